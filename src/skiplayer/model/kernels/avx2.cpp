// The native kernels for AVX2 + FMA + F16C (built with -mavx2 -mfma -mf16c): small-batch products (small_linear),
// RMSNorm, silu * up, RoPE + KV-cache write + attention, and whole decoder layers. Why they exist and what they
// guarantee (batch invariance, bit-identical to the Python model): skiplayer/model/optimize.py.
#include "common.h"
#include "attention.h"
#include "qblocks.h"

#include <immintrin.h>
#include <memory>
#include <numeric>
#include <omp.h>
#include <thread>

namespace skiplayer {
namespace {


inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {  // bf16 -> fp32 is a 16-bit shift
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(at::Half* p, __m256 v) {  // round to nearest even, as c10::Half does
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store8(at::BFloat16* p, __m256 v) {  // round to nearest even, NaN -> 0x7fc0, as c10::BFloat16 does
  __m256i b = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                        _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1)));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, bias), 16);
  b = _mm256_blendv_epi8(b, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
}
template <typename A>
inline __m256 round8(__m256 v) {  // v rounded to A's precision, widened back
  if constexpr (std::is_same_v<A, float>) {
    return v;
  } else {
    alignas(32) A t[8];
    store8(t, v);
    return load8(t);
  }
}
// e^x for x <= 0 (softmax scores minus their max): Cody-Waite reduction x = k ln2 + r and a degree-6 polynomial
// (Cephes expf), within a few ulp of std::exp; below -87 it returns ~1e-38 instead of a denormal or 0.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[m, n] = scale[n] * sum_k x[m, k] w[n, k] + bias[n] for M input rows and R weight rows n0..n0+R-1.
// Each output is one fp32 accumulator chain over k in steps of 8, then a fixed horizontal sum and the scalar tail:
// the same operations in the same order for every M, R, layout and thread split (batch invariance).
// PACKED: the weight is stored in pairs of rows interleaved every 8 columns ([n/2][k/8][2][8], an odd last row as
// is), so a tile of R = 2 rows reads one sequential stream: the hardware prefetcher keeps up, and decoding reads
// weights about 1.3x faster than from two rows K elements apart (benchmarks/kernel_speed.py).
template <int M, int R, bool PACKED, typename W>
inline void tile(const float* x, const W* w, const float* scale, const float* bias, float* y,
                 int64_t K, int64_t N, int64_t n0) {
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t(7);
  const W* base = w + n0 * K;
  // where element (row n0 + r, column k) lies: interleaved in the packed layout, row-major otherwise
  auto at = [&](int r, int64_t k) { return PACKED ? base + k * R + r * 8 : base + r * K + k; };
#pragma GCC unroll 2
  for (int64_t k = 0; k < K8; k += 8) {
    // Packed: one stream, prefetched to L1 2 KiB ahead and to L2 8 KiB ahead when there are several input rows
    // (5-position products 13-16% faster on Zen 4). One row: the hardware prefetcher alone (one-row products 6-10%
    // faster on Zen 4). Neither is timed on Zen 3, where the L1 prefetch alone had been tuned.
    if (PACKED) {
      if (M > 1 && ((k * R * sizeof(W)) & 63) == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(at(0, k)) + 2048, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(at(0, k)) + 8192, _MM_HINT_T1);
      }
    } else if ((k & 31) == 0) {  // 512 bytes ahead on every weight row: more loads in flight
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(at(r, k)) + 512, _MM_HINT_T0);
    }
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load8(at(r, k));
    for (int m = 0; m < M; ++m) {
      __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const W* wr = w + (n0 + r) * K;  // the K % 8 tail is only ever unpacked (packing needs K % 8 == 0)
    for (int m = 0; m < M; ++m) {
      float s = hsum8(acc[r][m]);
      for (int64_t k = K8; k < K; ++k) s += static_cast<float>(wr[k]) * x[m * K + k];
      if (scale) s *= scale[n0 + r];
      if (bias) s += bias[n0 + r];
      y[m * N + n0 + r] = s;
    }
  }
}

template <int M, bool PACKED, typename W>
void rows(const float* x, const W* w, const float* scale, const float* bias, float* y,
          int64_t K, int64_t N, int64_t n0, int64_t n1) {
  // Packed: the pairs it was packed in. Unpacked: four rows for one or two input rows (more independent FMA chains).
  constexpr int R = PACKED || M > 2 ? 2 : 4;
  int64_t n = n0;
  for (; n + R <= n1; n += R) tile<M, R, PACKED, W>(x, w, scale, bias, y, K, N, n);
  for (; n < n1; ++n) tile<M, 1, PACKED, W>(x, w, scale, bias, y, K, N, n);  // an odd last row is stored as is
}

template <bool PACKED, typename W>
void rows_any(int64_t M, const float* x, const W* w, const float* scale, const float* bias, float* y,
              int64_t K, int64_t N, int64_t n0, int64_t n1) {
  switch (M) {
    case 1: return rows<1, PACKED, W>(x, w, scale, bias, y, K, N, n0, n1);
    case 2: return rows<2, PACKED, W>(x, w, scale, bias, y, K, N, n0, n1);
    case 3: return rows<3, PACKED, W>(x, w, scale, bias, y, K, N, n0, n1);
    case 4: return rows<4, PACKED, W>(x, w, scale, bias, y, K, N, n0, n1);
    case 5: return rows<5, PACKED, W>(x, w, scale, bias, y, K, N, n0, n1);
    default: return rows<6, PACKED, W>(x, w, scale, bias, y, K, N, n0, n1);
  }
}

// Each thread starts on its own contiguous share of the blocks of weight rows (one sequential stream per thread) and,
// once done, takes what is left of the other shares. Claims shrink from a quarter of what is left to one block.
// A static split waited for the slower core: on this VM the two cores' speeds differ from minute to minute, and a
// five-position pass spent ~5% waiting.
// Which thread computes a row does not change its result (tile is batch- and split-invariant).
struct alignas(64) NextBlock { std::atomic<int64_t> v; };

// Shares of the blocks of weight rows for up to `threads` threads, each share's next unclaimed block.
struct BlockShares {
  std::vector<NextBlock> next;
  int64_t blocks = 0;
  void reset(int64_t n_blocks, int64_t threads) {
    blocks = n_blocks;
    const int64_t shares = std::max<int64_t>(1, std::min<int64_t>(threads, blocks));
    if (static_cast<int64_t>(next.size()) != shares) next = std::vector<NextBlock>(shares);
    for (int64_t s = 0; s < shares; ++s) next[s].v.store(s * blocks / shares, std::memory_order_relaxed);
  }
  // Thread t claims blocks until none is left: block(b) for each. Any number of threads covers every block once.
  template <typename Block>
  void claim(int64_t t, const Block& block) {
    const int64_t shares = static_cast<int64_t>(next.size());
    for (int64_t i = 0; i < shares; ++i) {  // its own share first, then the others'
      const int64_t s = (t + i) % shares, end = (s + 1) * blocks / shares;
      // one locked add per claim, not per block: it waits for the weight loads in flight (~2% of a 5-position pass)
      for (int64_t seen; (seen = next[s].v.load(std::memory_order_relaxed)) < end;) {
        const int64_t take = std::max<int64_t>(1, (end - seen) / 4);
        const int64_t b0 = next[s].v.fetch_add(take, std::memory_order_relaxed);
        for (int64_t b = b0; b < std::min(end, b0 + take); ++b) block(b);
      }
    }
  }
};

// Calls block(n, ne) for blocks of BLOCK weight rows [n, ne) covering [0, N), on all threads (BLOCK even: packed
// pairs stay whole; a multiple of 16 for the AMX tiles' groups).
template <int64_t BLOCK = 16, typename Block>
void run_blocks(int64_t N, const Block& block) {
  BlockShares shares;
  shares.reset((N + BLOCK - 1) / BLOCK, at::get_num_threads());
  at::parallel_for(0, static_cast<int64_t>(shares.next.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      shares.claim(t, [&](int64_t b) { block(b * BLOCK, std::min(N, (b + 1) * BLOCK)); });
  });
}

// The first rows of even chunks of at most `most` of M input rows, then M: chunk c is rows [first[c], first[c + 1]).
std::vector<int64_t> chunk_starts(int64_t M, int64_t most) {
  const int64_t chunks = (M + most - 1) / most;
  std::vector<int64_t> first(chunks + 1, 0);
  for (int64_t c = 0; c < chunks; ++c) first[c + 1] = first[c] + (M - first[c]) / (chunks - c);
  return first;
}

// f(m0, m1) over rows 0..M-1 of `per_row` elements of elementwise work: split over the threads for long blocks (a
// prompt: ~20% of a 600-token prefill ran on one thread while the other waited), in one piece for the few rows of a
// decoding step, where a hand-off costs more than the loop. Rows are independent: the bits do not depend on the split.
template <typename F>
void for_rows(int64_t M, int64_t per_row, const F& f) {
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(per_row, 1)), f);
}

// ---- GGUF block-quantized weights (qblocks.h): the AVX2 path, 8 lanes; avx512.cpp has the 16-lane one. ----
// The 32 weights of one block without m, d * q, as four fp32 vectors of 8 (elements 0..7, 8..15, 16..23, 24..31).
template <int FMT>
inline void block_weights(const uint8_t* blk, __m256 wv[4]) {
  const __m256 d = _mm256_set1_ps(load4<float>(blk));
  if constexpr (FMT == kQ6K) {  // elements 0..15 scaled by d0, 16..31 by d1
    const __m256 d1 = _mm256_set1_ps(load4<float>(blk + 4));
    for (int i = 0; i < 4; ++i) {
      const __m128i q = _mm_loadl_epi64((const __m128i*)(blk + 8 + 8 * i));
      wv[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), i < 2 ? d : d1);
    }
  } else if constexpr (FMT == kQ8) {
    for (int i = 0; i < 4; ++i)
      wv[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(blk + 4 + 8 * i)))), d);
  } else {
    const __m128i q = _mm_loadu_si128((const __m128i*)(blk + 4)), mask = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(q, mask), hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; ++i) wv[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), d);
  }
}

// acc += m[b] * xsum[b] lane-wise over the whole groups of 8 of the nb m of a Q4 row (fp16; fp32 in Q4K); m_tail
// adds the rest to the horizontal sum, in order (a vector read past the last m could leave the tensor).
template <int FMT>
inline __m256 add_m_terms(const uint8_t* m, const float* xsum, int64_t nb, __m256 acc) {
  for (int64_t b = 0; b + 8 <= nb; b += 8) {
    const __m256 mv = FMT == kQ4K ? _mm256_loadu_ps(reinterpret_cast<const float*>(m) + b)
                                  : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(m + 2 * b)));
    acc = _mm256_fmadd_ps(mv, _mm256_loadu_ps(xsum + b), acc);
  }
  return acc;
}
template <int FMT>
inline float m_tail(const uint8_t* m, const float* xsum, int64_t nb, float s) {
  for (int64_t b = nb & ~int64_t(7); b < nb; ++b) {
    if constexpr (FMT == kQ4K) {
      s += load4<float>(m + 4 * b) * xsum[b];
    } else {
      uint16_t h;
      std::memcpy(&h, m + 2 * b, 2);
      s += _cvtsh_ss(h) * xsum[b];
    }
  }
  return s;
}

// y of an R x M tile from its accumulators: each one's sum, plus the m terms of Q4 rows against xsum (M, nb: the
// block sums of the x the products took), plus the bias; the same order for fp32 and 8-bit x.
template <int FMT, int M, int R>
inline void store_tile(const __m256 (&acc)[R][M], const float* xsum, const uint8_t* w, const float* bias, float* y,
                       int64_t nb, int64_t N, int64_t n0) {
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float s;
      if (block_has_m(FMT)) {
        const uint8_t* mr = w + (n0 + r) * nb * FMT + nb * 20;
        s = m_tail<FMT>(mr, xsum + m * nb, nb, hsum8(add_m_terms<FMT>(mr, xsum + m * nb, nb, acc[r][m])));
      } else {
        s = hsum8(acc[r][m]);
      }
      if (bias) s += bias[n0 + r];
      y[m * N + n0 + r] = s;
    }
}

// M input rows against R weight rows from n0: one accumulator per output, four FMAs per block in a fixed order.
template <int FMT, int M, int R>
inline void quant_tile(const float* x, const float* xsum, const uint8_t* w, const float* bias, float* y, int64_t K,
                       int64_t N, int64_t n0) {
  const int64_t nb = K / 32, row_bytes = nb * FMT, step = block_step(FMT);
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256 wv[R][4];
    for (int r = 0; r < R; ++r) block_weights<FMT>(w + (n0 + r) * row_bytes + b * step, wv[r]);
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < 4; ++i) {
        const __m256 xv = _mm256_loadu_ps(x + m * K + 32 * b + 8 * i);
        for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r][i], xv, acc[r][m]);
      }
  }
  store_tile<FMT, M, R>(acc, xsum, w, bias, y, nb, N, n0);
}

template <int FMT, int M>
void quant_rows(const float* x, const float* xsum, const uint8_t* w, const float* bias, float* y, int64_t K,
                int64_t N, int64_t n0, int64_t n1) {
  constexpr int R = M == 1 ? 2 : 1;
  int64_t n = n0;
  for (; n + R <= n1; n += R) quant_tile<FMT, M, R>(x, xsum, w, bias, y, K, N, n);
  for (; n < n1; ++n) quant_tile<FMT, M, 1>(x, xsum, w, bias, y, K, N, n);
}

template <int FMT>
void quant_rows_fmt(int M, const float* x, const float* xsum, const uint8_t* w, const float* bias, float* y,
                    int64_t K, int64_t N, int64_t n0, int64_t n1) {
  switch (M) {
    case 1: return quant_rows<FMT, 1>(x, xsum, w, bias, y, K, N, n0, n1);
    case 2: return quant_rows<FMT, 2>(x, xsum, w, bias, y, K, N, n0, n1);
    case 3: return quant_rows<FMT, 3>(x, xsum, w, bias, y, K, N, n0, n1);
    default: return quant_rows<FMT, 4>(x, xsum, w, bias, y, K, N, n0, n1);
  }
}

// ---- The same rows layout with 8-bit activations (`--gguf_activations int8`, the default on AVX2-only CPUs): x as
// one int8 value per element and an fp32 scale per block of 32 (pack_int8_parts' definition), the products as
// integer dot products (vpmaddubsw + vpmaddwd: 32 products in two instructions, against four fp32 FMAs of 8 and the
// weights' conversion to fp32), llama.cpp's Q4_1 x Q8_1 arithmetic: d dx sum(q a) per block, plus m dx sum(a). ----

// Each block of 32 of x (M rows of K) -> 32 int8 a = clamp(round(x / dx), +-127) with dx = max|x| / 127 (IEEE division,
// ties to even; 1 for an all-zero block), and xs = dx sum(a): the 8-bit x's block sums (the m terms of Q4 rows).
void quantize_int8_blocks(int64_t M, const float* x, int64_t K, int8_t* a, float* dx, float* xs) {
  const int64_t nb = K / 32;
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' per-lane interleaving
  for (int64_t i = 0; i < M * nb; ++i) {
    const float* p = x + 32 * i;  // block b of row m is block m nb + b of x: rows are contiguous
    __m256 v[4], mx = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[j] = _mm256_loadu_ps(p + 8 * j)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const float d = amax > 0.f ? amax / 127.f : 1.f;
    __m256i q[4];
    for (int j = 0; j < 4; ++j)
      q[j] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_div_ps(v[j], _mm256_set1_ps(d))), lo), hi);
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + 32 * i), _mm256_permutevar8x32_epi32(bytes, order));
    dx[i] = d;
    xs[i] = d * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
}

// The 32 quants of a block as bytes in element order: Q4's nibbles (unsigned, 0..15), Q8's int8. Q4: the 16 bytes
// loaded into both 128-bit lanes at once, the upper lane shifted by a nibble, both masked: three instructions
// instead of five (one-token steps 4-6% faster on Zen 3, where the products are compute-bound).
template <int FMT>
inline __m256i block_quants(const uint8_t* q) {
  if constexpr (FMT == kQ8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  return _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(15));
}

// sum q a over a block as 8 int32 lanes (exact: vpmaddubsw's pair sums stay below 2^15). vpmaddubsw multiplies
// unsigned by signed bytes: Q4 quants are unsigned already; a Q8 quant gives its magnitude and its sign to a.
template <int FMT>
inline __m256i block_dot(__m256i q, __m256i a) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (FMT == kQ8) return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(a, q)), ones);
  return _mm256_madd_epi16(_mm256_maddubs_epi16(q, a), ones);
}

// M input rows against R weight rows from n0, one accumulator per output, one FMA per block in a fixed order.
template <int FMT, int M, int R>
inline void quant_tile_int8(const int8_t* a, const float* dx, const float* xs, const uint8_t* w, const float* bias,
                            float* y, int64_t K, int64_t N, int64_t n0, bool stream) {
  constexpr int QF = FMT == kQ6K ? kQ8 : FMT;  // Q6K's quants are int8 like Q8's, with a d per 16 of them
  const int64_t nb = K / 32, row_bytes = nb * FMT, step = block_step(FMT);
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i q[R];
    __m256 dw[R];  // the block's d (Q6K: d0 in lanes 0..3, d1 in 4..7), times x's block scale per input row
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + (n0 + r) * row_bytes + b * step;
      prefetch_weights(blk + 2048, stream);  // without it, one-token steps 9.5 ms instead of 6.9 on Zen 3
      dw[r] = FMT == kQ6K ? _mm256_set_m128(_mm_set1_ps(load4<float>(blk + 4)), _mm_set1_ps(load4<float>(blk)))
                          : _mm256_set1_ps(load4<float>(blk));
      q[r] = block_quants<QF>(blk + (FMT == kQ6K ? 8 : 4));
    }
    for (int m = 0; m < M; ++m) {
      const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + m * K + 32 * b));
      const __m256 sv = _mm256_broadcast_ss(dx + m * nb + b);
      for (int r = 0; r < R; ++r)  // int32 lanes 0..3 hold elements 0..15, lanes 4..7 elements 16..31
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot<QF>(q[r], av)), _mm256_mul_ps(dw[r], sv), acc[r][m]);
    }
  }
  store_tile<FMT, M, R>(acc, xs, w, bias, y, nb, N, n0);
}

template <int FMT, int M>
void quant_rows_int8(const int8_t* a, const float* dx, const float* xs, const uint8_t* w, const float* bias, float* y,
                     int64_t K, int64_t N, int64_t n0, int64_t n1, bool stream) {
  constexpr int R = M <= 2 ? 2 : 1;
  int64_t n = n0;
  for (; n + R <= n1; n += R) quant_tile_int8<FMT, M, R>(a, dx, xs, w, bias, y, K, N, n, stream);
  for (; n < n1; ++n) quant_tile_int8<FMT, M, 1>(a, dx, xs, w, bias, y, K, N, n, stream);
}

template <int FMT>
void quant_rows_int8_fmt(int M, const int8_t* a, const float* dx, const float* xs, const uint8_t* w, const float* bias,
                         float* y, int64_t K, int64_t N, int64_t n0, int64_t n1, bool stream) {
  switch (M) {
    case 1: return quant_rows_int8<FMT, 1>(a, dx, xs, w, bias, y, K, N, n0, n1, stream);
    case 2: return quant_rows_int8<FMT, 2>(a, dx, xs, w, bias, y, K, N, n0, n1, stream);
    case 3: return quant_rows_int8<FMT, 3>(a, dx, xs, w, bias, y, K, N, n0, n1, stream);
    case 4: return quant_rows_int8<FMT, 4>(a, dx, xs, w, bias, y, K, N, n0, n1, stream);
    case 5: return quant_rows_int8<FMT, 5>(a, dx, xs, w, bias, y, K, N, n0, n1, stream);
    case 6: return quant_rows_int8<FMT, 6>(a, dx, xs, w, bias, y, K, N, n0, n1, stream);
    case 7: return quant_rows_int8<FMT, 7>(a, dx, xs, w, bias, y, K, N, n0, n1, stream);
    default: return quant_rows_int8<FMT, 8>(a, dx, xs, w, bias, y, K, N, n0, n1, stream);
  }
}

void quant_rows_avx2_int8(int M, const int8_t* a, const float* dx, const float* xs, const uint8_t* w, int format,
                          const float* bias, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1, bool stream) {
  if (format == kQ4) return quant_rows_int8_fmt<kQ4>(M, a, dx, xs, w, bias, y, K, N, n0, n1, stream);
  if (format == kQ4K) return quant_rows_int8_fmt<kQ4K>(M, a, dx, xs, w, bias, y, K, N, n0, n1, stream);
  if (format == kQ6K) return quant_rows_int8_fmt<kQ6K>(M, a, dx, xs, w, bias, y, K, N, n0, n1, stream);
  return quant_rows_int8_fmt<kQ8>(M, a, dx, xs, w, bias, y, K, N, n0, n1, stream);
}

// ---- Prompt blocks (a prefill: a block at position 0 of 8 positions or more) of Q4 rows with 8-bit x. A prompt
// is never a verification pass (those always follow one), so its products need not match one-token steps bit for
// bit, only be deterministic. The rows kernel above spends six vector instructions per input row, weight row and
// block (the two integer products, the conversion, the scale product, the FMA, the scale's broadcast), and Zen 3
// issues its multiply-class ones on two pipes: ~2.1 cycles. Here the weight rows of a task are unpacked once to a
// byte per quant and x is interleaved so that one 256-bit load holds 4 consecutive elements of 8 input rows: each
// vpmaddubsw takes a broadcast group of 4 quants against 8 rows, the 16-bit sums of a block add up in place (a pair
// sum is at most 2 * 15 * 127 = 3810 in magnitude, 8 of them 30480: no overflow), and one vpmaddwd, conversion and
// FMA per block then serve 8 rows at once, their sums in the 8 lanes (no horizontal sums). 0.89 TSC cycles per input
// row, weight row and block in a C++ microbenchmark on Zen 3 (the rows kernel: 1.65-2.09; design-notes.md). ----
constexpr int64_t kPromptChunk = 8;  // input rows per interleaved chunk: one per int32 lane
constexpr int64_t kQ4TilesGroup = 16 * kQ4Tiles;  // bytes of one block of a group of 16 Q4 tiles rows (qblocks.h)

// x's 8-bit values (M rows of K: quantize_int8_blocks' a, dx, xs) interleaved per chunk of 8 rows, rows past M zero:
// xt[((c nb + b) 8 + g) 32 + 4 m + j] = a[8 c + m][32 b + 4 g + j], and the block scales and sums as 8 lanes:
// dxt[(c nb + b) 8 + m] = dx[8 c + m][b] (xst alike).
void interleave_prompt_rows(int64_t c, int64_t M, int64_t K, const int8_t* a, const float* dx, const float* xs,
                            int8_t* xt, float* dxt, float* xst) {
  const int64_t nb = K / 32;
  for (int64_t m = 0; m < kPromptChunk; ++m) {
    const int64_t row = c * kPromptChunk + m;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t at = (c * nb + b) * kPromptChunk + m;
      dxt[at] = row < M ? dx[row * nb + b] : 0.f;
      xst[at] = row < M ? xs[row * nb + b] : 0.f;
      int8_t* dst = xt + ((c * nb + b) * 8) * 32 + 4 * m;
      for (int64_t g = 0; g < 8; ++g)
        for (int64_t j = 0; j < 4; ++j) dst[32 * g + j] = row < M ? a[row * K + 32 * b + 4 * g + j] : 0;
    }
  }
}

// Weight rows [n, n + R) of Q4 or Q4K rows (or a group of Q4 tiles) unpacked for prompt_tile: u (R, K) one quant
// per byte in element order, d and m (R, nb) fp32.
template <int FMT>
void unpack_q4_rows(const uint8_t* w, int64_t n, int64_t R, int64_t K, uint8_t* u, float* d, float* m) {
  const int64_t nb = K / 32, row_bytes = nb * FMT;
  if constexpr (FMT == kQ4Tiles) {  // a whole group of 16 (qblocks.h): dword r of nibble pair t holds columns
    // 8 t .. 8 t + 3 (low nibbles) and 8 t + 4 .. 8 t + 7 (high) of row r: 8 bytes of u per row and t
    const uint8_t* g = w + (n / 16) * nb * kQ4TilesGroup;
    const __m256i nib = _mm256_set1_epi8(15);
    alignas(32) float dm[2][16];
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = g + b * kQ4TilesGroup;
      for (int k = 0; k < 2; ++k)  // 16 fp16 d, then 16 fp16 m
        for (int i = 0; i < 2; ++i) {
          const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32 * k + 16 * i));
          _mm256_store_ps(dm[k] + 8 * i, _mm256_cvtph_ps(h));
        }
      for (int64_t r = 0; r < R; ++r) d[r * nb + b] = dm[0][r], m[r * nb + b] = dm[1][r];
      for (int t = 0; t < 4; ++t)
        for (int i = 0; i < 2; ++i) {  // rows 8 i .. 8 i + 7
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 + 64 * t + 32 * i));
          const __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
          // qwords: rows 0, 1, 4, 5 of the 8 (unpacklo) and 2, 3, 6, 7 (unpackhi), each low then high nibbles
          alignas(32) uint64_t q[2][4];
          _mm256_store_si256(reinterpret_cast<__m256i*>(q[0]), _mm256_unpacklo_epi32(lo, hi));
          _mm256_store_si256(reinterpret_cast<__m256i*>(q[1]), _mm256_unpackhi_epi32(lo, hi));
          static constexpr int kRow[2][4] = {{0, 1, 4, 5}, {2, 3, 6, 7}};
          for (int k = 0; k < 2; ++k)
            for (int j = 0; j < 4; ++j) {
              const int64_t r = 8 * i + kRow[k][j];
              if (r < R) std::memcpy(u + r * K + 32 * b + 8 * t, &q[k][j], 8);
            }
        }
    }
    return;
  }
  for (int64_t r = 0; r < R; ++r) {
    const uint8_t* row = w + (n + r) * row_bytes;
    for (int64_t b = 0; b < nb; ++b) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + r * K + 32 * b), block_quants<kQ4>(row + 20 * b + 4));
      d[r * nb + b] = load4<float>(row + 20 * b);
      if constexpr (FMT == kQ4K) {
        m[r * nb + b] = load4<float>(row + nb * 20 + 4 * b);
      } else {
        uint16_t h;
        std::memcpy(&h, row + nb * 20 + 2 * b, 2);
        m[r * nb + b] = _cvtsh_ss(h);
      }
    }
  }
}

// One chunk of 8 input rows against R unpacked weight rows: y[8 c + m][n + r] for the chunk's rows m < rows. Each
// 4-element group of x is loaded once for the R weight rows and held in a register (the empty asm keeps GCC from
// folding it back into every vpmaddubsw): Zen 3 moves at most two 256-bit loads per cycle into its vector unit, and
// two loads per product had bounded the kernel (llvm-mca: 45 cycles per block of 4 weight rows, now 34, the four
// vector pipes' bound). Measured in one process on Zen 3: the products 1.14-1.28x faster, a prefill 1.08-1.24x.
template <int R>
inline void prompt_tile(const int8_t* xt, const float* dxt, const float* xst, const uint8_t* u, const float* d,
                        const float* mw, const float* bias, float* y, int64_t K, int64_t N, int64_t n, int64_t rows) {
  const int64_t nb = K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];  // one per weight row, the m terms included: separate ones spilled to the stack (5.6% of a prefill)
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i s[R];
    for (int g = 0; g < 8; ++g) {
      __m256i x8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt + 256 * b + 32 * g));
      __asm__("" : "+x"(x8));
      const uint8_t* q = u + 32 * b + 4 * g;
      for (int r = 0; r < R; ++r) {
        const __m256i p = _mm256_maddubs_epi16(_mm256_set1_epi32(load4<int32_t>(q + r * K)), x8);
        s[r] = g ? _mm256_add_epi16(s[r], p) : p;
        __asm__("" : "+x"(s[r]));  // integer adds reassociate: GCC formed all 8 R products first, then spilled them
      }
    }
    const __m256 dxv = _mm256_loadu_ps(dxt + 8 * b), xsv = _mm256_loadu_ps(xst + 8 * b);
    for (int r = 0; r < R; ++r) {
      const __m256 sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(s[r], ones));
      acc[r] = _mm256_fmadd_ps(sum, _mm256_mul_ps(_mm256_broadcast_ss(d + r * nb + b), dxv), acc[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(mw + r * nb + b), xsv, acc[r]);
    }
  }
  static_assert(R == 4 || R == 1, "prompt_rows takes 4 weight rows at a time, then single ones");
  if constexpr (R == 4) {  // 4 x 8 transposed in registers: one 4-float store per row (scalar stores and row-count
    // branches had cost ~10% of the kernel; an acc[r] indexed at run time kept acc in memory)
    const __m256 t0 = _mm256_unpacklo_ps(acc[0], acc[1]), t1 = _mm256_unpackhi_ps(acc[0], acc[1]);
    const __m256 t2 = _mm256_unpacklo_ps(acc[2], acc[3]), t3 = _mm256_unpackhi_ps(acc[2], acc[3]);
    const __m256 rows4[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xee),
                             _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xee)};  // m, m + 4
    const __m128 b4 = bias ? _mm_loadu_ps(bias + n) : _mm_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      if (i < rows) _mm_storeu_ps(y + i * N + n, _mm_add_ps(_mm256_castps256_ps128(rows4[i]), b4));
      if (i + 4 < rows) _mm_storeu_ps(y + (i + 4) * N + n, _mm_add_ps(_mm256_extractf128_ps(rows4[i], 1), b4));
    }
  } else {
    alignas(32) float t[8];
    _mm256_store_ps(t, acc[0]);
    for (int64_t m = 0; m < rows; ++m) y[m * N + n] = bias ? t[m] + bias[n] : t[m];
  }
}

// Weight rows [n, ne) (at most 16: run_blocks' task) for all M input rows of a prompt: the task's rows unpacked once,
// then every chunk of 8 input rows against them, 4 weight rows at a time.
template <int FMT>
void prompt_rows(const int8_t* xt, const float* dxt, const float* xst, int64_t M, const uint8_t* w, const float* bias,
                 float* y, int64_t K, int64_t N, int64_t n, int64_t ne) {
  const int64_t nb = K / 32, R = ne - n, chunks = (M + kPromptChunk - 1) / kPromptChunk;
  thread_local std::vector<uint8_t> u;
  thread_local std::vector<float> dm;
  u.resize(R * K), dm.resize(2 * R * nb);
  float *d = dm.data(), *mw = dm.data() + R * nb;
  unpack_q4_rows<FMT>(w, n, R, K, u.data(), d, mw);
  for (int64_t c = 0; c < chunks; ++c) {
    const int8_t* xc = xt + c * nb * 256;
    const float *dxc = dxt + c * nb * 8, *xsc = xst + c * nb * 8;
    float* yc = y + c * kPromptChunk * N;
    const int64_t rows = std::min<int64_t>(kPromptChunk, M - c * kPromptChunk);
    int64_t r = 0;
    for (; r + 4 <= R; r += 4)
      prompt_tile<4>(xc, dxc, xsc, u.data() + r * K, d + r * nb, mw + r * nb, bias, yc, K, N, n + r, rows);
    for (; r < R; ++r)
      prompt_tile<1>(xc, dxc, xsc, u.data() + r * K, d + r * nb, mw + r * nb, bias, yc, K, N, n + r, rows);
  }
}

// ---- Q4 weights in the tiles layout (qblocks.h; per group of 16 weight rows and block: 16 fp16 d, 16 fp16 m, then
// 8 B rows of 4 columns x 16 weight rows as nibble pairs) with 8-bit x: the rows kernel's roles swapped. Per block
// and half group (8 weight rows), the B rows are unpacked to bytes once for up to 4 input rows, each holding 4
// quants of the 8 weight rows; each input row's group of 4 x values is broadcast against them, the 16-bit products
// of a block add up in place (as in the prompt kernel: no overflow), and one vpmaddwd, conversion and two FMAs per
// block serve the 8 weight rows in the lanes (no horizontal sums). Per input row, weight row and block about 4
// vector instructions against the rows kernel's ~6 (plus its unpacking per weight row). The arithmetic is the VNNI
// kernel's (tiles.h add_block_int8: the exact int32 block sum s, acc + s (d dx), then + m xs, block by block), so
// the same bits as it and as the prompt kernel, whatever the number of rows: batch invariant. ----
// NH halves from h0: both (NH = 2) for M <= 2 input rows; for more, one half per pass (registers).
template <int M, int NH>
void q4_tiles_pass(const int8_t* a, const float* dx, const float* xs, const uint8_t* g, int64_t K, int h0,
                   const float* bias, float* y, int64_t N, int64_t n, bool stream) {
  const int64_t nb = K / 32;
  const __m256i nib = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  __m256 acc[NH][M];
  for (int hh = 0; hh < NH; ++hh)
    for (int m = 0; m < M; ++m) acc[hh][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = g + b * kQ4TilesGroup;
    if (h0 == 0)  // every line of a block 3 KB ahead (one line per block: products 1.16-1.3x slower on Zen 3);
      for (int l = 0; l < kQ4TilesGroup; l += 64) prefetch_weights(p + 3072 + l, stream);  // h0 = 1 reads L1
    for (int hh = 0; hh < NH; ++hh) {
      const int h = h0 + hh;
      __m256i s[M];
      for (int t = 0; t < 4; ++t) {  // 32 bytes of nibbles -> B rows 2t (low) and 2t + 1 (high) of this half
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 + 64 * t + 32 * h));
        for (int e = 0; e < 2; ++e) {
          const int j = 2 * t + e;
          const __m256i B = _mm256_and_si256(e ? _mm256_srli_epi16(v, 4) : v, nib);
          for (int m = 0; m < M; ++m) {
            const auto* x4 = reinterpret_cast<const uint8_t*>(a + m * K + 32 * b + 4 * j);
            const __m256i q = _mm256_maddubs_epi16(B, _mm256_set1_epi32(load4<int32_t>(x4)));
            s[m] = j ? _mm256_add_epi16(s[m], q) : q;
            __asm__("" : "+x"(s[m]));  // in order: integer adds reassociate, and all 8 M products first spill
          }
        }
      }
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * h)));
      const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32 + 16 * h)));
      for (int m = 0; m < M; ++m) {
        const __m256 sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(s[m], ones));
        acc[hh][m] = _mm256_fmadd_ps(sum, _mm256_mul_ps(d, _mm256_set1_ps(dx[m * nb + b])), acc[hh][m]);
        acc[hh][m] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xs[m * nb + b]), acc[hh][m]);
      }
    }
  }
  for (int hh = 0; hh < NH; ++hh) {
    const __m256 bv = bias ? _mm256_loadu_ps(bias + n + 8 * hh) : _mm256_setzero_ps();
    for (int m = 0; m < M; ++m) _mm256_storeu_ps(y + m * N + n + 8 * hh, _mm256_add_ps(acc[hh][m], bv));
  }
}

// Weight rows [n0, n1) (whole groups of 16) of Q4 tiles for M <= 8 input rows (quantize_int8_blocks' a, dx, xs).
void q4_tiles_avx2_int8(int M, const int8_t* a, const float* dx, const float* xs, const uint8_t* w, const float* bias,
                        float* y, int64_t K, int64_t N, int64_t n0, int64_t n1, bool stream) {
  const int64_t nb = K / 32;
  for (int64_t n = n0; n < n1; n += 16) {
    const uint8_t* g = w + (n / 16) * nb * kQ4TilesGroup;
    if (M <= 2) {  // both halves in one pass: the weights stream without the pause of a second pass from L1
      if (M == 1) q4_tiles_pass<1, 2>(a, dx, xs, g, K, 0, bias, y, N, n, stream);  // (1.08-1.13x on Zen 3)
      else q4_tiles_pass<2, 2>(a, dx, xs, g, K, 0, bias, y, N, n, stream);
      continue;
    }
    for (int h = 0; h < 2; ++h)
      for (int m0 = 0; m0 < M; m0 += 4) {
        const int8_t* am = a + m0 * K;
        const float *dxm = dx + m0 * nb, *xsm = xs + m0 * nb;
        float* ym = y + m0 * N;
        switch (std::min(4, M - m0)) {
          case 1: q4_tiles_pass<1, 1>(am, dxm, xsm, g, K, h, bias, ym, N, n + 8 * h, stream); break;
          case 2: q4_tiles_pass<2, 1>(am, dxm, xsm, g, K, h, bias, ym, N, n + 8 * h, stream); break;
          case 3: q4_tiles_pass<3, 1>(am, dxm, xsm, g, K, h, bias, ym, N, n + 8 * h, stream); break;
          default: q4_tiles_pass<4, 1>(am, dxm, xsm, g, K, h, bias, ym, N, n + 8 * h, stream);
        }
      }
  }
}

constexpr int kQuantRowsAvx2 = 4;
// 8-bit x: up to 8 input rows per pass over the weights (8 accumulators). With 4, a 5-position pass ran as 2 + 3
// rows and cost 17% more on Zen 3 (every block's quants unpacked twice, the tiles of 3 rows one weight row wide).
constexpr int kQuantRowsAvx2Int8 = 8;
void quant_rows_avx2(int M, const float* x, const float* xsum, const uint8_t* w, int format, const float* bias,
                     float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  if (format == kQ4) return quant_rows_fmt<kQ4>(M, x, xsum, w, bias, y, K, N, n0, n1);
  if (format == kQ4K) return quant_rows_fmt<kQ4K>(M, x, xsum, w, bias, y, K, N, n0, n1);
  if (format == kQ6K) return quant_rows_fmt<kQ6K>(M, x, xsum, w, bias, y, K, N, n0, n1);
  return quant_rows_fmt<kQ8>(M, x, xsum, w, bias, y, K, N, n0, n1);
}

// Which kernels the block-quantized products use: weights in the tiles layout go to AMX under "amx", to the AVX2
// tiles kernel under "avx2" with one int8 part (Q4 only), else to the VNNI kernel (pack_blocks lays them out so where
// kernel_isa() is "amx" or "vnni": AMX-INT8 with the OS granting the tiles, or AVX-512 VNNI, and for Q4 with int8
// activations on AVX2 alone); weights in the rows layout go to AVX-512 where present (also under "amx" and "vnni"),
// else AVX2. kernel_isa() switches (tests run every path the machine has). Each path is batch invariant on its own;
// the rows paths differ in the order of their sums, the tiles paths from them in an int8 split of x (AMX and VNNI
// agree bit for bit), so one run must not switch between rows and tiles.
enum QuantIsa : int { kAvx2 = 0, kAvx512 = 1, kVnni = 2, kAmx = 3 };
bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool cpu_has_vnni() { return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni"); }
bool cpu_has_amx() {
  return cpu_has_vnni() && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") &&
         amx_tiles_granted();
}
std::atomic<int> quant_isa{cpu_has_amx() ? kAmx : cpu_has_vnni() ? kVnni : cpu_has_avx512() ? kAvx512 : kAvx2};

// How many int8 parts x is split in for the tiles kernels: 2 (default: ~16 bits per block, AMX and VNNI bit for bit)
// or 1 (llama.cpp's 8-bit activations: half the integer products, VNNI kernel). Like kernel_isa, one run keeps one.
std::atomic<int> activation_parts{2};

int64_t activation_int8_parts(int64_t parts) {
  TORCH_CHECK(parts == 0 || parts == 1 || parts == 2, "activation_int8_parts: 1, 2 or 0 (query) expected");
  if (parts) activation_parts = static_cast<int>(parts);
  return activation_parts;
}

// Weights that one-chunk products still prefetch into the caches (prefetch_weights' `stream` off): a draft's
// layers and reduced head, read by every draft step. Streamed past the caches like the rest of the model, they came
// back from memory each step (0.80-0.82 ms a draft step on Zen 5, 0.71-0.74 ms kept). A property of the weights, by
// address, not of the call; swapped whole, so that a product binding its weights on another thread reads either set.
using WeightRanges = std::vector<std::pair<uintptr_t, uintptr_t>>;
std::shared_ptr<const WeightRanges> cached_weights = std::make_shared<const WeightRanges>();

int64_t keep_weights_cached(std::vector<at::Tensor> weights) {
  auto ranges = std::make_shared<WeightRanges>();
  for (const at::Tensor& w : weights) {
    const auto begin = reinterpret_cast<uintptr_t>(w.data_ptr());
    ranges->emplace_back(begin, begin + w.numel() * w.element_size());
  }
  std::atomic_store(&cached_weights, std::shared_ptr<const WeightRanges>(std::move(ranges)));
  return static_cast<int64_t>(weights.size());
}

bool weights_cached(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  const auto ranges = std::atomic_load(&cached_weights);
  for (const auto& [begin, end] : *ranges)
    if (a >= begin && a < end) return true;
  return false;
}

std::string kernel_isa(c10::string_view isa) {
  if (isa == "amx") {
    TORCH_CHECK(cpu_has_amx(), "kernel_isa: this CPU (or OS) gives no AMX tiles with int8");
    quant_isa = kAmx;
  } else if (isa == "vnni") {
    TORCH_CHECK(cpu_has_vnni(), "kernel_isa: this CPU has no AVX-512 VNNI");
    quant_isa = kVnni;
  } else if (isa == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "kernel_isa: this CPU has no AVX-512 (F, BW, VL, DQ)");
    quant_isa = kAvx512;
  } else if (isa == "avx2") {
    quant_isa = kAvx2;
  } else {
    TORCH_CHECK(isa.empty(), "kernel_isa: 'amx', 'vnni', 'avx512', 'avx2' or '' (query) expected");
  }
  const int now = quant_isa;
  return now == kAmx ? "amx" : now == kVnni ? "vnni" : now == kAvx512 ? "avx512" : "avx2";
}

// The block format of a uint8 weight (N, bytes) for K input columns, from its bytes per block (qblocks.h).
int block_format(const at::Tensor& w, int64_t K) {
  TORCH_CHECK(K % 32 == 0, "small_linear: block-quantized weights need K % 32 == 0");
  for (int f : {kQ4, kQ8, kQ4K, kQ6K, kQ4Tiles, kQ8Tiles})
    if (w.size(1) == K / 32 * f) return f;
  TORCH_CHECK(false, "small_linear: a uint8 weight must hold GGUF blocks in the kernels' layout (20, 22, 24, 34, 36 "
                     "or 40 bytes per 32 columns of x: model/gguf_blocks.py pack_blocks)");
}

// A product y (M, N) = x (M, K) @ w^T (times the int8 scales, plus the bias) in two steps: prepare(x, M) derives what
// the kernels read from x (the fp32 rows as they are; for GGUF blocks 8-bit x, block scales and block sums), then
// rows(n, ne, y) computes weight rows n..ne-1 for all M input rows. A row's bits depend neither on how the weight
// rows are split nor on which thread prepared x: product() prepares once and shares rows over run_blocks; the
// decoding team of decoder_layers prepares on every thread (a few hundred elements) and shares the rows.
struct ProductWeight {
  // float / bf16 / fp16 / int8 rows (format 0) or GGUF blocks (format: bytes per block, qblocks.h)
  const at::Tensor* w = nullptr;
  const void* data = nullptr;  // w's elements, read by every task (data_ptr checks the dtype on each call)
  const float *scale = nullptr, *bias = nullptr;
  bool packed = false, cached = false;  // cached: keep_weights_cached
  int format = 0, parts = 0;
  int64_t K = 0, N = 0, block = 16;  // block: weight rows per task (64 for the tiles: one tile configuration)
};

struct Product : ProductWeight {
  // from prepare
  const float* x = nullptr;
  int64_t M = 0;
  std::vector<int64_t> first;  // chunks of input rows the kernels take at once
  std::vector<std::vector<uint8_t>> a;
  std::vector<int8_t> a8, xt;
  std::vector<float> dx, xs, xsum, xsum_t, dxt, xst;
  bool prompt = false;  // a prompt block (decoder_layers): Q4 rows with 8-bit x take the prompt kernel

  void bind(const at::Tensor& weight, const float* s, const float* b, bool pk, int64_t k) {
    w = &weight, data = weight.data_ptr(), scale = s, bias = b, packed = pk, K = k, N = weight.size(0);
    format = weight.scalar_type() == at::kByte ? block_format(weight, K) : 0;
    parts = activation_parts;
    block = tiles() && !avx2_int8() ? 64 : 16;
    cached = weights_cached(data);
    if (tiles()) {
      TORCH_CHECK((quant_isa == kAmx && parts == 2) || cpu_has_vnni() || avx2_int8(),
                  "small_linear: weights in the tiles layout need AMX, AVX-512 VNNI, or Q4 blocks with int8 "
                  "activations (activation_int8_parts(1)) on AVX2");
      TORCH_CHECK(N % 16 == 0, "small_linear: the tiles layout needs N % 16 == 0");
    }
  }
  bool tiles() const { return format == kQ4Tiles || format == kQ8Tiles; }
  // 8-bit x and AVX2 integer dots: the rows layout, or Q4 tiles (q4_tiles_avx2_int8)
  bool avx2_int8() const { return format && format != kQ8Tiles && parts == 1 && quant_isa == kAvx2; }
  bool prompt_q4() const { return prompt && avx2_int8() && (format == kQ4 || format == kQ4K || format == kQ4Tiles); }

  void prepare(const float* xin, int64_t m) {
    x = xin, M = m;
    const int64_t nb = K / 32;
    if (!format) {
      first = chunk_starts(M, 6);  // at most 6 input rows at a time: 12 accumulators + 2 weights + 1 input
    } else if (avx2_int8()) {  // 8-bit x, AVX2 integer dots
      first = chunk_starts(M, kQuantRowsAvx2Int8);
      a8.resize(M * K), dx.resize(M * nb), xs.resize(M * nb);
      for_rows(M, K, [&](int64_t m0, int64_t m1) {
        quantize_int8_blocks(m1 - m0, x + m0 * K, K, a8.data() + m0 * K, dx.data() + m0 * nb, xs.data() + m0 * nb);
      });
      if (prompt_q4()) {
        const int64_t chunks = (M + kPromptChunk - 1) / kPromptChunk;
        xt.resize(chunks * kPromptChunk * K), dxt.resize(chunks * nb * kPromptChunk), xst.resize(dxt.size());
        for_rows(chunks, kPromptChunk * K, [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c)
            interleave_prompt_rows(c, M, K, a8.data(), dx.data(), xs.data(), xt.data(), dxt.data(), xst.data());
        });
      }
    } else {
      const bool one_part = parts == 1 && tiles();
      xsum.assign(one_part ? 0 : M * nb, 0.f);  // sums of x over each block, in order (the m terms of Q4 rows)
      if (!xsum.empty())
        for_rows(M, K, [&](int64_t m0, int64_t m1) {
          for (int64_t i = m0 * nb; i < m1 * nb; ++i)
            for (int64_t k = 0; k < 32; ++k) xsum[i] += x[i * 32 + k];
        });
      if (!tiles()) {
        first = chunk_starts(M, quant_isa != kAvx2 ? kQuantRowsAvx512 : kQuantRowsAvx2);
        return;
      }
      // x split in int8 parts, scales and block sums per chunk of <= 8 rows
      const bool amx = quant_isa == kAmx && parts == 2;
      first = chunk_starts(M, kQuantRowsTiles);
      const int64_t chunks = static_cast<int64_t>(first.size()) - 1;
      a.resize(chunks);
      dx.assign(chunks * nb * 16, 0.f), xsum_t.assign(chunks * nb * 16, 0.f);
      for_rows(chunks, kQuantRowsTiles * K, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t m0 = first[c], mc = first[c + 1] - m0;
          a[c].resize(int8_parts_bytes(mc, K, parts));
          pack_int8_parts(static_cast<int>(mc), x + m0 * K, K, a[c].data(), dx.data() + c * nb * 16, parts,
                          amx || format == kQ8Tiles, one_part ? xsum_t.data() + c * nb * 16 : nullptr);
          if (one_part) continue;
          for (int64_t r = 0; r < mc; ++r)
            for (int64_t j = 0; j < nb; ++j) xsum_t[(c * nb + j) * 16 + r] = xsum[(m0 + r) * nb + j];
        }
      });
    }
  }

  // y[m, n..ne-1] for every input row m (y: (M, N) fp32)
  void rows(int64_t n, int64_t ne, float* y) const {
    const int64_t nb = K / 32;
    // one chunk of input rows: the weights are read once (prefetch_weights), unless kept cached for the next step
    const bool stream = first.size() == 2 && !cached;
    if (prompt_q4()) {
      const auto* wq = static_cast<const uint8_t*>(data);
      if (format == kQ4K) return prompt_rows<kQ4K>(xt.data(), dxt.data(), xst.data(), M, wq, bias, y, K, N, n, ne);
      if (format == kQ4Tiles)
        return prompt_rows<kQ4Tiles>(xt.data(), dxt.data(), xst.data(), M, wq, bias, y, K, N, n, ne);
      return prompt_rows<kQ4>(xt.data(), dxt.data(), xst.data(), M, wq, bias, y, K, N, n, ne);
    }
    for (size_t c = 0; c + 1 < first.size(); ++c) {
      const int64_t m0 = first[c], mc = first[c + 1] - m0;
      float* yc = y + m0 * N;
      if (!format) {
        float_rows(mc, x + m0 * K, yc, n, ne);
      } else if (avx2_int8()) {
        const int8_t* am = a8.data() + m0 * K;
        const float *dxm = dx.data() + m0 * nb, *xsm = xs.data() + m0 * nb;
        const auto* wq = static_cast<const uint8_t*>(data);
        const int rows_in = static_cast<int>(mc);
        if (format == kQ4Tiles) q4_tiles_avx2_int8(rows_in, am, dxm, xsm, wq, bias, yc, K, N, n, ne, stream);
        else quant_rows_avx2_int8(rows_in, am, dxm, xsm, wq, format, bias, yc, K, N, n, ne, stream);
      } else if (tiles()) {
        const float *dxc = dx.data() + c * nb * 16, *xs_t = xsum_t.data() + c * nb * 16;
        if (quant_isa == kAmx && parts == 2)
          quant_rows_amx(static_cast<int>(mc), a[c].data(), dxc, xs_t, static_cast<const uint8_t*>(data), format, bias, yc, K,
                         N, n, ne);
        else
          quant_rows_vnni(static_cast<int>(mc), a[c].data(), dxc, xs_t, static_cast<const uint8_t*>(data), format, parts,
                          bias, yc, K, N, n, ne, stream);
      } else if (quant_isa != kAvx2) {
        quant_rows_avx512(static_cast<int>(mc), x + m0 * K, xsum.data() + m0 * nb, static_cast<const uint8_t*>(data),
                          format, bias, yc, K, N, n, ne, stream);
      } else {
        quant_rows_avx2(static_cast<int>(mc), x + m0 * K, xsum.data() + m0 * nb, static_cast<const uint8_t*>(data),
                        format, bias, yc, K, N, n, ne);
      }
    }
  }

  void float_rows(int64_t mc, const float* xc, float* yc, int64_t n, int64_t ne) const {
    auto go = [&](auto wp) {
      using W = std::remove_const_t<std::remove_pointer_t<decltype(wp)>>;
      if (packed) rows_any<true, W>(mc, xc, wp, scale, bias, yc, K, N, n, ne);
      else rows_any<false, W>(mc, xc, wp, scale, bias, yc, K, N, n, ne);
    };
    switch (w->scalar_type()) {
      case at::kFloat: return go(static_cast<const float*>(data));
      case at::kBFloat16: return go(static_cast<const at::BFloat16*>(data));
      case at::kHalf: return go(static_cast<const at::Half*>(data));
      default: return go(static_cast<const int8_t*>(data));
    }
  }
};

// Weight rows [0, N) of p over all threads (run_blocks in blocks of p.block).
void run_product(const Product& p, float* y) {
  if (p.block == 64) run_blocks<64>(p.N, [&](int64_t n, int64_t ne) { p.rows(n, ne, y); });
  else run_blocks<16>(p.N, [&](int64_t n, int64_t ne) { p.rows(n, ne, y); });
}

void check_weight(const at::Tensor& w, int64_t K, bool packed, const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(w.is_contiguous(), "small_linear: contiguous weights expected");
  TORCH_CHECK(!packed || w.size(1) % 8 == 0, "small_linear: a packed weight needs K % 8 == 0");
  const bool blocks = w.scalar_type() == at::kByte;
  TORCH_CHECK(blocks || w.size(1) == K, "small_linear: x (M, K), w (N, K) expected");
  TORCH_CHECK(!blocks || (!packed && !(scale.has_value() && scale->defined())),
              "small_linear: block-quantized weights carry their own scales and are never packed");
  const auto t = w.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kChar || t == at::kByte,
              "small_linear: weight dtype must be float32, bfloat16, float16, int8 or uint8 (GGUF blocks)");
}

// An optional scale or bias as a contiguous fp32 tensor (undefined when absent).
at::Tensor as_fp32(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->to(at::kFloat).contiguous() : at::Tensor();
}
inline const float* fp32_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// y (M, N) fp32 = x (M, K) fp32 @ w^T, times the int8 scales, plus the bias: the batch-invariant product.
void product(const float* x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
             const c10::optional<at::Tensor>& bias, float* y, int64_t M, int64_t K, bool packed, bool prompt = false) {
  check_weight(w, K, packed, scale);
  if (M == 0 || w.size(0) == 0) return;
  const at::Tensor sc = as_fp32(scale), bc = as_fp32(bias);
  Product p;
  p.bind(w, fp32_ptr(sc), fp32_ptr(bc), packed, K);
  p.prompt = prompt;
  p.prepare(x, M);
  run_product(p, y);
}

// Scratch rows for the kernel, 64-byte aligned: it reads x 32 bytes at a time, and rows starting 16 bytes into a
// cache line (malloc's alignment) split every other load over two lines (5-position products ~4% slower).
struct FreeDeleter { void operator()(float* p) const { std::free(p); } };
inline std::unique_ptr<float[], FreeDeleter> aligned_floats(int64_t n) {  // not zero-filled
  void* p = std::aligned_alloc(64, (static_cast<size_t>(n) * sizeof(float) + 63) & ~size_t(63));
  TORCH_CHECK(p || n == 0, "small_linear: out of memory");
  return std::unique_ptr<float[], FreeDeleter>(static_cast<float*>(p));
}

template <typename A>
void to_fp32(const A* a, float* f, int64_t n) {  // exact
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, load8(a + i));
  for (; i < n; ++i) f[i] = static_cast<float>(a[i]);
}

// Columns n..ne-1 of y (T, N) fp32 to A, plus the residual when given: the product rounded to A, then the sum in
// fp32 rounded to A (at::add's rounding).
template <typename A>
void round_out(const float* y, const A* residual, A* out, int64_t T, int64_t N, int64_t n, int64_t ne) {
  for (int64_t m = 0; m < T; ++m) {
    int64_t i = m * N + n;
    const int64_t end = m * N + ne;
    for (; i + 8 <= end; i += 8) {
      __m256 v = round8<A>(_mm256_loadu_ps(y + i));
      if (residual) v = _mm256_add_ps(load8(residual + i), v);
      store8(out + i, v);
    }
    for (; i < end; ++i) {
      const A v = static_cast<A>(y[i]);
      out[i] = residual ? static_cast<A>(static_cast<float>(residual[i]) + static_cast<float>(v)) : v;
    }
  }
}

// The product of x (M, K) in dtype A and w, in A, plus `residual` (M, N) when given, rounded as the tensor ops it
// replaces round (the product to A, then the sum in fp32 to A: at::add's rounding). In decoder_layers those ops
// (x to fp32, y back to A, the residual add: ~20 dispatched ops per layer) ran on one thread while the other waited.
template <typename A>
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                       const c10::optional<at::Tensor>& bias, bool packed, const at::Tensor* residual, bool prompt) {
  constexpr bool F32 = std::is_same_v<A, float>;
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), MN = M * N;
  const A* xa = x.data_ptr<A>();
  at::Tensor out = at::empty({M, N}, x.options());
  if (F32 && !residual) {  // nothing to convert or add: the product goes straight to the output
    product(reinterpret_cast<const float*>(xa), w, scale, bias, reinterpret_cast<float*>(out.data_ptr<A>()), M, K,
            packed, prompt);
    return out;
  }
  std::unique_ptr<float[], FreeDeleter> xbuf;
  const float* xf = reinterpret_cast<const float*>(xa);
  if constexpr (!F32) {
    xbuf = aligned_floats(M * K);
    float* xb = xbuf.get();
    for_rows(M, K, [&](int64_t m0, int64_t m1) { to_fp32(xa + m0 * K, xb + m0 * K, (m1 - m0) * K); });
    xf = xb;
  }
  const auto ybuf = aligned_floats(MN);  // the kernel writes every element
  product(xf, w, scale, bias, ybuf.get(), M, K, packed, prompt);
  A* o = out.data_ptr<A>();
  const A* r = residual ? residual->data_ptr<A>() : nullptr;
  const float* yb = ybuf.get();
  for_rows(M, N, [&](int64_t m0, int64_t m1) {
    round_out(yb + m0 * N, r ? r + m0 * N : nullptr, o + m0 * N, m1 - m0, N, 0, N);
  });
  return out;
}

// [residual +] x @ w^T in x's dtype (float32, bfloat16 or float16): linear_rows for that dtype. `prompt`: x is a
// prompt block (decoder_layers), whose products need not be batch invariant.
at::Tensor linear_in_dtype(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                           const c10::optional<at::Tensor>& bias, bool packed, const at::Tensor* residual,
                           bool prompt = false) {
  TORCH_CHECK(!residual || (residual->sizes() == at::IntArrayRef({x.size(0), w.size(0)}) &&
                            residual->scalar_type() == x.scalar_type() && residual->is_contiguous()),
              "small_linear: the residual must be a contiguous (M, N) tensor of x's dtype");
  return with_activation_dtype(x.scalar_type(), "small_linear: float32, bfloat16 or float16 activations expected",
                               [&](auto a) {
                                 return linear_rows<decltype(a)>(x, w, scale, bias, packed, residual, prompt);
                               });
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                        const c10::optional<at::Tensor>& bias, bool float_out, bool packed, bool prompt) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "small_linear: x (M, K), w (N, K) expected");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "small_linear: CPU tensors only");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  if (!float_out || x.scalar_type() == at::kFloat)
    return linear_in_dtype(xc, wc, scale, bias, packed, nullptr, prompt);
  const at::Tensor xf = xc.to(at::kFloat);
  at::Tensor y = at::empty({xf.size(0), wc.size(0)}, xf.options());
  product(xf.data_ptr<float>(), wc, scale, bias, y.data_ptr<float>(), xf.size(0), xf.size(1), packed, prompt);
  return y;
}

// ---- RMSNorm as HF Llama computes it: normalise in fp32, round to the model dtype, then scale by the weight. ----
template <typename A>
void rms_norm_rows(const A* x, const A* w, A* y, int64_t T, int64_t D, double eps) {
  const int64_t D8 = D & ~int64_t(7);
  for (int64_t t = 0; t < T; ++t) {
    const A* xr = x + t * D;
    A* yr = y + t * D;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D8; d += 8) acc = _mm256_fmadd_ps(load8(xr + d), load8(xr + d), acc);
    float ss = hsum8(acc);
    for (int64_t d = D8; d < D; ++d) { const float v = static_cast<float>(xr[d]); ss += v * v; }
    const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
    const __m256 rv = _mm256_set1_ps(r);
    for (int64_t d = 0; d < D8; d += 8)
      store8(yr + d, _mm256_mul_ps(load8(w + d), round8<A>(_mm256_mul_ps(load8(xr + d), rv))));
    for (int64_t d = D8; d < D; ++d) {
      const A n = static_cast<A>(static_cast<float>(xr[d]) * r);
      yr[d] = static_cast<A>(static_cast<float>(w[d]) * static_cast<float>(n));
    }
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && x.size(1) == w.size(0) && x.scalar_type() == w.scalar_type(),
              "rms_norm: x (T, D) and w (D) of one dtype expected");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t T = xc.size(0), D = xc.size(1);
  with_activation_dtype(xc.scalar_type(), "rms_norm: float32, bfloat16 or float16 expected", [&](auto a) {
    using A = decltype(a);
    const A *xp = xc.data_ptr<A>(), *wp = wc.data_ptr<A>();
    A* yp = y.data_ptr<A>();
    for_rows(T, D, [&](int64_t t0, int64_t t1) { rms_norm_rows(xp + t0 * D, wp, yp + t0 * D, t1 - t0, D, eps); });
  });
  return y;
}

// ---- gate(g) * up of the fused gate/up projection: (T, 2I) -> (T, I), rounded as at::silu (or at::gelu with
// approximate="tanh") then at::mul (the gate to A, the product to A). One pass instead of four dispatched ops (two
// narrows, the activation, mul: ~15 us a layer at one position, most of it dispatch). exp is exp8, not the one torch
// uses (the two can differ by an ulp), so FeedForward uses these ops too wherever the native kernels run: the per-op
// path and decoder_layers stay identical. Both gates are g / (1 + exp(z)), with z = -g for SiLU and z = -2u for
// GeGLU's gelu_tanh (Gemma 3), u = sqrt(2/pi) (g + 0.044715 g^3), since (1 + tanh u) / 2 = sigmoid(2u). ----
struct SiluGate {
  static __m256 z(__m256 x) { return _mm256_xor_ps(x, _mm256_set1_ps(-0.f)); }
  static float z(float x) { return -x; }
};
struct GeluTanhGate {
  static constexpr float k1 = -1.5957691216057308f, k3 = k1 * 0.044715f;  // -2u = x (k1 + k3 x^2)
  static __m256 z(__m256 x) {
    return _mm256_mul_ps(x, _mm256_fmadd_ps(_mm256_set1_ps(k3), _mm256_mul_ps(x, x), _mm256_set1_ps(k1)));
  }
  static float z(float x) { return x * (k1 + k3 * x * x); }
};

// Columns c0..c1-1 of every row (c0 and c1 multiples of 8, or c1 = I): each element as the whole row computes it.
template <typename Gate, typename A>
void gated_mul_cols(const A* gu, A* out, int64_t T, int64_t I, int64_t c0, int64_t c1) {
  const int64_t I8 = std::min(c1, I & ~int64_t(7));
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f), cap = _mm256_set1_ps(88.f),
               huge = _mm256_set1_ps(88.7228f);  // ln(FLT_MAX): e^z overflows to inf above it
  for (int64_t t = 0; t < T; ++t) {
    const A* g = gu + t * 2 * I;
    const A* u = g + I;
    A* o = out + t * I;
    for (int64_t d = c0; d < I8; d += 8) {
      const __m256 x = load8(g + d), z = Gate::z(x);
      __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_min_ps(z, cap))));  // exp8 has no overflow
      s = _mm256_blendv_ps(s, _mm256_and_ps(x, sign), _mm256_cmp_ps(z, huge, _CMP_GT_OQ));  // x / inf = -0
      store8(o + d, _mm256_mul_ps(round8<A>(s), load8(u + d)));
    }
    for (int64_t d = std::max(c0, I8); d < c1; ++d) {
      const float x = static_cast<float>(g[d]);
      const A s = static_cast<A>(x / (1.f + std::exp(Gate::z(x))));
      o[d] = static_cast<A>(static_cast<float>(s) * static_cast<float>(u[d]));
    }
  }
}

template <typename Gate>
at::Tensor gated_mul(const at::Tensor& gate_up, const char* op) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, op, ": gate_up (T, 2I) expected");
  const at::Tensor gu = gate_up.contiguous();
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  at::Tensor out = at::empty({T, I}, gu.options());
  const std::string error = std::string(op) + ": float32, bfloat16 or float16 expected";
  with_activation_dtype(gu.scalar_type(), error.c_str(), [&](auto a) {
    using A = decltype(a);
    const A* g = gu.data_ptr<A>();
    A* o = out.data_ptr<A>();
    for_rows(T, I, [&](int64_t t0, int64_t t1) { gated_mul_cols<Gate>(g + t0 * 2 * I, o + t0 * I, t1 - t0, I, 0, I); });
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up) { return gated_mul<SiluGate>(gate_up, "silu_mul"); }
at::Tensor gelu_tanh_mul(const at::Tensor& gate_up) { return gated_mul<GeluTanhGate>(gate_up, "gelu_tanh_mul"); }

// ---- RoPE + KV-cache write + causal grouped-query attention for a block of T positions at `start`. ----
// qkv (T, (H + 2G) * D) is the fused projection; cos/sin (T, D) the rope tables of positions start..start+T-1;
// kc/vc (G, L, D) are one layer's cache buffers. Rotated K and V are written at [start, start+T); with `attend` the
// result (T, H*D) of softmax(q k^T / sqrt(D)) v over keys 0..start+i for row i is returned (with a sliding `window`
// > 0, keys start+i-window+1..start+i: Gemma's local layers). q stays fp32; scores,
// softmax and the weighted sum are fp32 and run over the keys in order, one row at a time: a row's result does not
// depend on T (batch invariance).
template <typename A>
void rope_row(const A* x, const A* cos, const A* sin, float* out, int64_t D) {
  const int64_t h = D / 2;
  if (h % 8 == 0) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 rot = d < h ? _mm256_xor_ps(load8(x + d + h), sign) : load8(x + d - h);
      _mm256_storeu_ps(out + d, _mm256_fmadd_ps(load8(x + d), load8(cos + d), _mm256_mul_ps(rot, load8(sin + d))));
    }
    return;
  }
  for (int64_t d = 0; d < D; ++d) {
    const float rot = d < h ? -static_cast<float>(x[d + h]) : static_cast<float>(x[d - h]);
    out[d] = std::fma(static_cast<float>(x[d]), static_cast<float>(cos[d]), rot * static_cast<float>(sin[d]));
  }
}

// The four sums of a0..a3, each as ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)).
inline __m128 hsum8x4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// p[j] = scale * q . k[j] for keys j0 <= j < j1: one FMA chain over d in order per key and the same horizontal
// sum, whichever path a key takes. Four keys at a time give four independent chains (one at a time waited on the
// FMA latency).
template <typename A>
inline void key_scores(const float* q, const A* k, int64_t j0, int64_t j1, int64_t D, float scale, float* p) {
  const __m128 sc = _mm_set1_ps(scale);
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) {
    const A* k0 = k + j * D;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qd = _mm256_loadu_ps(q + d);
      a0 = _mm256_fmadd_ps(qd, load8(k0 + d), a0);
      a1 = _mm256_fmadd_ps(qd, load8(k0 + D + d), a1);
      a2 = _mm256_fmadd_ps(qd, load8(k0 + 2 * D + d), a2);
      a3 = _mm256_fmadd_ps(qd, load8(k0 + 3 * D + d), a3);
    }
    _mm_storeu_ps(p + j, _mm_mul_ps(hsum8x4(a0, a1, a2, a3), sc));
  }
  for (; j < j1; ++j) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + j * D + d), a);
    const __m256 z = _mm256_setzero_ps();
    p[j] = _mm_cvtss_f32(_mm_mul_ps(hsum8x4(a, z, z, z), sc));
  }
}

// p[0, n) = exp(p - max p), in place; returns 1 / sum. exp eight at a time (a scalar std::exp per key took about
// half of the attention time).
inline float softmax_row(float* p, int64_t n) {
  __m256 m8 = _mm256_set1_ps(-INFINITY);  // the max, eight lanes at a time (a scalar max waited on each compare)
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(p + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m8);
  float m = *std::max_element(lanes, lanes + 8);
  for (; i < n; ++i) m = std::max(m, p[i]);
  const __m256 mx = _mm256_set1_ps(m);
  __m256 sv = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), mx));
    _mm256_storeu_ps(p + j, e);
    sv = _mm256_add_ps(sv, e);
  }
  float sum = hsum8(sv);
  for (; j < n; ++j) { p[j] = std::exp(p[j] - m); sum += p[j]; }
  return 1.f / sum;
}

// acc[0, 8C) += sum_j p[j] v[j * D + (0, 8C)] over keys j0 <= j < j1 in order, keys in the outer loop: C independent
// FMA chains. C is a compile-time constant so that the accumulators stay in registers (with a run-time count they
// lived on the stack: half the attention time).
template <int C, typename A>
inline void weighted_sum(const float* p, const A* v, int64_t j0, int64_t j1, int64_t D, float* acc) {
  __m256 a[C];
  for (int i = 0; i < C; ++i) a[i] = _mm256_loadu_ps(acc + 8 * i);
  for (int64_t j = j0; j < j1; ++j) {
    const __m256 pj = _mm256_set1_ps(p[j]);
    for (int i = 0; i < C; ++i) a[i] = _mm256_fmadd_ps(pj, load8(v + j * D + 8 * i), a[i]);
  }
  for (int i = 0; i < C; ++i) _mm256_storeu_ps(acc + 8 * i, a[i]);
}

template <typename A>
inline void weighted_sum_any(const float* p, const A* v, int64_t j0, int64_t j1, int64_t D, float* acc) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    switch (std::min<int64_t>(8, (D - d0) / 8)) {
      case 8: weighted_sum<8>(p, v + d0, j0, j1, D, acc + d0); break;
      case 7: weighted_sum<7>(p, v + d0, j0, j1, D, acc + d0); break;
      case 6: weighted_sum<6>(p, v + d0, j0, j1, D, acc + d0); break;
      case 5: weighted_sum<5>(p, v + d0, j0, j1, D, acc + d0); break;
      case 4: weighted_sum<4>(p, v + d0, j0, j1, D, acc + d0); break;
      case 3: weighted_sum<3>(p, v + d0, j0, j1, D, acc + d0); break;
      case 2: weighted_sum<2>(p, v + d0, j0, j1, D, acc + d0); break;
      default: weighted_sum<1>(p, v + d0, j0, j1, D, acc + d0); break;
    }
  }
}

// key_scores for NR rows of q (stride D) at once, KEYS keys at a time: each K vector is converted once for all NR
// rows instead of once per row (5 rows after 600 float16 keys: 16% less time per call). Every key keeps its own
// FMA chain over d in order and the same horizontal sum (hsum8x4 sums each of its four inputs on its own), so the
// scores equal key_scores' bit for bit. p rows have stride S.
template <int NR, typename A>
inline void key_scores_rows(const float* q, const A* k, int64_t j0, int64_t j1, int64_t D, float scale, float* p,
                            int64_t S) {
  constexpr int KEYS = NR <= 2 ? 4 : 2, N = NR * KEYS;  // N <= 10 accumulators
  const __m128 sc = _mm_set1_ps(scale);
  const __m256 z = _mm256_setzero_ps();
  int64_t j = j0;
  for (; j + KEYS <= j1; j += KEYS) {
    __m256 a[N + 3];  // [row][key], padded to a multiple of four for the sums
    for (int i = 0; i < N + 3; ++i) a[i] = z;
    for (int64_t d = 0; d < D; d += 8) {
      __m256 kv[KEYS];
      for (int c = 0; c < KEYS; ++c) kv[c] = load8(k + (j + c) * D + d);
      for (int r = 0; r < NR; ++r) {
        const __m256 qd = _mm256_loadu_ps(q + r * D + d);
        for (int c = 0; c < KEYS; ++c) a[r * KEYS + c] = _mm256_fmadd_ps(qd, kv[c], a[r * KEYS + c]);
      }
    }
    for (int i = 0; i < N; i += 4) {
      alignas(16) float t[4];
      _mm_store_ps(t, _mm_mul_ps(hsum8x4(a[i], a[i + 1], a[i + 2], a[i + 3]), sc));
      for (int l = 0; l < 4 && i + l < N; ++l) p[(i + l) / KEYS * S + j + (i + l) % KEYS] = t[l];
    }
  }
  for (int r = 0; r < NR; ++r) key_scores(q + r * D, k, j, j1, D, scale, p + r * S);
}

// weighted_sum for NR rows at once over keys j0..j1-1, VC vectors of columns at a time: each V vector is converted
// once for all rows. Per column the sum still runs over the keys in order, as in weighted_sum (bit-identical).
template <int NR, typename A>
inline void weighted_sum_rows(const float* p, int64_t S, const A* v, int64_t j0, int64_t j1, int64_t D, float* acc) {
  constexpr int VC = NR <= 2 ? 4 : 2;  // NR * VC <= 10 accumulators
  int64_t d0 = 0;
  for (; d0 + 8 * VC <= D; d0 += 8 * VC) {
    __m256 a[NR][VC];
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < VC; ++c) a[r][c] = _mm256_loadu_ps(acc + r * D + d0 + 8 * c);
    for (int64_t j = j0; j < j1; ++j) {
      __m256 vv[VC];
      for (int c = 0; c < VC; ++c) vv[c] = load8(v + j * D + d0 + 8 * c);
      for (int r = 0; r < NR; ++r) {
        const __m256 pj = _mm256_broadcast_ss(p + r * S + j);
        for (int c = 0; c < VC; ++c) a[r][c] = _mm256_fmadd_ps(pj, vv[c], a[r][c]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < VC; ++c) _mm256_storeu_ps(acc + r * D + d0 + 8 * c, a[r][c]);
  }
  for (; d0 < D; d0 += 8)  // the last columns, 8 at a time, row by row
    for (int r = 0; r < NR; ++r) weighted_sum<1>(p + r * S, v + d0, j0, j1, D, acc + r * D + d0);
}

// Rows 0..NR-1 of a group (row r sees keys 0..keys+r-1): scores, softmax and the weighted sum. The keys all rows see
// go through the NR-row loops, each row's own last keys through the one-row ones (in order, so every chain is the
// one-row chain); a single row keeps the one-row loops throughout (four keys at a time).
template <int NR, typename A>
void attend_rows(const float* q, const A* kh, const A* vh, int64_t keys, int64_t D, float scale, float* p, int64_t S,
                 float* acc, float* inv) {
  if constexpr (NR == 1) key_scores(q, kh, 0, keys, D, scale, p);
  else key_scores_rows<NR>(q, kh, 0, keys, D, scale, p, S);
  for (int r = 1; r < NR; ++r) key_scores(q + r * D, kh, keys, keys + r, D, scale, p + r * S);
  for (int r = 0; r < NR; ++r) inv[r] = softmax_row(p + r * S, keys + r);
  if constexpr (NR == 1) weighted_sum_any(p, vh, 0, keys, D, acc);
  else weighted_sum_rows<NR>(p, S, vh, 0, keys, D, acc);
  for (int r = 1; r < NR; ++r) weighted_sum_any(p + r * S, vh, keys, keys + r, D, acc + r * D);
}

// NH query heads of one KV head, one row each, over keys 0..keys-1 (a one-token step): each K and V vector loaded
// once for the NH heads, through the NR-row loops with the heads as rows, so every head's bits are attend_rows<1>'s.
template <int NH, typename A>
void attend_heads(const float* q, const A* kh, const A* vh, int64_t keys, int64_t D, float scale, float* p, int64_t S,
                  float* acc, float* inv) {
  key_scores_rows<NH>(q, kh, 0, keys, D, scale, p, S);
  for (int r = 0; r < NH; ++r) inv[r] = softmax_row(p + r * S, keys);
  weighted_sum_rows<NH>(p, S, vh, 0, keys, D, acc);
}

// The AVX-512 attention kernels (attention.h) apply where the CPU has AVX-512, the kernels are not held to AVX2 and
// D % 64 == 0: a long prompt takes the prompt kernel, every other block the decoding one (one-token steps, chains,
// trees, sliding windows), so rows stay bit-identical across them.
inline bool attention_avx512(int64_t D) { return D % 64 == 0 && cpu_has_avx512() && quant_isa != kAvx2; }

// attention.h's kv_dtype for a cache of A: 0 fp32, 1 fp16, 2 bf16.
template <typename A>
constexpr int kv_dtype_code() { return std::is_same<A, float>::value ? 0 : std::is_same<A, at::Half>::value ? 1 : 2; }

struct DecodeBuffers { std::vector<float> q, o, scratch; };  // one thread's

// Block positions t0..t1-1 of query heads h0..h1-1 (one KV head's) through decode_attention_avx512, keys as
// attention.h describes: RoPE on q first, the result stored in A.
template <typename A>
void attend_512(const A* qkv, const A* cos, const A* sin, const A* kc, const A* vc, A* out, int64_t t0, int64_t t1,
                int64_t h0, int64_t h1, int64_t H, int64_t G, int64_t D, int64_t L, int64_t lo, int64_t c1,
                const int64_t* extra, int64_t W, DecodeBuffers& b) {
  const int64_t T = t1 - t0, R = (h1 - h0) * T, row = (H + 2 * G) * D, g = h0 / (H / G);
  b.q.resize(R * D);
  b.o.resize(R * D);
  b.scratch.resize(decode_attention_scratch(R, c1 - lo, extra ? W : T, D));
  for (int64_t h = h0; h < h1; ++h)
    for (int64_t t = t0; t < t1; ++t)
      rope_row(qkv + t * row + h * D, cos + t * D, sin + t * D, b.q.data() + ((h - h0) * T + t - t0) * D, D);
  decode_attention_avx512(b.q.data(), R, T, kc + g * L * D, vc + g * L * D, kv_dtype_code<A>(), D,
                          1.f / std::sqrt(static_cast<float>(D)), lo, c1, extra, W, b.o.data(), b.scratch.data());
  for (int64_t h = h0; h < h1; ++h)
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t d = 0; d < D; d += 8)
        store8(out + t * H * D + h * D + d, _mm256_loadu_ps(b.o.data() + ((h - h0) * T + t - t0) * D + d));
}

// f(h0, h1, t0, t1, buffers) over parts of the work, in parallel: a part is query heads h0..h1-1 of one KV head at
// block positions t0..t1-1, and the K and V it reads are converted once for all its rows (one thread, 25-30% less
// time than head by head at 200-700 keys on Zen 5). Whole KV heads where the threads divide them; else each KV
// head's positions in `split` parts, so that the parts divide evenly (SmolLM2's 3 KV heads on 2 threads: 6 parts,
// 3 a thread; 4-position blocks 5-13% faster than head by head, and whole KV heads split 2:1 cost more than the
// sharing saved); blocks with fewer positions than that (one-token steps) go head by head. From kWholeKvHeadsFrom
// keys on, reading each K and V row fewer times outweighs even shares: one-token steps go by whole KV heads (1.00x
// at 200-650 keys, 1.06-1.09x at 800-900, 1.22x at 1200, 1.27x at 1800 against head by head), and blocks by whole
// KV heads as far as the threads divide them, the rest by positions (SmolLM2: two whole, the third in two halves;
// 2-3 positions 1.07-1.20x at 900-1400 keys, 5-8 within noise; in situ on cnn_dm plain decoding 1.09x and
// self-speculation 1.06x; Zen 5). A row's bits do not depend on the parts (attention.h). `work`: small problems
// stay on one thread.
constexpr int64_t kWholeKvHeadsFrom = 768;

struct HeadSets {
  int64_t G, group, split, whole = 0;
  bool by_position;
  // keys: the most keys a row of the block attends to
  HeadSets(int64_t H, int64_t G_, int64_t T, int64_t keys, int64_t threads) : G(G_), group(H / G_) {
    const int64_t even = threads / std::gcd(G, threads);  // parts per KV head that divide evenly (1: whole heads)
    by_position = T >= even;
    split = by_position ? even : group;
    if (keys >= kWholeKvHeadsFrom && G >= threads && even > 1) {
      by_position = true;
      if (T >= even) whole = G - G % threads;  // the rest by position
      else split = 1;                          // one-token steps: every KV head whole
    }
  }
  int64_t parts() const { return whole + (G - whole) * split; }
  // part u: f(h0, h1, t0, t1, buffers)
  template <typename F>
  void run(int64_t u, int64_t T, const F& f, DecodeBuffers& b) const {
    if (u < whole) return f(u * group, (u + 1) * group, 0, T, b);
    const int64_t v = u - whole, g = whole + v / split, i = v % split;
    if (by_position) f(g * group, (g + 1) * group, T * i / split, T * (i + 1) / split, b);
    else f(g * group + i, g * group + i + 1, 0, T, b);  // split == group: one query head
  }
};

template <typename F>
void for_head_sets(int64_t H, int64_t G, int64_t T, int64_t keys, int64_t work, const F& f) {
  const int64_t threads = work < (1 << 14) ? 1 : at::get_num_threads();
  const HeadSets sets(H, G, T, keys, threads);
  at::parallel_for(0, sets.parts(), threads == 1 ? sets.parts() : 1, [&](int64_t u0, int64_t u1) {
    DecodeBuffers b;
    for (int64_t u = u0; u < u1; ++u) sets.run(u, T, f, b);
  });
}

// One part of decoding attention (AVX-512, attention.h) of a block at slots start..start+T-1: query heads h0..h1-1
// of one KV head at block positions a..z-1. Chain (paths null): row t sees keys [0, start + 1 + a) shared by the
// part's rows, then its own start + 1 + a .. start + t. Tree: the rows of a run with the same prefix and window
// start go through together, each with its path (see tree_attention).
template <typename A>
struct DecodeAttentionPart {
  const A *qkv, *cos, *sin, *kc, *vc;
  A* out;
  int64_t start, H, G, D, L;
  const int64_t* paths;
  int64_t W, window;
  int64_t window_lo(const int64_t* path) const {  // the node's window start (0 without a window)
    int64_t n = 0;
    while (n < W && path[n] >= 0) ++n;
    return window > 0 ? std::max<int64_t>(0, path[0] + n - window) : 0;
  }
  void operator()(int64_t h0, int64_t h1, int64_t a, int64_t z, DecodeBuffers& b) const {
    if (!paths)
      return attend_512(qkv, cos, sin, kc, vc, out, a, z, h0, h1, H, G, D, L, 0, start + 1 + a, nullptr, 0, b);
    for (int64_t t0 = a, t1; t0 < z; t0 = t1) {
      const int64_t prefix = paths[t0 * W], lo = window_lo(paths + t0 * W);
      for (t1 = t0 + 1; t1 < z && paths[t1 * W] == prefix && window_lo(paths + t1 * W) == lo; ++t1) {}
      attend_512(qkv, cos, sin, kc, vc, out, t0, t1, h0, h1, H, G, D, L, lo, prefix, paths + t0 * W, W, b);
    }
  }
};

// One query head of a block at slots start..start+T-1 through the one-row loops (CPUs without AVX-512, and D not a
// multiple of 64). Chain (paths null): a head's rows are taken up to NR = 5 at a time (a verification block of
// k + 1 <= 5 positions in one go), each K and V vector converted once for all of them; a single row keeps the one-row
// loops (four keys at a time). Tree: node by node over its path (tree_attention). A head's result does not depend
// on which thread runs it or on the other heads.
struct RowBuffers { std::vector<float> q, p, acc, inv; };

template <typename A>
struct RowLoopsAttentionHead {
  const A *qkv, *cos, *sin, *kc, *vc;
  A* out;
  int64_t T, start, H, G, D, L;
  const int64_t* paths;
  int64_t W, window;

  void operator()(int64_t h, RowBuffers& b) const {
    const int64_t S = start + T, row = (H + 2 * G) * D;
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    const A* kh = kc + (h / (H / G)) * L * D;
    const A* vh = vc + (h / (H / G)) * L * D;
    if (paths) return tree(h, b, S, row, scale, kh, vh);
    constexpr int64_t ROWS = 16, NR = 5;
    decltype(&attend_rows<1, A>) const group_rows[NR] = {attend_rows<1, A>, attend_rows<2, A>, attend_rows<3, A>,
                                                          attend_rows<4, A>, attend_rows<5, A>};
    b.q.resize(ROWS * D), b.p.resize(ROWS * S), b.acc.resize(ROWS * D), b.inv.resize(ROWS);
    for (int64_t t0 = 0; t0 < T; t0 += ROWS) {
      const int64_t R = std::min(ROWS, T - t0);  // row r sees keys 0..start+t0+r
      for (int64_t r = 0; r < R; ++r)
        rope_row(qkv + (t0 + r) * row + h * D, cos + (t0 + r) * D, sin + (t0 + r) * D, b.q.data() + r * D, D);
      std::fill(b.acc.begin(), b.acc.end(), 0.f);
      for (int64_t g0 = 0; g0 < R; g0 += NR) {
        const int64_t nr = std::min(NR, R - g0), keys = start + t0 + g0 + 1;  // keys all nr rows see
        group_rows[nr - 1](b.q.data() + g0 * D, kh, vh, keys, D, scale, b.p.data() + g0 * S, S, b.acc.data() + g0 * D,
                           b.inv.data() + g0);
      }
      for (int64_t r = 0; r < R; ++r) {
        A* o = out + (t0 + r) * H * D + h * D;
        const __m256 iv = _mm256_set1_ps(b.inv[r]);
        for (int64_t d = 0; d < D; d += 8) store8(o + d, _mm256_mul_ps(_mm256_loadu_ps(b.acc.data() + r * D + d), iv));
      }
    }
  }

  // A one-token step (T = 1, no tree): query heads h0..h1-1, all of one KV head, together (attend_heads).
  void heads(int64_t h0, int64_t h1, RowBuffers& b) const {
    const int64_t S = start + 1, n = h1 - h0;
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    const A* kh = kc + (h0 / (H / G)) * L * D;
    const A* vh = vc + (h0 / (H / G)) * L * D;
    b.q.resize(n * D), b.p.resize(n * S), b.acc.assign(n * D, 0.f), b.inv.resize(n);
    for (int64_t i = 0; i < n; ++i) rope_row(qkv + (h0 + i) * D, cos, sin, b.q.data() + i * D, D);
    decltype(&attend_heads<1, A>) const go[4] = {attend_heads<1, A>, attend_heads<2, A>, attend_heads<3, A>,
                                                 attend_heads<4, A>};
    for (int64_t i = 0; i < n; i += 4)
      go[std::min<int64_t>(4, n - i) - 1](b.q.data() + i * D, kh, vh, S, D, scale, b.p.data() + i * S, S,
                                          b.acc.data() + i * D, b.inv.data() + i);
    for (int64_t i = 0; i < n; ++i) {
      A* o = out + (h0 + i) * D;
      const __m256 iv = _mm256_set1_ps(b.inv[i]);
      for (int64_t d = 0; d < D; d += 8) store8(o + d, _mm256_mul_ps(_mm256_loadu_ps(b.acc.data() + i * D + d), iv));
    }
  }

  void tree(int64_t h, RowBuffers& b, int64_t S, int64_t row, float scale, const A* kh, const A* vh) const {
    b.q.resize(D), b.p.resize(S), b.acc.resize(D);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t* path = paths + t * W;
      const int64_t prefix = path[0];
      int64_t n = 0;
      while (n < W && path[n] >= 0) ++n;
      // the node sits at position prefix + n - 1, as the last row of a chain holding the same keys would; its
      // window starts at lo (checked_paths keeps lo <= prefix: a tree is never deeper than the window)
      const int64_t lo = window > 0 ? std::max<int64_t>(0, prefix + n - window) : 0;
      rope_row(qkv + t * row + h * D, cos + t * D, sin + t * D, b.q.data(), D);
      // key j = prefix + m of the chain is slot path[m]: offset the base pointer so the one-row loops read it
      key_scores(b.q.data(), kh, lo, prefix, D, scale, b.p.data());
      for (int64_t m = 0; m < n; ++m)
        key_scores(b.q.data(), kh + (path[m] - prefix - m) * D, prefix + m, prefix + m + 1, D, scale, b.p.data());
      const float inv = softmax_row(b.p.data() + lo, prefix + n - lo);
      std::fill(b.acc.begin(), b.acc.end(), 0.f);
      weighted_sum_any(b.p.data(), vh, lo, prefix, D, b.acc.data());
      for (int64_t m = 0; m < n; ++m)
        weighted_sum_any(b.p.data(), vh + (path[m] - prefix - m) * D, prefix + m, prefix + m + 1, D, b.acc.data());
      A* o = out + t * H * D + h * D;
      const __m256 iv = _mm256_set1_ps(inv);
      for (int64_t d = 0; d < D; d += 8) store8(o + d, _mm256_mul_ps(_mm256_loadu_ps(b.acc.data() + d), iv));
    }
  }
};

// From this many keys a one-token step on the one-row loops goes by whole KV heads (RowLoopsAttentionHead::heads:
// each K and V vector loaded once for the query heads sharing it), else head by head, as heads come free. SmolLM2 (3
// KV heads of 3 query heads) on 2 threads, Zen 3, in one process: 0.95x at 100 keys, 1.0 at 400, 1.02-1.08x at
// 520-880 (threads unevenly loaded below that outweigh the loads saved; cf. kWholeKvHeadsFrom for AVX-512).
constexpr int64_t kWholeKvHeadsFromAvx2 = 512;

// Token-tree attention (decoding/self_speculative.py): row t attends to keys [0, path[0]) and to the slots of
// path = paths[t * W ..] (its ancestors and itself, ascending, -1 padded). The scores of those keys are laid out
// contiguously, as a chain holding the same keys would hold them, and every key goes through the one-row loops in
// the same order: a node's result is bit-identical to the same tokens decoded one at a time.
template <typename A>
void tree_attention(const A* qkv, const A* cos, const A* sin, const A* kc, const A* vc, A* out, int64_t T,
                    int64_t S, int64_t H, int64_t G, int64_t D, int64_t L, const int64_t* paths, int64_t W,
                    int64_t window) {
  if (attention_avx512(D))  // rows with the same prefix and window start go through together
    return for_head_sets(H, G, T, S, T * S * D * H,
                         DecodeAttentionPart<A>{qkv, cos, sin, kc, vc, out, S - T, H, G, D, L, paths, W, window});
  const RowLoopsAttentionHead<A> head{qkv, cos, sin, kc, vc, out, T, S - T, H, G, D, L, paths, W, window};
  at::parallel_for(0, H, T * S * D * H < (1 << 14) ? H : 1, [&](int64_t h0, int64_t h1) {
    RowBuffers b;
    for (int64_t h = h0; h < h1; ++h) head(h, b);
  });
}

// Sliding-window attention of a chain block: row t (position start + t) over keys lo..start+t, lo = max(0,
// start + t - window + 1), one row at a time through the one-row loops. With lo = 0 that is what attend_rows computes
// (its NR-row loops are bit-identical to the one-row ones), so a row's result depends neither on T nor on the path.
template <typename A>
struct WindowRowsHead {  // one query head of the block through the one-row loops (no AVX-512)
  const A *qkv, *cos, *sin, *kc, *vc;
  A* out;
  int64_t T, start, H, G, D, L, window;
  void operator()(int64_t h, RowBuffers& b) const {
    const int64_t row = (H + 2 * G) * D;
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    const A* kh = kc + (h / (H / G)) * L * D;
    const A* vh = vc + (h / (H / G)) * L * D;
    b.q.resize(D), b.p.resize(start + T), b.acc.resize(D);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t end = start + t + 1, lo = std::max<int64_t>(0, end - window);
      rope_row(qkv + t * row + h * D, cos + t * D, sin + t * D, b.q.data(), D);
      key_scores(b.q.data(), kh, lo, end, D, scale, b.p.data());
      const float inv = softmax_row(b.p.data() + lo, end - lo);
      std::fill(b.acc.begin(), b.acc.end(), 0.f);
      weighted_sum_any(b.p.data(), vh, lo, end, D, b.acc.data());
      A* o = out + t * H * D + h * D;
      const __m256 iv = _mm256_set1_ps(inv);
      for (int64_t d = 0; d < D; d += 8) store8(o + d, _mm256_mul_ps(_mm256_loadu_ps(b.acc.data() + d), iv));
    }
  }
};

// AVX-512: block positions a..z-1 of query heads h0..h1-1, position by position (each has its own window start).
template <typename A>
struct WindowAttentionPart {
  const A *qkv, *cos, *sin, *kc, *vc;
  A* out;
  int64_t start, H, G, D, L, window;
  void operator()(int64_t h0, int64_t h1, int64_t a, int64_t z, DecodeBuffers& b) const {
    for (int64_t t = a; t < z; ++t) {
      const int64_t end = start + t + 1;
      attend_512(qkv, cos, sin, kc, vc, out, t, t + 1, h0, h1, H, G, D, L, std::max<int64_t>(0, end - window), end,
                 nullptr, 0, b);
    }
  }
};

template <typename A>
void window_attention(const A* qkv, const A* cos, const A* sin, const A* kc, const A* vc, A* out, int64_t T,
                      int64_t start, int64_t H, int64_t G, int64_t D, int64_t L, int64_t window) {
  if (attention_avx512(D)) {  // position by position: each has its own window start
    for_head_sets(H, G, T, window, T * window * D * H,
                  WindowAttentionPart<A>{qkv, cos, sin, kc, vc, out, start, H, G, D, L, window});
    return;
  }
  const WindowRowsHead<A> head{qkv, cos, sin, kc, vc, out, T, start, H, G, D, L, window};
  at::parallel_for(0, H, T * window * D * H < (1 << 14) ? H : 1, [&](int64_t h0, int64_t h1) {
    RowBuffers b;
    for (int64_t h = h0; h < h1; ++h) head(h, b);
  });
}

// A prompt's causal attention on AVX2 (a block at position 0, no sliding window), for CPUs without AVX-512: the
// keys in the lanes (K transposed once per head, 8 keys per vector), so a score needs no horizontal sum and each key
// vector serves 8 query rows; the weighted sums of V run 4 rows at a time over 16 columns. The one-row loops took
// ~18% of a 613-token prefill on Zen 3 once the products had the prompt kernel. Deterministic; not the one-row
// loops' bits (a prompt need not be: attention.h). Rows r_begin..r_end - 1 of one head (r_begin a multiple of 8):
// q and out hold them from row r_begin, q padded to whole blocks of 8 rows; keys 0..r_end - 1.
template <typename A>
void prompt_attention_avx2_rows(const float* q, const A* k, const A* v, int64_t r_begin, int64_t r_end, int64_t D,
                                float scale, float* out, std::vector<float>& kt, std::vector<float>& p) {
  const int64_t T = r_end, S = (T + 7) / 8 * 8;
  kt.assign(S * D, 0.f);  // (S / 8, D, 8): key j's element d at ((j / 8) D + d) 8 + j % 8, zeros past T
  p.resize(8 * S);        // (8, S): one block of rows' scores, then weights
  alignas(32) float tmp[8];
  for (int64_t j = 0; j < T; ++j)
    for (int64_t d = 0; d < D; d += 8) {
      _mm256_store_ps(tmp, load8(k + j * D + d));
      for (int i = 0; i < 8; ++i) kt[((j / 8) * D + d + i) * 8 + j % 8] = tmp[i];
    }
  const __m256 sc = _mm256_set1_ps(scale);
  for (int64_t r0 = r_begin; r0 < T; r0 += 8) {
    const int64_t rows = std::min<int64_t>(8, T - r0), keys = r0 + rows;  // row r0 + r sees keys 0..r0 + r
    for (int64_t kb = 0; kb < (keys + 7) / 8; ++kb) {
      __m256 acc[8];
      for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
      const float* kk = kt.data() + kb * D * 8;
      for (int64_t d = 0; d < D; ++d) {
        const __m256 kd = _mm256_loadu_ps(kk + d * 8);
        for (int r = 0; r < 8; ++r)
          acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(q + (r0 - r_begin + r) * D + d), kd, acc[r]);
      }
      for (int r = 0; r < 8; ++r) _mm256_storeu_ps(p.data() + r * S + kb * 8, _mm256_mul_ps(acc[r], sc));
    }
    float inv[8];
    for (int64_t r = 0; r < rows; ++r) {
      float* pr = p.data() + r * S;
      inv[r] = softmax_row(pr, r0 + r + 1);
      std::fill(pr + r0 + r + 1, pr + keys, 0.f);  // later keys weigh nothing for this row
    }
    for (int64_t r1 = 0; r1 < rows; r1 += 4) {
      const int nr = static_cast<int>(std::min<int64_t>(4, rows - r1));
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        __m256 acc[4][2];
        for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int64_t j = 0; j < keys; ++j) {
          const __m256 v0 = load8(v + j * D + d0), v1 = load8(v + j * D + d0 + 8);
          for (int r = 0; r < 4; ++r) {
            const __m256 pj = _mm256_broadcast_ss(p.data() + (r1 + (r < nr ? r : 0)) * S + j);
            acc[r][0] = _mm256_fmadd_ps(pj, v0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(pj, v1, acc[r][1]);
          }
        }
        for (int r = 0; r < 4; ++r) {  // a constant trip count: with `r < nr` the sums lived on the stack
          if (r >= nr) break;
          const __m256 iv = _mm256_set1_ps(inv[r1 + r]);
          _mm256_storeu_ps(out + (r0 - r_begin + r1 + r) * D + d0, _mm256_mul_ps(acc[r][0], iv));
          _mm256_storeu_ps(out + (r0 - r_begin + r1 + r) * D + d0 + 8, _mm256_mul_ps(acc[r][1], iv));
        }
      }
    }
  }
}

// A prompt's attention (a block at position 0) on AVX-512 (attention.h), or on AVX2 where the CPU has no AVX-512 or
// kernel_isa is "avx2" (no sliding window shorter than the prompt there): AVX-512 head by head, AVX2 by parts of heads.
template <typename A>
void prompt_attention(const A* qkv, const A* cos, const A* sin, const A* kc, const A* vc, A* out, int64_t T,
                      int64_t H, int64_t G, int64_t D, int64_t L, int64_t window) {
  const int64_t row = (H + 2 * G) * D, group = H / G;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int kv = kv_dtype_code<A>();
  const bool avx512 = attention_avx512(D);
  if (!avx512) {
    // Work items (head, part of its rows). Row r costs ~r (causal), so part i of P ends at row T sqrt((i + 1) / P)
    // (whole blocks of 8): equal items, as many per thread (9 heads on 2 threads ran 5 against 4).
    const int64_t threads = at::get_num_threads(), P = threads / std::gcd(H, threads);
    std::vector<int64_t> cut(P + 1, T);
    for (int64_t i = 0; i < P; ++i)
      cut[i] = std::min<int64_t>(T, static_cast<int64_t>(std::lround(T * std::sqrt(double(i) / P) / 8)) * 8);
    at::parallel_for(0, H * P, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> q((T + 15) / 16 * 16 * D, 0.f), o(T * D), kt, p;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t h = i / P, a = cut[i % P], z = cut[i % P + 1];
        if (a >= z) continue;
        for (int64_t t = a; t < z; ++t)
          rope_row(qkv + t * row + h * D, cos + t * D, sin + t * D, q.data() + (t - a) * D, D);
        prompt_attention_avx2_rows(q.data(), kc + (h / group) * L * D, vc + (h / group) * L * D, a, z, D, scale,
                                   o.data(), kt, p);
        for (int64_t t = a; t < z; ++t)
          for (int64_t d = 0; d < D; d += 8)
            store8(out + t * H * D + h * D + d, _mm256_loadu_ps(o.data() + (t - a) * D + d));
      }
    });
    return;
  }
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> q((T + 15) / 16 * 16 * D, 0.f), o(T * D), scratch(prefill_attention_scratch(T, D));
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t t = 0; t < T; ++t) rope_row(qkv + t * row + h * D, cos + t * D, sin + t * D, q.data() + t * D, D);
      prefill_attention_avx512(q.data(), kc + (h / group) * L * D, vc + (h / group) * L * D, kv, T, D, window, scale,
                                 o.data(), scratch.data());
      for (int64_t t = 0; t < T; ++t)
        for (int64_t d = 0; d < D; d += 8) store8(out + t * H * D + h * D + d, _mm256_loadu_ps(o.data() + t * D + d));
    }
  });
}

// Rotated K and V of block rows 0..T-1 into the cache slots start..start+T-1, KV heads g0, g0 + step, ... < G.
template <typename A>
void write_kv(const A* qkv, const A* cos, const A* sin, A* kc, A* vc, int64_t T, int64_t start, int64_t H, int64_t G,
              int64_t D, int64_t L, int64_t g0, int64_t step) {
  const int64_t row = (H + 2 * G) * D;
  std::vector<float> tmp(D);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t g = g0; g < G; g += step) {
      const A* k = qkv + t * row + (H + g) * D;
      const A* v = qkv + t * row + (H + G + g) * D;
      rope_row(k, cos + t * D, sin + t * D, tmp.data(), D);
      A* kd = kc + (g * L + start + t) * D;
      A* vd = vc + (g * L + start + t) * D;
      for (int64_t d = 0; d < D; d += 8) store8(kd + d, _mm256_loadu_ps(tmp.data() + d));
      std::copy(v, v + D, vd);
    }
  }
}

template <typename A>
void attention_impl(const A* qkv, const A* cos, const A* sin, A* kc, A* vc, A* out, int64_t T, int64_t start,
                    int64_t H, int64_t G, int64_t D, int64_t L, bool attend, const int64_t* paths, int64_t W,
                    int64_t window) {
  write_kv(qkv, cos, sin, kc, vc, T, start, H, G, D, L, 0, 1);
  if (!attend) return;
  if (paths != nullptr)
    return tree_attention(qkv, cos, sin, kc, vc, out, T, start + T, H, G, D, L, paths, W, window);
  const bool avx512 = attention_avx512(D);
  if (start == 0 && T >= kPrefillAttentionRows && D % 16 == 0 && (avx512 || window <= 0 || T <= window))
    return prompt_attention(qkv, cos, sin, kc, vc, out, T, H, G, D, L, window);  // a prompt: never verification
  if (window > 0 && start + T > window)  // some row's window leaves out early keys
    return window_attention(qkv, cos, sin, kc, vc, out, T, start, H, G, D, L, window);
  const int64_t S = start + T;
  const int64_t grain = T * S * D * H < (1 << 14) ? H : 1;  // small problems: no thread hand-off
  if (attention_avx512(D))  // row t: keys [0, start + 1), then its own start + 1 .. start + t
    return for_head_sets(H, G, T, S, T * S * D * H,
                         DecodeAttentionPart<A>{qkv, cos, sin, kc, vc, out, start, H, G, D, L, nullptr, 0, 0});
  const RowLoopsAttentionHead<A> head{qkv, cos, sin, kc, vc, out, T, start, H, G, D, L, nullptr, 0, 0};
  if (T == 1 && S >= kWholeKvHeadsFromAvx2) {
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
      RowBuffers b;
      for (int64_t g = g0; g < g1; ++g) head.heads(g * (H / G), (g + 1) * (H / G), b);
    });
    return;
  }
  at::parallel_for(0, H, grain, [&](int64_t h0, int64_t h1) {
    RowBuffers b;
    for (int64_t h = h0; h < h1; ++h) head(h, b);
  });
}

// Checks a tree's paths (T, W) for a block at slots start..start+T-1: row t's path is ascending, starts at or before
// `start` and ends with its own slot (keys outside the cache would be read otherwise).
at::Tensor checked_paths(const c10::optional<at::Tensor>& tree, int64_t T, int64_t start, int64_t window) {
  if (!tree.has_value()) return at::Tensor();
  const at::Tensor paths = tree->contiguous();
  TORCH_CHECK(paths.scalar_type() == at::kLong && paths.dim() == 2 && paths.size(0) == T && paths.size(1) >= 1,
              "rope_cache_attention: tree paths (T, W) int64 expected");
  const int64_t W = paths.size(1);
  const int64_t* p = paths.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    int64_t n = 1;
    TORCH_CHECK(p[t * W] >= 0 && p[t * W] <= start, "rope_cache_attention: a tree path must start at or before the block");
    while (n < W && p[t * W + n] >= 0) {
      TORCH_CHECK(p[t * W + n] > p[t * W + n - 1], "rope_cache_attention: tree paths must be ascending");
      ++n;
    }
    TORCH_CHECK(p[t * W + n - 1] == start + t && p[t * W] + n - 1 <= start + t,
                "rope_cache_attention: a tree path must end at its own row's slot");
    TORCH_CHECK(window <= 0 || n <= window, "rope_cache_attention: a tree deeper than the sliding window");
  }
  return paths;
}

at::Tensor rope_cache_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor kc,
                                at::Tensor vc, int64_t start, int64_t n_heads, int64_t n_kv_heads, bool attend,
                                const c10::optional<at::Tensor>& tree, int64_t window) {
  const int64_t T = qkv.size(0), D = kc.size(2), L = kc.size(1);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (n_heads + 2 * n_kv_heads) * D && D % 8 == 0 && D % 2 == 0,
              "rope_cache_attention: qkv (T, (H + 2G) * D) with D a multiple of 8 expected");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kc.sizes() == vc.sizes() && kc.size(0) == n_kv_heads,
              "rope_cache_attention: contiguous (G, L, D) caches expected");
  TORCH_CHECK(start + T <= L && cos.size(0) == T && cos.size(1) == D, "rope_cache_attention: bad positions");
  const auto dt = qkv.scalar_type();
  TORCH_CHECK(cos.scalar_type() == dt && sin.scalar_type() == dt && kc.scalar_type() == dt && vc.scalar_type() == dt,
              "rope_cache_attention: one dtype expected for qkv, rope tables and caches");
  const at::Tensor q = qkv.contiguous(), c = cos.contiguous(), s = sin.contiguous();
  const at::Tensor paths = checked_paths(tree, T, start, window);
  at::Tensor out = at::empty({attend ? T : 0, n_heads * D}, q.options());
  with_activation_dtype(dt, "rope_cache_attention: float32, bfloat16 or float16 expected", [&](auto a) {
    using A = decltype(a);
    attention_impl<A>(q.data_ptr<A>(), c.data_ptr<A>(), s.data_ptr<A>(), kc.data_ptr<A>(), vc.data_ptr<A>(),
                      out.data_ptr<A>(), T, start, n_heads, n_kv_heads, D, L, attend,
                      paths.defined() ? paths.data_ptr<int64_t>() : nullptr, paths.defined() ? paths.size(1) : 0,
                      window);
  });
  return out;
}

// ---- A decoding team for decoder_layers: a block of a few positions (one-token steps, drafts, verification passes)
// goes through all its layers inside one parallel region, the threads meeting at a barrier between operations,
// instead of a parallel region per product and attention with the glue between them on one thread (on Zen 5 the
// second thread spun idle ~30% of a one-token step, perf). Each thread normalises and quantizes the few input rows
// itself (a few hundred elements), claims blocks of weight rows and attention parts (the AVX-512 decoding
// attention's head sets, else single heads through the one-row loops) from shared counters and rounds the outputs
// it computed: the same functions on the same values as the per-operation path, so the bits are the same
// (tests/unit/test_optimize.py). ----
constexpr int64_t kTeamRows = 16;  // longer blocks (prompts) keep the per-operation path and its prompt kernels

// Operations are a few microseconds apart, so the threads spin; past ~50 us of waiting (a thread descheduled on a
// busy machine) they yield the core instead of burning the time slice its peer needs.
struct SpinBarrier {
  alignas(64) std::atomic<int> waiting{0};
  alignas(64) std::atomic<int> generation{0};
  void wait(int team) {
    if (team == 1) return;
    const int g = generation.load(std::memory_order_acquire);
    if (waiting.fetch_add(1, std::memory_order_acq_rel) == team - 1) {
      waiting.store(0, std::memory_order_relaxed);
      generation.store(g + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation.load(std::memory_order_acquire) == g; ++spins) {
      if (spins < (1 << 12)) _mm_pause();
      else std::this_thread::yield();
    }
  }
};

// Gemma 3's variations of the layer (llama.py ModelArgs), read by both paths of decoder_layers; empty for Llama.
struct LayerVariations {
  at::TensorList norms;           // 4 per layer: q_norm, k_norm (head size), post_attention_norm, post_ffn_norm
  at::IntArrayRef windows;        // per layer: a sliding window (0: global attention)
  c10::optional<at::Tensor> cos_local, sin_local;  // the sliding layers' RoPE tables (T, D)
  bool gelu = false;              // GeGLU instead of SwiGLU
  int64_t window(int64_t l) const { return windows.empty() ? 0 : windows[l]; }
  int64_t smallest_window() const {
    int64_t w = 0;
    for (int64_t x : windows)
      if (x > 0 && (w == 0 || x < w)) w = x;
    return w;
  }
};

// a + b rounded to A, as at::add of two A tensors (the fp32 sum to A): the residual adds after sandwich norms.
template <typename A>
void add_rows(const A* a, const A* b, A* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<A>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
}

// Everything decoder_layers' team reads, set up (and checked) before the parallel region.
template <typename A>
struct TeamLayers {
  int64_t n, T, C, Nq, I, H, G, D, L, first, start, W;
  double eps;
  const A *cos, *sin, *cos_local = nullptr, *sin_local = nullptr;
  const int64_t* paths;
  std::vector<const A*> norms;        // 2 per layer
  std::vector<const A*> gemma_norms;  // 4 per layer with sandwich norms (LayerVariations), else empty
  std::vector<int64_t> window;        // per layer
  bool gelu = false;
  std::vector<ProductWeight> weight;  // 4 per layer: wqkv, wo, w13, w2
  std::vector<BlockShares> shares;    // 4 per layer
  std::vector<NextBlock> next_part;   // attention parts, 1 per layer
  A *kc, *vc;                         // the whole cache (layers, G, L, D)
  const A* x0;                        // the input rows
  A *x, *h, *qkv, *att, *gate_up, *act, *o;  // o: wo's and w2's outputs before their sandwich norms
  float* y;
  std::vector<std::pair<int64_t, A*>> keep;  // (layer, where the state entering it goes)
  SpinBarrier barrier;

  void run(int tid, int team) {
    Product p;
    DecodeBuffers b;
    RowBuffers rb;
    const bool avx512 = attention_avx512(D), sandwich = !gemma_norms.empty();
    const HeadSets sets(H, G, T, start + T, team);
    std::vector<A> normed(T * C);
    const auto xf = aligned_floats(T * std::max({C, H * D, I}));  // 64-byte rows, as linear_rows gives the kernels
    // With sandwich norms every thread adds the residuals itself, into its own state rows (thread 0: the shared
    // ones), and normalises q and k in its own copy of qkv: no more meetings than the Llama layer's.
    std::vector<A> own_x, own_h, own_qkv, sum;
    A *xs = x, *hs = h;
    if (sandwich) {
      if (tid != 0) {
        own_x.assign(x0, x0 + T * C), own_h.resize(T * C);
        xs = own_x.data(), hs = own_h.data();
      }
      own_qkv.resize(T * Nq), sum.resize(T * C);
    }
    // [residual +] in @ weight r of layer l into out; in: A rows of K
    auto linear = [&](int64_t l, int r, const A* in, const A* residual, A* out) {
      static_cast<ProductWeight&>(p) = weight[4 * l + r];
      to_fp32(in, xf.get(), T * p.K);
      p.prepare(xf.get(), T);
      shares[4 * l + r].claim(tid, [&](int64_t blk) {
        const int64_t n0 = blk * p.block, n1 = std::min(p.N, n0 + p.block);
        p.rows(n0, n1, y);
        round_out(y, residual, out, T, p.N, n0, n1);
      });
      barrier.wait(team);
    };
    // residual + in @ weight r (1: wo, 3: w2) into out; with sandwich norms residual + its post norm (2: after
    // attention, 3: after the FFN) of in @ weight r, on this thread's own state rows
    auto add_projection = [&](int64_t l, int r, const A* in, const A* residual, A* out, const A* own_residual,
                              A* own_out) {
      if (!sandwich) return linear(l, r, in, residual, out);
      linear(l, r, in, nullptr, o);
      rms_norm_rows(o, gemma_norms[4 * l + (r == 1 ? 2 : 3)], sum.data(), T, C, eps);
      add_rows(own_residual, sum.data(), own_out, T * C);
    };
    auto keep_it = keep.begin();
    for (int64_t l = 0; l < n; ++l) {
      if (keep_it != keep.end() && keep_it->first == first + l) {
        if (tid == 0) std::copy(x, x + T * C, keep_it->second);  // x is next written after three barriers
        ++keep_it;
      }
      A* kl = kc + (first + l) * G * L * D;
      A* vl = vc + (first + l) * G * L * D;
      const int64_t win = window[l];
      const A* c = win > 0 ? cos_local : cos;
      const A* s = win > 0 ? sin_local : sin;
      rms_norm_rows(xs, norms[2 * l], normed.data(), T, C, eps);
      linear(l, 0, normed.data(), nullptr, qkv);
      const A* q = qkv;
      if (sandwich) {  // q and k normalised per head, as rms_norm over (T * heads, D) rows
        const A* const* g = gemma_norms.data() + 4 * l;
        std::copy(qkv, qkv + T * Nq, own_qkv.data());
        for (int64_t t = 0; t < T; ++t)
          for (int64_t hd = 0; hd < H + G; ++hd) {
            A* r = own_qkv.data() + t * Nq + hd * D;
            rms_norm_rows(r, g[hd < H ? 0 : 1], r, 1, D, eps);
          }
        q = own_qkv.data();
      }
      write_kv(q, c, s, kl, vl, T, start, H, G, D, L, tid, team);
      barrier.wait(team);
      const bool windowed = !paths && win > 0 && start + T > win;  // as window_attention
      if (avx512) {
        const DecodeAttentionPart<A> part{q, c, s, kl, vl, att, start, H, G, D, L, paths, W, win};
        const WindowAttentionPart<A> rows{q, c, s, kl, vl, att, start, H, G, D, L, win};
        for (int64_t u; (u = next_part[l].v.fetch_add(1, std::memory_order_relaxed)) < sets.parts();)
          windowed ? sets.run(u, T, rows, b) : sets.run(u, T, part, b);
      } else {
        const RowLoopsAttentionHead<A> head{q, c, s, kl, vl, att, T, start, H, G, D, L, paths, W, win};
        const WindowRowsHead<A> rows{q, c, s, kl, vl, att, T, start, H, G, D, L, win};
        if (T == 1 && !paths && !windowed && start + 1 >= kWholeKvHeadsFromAvx2) {
          for (int64_t g; (g = next_part[l].v.fetch_add(1, std::memory_order_relaxed)) < G;)
            head.heads(g * (H / G), (g + 1) * (H / G), rb);
        } else {
          for (int64_t hd; (hd = next_part[l].v.fetch_add(1, std::memory_order_relaxed)) < H;)
            windowed ? rows(hd, rb) : head(hd, rb);
        }
      }
      barrier.wait(team);
      add_projection(l, 1, att, x, h, xs, hs);  // h = x + wo att
      rms_norm_rows(hs, norms[2 * l + 1], normed.data(), T, C, eps);
      linear(l, 2, normed.data(), nullptr, gate_up);
      const int64_t eights = I / 8;  // columns split at multiples of 8: each goes through the same loop as alone
      const int64_t c0 = eights * tid / team * 8, c1 = tid + 1 == team ? I : eights * (tid + 1) / team * 8;
      (gelu ? gated_mul_cols<GeluTanhGate, A> : gated_mul_cols<SiluGate, A>)(gate_up, act, T, I, c0, c1);
      barrier.wait(team);
      add_projection(l, 3, act, h, x, hs, xs);  // x = h + w2 act
    }
  }
};

// The team's path: a few positions (kTeamRows), more than one thread, not already inside a parallel region.
bool use_team(const at::Tensor& x, const at::Tensor& k) {
  return x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kTeamRows && at::get_num_threads() > 1 &&
         !at::in_parallel_region() && k.dim() == 4;
}

// The checks both paths make of the variations: per-layer norms of the right widths, windows per layer, and the
// local RoPE tables where some layer has a window.
void check_variations(const LayerVariations& var, int64_t n, int64_t C, int64_t D, at::ScalarType dt,
                      const at::Tensor& cos) {
  TORCH_CHECK(var.norms.empty() || static_cast<int64_t>(var.norms.size()) == 4 * n,
              "decoder_layers: 4 layer norms per layer (q, k, post-attention, post-FFN) or none");
  for (size_t i = 0; i < var.norms.size(); ++i)
    TORCH_CHECK(var.norms[i].is_contiguous() && var.norms[i].scalar_type() == dt &&
                    var.norms[i].numel() == (i % 4 < 2 ? D : C),
                "decoder_layers: q/k norms of the head size and post norms of the width, in x's dtype");
  TORCH_CHECK(var.windows.empty() || static_cast<int64_t>(var.windows.size()) == n,
              "decoder_layers: one window per layer or none");
  if (var.smallest_window() > 0)
    TORCH_CHECK(var.cos_local.has_value() && var.sin_local.has_value() && var.cos_local->sizes() == cos.sizes() &&
                    var.sin_local->sizes() == cos.sizes() && var.cos_local->scalar_type() == dt &&
                    var.sin_local->scalar_type() == dt,
                "decoder_layers: sliding-window layers need their local RoPE tables, shaped as cos");
}

std::vector<at::Tensor> team_decoder_layers(const at::Tensor& x, at::TensorList weights,
                                            const c10::List<c10::optional<at::Tensor>>& scales,
                                            const c10::List<c10::optional<at::Tensor>>& qkv_bias,
                                            const at::Tensor& cos, const at::Tensor& sin, at::Tensor k, at::Tensor v,
                                            int64_t first, int64_t start, int64_t n_heads, int64_t n_kv_heads,
                                            double eps, bool packed, at::IntArrayRef keep,
                                            const c10::optional<at::Tensor>& tree, const LayerVariations& var) {
  const int64_t n = qkv_bias.size(), T = x.size(0), C = x.size(1), D = k.size(3), L = k.size(2);
  const auto dt = x.scalar_type();
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.sizes() == v.sizes() && k.size(1) == n_kv_heads &&
                  n_heads % n_kv_heads == 0 && D % 8 == 0,
              "decoder_layers: contiguous (layers, G, L, D) caches expected");
  TORCH_CHECK(start + T <= L && cos.dim() == 2 && cos.size(0) == T && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "decoder_layers: bad positions");
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt && cos.scalar_type() == dt && sin.scalar_type() == dt,
              "decoder_layers: one dtype expected for x, rope tables and caches");
  check_variations(var, n, C, D, dt, cos);
  const at::Tensor xc = x.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  const at::Tensor lc = var.cos_local ? var.cos_local->contiguous() : cc, ls = var.sin_local ? var.sin_local->contiguous() : sc;
  const at::Tensor paths = checked_paths(tree, T, start, var.smallest_window());
  std::vector<at::Tensor> fp32;  // scales and biases as fp32, alive until the end
  std::vector<at::Tensor> out;
  with_activation_dtype(dt, "decoder_layers: float32, bfloat16 or float16 activations expected", [&](auto a) {
    using A = decltype(a);
    TeamLayers<A> t;
    t.n = n, t.T = T, t.C = C, t.H = n_heads, t.G = n_kv_heads, t.D = D, t.L = L, t.first = first, t.start = start;
    t.eps = eps, t.cos = cc.data_ptr<A>(), t.sin = sc.data_ptr<A>();
    t.cos_local = lc.data_ptr<A>(), t.sin_local = ls.data_ptr<A>(), t.gelu = var.gelu;
    t.paths = paths.defined() ? paths.data_ptr<int64_t>() : nullptr, t.W = paths.defined() ? paths.size(1) : 0;
    for (const at::Tensor& w : var.norms) t.gemma_norms.push_back(w.data_ptr<A>());
    for (int64_t l = 0; l < n; ++l) t.window.push_back(var.window(l));
    const int64_t threads = at::get_num_threads();
    int64_t most = 0;
    t.shares.resize(4 * n);
    t.next_part = std::vector<NextBlock>(n);
    for (int64_t l = 0; l < n; ++l) {
      const at::Tensor* w = weights.data() + 6 * l;
      t.norms.push_back(w[0].data_ptr<A>());
      t.norms.push_back(w[3].data_ptr<A>());
      TORCH_CHECK(w[0].is_contiguous() && w[3].is_contiguous() && w[0].scalar_type() == dt &&
                      w[3].scalar_type() == dt && w[0].numel() == C && w[3].numel() == C,
                  "decoder_layers: norm weights of x's dtype and width expected");
      const int64_t in[4] = {C, n_heads * D, C, w[4].size(0) / 2};  // wqkv, wo, w13, w2: (out_width, in)
      const int64_t out_width[4] = {(n_heads + 2 * n_kv_heads) * D, C, w[4].size(0), C};
      const at::Tensor* mats[4] = {&w[1], &w[2], &w[4], &w[5]};
      for (int r = 0; r < 4; ++r) {
        const c10::optional<at::Tensor> scale = scales.get(4 * l + r);
        check_weight(*mats[r], in[r], packed, scale);
        TORCH_CHECK(mats[r]->size(0) == out_width[r], "decoder_layers: a weight of the wrong shape");
        fp32.push_back(as_fp32(scale));
        fp32.push_back(r == 0 ? as_fp32(qkv_bias.get(l)) : at::Tensor());
        Product p;
        p.bind(*mats[r], fp32_ptr(fp32[fp32.size() - 2]), fp32_ptr(fp32.back()), packed, in[r]);
        t.weight.push_back(p);
        t.shares[4 * l + r].reset((p.N + p.block - 1) / p.block, threads);
        most = std::max(most, p.N);
      }
      t.next_part[l].v.store(0, std::memory_order_relaxed);
    }
    t.Nq = (n_heads + 2 * n_kv_heads) * D, t.I = n ? weights[4].size(0) / 2 : 0;
    t.kc = k.data_ptr<A>(), t.vc = v.data_ptr<A>();
    at::Tensor state = xc.clone(), h = at::empty_like(xc), qkv = at::empty({T, t.Nq}, xc.options()),
               att = at::empty({T, n_heads * D}, xc.options()), gu = at::empty({T, 2 * t.I}, xc.options()),
               act = at::empty({T, t.I}, xc.options()), o = at::empty_like(xc);
    const auto y = aligned_floats(T * most);
    t.x0 = xc.data_ptr<A>(), t.x = state.data_ptr<A>(), t.h = h.data_ptr<A>(), t.qkv = qkv.data_ptr<A>();
    t.att = att.data_ptr<A>(), t.gate_up = gu.data_ptr<A>(), t.act = act.data_ptr<A>(), t.o = o.data_ptr<A>();
    t.y = y.get();
    for (size_t i = 0; i < keep.size(); ++i) {
      const int64_t layer = keep[i];
      TORCH_CHECK(layer >= first && layer < first + n && (i == 0 || layer > keep[i - 1]),
                  "decoder_layers: keep must list layers first < n < first + layers, ascending");
      out.push_back(at::empty_like(xc));
      t.keep.emplace_back(layer, out.back().data_ptr<A>());
    }
#pragma omp parallel num_threads(threads)
    t.run(omp_get_thread_num(), omp_get_num_threads());
    out.push_back(state);
  });
  return out;
}

// ---- Decoder layers first..first+n-1, each x + attn(norm(x)) then h + mlp(norm(h)), as the Python Block computes
// it (same ops, same roundings, bit-identical), in one call: a decode step is ~30 layers x 12 small ops, and their
// Python and dispatch overhead was a quarter of a float16 step of the default model; one call per layer still cost
// ~40 us of Python each (~10% of a step), hence one call for a whole range of layers. ----
// Per layer l: weights[6l..6l+5] = attention_norm, wqkv, wo, ffn_norm, w13, w2; scales[4l..4l+3] = int8 scales of
// wqkv, wo, w13, w2 (or None); qkv_bias[l]. k, v: the whole cache (layers, G, L, D); layer first + l uses k[first + l].
// Gemma 3's layer (LayerVariations): layer_norms[4l..4l+3] = q_norm, k_norm, post_attention_norm, post_ffn_norm
// (q and k normalised per head before RoPE; the outputs of wo and w2 normalised before their residual adds),
// windows[l] > 0 for a sliding layer (attention over its window, RoPE from cos_local / sin_local), GeGLU with gelu.
// Returns the states entering each layer listed in `keep` (ascending, first < n < first + layers), then the output.
std::vector<at::Tensor> decoder_layers(const at::Tensor& x, at::TensorList weights,
                                       const c10::List<c10::optional<at::Tensor>>& scales,
                                       const c10::List<c10::optional<at::Tensor>>& qkv_bias, const at::Tensor& cos,
                                       const at::Tensor& sin, at::Tensor k, at::Tensor v, int64_t first, int64_t start,
                                       int64_t n_heads, int64_t n_kv_heads, double eps, bool packed,
                                       at::IntArrayRef keep, const c10::optional<at::Tensor>& tree,
                                       at::TensorList layer_norms, at::IntArrayRef windows,
                                       const c10::optional<at::Tensor>& cos_local,
                                       const c10::optional<at::Tensor>& sin_local, bool gelu) {
  const int64_t n = qkv_bias.size();
  TORCH_CHECK(weights.size() == 6 * n && scales.size() == 4 * n, "decoder_layers: 6 weights and 4 scales per layer");
  TORCH_CHECK(k.dim() == 4 && first >= 0 && first + n <= k.size(0), "decoder_layers: layers outside the cache");
  const LayerVariations var{layer_norms, windows, cos_local, sin_local, gelu};
  if (use_team(x, k)) return team_decoder_layers(x, weights, scales, qkv_bias, cos, sin, k, v, first, start,
                                                       n_heads, n_kv_heads, eps, packed, keep, tree, var);
  check_variations(var, n, x.size(1), k.size(3), x.scalar_type(), cos);
  const c10::optional<at::Tensor> none;
  const int64_t D = k.size(3);
  // a prompt: verification passes never start at 0 (shorter prompts run the team's path above)
  const bool prompt = start == 0 && x.size(0) >= kPromptChunk && !(tree.has_value() && tree->defined());
  // [residual +] x @ w^T in the activation dtype, as the Python Block computes it
  auto linear = [&](const at::Tensor& a, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                    const c10::optional<at::Tensor>& bias, const at::Tensor* residual) {
    return linear_in_dtype(a, w, scale, bias, packed, residual, prompt);
  };
  std::vector<at::Tensor> out;
  auto next_keep = keep.begin();
  at::Tensor x_ = x.contiguous();
  for (int64_t l = 0; l < n; ++l) {
    if (next_keep != keep.end() && *next_keep == first + l) {
      out.push_back(x_);
      ++next_keep;
    }
    const at::Tensor* w = weights.data() + 6 * l;
    const at::Tensor* g = layer_norms.empty() ? nullptr : layer_norms.data() + 4 * l;
    const int64_t win = var.window(l);
    at::Tensor qkv = linear(rms_norm(x_, w[0], eps), w[1], scales.get(4 * l), qkv_bias.get(l), nullptr);
    if (g) {  // Attention.norm_qk
      const int64_t T = qkv.size(0);
      qkv = at::cat({rms_norm(qkv.narrow(1, 0, n_heads * D).reshape({-1, D}), g[0], eps).reshape({T, -1}),
                     rms_norm(qkv.narrow(1, n_heads * D, n_kv_heads * D).reshape({-1, D}), g[1], eps).reshape({T, -1}),
                     qkv.narrow(1, (n_heads + n_kv_heads) * D, n_kv_heads * D)}, 1);
    }
    const at::Tensor att = rope_cache_attention(qkv, win > 0 ? *cos_local : cos, win > 0 ? *sin_local : sin,
                                                k.select(0, first + l), v.select(0, first + l), start, n_heads,
                                                n_kv_heads, true, tree, win);
    const at::Tensor h = g ? x_ + rms_norm(linear(att, w[2], scales.get(4 * l + 1), none, nullptr), g[2], eps)
                           : linear(att, w[2], scales.get(4 * l + 1), none, &x_);
    const at::Tensor gate_up = linear(rms_norm(h, w[3], eps), w[4], scales.get(4 * l + 2), none, nullptr);
    const at::Tensor a = gelu ? gelu_tanh_mul(gate_up) : silu_mul(gate_up);
    x_ = g ? h + rms_norm(linear(a, w[5], scales.get(4 * l + 3), none, nullptr), g[3], eps)
           : linear(a, w[5], scales.get(4 * l + 3), none, &h);
  }
  TORCH_CHECK(next_keep == keep.end(), "decoder_layers: keep must list layers first < n < first + layers, ascending");
  out.push_back(x_);
  return out;
}

}  // namespace

void register_cpu_kernels(torch::Library& m) {
  m.impl("small_linear", &small_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("gelu_tanh_mul", &gelu_tanh_mul);
  m.impl("rope_cache_attention", &rope_cache_attention);
  m.impl("decoder_layers", &decoder_layers);
}

void register_kernel_isa(torch::Library& m) {
  m.def("kernel_isa(str isa='') -> str", &kernel_isa);
  m.def("activation_int8_parts(int parts=0) -> int", &activation_int8_parts);
  m.def("keep_weights_cached(Tensor[] weights) -> int", &keep_weights_cached);
}

}  // namespace skiplayer
