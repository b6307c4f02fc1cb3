// Shared by every instruction-set file of the native kernels and by ops.cpp: the includes, the helpers that do not
// depend on the instruction set, and the hook through which the compiled instruction-set file registers its
// implementations of the ops declared in ops.cpp. Built by skiplayer/model/optimize.py (native_kernels_available).
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace skiplayer {

// f(A{}) for the activation dtype A that t names (float32, bfloat16 or float16); any other dtype fails with `error`.
template <typename F>
decltype(auto) with_activation_dtype(at::ScalarType t, const char* error, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: TORCH_CHECK(false, error);
  }
}

// Registers the CPU implementations of the ops that ops.cpp declares; defined once, by the instruction-set file
// that is compiled in (avx2.cpp: AVX2 + FMA + F16C, which calls avx512.cpp's kernels where the CPU has AVX-512).
void register_cpu_kernels(torch::Library& m);
// Defines skiplayer::kernel_isa (which instruction set the block-quantized products use; avx2.cpp).
void register_kernel_isa(torch::Library& m);

}  // namespace skiplayer
