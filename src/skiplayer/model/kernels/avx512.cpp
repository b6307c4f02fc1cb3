// AVX-512 kernels (F, BW, VL, DQ + F16C), compiled with a target pragma and called only where the CPU has them
// (run-time dispatch in avx2.cpp): products with GGUF block-quantized weights (qblocks.h), 16 lanes at a time, and a
// prompt's causal attention (attention.h).
// No torch header here: see qblocks.h for why.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma,avx2")
#include "attention.h"
#include "qblocks.h"

#include <algorithm>
#include <immintrin.h>

namespace skiplayer {
namespace {

// The 32 weights of one block without m, d * q, as two fp32 vectors: elements 0..15 and 16..31.
template <int FMT>
inline void block_weights(const uint8_t* blk, __m512& lo, __m512& hi) {
  const __m512 d = _mm512_set1_ps(load4<float>(blk));
  if constexpr (FMT == kQ6K) {  // elements 0..15 scaled by d0, 16..31 by d1
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 8)))), d);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 24)))),
                       _mm512_set1_ps(load4<float>(blk + 4)));
  } else if constexpr (FMT == kQ8) {
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
                 int64_t N, int64_t n0, bool stream) {
  const int64_t nb = K / 32, row_bytes = nb * FMT, step = block_step(FMT);
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 lo[R], hi[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + (n0 + r) * row_bytes + b * step;
      prefetch_weights(blk + 4096, stream);  // see amx.cpp: streams from DRAM
      block_weights<FMT>(blk, lo[r], hi[r]);
    }
    for (int m = 0; m < M; ++m) {
      const __m512 xl = _mm512_loadu_ps(x + m * K + 32 * b), xh = _mm512_loadu_ps(x + m * K + 32 * b + 16);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(hi[r], xh, _mm512_fmadd_ps(lo[r], xl, acc[r][m]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      if (block_has_m(FMT)) acc[r][m] = add_m_terms<FMT>(w + (n0 + r) * row_bytes + nb * 20, xsum + m * nb, nb, acc[r][m]);
      float s = _mm512_reduce_add_ps(acc[r][m]);
      if (bias) s += bias[n0 + r];
      y[m * N + n0 + r] = s;
    }
}

template <int FMT, int M>
void rows(const float* x, const float* xsum, const uint8_t* w, const float* bias, float* y, int64_t K, int64_t N,
          int64_t n0, int64_t n1, bool stream) {
  constexpr int R = M <= 2 ? 4 : 2;  // R * M accumulators + 2R weights <= 24 of the 32 registers
  int64_t n = n0;
  for (; n + R <= n1; n += R) tile<FMT, M, R>(x, xsum, w, bias, y, K, N, n, stream);
  for (; n < n1; ++n) tile<FMT, M, 1>(x, xsum, w, bias, y, K, N, n, stream);
}

template <int FMT>
void rows_any(int M, const float* x, const float* xsum, const uint8_t* w, const float* bias, float* y, int64_t K,
              int64_t N, int64_t n0, int64_t n1, bool stream) {
  switch (M) {
    case 1: return rows<FMT, 1>(x, xsum, w, bias, y, K, N, n0, n1, stream);
    case 2: return rows<FMT, 2>(x, xsum, w, bias, y, K, N, n0, n1, stream);
    case 3: return rows<FMT, 3>(x, xsum, w, bias, y, K, N, n0, n1, stream);
    case 4: return rows<FMT, 4>(x, xsum, w, bias, y, K, N, n0, n1, stream);
    case 5: return rows<FMT, 5>(x, xsum, w, bias, y, K, N, n0, n1, stream);
    case 6: return rows<FMT, 6>(x, xsum, w, bias, y, K, N, n0, n1, stream);
    case 7: return rows<FMT, 7>(x, xsum, w, bias, y, K, N, n0, n1, stream);
    default: return rows<FMT, 8>(x, xsum, w, bias, y, K, N, n0, n1, stream);
  }
}

}  // namespace

void quant_rows_avx512(int M, const float* x, const float* xsum, const uint8_t* w, int format, const float* bias,
                       float* y, int64_t K, int64_t N, int64_t n0, int64_t n1, bool stream) {
  if (format == kQ4) return rows_any<kQ4>(M, x, xsum, w, bias, y, K, N, n0, n1, stream);
  if (format == kQ4K) return rows_any<kQ4K>(M, x, xsum, w, bias, y, K, N, n0, n1, stream);
  if (format == kQ6K) return rows_any<kQ6K>(M, x, xsum, w, bias, y, K, N, n0, n1, stream);
  return rows_any<kQ8>(M, x, xsum, w, bias, y, K, N, n0, n1, stream);
}

// ---- A prompt's causal attention (attention.h). ----
namespace {

// exp(x) for x <= 0 (scores minus their row's max): avx2.cpp's exp8 on 16 lanes (same reduction and constants; each
// instruction-set file keeps its own copy), with 2^k by vscalefps.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, k);
}

// 16 values of a K or V row from element i, as fp32.
template <int KV>
inline __m512 load16(const void* base, int64_t i) {
  if constexpr (KV == 0) return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
  if constexpr (KV == 1) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Scores of 16 query rows against 16 keys at a time (one accumulator per row; kt holds the keys in the lanes).
inline void block_scores(const float* q, const float* kt, int64_t kbs, int64_t D, float scale, float* p, int64_t S) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t kb = 0; kb < kbs; ++kb) {
    __m512 acc[16];
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
    const float* kk = kt + kb * D * 16;
    for (int64_t d = 0; d < D; ++d) {
      const __m512 kd = _mm512_loadu_ps(kk + d * 16);
      for (int r = 0; r < 16; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * D + d]), kd, acc[r]);
    }
    for (int r = 0; r < 16; ++r) _mm512_storeu_ps(p + r * S + kb * 16, _mm512_mul_ps(acc[r], sc));
  }
}

// p[0, n) = exp(p - max), p[n, end) = 0; returns 1 / sum.
inline float softmax16(float* p, int64_t n, int64_t end) {
  __m512 mv = _mm512_set1_ps(-__builtin_inff());
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1);
    mv = _mm512_mask_max_ps(mv, k, mv, _mm512_maskz_loadu_ps(k, p + j));
  }
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
  __m512 sv = _mm512_setzero_ps();
  for (int64_t j = 0; j < end; j += 16) {
    const __mmask16 k = j >= n ? 0 : n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j), m)));
    _mm512_storeu_ps(p + j, e);
    sv = _mm512_add_ps(sv, e);
  }
  return 1.f / _mm512_reduce_add_ps(sv);
}

// softmax16 over keys [lo, n) of a row whose scores start at j0 (a multiple of 16, <= lo): p[j0, lo) and
// p[n, end) = 0. A prompt's sliding window (Gemma's local layers).
inline float softmax16_window(float* p, int64_t j0, int64_t lo, int64_t n, int64_t end) {
  auto keep = [&](int64_t j) {  // lanes j + i with lo <= j + i < n
    uint32_t k = n - j >= 16 ? 0xffffu : n - j <= 0 ? 0u : (1u << (n - j)) - 1;
    if (lo > j) k &= lo - j >= 16 ? 0u : ~((1u << (lo - j)) - 1);
    return __mmask16(k & 0xffffu);
  };
  __m512 mv = _mm512_set1_ps(-__builtin_inff());
  for (int64_t j = j0; j < n; j += 16) mv = _mm512_mask_max_ps(mv, keep(j), mv, _mm512_maskz_loadu_ps(keep(j), p + j));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
  __m512 sv = _mm512_setzero_ps();
  for (int64_t j = j0; j < end; j += 16) {
    const __m512 e = _mm512_maskz_mov_ps(keep(j), exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j), m)));
    _mm512_storeu_ps(p + j, e);
    sv = _mm512_add_ps(sv, e);
  }
  return 1.f / _mm512_reduce_add_ps(sv);
}

// out rows of 4 query rows (stride D) += p v over keys [j0, keys), 64 columns at a time, times their 1 / sum.
template <int KV>
inline void block_values(const float* p, int64_t S, const void* v, int64_t j0, int64_t keys, int64_t D,
                         const float* inv, int rows, float* out) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t j = j0; j < keys; ++j) {
      __m512 vv[4];
      for (int c = 0; c < 4; ++c) vv[c] = load16<KV>(v, j * D + d0 + 16 * c);
      for (int r = 0; r < 4; ++r) {
        const __m512 pj = _mm512_set1_ps(p[r * S + j]);
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(pj, vv[c], acc[r][c]);
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < 4; ++c)
        _mm512_storeu_ps(out + r * D + d0 + 16 * c, _mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r])));
  }
}

template <int KV>
void prefill_attention(const float* q, const void* k, const void* v, int64_t T, int64_t D, float scale,
                       int64_t window, float* out, float* scratch) {
  const int64_t nkb = (T + 15) / 16, S = nkb * 16;
  float* kt = scratch;      // (nkb, D, 16): the keys in the lanes, zeros past T
  float* p = kt + S * D;    // (16, S): one block of rows' scores, then weights
  alignas(64) float tmp[16];
  for (int64_t key = 0; key < S; ++key)
    for (int64_t d = 0; d < D; d += 16) {
      _mm512_store_ps(tmp, key < T ? load16<KV>(k, key * D + d) : _mm512_setzero_ps());
      for (int i = 0; i < 16; ++i) kt[((key / 16) * D + d + i) * 16 + key % 16] = tmp[i];
    }
  for (int64_t r0 = 0; r0 < T; r0 += 16) {
    const int64_t rows = T - r0 < 16 ? T - r0 : 16, keys = r0 + rows;  // row r0 + r sees keys 0..r0 + r
    const int64_t end = (keys + 15) / 16 * 16;
    // with a window, row r0 + r sees keys r0 + r - window + 1 .. r0 + r: the block's scores start at j0
    const int64_t j0 = window > 0 && r0 >= window ? (r0 - window + 1) / 16 * 16 : 0;
    block_scores(q + r0 * D, kt + j0 * D, (end - j0) / 16, D, scale, p + j0, S);
    float inv[16] = {};
    for (int64_t r = 0; r < 16; ++r) {
      const int64_t n = r < rows ? r0 + r + 1 : 0;
      inv[r] = window > 0 ? softmax16_window(p + r * S, j0, n > window ? n - window : 0, n, end)
                          : softmax16(p + r * S, n, end);
    }
    for (int r = 0; r < rows; r += 4)
      block_values<KV>(p + r * S, S, v, j0, keys, D, inv + r, static_cast<int>(rows - r < 4 ? rows - r : 4),
                       out + (r0 + r) * D);
  }
}

// ---- Decoding attention (attention.h): rows of one head after a prompt. ----

// Lane i = the sum of a[i]'s 16 lanes, for every i by the same tree whatever the other accumulators hold:
// ((l0 + l2) + (l1 + l3)) within each 128-bit chunk, then (c0 + c1) + (c2 + c3). A key's score therefore does not
// depend on its place in a tile of keys, which is what makes a row's result independent of the block around it.
inline __m512 sum16x16(const __m512 (&a)[16]) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

// p[0, nk) = scale * q . key_i for the nk <= 16 keys of a tile, key i at key(i) (fp32 rows of D, or cache rows
// converted on the fly): one FMA chain per key over 16-column chunks in order, then sum16x16.
template <typename Key>
inline void score_tile(const float* q, int nk, int64_t D, __m512 sc, float* p, const Key& key) {
  __m512 a[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
  if (nk == 16) {  // a whole tile: no bound checks, the 16 chains stay in registers
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 qd = _mm512_loadu_ps(q + d);
      for (int i = 0; i < 16; ++i) a[i] = _mm512_fmadd_ps(qd, key(i, d), a[i]);
    }
  } else {
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 qd = _mm512_loadu_ps(q + d);
      for (int i = 0; i < nk; ++i) a[i] = _mm512_fmadd_ps(qd, key(i, d), a[i]);
    }
  }
  const __mmask16 keep = nk >= 16 ? __mmask16(0xffff) : __mmask16((1u << nk) - 1);
  _mm512_mask_storeu_ps(p, keep, _mm512_mul_ps(sum16x16(a), sc));
}

// Sums of p[r * S + j - j0] v_j over keys j0 <= j < j1 for rows r < NR, 64 columns at a time, in two sets by the
// parity of j (acc rows of 2D: even keys' sums, then odd keys'): with one row, four chains over the keys waited on
// the FMA latency; two sets make eight. Each V row is converted once for all NR rows, and per row, column and set
// the sum runs over the keys in order, whatever NR and wherever the keys' range starts or ends.
template <int KV, int NR>
inline void value_rows(const float* p, int64_t S, const void* v, int64_t j0, int64_t j1, int64_t D, float* acc2) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    __m512 acc[NR][2][4];
    for (int r = 0; r < NR; ++r)
      for (int e = 0; e < 2; ++e)
        for (int c = 0; c < 4; ++c) acc[r][e][c] = _mm512_loadu_ps(acc2 + (2 * r + e) * D + d0 + 16 * c);
    auto add = [&](int64_t j, int e) {
      __m512 vv[4];
      for (int c = 0; c < 4; ++c) vv[c] = load16<KV>(v, j * D + d0 + 16 * c);
      for (int r = 0; r < NR; ++r) {
        const __m512 pj = _mm512_set1_ps(p[r * S + j - j0]);
        for (int c = 0; c < 4; ++c) acc[r][e][c] = _mm512_fmadd_ps(pj, vv[c], acc[r][e][c]);
      }
    };
    int64_t j = j0;
    if (j < j1 && (j & 1)) add(j++, 1);
    for (; j + 1 < j1; j += 2) {
      add(j, 0);
      add(j + 1, 1);
    }
    if (j < j1) add(j, 0);
    for (int r = 0; r < NR; ++r)
      for (int e = 0; e < 2; ++e)
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc2 + (2 * r + e) * D + d0 + 16 * c, acc[r][e][c]);
  }
}

template <int KV>
void value_rows_any(int nr, const float* p, int64_t S, const void* v, int64_t j0, int64_t j1, int64_t D, float* acc2) {
  switch (nr) {
    case 1: return value_rows<KV, 1>(p, S, v, j0, j1, D, acc2);
    case 2: return value_rows<KV, 2>(p, S, v, j0, j1, D, acc2);
    default: return value_rows<KV, 3>(p, S, v, j0, j1, D, acc2);
  }
}

template <int KV>
void decode_attention(const float* q, int64_t R, int64_t T, const void* k, const void* v, int64_t D, float scale,
                      int64_t lo, int64_t c1, const int64_t* extra, int64_t W, float* out, float* scratch) {
  const int64_t S = decode_attention_stride(c1 - lo, extra ? W : T);
  float* p = scratch;            // (R, S): row r's scores of keys lo.., then its weights
  float* kb = p + R * S;         // (16, D): a tile of keys in fp32, shared by all rows
  float* inv = kb + 16 * D;      // (R): 1 / each row's sum of weights
  float* acc2 = inv + R;         // (R, 2, D): each row's weighted sums over even and odd keys
  const __m512 sc = _mm512_set1_ps(scale);
  auto n_extra = [&](int64_t r) {  // row r is block position r % T of one of the heads
    if (extra == nullptr) return r % T;
    int64_t n = 0;
    while (n < W && extra[(r % T) * W + n] >= 0) ++n;
    return n;
  };
  auto slot = [&](int64_t r, int64_t m) { return extra == nullptr ? c1 + m : extra[(r % T) * W + m]; };
  for (int64_t j0 = lo; j0 < c1; j0 += 16) {  // the keys every row sees
    const int nk = static_cast<int>(std::min<int64_t>(16, c1 - j0));
    if (R == 1) {  // one row: convert as it reads (the same values: fp16 and bf16 widen exactly)
      score_tile(q, nk, D, sc, p + j0 - lo, [&](int i, int64_t d) { return load16<KV>(k, (j0 + i) * D + d); });
      continue;
    }
    for (int i = 0; i < nk; ++i)
      for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(kb + i * D + d, load16<KV>(k, (j0 + i) * D + d));
    for (int64_t r = 0; r < R; ++r)
      score_tile(q + r * D, nk, D, sc, p + r * S + j0 - lo,
                 [&](int i, int64_t d) { return _mm512_loadu_ps(kb + i * D + d); });
  }
  for (int64_t r = 0; r < R; ++r) {  // each row's own keys, at logical places c1, c1 + 1, ...
    const int64_t n = n_extra(r);
    for (int64_t m0 = 0; m0 < n; m0 += 16) {
      const int nk = static_cast<int>(std::min<int64_t>(16, n - m0));
      score_tile(q + r * D, nk, D, sc, p + r * S + c1 - lo + m0,
                 [&](int i, int64_t d) { return load16<KV>(k, slot(r, m0 + i) * D + d); });
    }
    inv[r] = softmax16(p + r * S, c1 - lo + n, (c1 - lo + n + 15) / 16 * 16);
  }
  std::fill(acc2, acc2 + 2 * R * D, 0.f);
  for (int64_t r0 = 0; r0 < R; r0 += 3) {
    const int nr = static_cast<int>(std::min<int64_t>(3, R - r0));
    value_rows_any<KV>(nr, p + r0 * S, S, v, lo, c1, D, acc2 + 2 * r0 * D);
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = n_extra(r);
    for (int64_t m = 0; m < n; ++m)  // key c1 + m is V row slot(r, m): offset the base so value_rows reads it
      value_rows<KV, 1>(p + r * S + c1 - lo + m, S, static_cast<const char*>(v) +
                        (slot(r, m) - (c1 + m)) * D * (KV == 0 ? 4 : 2), c1 + m, c1 + m + 1, D, acc2 + 2 * r * D);
    const __m512 iv = _mm512_set1_ps(inv[r]);
    const float *even = acc2 + 2 * r * D, *odd = even + D;
    for (int64_t d = 0; d < D; d += 16)
      _mm512_storeu_ps(out + r * D + d, _mm512_mul_ps(_mm512_add_ps(_mm512_loadu_ps(even + d), _mm512_loadu_ps(odd + d)), iv));
  }
}

}  // namespace

int64_t decode_attention_stride(int64_t shared, int64_t most_extra) { return (shared + most_extra + 31) / 16 * 16; }

size_t decode_attention_scratch(int64_t R, int64_t shared, int64_t most_extra, int64_t D) {
  return static_cast<size_t>(R * decode_attention_stride(shared, most_extra) + 16 * D + R + 2 * R * D);
}

void decode_attention_avx512(const float* q, int64_t R, int64_t T, const void* k, const void* v, int kv_dtype,
                             int64_t D, float scale, int64_t lo, int64_t c1, const int64_t* extra, int64_t W,
                             float* out, float* scratch) {
  if (kv_dtype == 0) return decode_attention<0>(q, R, T, k, v, D, scale, lo, c1, extra, W, out, scratch);
  if (kv_dtype == 1) return decode_attention<1>(q, R, T, k, v, D, scale, lo, c1, extra, W, out, scratch);
  return decode_attention<2>(q, R, T, k, v, D, scale, lo, c1, extra, W, out, scratch);
}

size_t prefill_attention_scratch(int64_t T, int64_t D) {
  const int64_t S = (T + 15) / 16 * 16;
  return static_cast<size_t>(S * D + 16 * S);
}

void prefill_attention_avx512(const float* q, const void* k, const void* v, int kv_dtype, int64_t T, int64_t D,
                              int64_t window,
                              float scale, float* out, float* scratch) {
  if (kv_dtype == 0) return prefill_attention<0>(q, k, v, T, D, scale, window, out, scratch);
  if (kv_dtype == 1) return prefill_attention<1>(q, k, v, T, D, scale, window, out, scratch);
  return prefill_attention<2>(q, k, v, T, D, scale, window, out, scratch);
}

}  // namespace skiplayer
