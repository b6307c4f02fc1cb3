// AMX kernels (tiles + int8 dot products), compiled with a target pragma and called only where the CPU has AMX and
// the OS grants the tile state (run-time dispatch in avx2.cpp). Today: products with GGUF block-quantized weights in
// the tiles layout (qblocks.h), up to 8 input rows a call: the weights are unpacked once per call and the tile unit
// does the rows' multiplies, so a block of 8 positions costs 2.1x one row where the AVX-512 kernel costs 3.2x (the
// default model's layer products on the Intel Xeon: 6.3 vs 9.7 ms; one row: 3.0 ms on both).
// No torch header here (qblocks.h says why).
//
// Per block of 32 columns and 16 weight rows: B = the 32 x 16 quants (int8, the tiles' 4-byte groups), A = each input
// row's block as two int8 parts, x ~ dx (a + l / 254) with dx = max|x| / 127 (a = round(x / dx), l the rounded
// rest: relative error ~2^-16 of the block's largest |x|, finer than float16 activations), stored as a + 128 and
// l + 128 for the unsigned-by-signed product (TDPBUSD): C_a = sum (a + 128) q, C_l = sum (l + 128) q in int32,
// exact. Then per row and weight row: d dx ((C_a - 128 qsum) + (C_l - 128 qsum) / 254) + m xsum, accumulated in
// fp32 block by block. Every step is per input row, whatever the other rows (batch invariance). The split of x
// (pack_int8_parts) lives in avx512_vnni.cpp, whose kernel does the same arithmetic without tiles.
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma,avx2")
#include "qblocks.h"
#include "tiles.h"

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace skiplayer {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tile registers (GCC's tile intrinsics take literal numbers): 0 = C (C_a rows, then C_l), 2 = A (a rows, then l
// rows: one load and one product for both parts, hence at most 8 input rows a call), 4 = B.

}  // namespace

bool amx_tiles_granted() {  // Linux hands out the tile state only on request (5.16+)
  static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return granted;
}

// Weight rows n0..n1-1 (whole groups of 16 of the tiles layout) against M <= 8 input rows: y[m * N + n] (+ bias).
// The tile configuration is loaded once per call, not per group (a one-row product over Gemma 3's 262k-row head
// spent a quarter of its time there with one group a call).
// Two things keep the tile unit fed: B tiles of a Q4 group are unpacked for up to kChunk blocks before the first of
// them is loaded (a tile load right after the vector stores of its data waited for them: 1.4 of 4.9 ms of the layer
// products of a token), and the int32 results of a block are scaled one block later, after the next block's tiles
// were issued (same for tile stores read back at once).
void quant_rows_amx(int M, const uint8_t* a, const float* dx, const float* xsum_t, const uint8_t* w, int format,
                    const float* bias, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  constexpr int64_t kChunk = 16;
  const int64_t nb = K / 32, group_bytes = (format == kQ4Tiles ? 320 : 544);
  TileConfig cfg;
  cfg.rows[0] = 2 * M, cfg.colsb[0] = 64;  // C: rows m of C_a, then rows m of C_l
  cfg.rows[2] = 2 * M, cfg.colsb[2] = 32;  // A: the a parts, then the l parts
  cfg.rows[4] = 8, cfg.colsb[4] = 64;      // B
  _tile_loadconfig(&cfg);
  for (; n0 < n1; n0 += 16) {
    const uint8_t* g = w + (n0 / 16) * nb * group_bytes;
    alignas(64) uint8_t bt[kChunk * 512];
    alignas(64) int32_t qsums[kChunk * 16];
    alignas(64) int32_t cbuf[2][16 * 16];  // [block parity][a rows, then l rows][n]
    __m512 acc[16];
    for (int m = 0; m < 16; ++m) acc[m] = _mm512_setzero_ps();
    const __m512i nib = _mm512_set1_epi8(15), ones = _mm512_set1_epi8(1);
    int64_t qsum_at[2] = {0, 0};  // where the pending block's qsum lies in qsums
    auto scale = [&](int64_t b, int parity) {  // acc += block b's results, from cbuf[parity]
      const uint8_t* p = g + b * group_bytes;
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));  // the 16 rows' d
      const __m512i bias128 = _mm512_slli_epi32(_mm512_load_si512(qsums + 16 * qsum_at[parity]), 7);
      const __m512 mv = format == kQ4Tiles ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + 32)))
                                           : _mm512_setzero_ps();
      for (int m = 0; m < M; ++m)
        acc[m] = add_block(acc[m], _mm512_sub_epi32(_mm512_load_si512(cbuf[parity] + 16 * m), bias128),
                           _mm512_sub_epi32(_mm512_load_si512(cbuf[parity] + 16 * (M + m)), bias128), d,
                           dx[b * 16 + m], mv, xsum_t[b * 16 + m], format == kQ4Tiles);
    };
    for (int64_t c0 = 0; c0 < nb; c0 += kChunk) {
      const int64_t c1 = c0 + kChunk < nb ? c0 + kChunk : nb;
      for (int64_t b = c0; b < c1; ++b) {  // B tiles (Q4: unpacked) and the rows' quant sums of this chunk
        const uint8_t* p = g + b * group_bytes;
        // the same block of the next group, into L2: one core alone keeps too few reads in flight to stream from
        // DRAM (Gemma 3's 178 MB head: 7.7 GB/s per core without, where a plain sum reads 15)
        for (int64_t l = 0; l < group_bytes; l += 64)
          _mm_prefetch(reinterpret_cast<const char*>(p + nb * group_bytes + l), _MM_HINT_T1);
        __m512i qsum = _mm512_setzero_si512();
        if (format == kQ4Tiles) {
          uint8_t* out = bt + (b - c0) * 512;
          for (int t = 0; t < 4; ++t) {  // 64 bytes of nibbles -> B rows 2t (low) and 2t + 1 (high)
            const __m512i v = _mm512_loadu_si512(p + 64 + 64 * t);
            const __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
            _mm512_store_si512(out + 128 * t, lo);
            _mm512_store_si512(out + 128 * t + 64, hi);
            qsum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(qsum, ones, lo), ones, hi);
          }
        } else {
          for (int t = 0; t < 8; ++t) qsum = _mm512_dpbusd_epi32(qsum, ones, _mm512_loadu_si512(p + 32 + 64 * t));
        }
        _mm512_store_si512(qsums + 16 * (b - c0), qsum);
      }
      for (int64_t b = c0; b < c1; ++b) {
        const int parity = b & 1;
        _tile_loadd(4, format == kQ4Tiles ? bt + (b - c0) * 512 : g + b * group_bytes + 32, 64);
        _tile_loadd(2, a + b * 2 * M * 32, 32);
        _tile_zero(0);
        _tile_dpbusd(0, 2, 4);
        if (b > c0) scale(b - 1, parity ^ 1);  // the previous block of this chunk, while these tiles run
        _tile_stored(0, cbuf[parity], 64);
        qsum_at[parity] = b - c0;
      }
      scale(c1 - 1, (c1 - 1) & 1);  // the chunk's last block (qsums is rewritten by the next chunk)
    }
    store_group(acc, M, bias, y, N, n0);
  }
  _tile_release();
}

}  // namespace skiplayer
