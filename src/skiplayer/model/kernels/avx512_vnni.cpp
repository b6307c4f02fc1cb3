// AVX-512 VNNI kernels, compiled with a target pragma and called only where the CPU has them (run-time dispatch in
// avx2.cpp): products with GGUF block weights in the tiles layout (qblocks.h) on CPUs with VNNI but no AMX (AMD
// Zen 4, Intel Ice Lake and later), and the int8 split of x that this kernel and the AMX one (amx.cpp) share.
//
// Why: from about 4 input rows on, the fp32 kernel (avx512.cpp) is bound by the FMA units (16 products per cycle
// and core on Zen 4: a block of 8 positions cost 2.7x one row there), while vpdpbusd does 64 int8 products per
// instruction. The arithmetic is amx.cpp's, with vpdpbusd doing the tile unit's products: per block of 32 columns
// and 16 weight rows, C_a and C_l are the same exact int32 sums and the scaling is the same fp32 sequence, so a
// product here is bit-identical to the AMX one (tested where both exist) and, like it, batch invariant.
// With x as one int8 part (llama.cpp's 8-bit activations, `--gguf_activations int8`, the default where this kernel
// runs) a product is half the vpdpbusd: 8- and 16-row products of the default model's layers took 0.64x and 0.59x
// the time (Zen 5, benchmarks/kernel_speed.py); the products are bound by vpdpbusd from about 8 rows on either way.
// No torch header here (qblocks.h says why).
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma,avx2")
#include "qblocks.h"
#include "tiles.h"

#include <immintrin.h>

namespace skiplayer {
namespace {

// 4 columns of one input row's part times B (4 columns x 16 weight rows). Q4 quants are unsigned nibbles, so they
// take vpdpbusd's unsigned side and x its signed one (packed without the + 128 for this kernel): the exact sum of q x,
// with no 128 qsum to take off. Q8 quants are signed, so x (stored + 128) is the unsigned side and `start` takes the
// 128 qsum off. The same int32 sums either way, as the AMX kernel's.
template <int FMT>
inline __m512i dot4(__m512i c, const uint8_t* x4, __m512i B) {
  if constexpr (FMT == kQ4Tiles) return _mm512_dpbusd_epi32(c, B, _mm512_set1_epi32(load4<int32_t>(x4)));
  return _mm512_dpbusd_epi32(c, _mm512_set1_epi32(load4<int32_t>(x4)), B);
}

// Weight rows n0..n1-1 (groups of 16) against M input rows, whole groups at a time: per block, the group's 8 B rows
// (4 columns x 16 weight rows each, the tiles' order) stay in registers for all M input rows. PARTS: x as two int8
// parts (C_a and C_l, amx.cpp's arithmetic) or one (C_a alone).
template <int FMT, int M, int PARTS>
void rows(const uint8_t* a, const float* dx, const float* xsum_t, const uint8_t* w, const float* bias, float* y,
          int64_t K, int64_t N, int64_t n0, int64_t n1, bool stream) {
  constexpr int64_t group_bytes = FMT == kQ4Tiles ? 320 : 544;
  const int64_t nb = K / 32;
  const __m512i nib = _mm512_set1_epi8(15), ones = _mm512_set1_epi8(1);
  for (; n0 < n1; n0 += 16) {
    const uint8_t* g = w + (n0 / 16) * nb * group_bytes;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = g + b * group_bytes;
      for (int64_t l = 0; l < group_bytes; l += 64)  // the next group's block (amx.cpp says why)
        prefetch_weights(p + nb * group_bytes + l, stream);
      __m512i B[8];
      __m512i start = _mm512_setzero_si512();
      if constexpr (FMT == kQ4Tiles) {
        for (int t = 0; t < 4; ++t) {  // 64 bytes of nibbles -> B rows 2t (low) and 2t + 1 (high)
          const __m512i v = _mm512_loadu_si512(p + 64 + 64 * t);
          B[2 * t] = _mm512_and_si512(v, nib);
          B[2 * t + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        }
      } else {
        __m512i qsum = _mm512_setzero_si512();
        for (int t = 0; t < 8; ++t) qsum = _mm512_dpbusd_epi32(qsum, ones, B[t] = _mm512_loadu_si512(p + 32 + 64 * t));
        // C - 128 qsum: the sums start at -128 qsum instead of subtracting it after (the same exact int32)
        start = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(qsum, 7));
      }
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      const __m512 mv = FMT == kQ4Tiles ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)))
                                        : _mm512_setzero_ps();
      const uint8_t* ab = a + b * PARTS * M * 32;  // this block's a rows, then (two parts) its l rows
      for (int m = 0; m < M; ++m) {
        const uint8_t *xa = ab + m * 32, *xl = ab + (M + m) * 32;
        __m512i ca = start, ca1 = _mm512_setzero_si512(), cl = start, cl1 = _mm512_setzero_si512();
        for (int t = 0; t < 8; t += 2) {  // two chains each: vpdpbusd's latency, not its throughput, bounded one
          ca = dot4<FMT>(ca, xa + 4 * t, B[t]);
          ca1 = dot4<FMT>(ca1, xa + 4 * t + 4, B[t + 1]);
          if constexpr (PARTS == 2) {
            cl = dot4<FMT>(cl, xl + 4 * t, B[t]);
            cl1 = dot4<FMT>(cl1, xl + 4 * t + 4, B[t + 1]);
          }
        }
        ca = _mm512_add_epi32(ca, ca1);
        if constexpr (PARTS == 2)
          acc[m] = add_block(acc[m], ca, _mm512_add_epi32(cl, cl1), d, dx[b * 16 + m], mv, xsum_t[b * 16 + m],
                             FMT == kQ4Tiles);
        else
          acc[m] = add_block_int8(acc[m], ca, d, dx[b * 16 + m], mv, xsum_t[b * 16 + m], FMT == kQ4Tiles);
      }
    }
    store_group(acc, M, bias, y, N, n0);
  }
}

template <int FMT, int PARTS>
void rows_any(int M, const uint8_t* a, const float* dx, const float* xsum_t, const uint8_t* w, const float* bias,
              float* y, int64_t K, int64_t N, int64_t n0, int64_t n1, bool stream) {
  switch (M) {
    case 1: return rows<FMT, 1, PARTS>(a, dx, xsum_t, w, bias, y, K, N, n0, n1, stream);
    case 2: return rows<FMT, 2, PARTS>(a, dx, xsum_t, w, bias, y, K, N, n0, n1, stream);
    case 3: return rows<FMT, 3, PARTS>(a, dx, xsum_t, w, bias, y, K, N, n0, n1, stream);
    case 4: return rows<FMT, 4, PARTS>(a, dx, xsum_t, w, bias, y, K, N, n0, n1, stream);
    case 5: return rows<FMT, 5, PARTS>(a, dx, xsum_t, w, bias, y, K, N, n0, n1, stream);
    case 6: return rows<FMT, 6, PARTS>(a, dx, xsum_t, w, bias, y, K, N, n0, n1, stream);
    case 7: return rows<FMT, 7, PARTS>(a, dx, xsum_t, w, bias, y, K, N, n0, n1, stream);
    default: return rows<FMT, 8, PARTS>(a, dx, xsum_t, w, bias, y, K, N, n0, n1, stream);
  }
}

}  // namespace

size_t int8_parts_bytes(int64_t M, int64_t K, int parts) { return static_cast<size_t>(K / 32) * parts * M * 32; }

// Per block, the a parts of the M <= 8 rows (M x 32 bytes) then, with two parts, their l parts, each + 128 with
// `offset` (unsigned, for the AMX kernel and Q8 weights), else as int8 (the VNNI kernel on Q4 weights); dx (K / 32, 16) the
// scale of each row's block, block-major (amx.cpp describes the split). Vectorised: done once per product on the
// calling thread, the scalar loop cost 1.5 ns per element (a quarter of an 8-row product of the default model). IEEE
// division and round-to-nearest-even conversions: the same bytes as the scalar definition, d = max|x| / 127,
// a = clamp(round(x / d)), l = clamp(round((x / d - a) * 254)). xsum_a (optional, block-major as dx): d sum(a), the
// block sum of x as one int8 part holds it.
void pack_int8_parts(int M, const float* x, int64_t K, uint8_t* a, float* dx, int parts, bool offset, float* xsum_a) {
  const int64_t nb = K / 32;
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), off = _mm512_set1_epi32(offset ? 128 : 0);
  const __m512 f254 = _mm512_set1_ps(254.f);
  for (int64_t b = 0; b < nb; ++b)
    for (int m = 0; m < M; ++m) {
      const float* xb = x + m * K + 32 * b;
      const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      const float d = amax > 0.f ? amax / 127.f : 1.f;
      dx[b * 16 + m] = d;
      uint8_t* pa = a + (b * parts * M + m) * 32;
      uint8_t* pl = pa + M * 32;
      int32_t asum = 0;
      for (int h = 0; h < 2; ++h) {
        const __m512 v = _mm512_div_ps(h ? x1 : x0, _mm512_set1_ps(d));
        const __m512i q = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(v), lo), hi);
        if (xsum_a) asum += _mm512_reduce_add_epi32(q);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(pa + 16 * h), _mm512_cvtepi32_epi8(_mm512_add_epi32(q, off)));
        if (parts == 1) continue;
        const __m512 rest = _mm512_mul_ps(_mm512_sub_ps(v, _mm512_cvtepi32_ps(q)), f254);
        const __m512i l = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(rest), lo), hi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(pl + 16 * h), _mm512_cvtepi32_epi8(_mm512_add_epi32(l, off)));
      }
      if (xsum_a) xsum_a[b * 16 + m] = d * static_cast<float>(asum);
    }
}

void quant_rows_vnni(int M, const uint8_t* a, const float* dx, const float* xsum_t, const uint8_t* w, int format,
                     int parts, const float* bias, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1,
                     bool stream) {
  if (parts == 1) {
    if (format == kQ4Tiles) return rows_any<kQ4Tiles, 1>(M, a, dx, xsum_t, w, bias, y, K, N, n0, n1, stream);
    return rows_any<kQ8Tiles, 1>(M, a, dx, xsum_t, w, bias, y, K, N, n0, n1, stream);
  }
  if (format == kQ4Tiles) return rows_any<kQ4Tiles, 2>(M, a, dx, xsum_t, w, bias, y, K, N, n0, n1, stream);
  return rows_any<kQ8Tiles, 2>(M, a, dx, xsum_t, w, bias, y, K, N, n0, n1, stream);
}

}  // namespace skiplayer
