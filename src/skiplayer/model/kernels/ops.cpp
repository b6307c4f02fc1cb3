// The skiplayer ops (torch.ops.skiplayer.*): their schemas, and the CPU implementations of the instruction-set file
// that is compiled in (register_cpu_kernels, common.h). Shapes for meta tensors / torch.compile: optimize.py.
#include "common.h"

TORCH_LIBRARY(skiplayer, m) {
  // prompt: x is a prompt block (never a verification pass), free of batch invariance: Q4 rows with 8-bit x take
  // the prompt kernel (avx2.cpp). decoder_layers sets it itself for blocks at position 0 of 8+ rows.
  m.def("small_linear(Tensor x, Tensor w, Tensor? scale, Tensor? bias, bool float_out, bool packed=False, "
        "bool prompt=False) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("gelu_tanh_mul(Tensor gate_up) -> Tensor");
  m.def("rope_cache_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) kc, Tensor(b!) vc, int start, "
        "int n_heads, int n_kv_heads, bool attend, Tensor? tree=None, int window=0) -> Tensor");
  m.def("decoder_layers(Tensor x, Tensor[] weights, Tensor?[] scales, Tensor?[] qkv_bias, Tensor cos, Tensor sin, "
        "Tensor(a!) k, Tensor(b!) v, int first, int start, int n_heads, int n_kv_heads, float eps, bool packed, "
        "int[] keep, Tensor? tree, Tensor[] layer_norms, int[] windows, Tensor? cos_local, Tensor? sin_local, "
        "bool gelu) -> Tensor[]");
  skiplayer::register_kernel_isa(m);
}
TORCH_LIBRARY_IMPL(skiplayer, CPU, m) { skiplayer::register_cpu_kernels(m); }
