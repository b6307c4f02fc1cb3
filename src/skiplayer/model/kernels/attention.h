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

// out (T, D) fp32 = softmax(scale q k^T) v, row t over keys 0..t (with a sliding `window` > 0, keys
// t - window + 1..t only), for one head: q ((T + 15) / 16 * 16, D) fp32 with RoPE applied and zero rows past T; k, v
// (T, D) of its KV head in `kv_dtype` (0 fp32, 1 fp16, 2 bf16). D % 64 == 0.
void prefill_attention_avx512(const float* q, const void* k, const void* v, int kv_dtype, int64_t T, int64_t D,
                              int64_t window, float scale, float* out, float* scratch);

// Decoding attention (AVX-512, D % 64 == 0): every block after a prompt, one-token steps, verification chains and
// token trees alike, so that a row's result is bit-identical whichever of them computes it. The one-row loops
// (avx2.cpp) sum each key's score in 8 lanes and convert every K and V vector once per row; here a score is 16-lane
// FMAs and one fixed reduction tree per key (sum16x16), and each tile of 16 keys and each V row is converted once for
// all rows of a call: the query heads that share a KV head go through together, so their K and V are read once.
// q (R, D) fp32 with RoPE applied, R = heads x T block positions (row r is position r % T); k, v (L, D) the cache
// rows of the KV head in `kv_dtype`. Row r's keys, in order: cache keys [lo, c1), then its own: the slots
// extra[(r % T) * W + m] (-1 padded), or with extra == nullptr the slots c1 .. c1 + r % T - 1 (a chain block's
// earlier positions). out (R, D) fp32.
int64_t decode_attention_stride(int64_t shared, int64_t most_extra);
size_t decode_attention_scratch(int64_t R, int64_t shared, int64_t most_extra, int64_t D);
void decode_attention_avx512(const float* q, int64_t R, int64_t T, const void* k, const void* v, int kv_dtype,
                             int64_t D, float scale, int64_t lo, int64_t c1, const int64_t* extra, int64_t W,
                             float* out, float* scratch);

}  // namespace skiplayer
