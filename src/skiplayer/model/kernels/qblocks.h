// GGUF block-quantized weights (ggml's Q4_0, Q4_1, Q8_0), multiplied without expanding them to floats in memory.
// Plain C++ types only: the AVX-512 file includes this header under its own target pragma, and must not instantiate
// any torch or std inline function there (the linker could keep its AVX-512 copy for the whole library, which then
// fails on AVX2-only machines).
//
// The kernels read the file's blocks re-laid out (model/gguf_blocks.py, pack_blocks), in one of two layouts told
// apart by the bytes per block of 32 weights:
// Rows (AVX2 / AVX-512 kernels), per weight row:
//   Q4 (22 bytes): nb blocks of [fp32 d][16 bytes of nibbles], then nb fp16 m   w = d * q + m    (Q4_1; Q4_0 as m = -8d)
//   Q8 (36 bytes): nb blocks of [fp32 d][32 int8]                               w = d * q        (Q8_0, Q5_0)
//   Q4K (24 bytes): as Q4 with nb fp32 m                                        w = d * q + m    (Q4_K)
//   (Q4_K's sub-block d = d * scale and m = -dmin * min carry up to 17 significant bits: exact in fp32, not fp16.)
//   Q6K (40 bytes): nb blocks of [fp32 d0][fp32 d1][32 int8]                w = d0 * q, d1 * q (Q6_K)
//   (Q6_K's 16-weight sub-blocks: d0 = d * scale of elements 0..15, d1 of 16..31, q = the 6-bit quant - 32;
//   d0 * q carries at most 11 + 7 + 5 bits: exact in fp32, as ggml computes it.)
//   Byte j of the nibbles holds element j (low nibble) and element j + 16 (high nibble), as in the file.
//   A d stored as fp32 in front of its block feeds the multiply as an embedded broadcast, and the m of a Q4 row
//   enter once per row as sum_b m_b * (sum of x over block b): the file's layout (two fp16 conversions and two
//   broadcasts per block) cost twice the vector instructions, and 512-bit ones issue on two ports only.
// Tiles (AMX and VNNI kernels, amx.cpp and avx512_vnni.cpp), per group of 16 weight rows (N % 16 == 0) and block:
//   Q4 (20 bytes): [16 fp16 d][16 fp16 m][256 bytes: the 32 x 16 quants in the tiles' order, two per byte]
//   Q8 (34 bytes): [16 fp16 d][512 int8 in the tiles' order]
//   The tiles' order is B[k / 4][4 n + k % 4] (k < 32 the column in the block, n < 16 the row in the group); in Q4,
//   byte i of the 64-byte chunk t holds B row 2t (low nibble) and 2t + 1 (high nibble) at position i.
// Rows kernels compute sum_b (d_b q_b) . x_b + sum_b m_b xsum_b in fp32 with the file's exact weights (d * q is
// exact); the tiles kernels split x in int8 parts first (amx.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <xmmintrin.h>

namespace skiplayer {

// The 4 bytes at p as a T (an fp32 d, 4 int8 of x): an unaligned load. `static`: each file's own copy, compiled for
// its own target (see above).
template <typename T>
static inline T load4(const uint8_t* p) {
  static_assert(sizeof(T) == 4, "load4 reads 4 bytes");
  T v;
  __builtin_memcpy(&v, p, 4);
  return v;
}

enum BlockFormat : int { kQ4 = 22, kQ8 = 36, kQ4K = 24, kQ6K = 40, kQ4Tiles = 20, kQ8Tiles = 34 };  // bytes per 32

// Rows layout: bytes from one block to the next (a Q4 row's m follow its blocks), and whether a row has m terms.
static constexpr int block_step(int format) { return format == kQ8 ? 36 : format == kQ6K ? 40 : 20; }
static constexpr bool block_has_m(int format) { return format == kQ4 || format == kQ4K; }

// Software prefetch of weights ahead of a product's loads. `stream`: the product reads its weights once (all its input
// rows in one chunk: decoding passes), so they go non-temporally and the ~100 MB a token streams does not evict what
// the caches hold besides (the K/V cache, activations, the interpreter): decoding and self-speculation 4-11% faster on
// Zen 5 in situ (Gemma 3 270M 7-29%). Otherwise (prompts, and weights kept cached: avx2.cpp keep_weights_cached) into
// L2: the next chunk of rows, or the next draft step, reads the same weights.
inline void prefetch_weights(const void* p, bool stream) {
  if (stream) _mm_prefetch(static_cast<const char*>(p), _MM_HINT_NTA);
  else _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
}

// y[m * N + n] = sum_k x[m * K + k] w(n, k) (+ bias[n]) for input rows m < M and weight rows n0 <= n < n1; xsum (M,
// K / 32): the sums of x over each block of 32 columns (Q4 and Q4K only). Every output is accumulated in the same order
// whatever M and the rows around it (batch invariance). The quant_rows_* functions below compute this.
// AVX-512 (F, BW, VL, DQ) + F16C: avx512.cpp. Up to kQuantRowsAvx512 input rows per call; `stream`: prefetch_weights.
void quant_rows_avx512(int M, const float* x, const float* xsum, const uint8_t* w, int format, const float* bias,
                       float* y, int64_t K, int64_t N, int64_t n0, int64_t n1, bool stream);
constexpr int kQuantRowsAvx512 = 8;

// Tiles layout, on input rows split in int8 parts per block (amx.cpp says how): pack_int8_parts prepares them once
// per product for M <= 8 rows (dx: (K / 32, 16) block scales; xsum_t: (K / 32, 16) block sums of x, both
// block-major); then weight rows n0..n1-1 (groups of 16) against them on AMX tiles (amx.cpp) or with AVX-512 VNNI
// (avx512_vnni.cpp, which also holds pack_int8_parts): the same arithmetic, bit for bit. `parts`: 2 (a and l, the
// default), or 1 (a alone, llama.cpp's 8-bit activations: half the integer products; VNNI kernel only). With one
// part the m terms of Q4 take the block sums of the int8 x (xsum_a), not of x: the product is then exactly that of
// the file's weights with the 8-bit x, whose errors in d q x and m x cancel as in llama.cpp (with x's own sums the
// whole model's logits erred twice as much).
constexpr int kQuantRowsTiles = 8;
size_t int8_parts_bytes(int64_t M, int64_t K, int parts);
void pack_int8_parts(int M, const float* x, int64_t K, uint8_t* a, float* dx, int parts, bool offset,
                     float* xsum_a);
bool amx_tiles_granted();
void quant_rows_amx(int M, const uint8_t* a, const float* dx, const float* xsum_t, const uint8_t* w, int format,
                    const float* bias, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1);
void quant_rows_vnni(int M, const uint8_t* a, const float* dx, const float* xsum_t, const uint8_t* w, int format,
                     int parts, const float* bias, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1,
                     bool stream);

}  // namespace skiplayer
