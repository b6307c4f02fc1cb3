// GGUF block-quantized weights (ggml's Q4_0, Q4_1, Q8_0), multiplied without expanding them to floats in memory.
// Plain C++ types only: the AVX-512 file includes this header under its own target pragma, and must not instantiate
// any torch or std inline function there (the linker could keep its AVX-512 copy for the whole library, which then
// fails on AVX2-only machines).
//
// The kernels read the file's blocks re-laid out per row (model/gguf_blocks.py, pack_blocks), told apart by the bytes
// per block of 32 weights:
//   Q4 (22 bytes): nb blocks of [fp32 d][16 bytes of nibbles], then nb fp16 m   w = d * q + m    (Q4_1; Q4_0 as m = -8d)
//   Q8 (36 bytes): nb blocks of [fp32 d][32 int8]                               w = d * q        (Q8_0)
// Byte j of the nibbles holds element j (low nibble) and element j + 16 (high nibble), as in the file.
// Why this layout: a d stored as fp32 in front of its block feeds the multiply as an embedded broadcast, and the
// m of a Q4 row enter once per row as sum_b m_b * (sum of x over block b), instead of two fp16 conversions and two
// broadcasts per block: the file's layout cost twice the vector instructions (512-bit ones issue on two ports only).
// Each output is sum_b (d_b q_b) . x_b + sum_b m_b xsum_b in fp32: d_b * q is exact, so these are the file's weights
// exactly, only summed in another order than ggml's own dequantize-then-multiply.
#pragma once

#include <cstdint>

namespace skiplayer {

enum BlockFormat : int { kQ4 = 22, kQ8 = 36 };  // bytes per block of 32 weights in the kernels' layout

// y[m * N + n] = sum_k x[m * K + k] w(n, k) (+ bias[n]) for input rows m < M and weight rows n0 <= n < n1; xsum (M,
// K / 32): the sums of x over each block of 32 columns (Q4 only). Every output is accumulated in the same order
// whatever M and the rows around it (batch invariance).
using QuantRowsFn = void (*)(int M, const float* x, const float* xsum, const uint8_t* w, int format,
                             const float* bias, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1);

// AVX-512 (F, BW, VL, DQ) + F16C: avx512.cpp. Up to kQuantRowsAvx512 input rows per call.
void quant_rows_avx512(int M, const float* x, const float* xsum, const uint8_t* w, int format, const float* bias,
                       float* y, int64_t K, int64_t N, int64_t n0, int64_t n1);
constexpr int kQuantRowsAvx512 = 8;

}  // namespace skiplayer
