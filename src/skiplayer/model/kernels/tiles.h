// What the two kernels of the tiles layout (amx.cpp, avx512_vnni.cpp) share so that they agree bit for bit: the fp32
// scaling of a block's exact int32 sums, and the store of a group's outputs. Included after each file's target
// pragma; `static` gives each file its own copy, compiled for that file's instruction set (no torch header here:
// qblocks.h says why).
#pragma once

#include <cstdint>
#include <immintrin.h>

namespace skiplayer {

// acc + d dx (C_a + C_l / 254) (+ m xsum in Q4) for one input row, one block of 32 columns and 16 weight rows;
// ca and cl: the int32 sums with 128 qsum taken off (amx.cpp explains the parts).
static inline __m512 add_block(__m512 acc, __m512i ca, __m512i cl, __m512 d, float dx, __m512 mv, float xsum, bool q4) {
  const __m512 s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(cl), _mm512_set1_ps(1.f / 254.f), _mm512_cvtepi32_ps(ca));
  acc = _mm512_fmadd_ps(s, _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc);
  return q4 ? _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum), acc) : acc;
}

// The same with x as one int8 part (llama.cpp's 8-bit activations): acc + d dx C_a (+ m xsum in Q4).
static inline __m512 add_block_int8(__m512 acc, __m512i ca, __m512 d, float dx, __m512 mv, float xsum, bool q4) {
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ca), _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc);
  return q4 ? _mm512_fmadd_ps(mv, _mm512_set1_ps(xsum), acc) : acc;
}

// y[m * N + n] = acc[m] lane n - n0 (+ bias[n]) for the group's weight rows n0 <= n < min(n0 + 16, N).
static inline void store_group(const __m512* acc, int M, const float* bias, float* y, int64_t N, int64_t n0) {
  const int64_t rows = N - n0 < 16 ? N - n0 : 16;
  const __mmask16 keep = static_cast<__mmask16>((1u << rows) - 1);
  for (int m = 0; m < M; ++m) {
    __m512 v = acc[m];
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(keep, bias + n0));
    _mm512_mask_storeu_ps(y + m * N + n0, keep, v);
  }
}

}  // namespace skiplayer
