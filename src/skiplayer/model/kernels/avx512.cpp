// AVX-512 kernels (F, BW, VL, DQ + F16C), compiled with a target pragma and called only where the CPU has them
// (run-time dispatch in avx2.cpp). Today: products with GGUF block-quantized weights (qblocks.h), 16 lanes at a time.
// No torch header here: see qblocks.h for why.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma,avx2")
#include "qblocks.h"

#include <immintrin.h>

namespace skiplayer {
namespace {

// The 32 weights of one block without m, d * q, as two fp32 vectors: elements 0..15 and 16..31.
template <int FMT>
inline void block_weights(const uint8_t* blk, __m512& lo, __m512& hi) {
  const __m512 d = _mm512_set1_ps(load4<float>(blk));
  if constexpr (FMT == kQ8) {
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 4)))), d);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 20)))), d);
  } else {
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(blk + 4)));
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(15))), d);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), d);
  }
}

// acc += m[b] * xsum[b] lane-wise over the nb m of a Q4 row (fp16; fp32 in Q4K), 16 blocks at a time (masked
// tail): the m terms join the block sums before the one horizontal sum.
template <int FMT>
inline __m512 add_m_terms(const uint8_t* m, const float* xsum, int64_t nb, __m512 acc) {
  for (int64_t b = 0; b < nb; b += 16) {
    const __mmask16 k = nb - b >= 16 ? __mmask16(0xffff) : __mmask16((1u << (nb - b)) - 1);
    const __m512 mv = FMT == kQ4K ? _mm512_maskz_loadu_ps(k, m + 4 * b)
                                  : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, m + 2 * b));
    acc = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k, xsum + b), acc);
  }
  return acc;
}

// M input rows against R weight rows n0..n0+R-1: one accumulator per output, two FMAs per block in a fixed order.
template <int FMT, int M, int R>
inline void tile(const float* x, const float* xsum, const uint8_t* w, const float* bias, float* y, int64_t K,
                 int64_t N, int64_t n0) {
  const int64_t nb = K / 32, row_bytes = nb * FMT, step = FMT == kQ8 ? 36 : 20;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 lo[R], hi[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + (n0 + r) * row_bytes + b * step;
      _mm_prefetch(reinterpret_cast<const char*>(blk) + 4096, _MM_HINT_T1);  // see amx.cpp: streams from DRAM
      block_weights<FMT>(blk, lo[r], hi[r]);
    }
    for (int m = 0; m < M; ++m) {
      const __m512 xl = _mm512_loadu_ps(x + m * K + 32 * b), xh = _mm512_loadu_ps(x + m * K + 32 * b + 16);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(hi[r], xh, _mm512_fmadd_ps(lo[r], xl, acc[r][m]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      if (FMT != kQ8) acc[r][m] = add_m_terms<FMT>(w + (n0 + r) * row_bytes + nb * 20, xsum + m * nb, nb, acc[r][m]);
      float s = _mm512_reduce_add_ps(acc[r][m]);
      if (bias) s += bias[n0 + r];
      y[m * N + n0 + r] = s;
    }
}

template <int FMT, int M>
void rows(const float* x, const float* xsum, const uint8_t* w, const float* bias, float* y, int64_t K, int64_t N,
          int64_t n0, int64_t n1) {
  constexpr int R = M <= 2 ? 4 : 2;  // R * M accumulators + 2R weights <= 24 of the 32 registers
  int64_t n = n0;
  for (; n + R <= n1; n += R) tile<FMT, M, R>(x, xsum, w, bias, y, K, N, n);
  for (; n < n1; ++n) tile<FMT, M, 1>(x, xsum, w, bias, y, K, N, n);
}

template <int FMT>
void rows_any(int M, const float* x, const float* xsum, const uint8_t* w, const float* bias, float* y, int64_t K,
              int64_t N, int64_t n0, int64_t n1) {
  switch (M) {
    case 1: return rows<FMT, 1>(x, xsum, w, bias, y, K, N, n0, n1);
    case 2: return rows<FMT, 2>(x, xsum, w, bias, y, K, N, n0, n1);
    case 3: return rows<FMT, 3>(x, xsum, w, bias, y, K, N, n0, n1);
    case 4: return rows<FMT, 4>(x, xsum, w, bias, y, K, N, n0, n1);
    case 5: return rows<FMT, 5>(x, xsum, w, bias, y, K, N, n0, n1);
    case 6: return rows<FMT, 6>(x, xsum, w, bias, y, K, N, n0, n1);
    case 7: return rows<FMT, 7>(x, xsum, w, bias, y, K, N, n0, n1);
    default: return rows<FMT, 8>(x, xsum, w, bias, y, K, N, n0, n1);
  }
}

}  // namespace

void quant_rows_avx512(int M, const float* x, const float* xsum, const uint8_t* w, int format, const float* bias,
                       float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  if (format == kQ4) return rows_any<kQ4>(M, x, xsum, w, bias, y, K, N, n0, n1);
  if (format == kQ4K) return rows_any<kQ4K>(M, x, xsum, w, bias, y, K, N, n0, n1);
  return rows_any<kQ8>(M, x, xsum, w, bias, y, K, N, n0, n1);
}

}  // namespace skiplayer
