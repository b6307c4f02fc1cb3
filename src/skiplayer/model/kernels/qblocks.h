// GGUF block-quantized weights as the file stores them (ggml's Q4_0, Q4_1, Q8_0), multiplied without expanding them
// to floats in memory. Plain C++ types only: the AVX-512 file includes this header under its own target pragma,
// and must not instantiate any torch or std inline function there (the linker could keep its AVX-512 copy for
// the whole library, which then fails on AVX2-only machines).
//
// A weight (N, K) is N rows of K / 32 blocks; the format is told by the bytes per block:
//   Q4_0 (18 bytes): fp16 d, 16 bytes of nibbles          w = d * (q - 8)
//   Q4_1 (20 bytes): fp16 d, fp16 m, 16 bytes of nibbles  w = d * q + m
//   Q8_0 (34 bytes): fp16 d, 32 int8                      w = d * q
// Byte j of the nibbles holds element j (low nibble) and element j + 16 (high nibble).
// Each weight is dequantized in registers to the fp32 value d * q + m (exact: d * q needs at most 15 bits and m
// is added with one rounding, as ggml's own dequantization does), then multiplied with fp32 activations.
#pragma once

#include <cstdint>

namespace skiplayer {

enum BlockFormat : int { kQ4_0 = 18, kQ4_1 = 20, kQ8_0 = 34 };  // bytes per block of 32 weights

// y[m * N + n] = sum_k x[m * K + k] w(n, k) (+ bias[n]) for input rows m < M and weight rows n0 <= n < n1.
// Every output is accumulated in the same order whatever M and the rows around it (batch invariance).
using QuantRowsFn = void (*)(int M, const float* x, const uint8_t* w, int format, const float* bias, float* y,
                             int64_t K, int64_t N, int64_t n0, int64_t n1);

// AVX-512 (F, BW, VL, DQ) + F16C: avx512.cpp. Up to kQuantRowsAvx512 input rows per call.
void quant_rows_avx512(int M, const float* x, const uint8_t* w, int format, const float* bias, float* y, int64_t K,
                       int64_t N, int64_t n0, int64_t n1);
constexpr int kQuantRowsAvx512 = 8;

}  // namespace skiplayer
