// AVX-512 kernels (F, BW, VL, DQ + F16C), compiled with a target pragma and called only where the CPU has them
// (run-time dispatch in avx2.cpp). Today: products with GGUF block-quantized weights (qblocks.h), 16 lanes at a time.
// No torch header here: see qblocks.h for why.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma,avx2")
#include "qblocks.h"

#include <immintrin.h>

namespace skiplayer {
namespace {

inline float half_at(const uint8_t* p) {
  uint16_t h;
  __builtin_memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// The 32 weights of one block as two fp32 vectors: elements 0..15 and 16..31.
template <int FMT>
inline void block_weights(const uint8_t* blk, __m512& lo, __m512& hi) {
  const float d = half_at(blk);
  if constexpr (FMT == kQ8_0) {
    const __m512 dv = _mm512_set1_ps(d);
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 2)))), dv);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 18)))), dv);
  } else {
    const float m = FMT == kQ4_1 ? half_at(blk + 2) : -8.f * d;  // Q4_0: d * (q - 8) = d * q - 8d, both exact
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(blk + (FMT == kQ4_1 ? 4 : 2))));
    const __m512 dv = _mm512_set1_ps(d), mv = _mm512_set1_ps(m);
    lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(15))), dv, mv);
    hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), dv, mv);
  }
}

// M input rows against R weight rows n0..n0+R-1: one accumulator per output, two FMAs per block in a fixed order.
template <int FMT, int M, int R>
inline void tile(const float* x, const uint8_t* w, const float* bias, float* y, int64_t K, int64_t N, int64_t n0) {
  const int64_t nb = K / 32, row_bytes = nb * FMT;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 lo[R], hi[R];
    for (int r = 0; r < R; ++r) block_weights<FMT>(w + (n0 + r) * row_bytes + b * FMT, lo[r], hi[r]);
    for (int m = 0; m < M; ++m) {
      const __m512 xl = _mm512_loadu_ps(x + m * K + 32 * b), xh = _mm512_loadu_ps(x + m * K + 32 * b + 16);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(hi[r], xh, _mm512_fmadd_ps(lo[r], xl, acc[r][m]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float s = _mm512_reduce_add_ps(acc[r][m]);
      if (bias) s += bias[n0 + r];
      y[m * N + n0 + r] = s;
    }
}

template <int FMT, int M>
void rows(const float* x, const uint8_t* w, const float* bias, float* y, int64_t K, int64_t N, int64_t n0,
          int64_t n1) {
  constexpr int R = M <= 2 ? 4 : 2;  // R * M accumulators + 2R weights <= 24 of the 32 registers
  int64_t n = n0;
  for (; n + R <= n1; n += R) tile<FMT, M, R>(x, w, bias, y, K, N, n);
  for (; n < n1; ++n) tile<FMT, M, 1>(x, w, bias, y, K, N, n);
}

template <int FMT>
void rows_any(int M, const float* x, const uint8_t* w, const float* bias, float* y, int64_t K, int64_t N,
              int64_t n0, int64_t n1) {
  switch (M) {
    case 1: return rows<FMT, 1>(x, w, bias, y, K, N, n0, n1);
    case 2: return rows<FMT, 2>(x, w, bias, y, K, N, n0, n1);
    case 3: return rows<FMT, 3>(x, w, bias, y, K, N, n0, n1);
    case 4: return rows<FMT, 4>(x, w, bias, y, K, N, n0, n1);
    case 5: return rows<FMT, 5>(x, w, bias, y, K, N, n0, n1);
    case 6: return rows<FMT, 6>(x, w, bias, y, K, N, n0, n1);
    case 7: return rows<FMT, 7>(x, w, bias, y, K, N, n0, n1);
    default: return rows<FMT, 8>(x, w, bias, y, K, N, n0, n1);
  }
}

}  // namespace

void quant_rows_avx512(int M, const float* x, const uint8_t* w, int format, const float* bias, float* y, int64_t K,
                       int64_t N, int64_t n0, int64_t n1) {
  switch (format) {
    case kQ4_0: return rows_any<kQ4_0>(M, x, w, bias, y, K, N, n0, n1);
    case kQ4_1: return rows_any<kQ4_1>(M, x, w, bias, y, K, N, n0, n1);
    default: return rows_any<kQ8_0>(M, x, w, bias, y, K, N, n0, n1);
  }
}

}  // namespace skiplayer
