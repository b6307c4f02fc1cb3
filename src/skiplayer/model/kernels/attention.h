// A prompt's causal attention on AVX-512 (avx512.cpp), called by avx2.cpp's rope_cache_attention for blocks that
// start at position 0 where the CPU has AVX-512. Plain C++ types only (qblocks.h says why).
//
// Why: the one-row loops (avx2.cpp) take a key's score as 8-lane FMAs over its D values and a horizontal sum, so a
// 613-token prompt's attention cost 79 ms of a ~300 ms prefill on Zen 5. Here the keys sit in the lanes (K transposed
// once per head: 16 keys per vector), so a score needs no horizontal sum, and 16 query rows share each K and V
// vector. A prompt's rows need not match one-token steps bit for bit (verification passes always follow a prompt,
// so they never start at 0, and both strategies run the same prefill); the result is deterministic.
#pragma once

#include <cstddef>
#include <cstdint>

namespace skiplayer {

constexpr int64_t kPrefillAttentionRows = 64;  // shorter prompts keep the one-row loops

// Floats of scratch prefill_attention_avx512 needs for T positions of head size D.
size_t prefill_attention_scratch(int64_t T, int64_t D);

// out (T, D) fp32 = softmax(scale q k^T) v, row t over keys 0..t, for one head: q ((T + 15) / 16 * 16, D) fp32 with
// RoPE applied and zero rows past T; k, v (T, D) of its KV head in `kv_dtype` (0 fp32, 1 fp16, 2 bf16). D % 64 == 0.
void prefill_attention_avx512(const float* q, const void* k, const void* v, int kv_dtype, int64_t T, int64_t D,
                              float scale, float* out, float* scratch);

}  // namespace skiplayer
