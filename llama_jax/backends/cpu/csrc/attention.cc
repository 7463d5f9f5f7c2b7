// Self-attention of a bf16 training step on CPU, forward and backward, called through jax.ffi
// (llama_jax/cpu_kernels.py: attention_forward / attention_backward; used by
// llama_jax/attention.py: materialized_attention).
//
// XLA:CPU runs the materialised attention as whole-array passes over [B, N, T, T]-sized f32
// scores (logits, mask, max, exp, sum, divide, convert; dP, dS in the backward): on the bench
// shape ~0.19 s of a 0.8 s bf16 step, of which its dots are ~20 ms. Here each work item keeps
// one block of 64 queries against 256 keys in L2 (flash attention's online softmax, Dao et al.
// 2022, Algorithm 1; the backward recomputes the probabilities from the saved log-sum-exp,
// Algorithm 2), and the products run on AMX tiles (bf16 pairs, f32 accumulation; without AMX
// on vdpbf16ps with 8 x 32 accumulators in registers). One layer of the bench shape, forward +
// backward, 2 cores: ~8.5 ms (XLA's causal blocks ~30 ms).
//
// The mask is attention.attention_mask's, element by element: query (segment a, position p)
// sees key (segment b, position r) iff a == b != 0 and r <= p. A 32-key tile is skipped only
// when no query of the block can see any of its keys (from per-tile ranges of segments and
// positions), so any token order is exact and rows in order (packed documents) skip the tiles
// above the diagonal and before their documents. A query that sees no key (padding) gets the
// reference's uniform softmax, the mean of all values (and log-sum-exp +inf); its gradient
// goes to every value equally.
//
// Roundings: logits and softmax in f32; the unnormalised probabilities exp(s - running max) are
// rounded to bf16 for the value product (the reference rounds the normalised ones), outputs and
// gradients to bf16 at the end; dS is rounded to bf16 for its products, as in
// attention._blocked_backward.

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "team.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#if defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ffi = xla::ffi;

// 2 for the AMX build, 1 for the AVX-512 BF16 one, 0 when this build has no kernels (or the
// tile data state was refused): the caller then keeps XLA's attention. With AMX the process
// must first be granted the tile data state (Linux >= 5.16); XLA's own AMX kernels ask too.
extern "C" int LlamaJaxAttentionKernel() {
#if defined(__AMX_BF16__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0 ? 2 : 0;
#elif defined(__AVX512BF16__)
  return 1;
#else
  return 0;
#endif
}

#if defined(__AVX512BF16__)
namespace {

using bf16 = uint16_t;
constexpr int64_t kKeyTile = 32;     // keys per mask tile and per column block of a product
constexpr int64_t kQueryBlock = 64;  // query rows per work item
constexpr int64_t kKeyChunk = 256;   // keys per online-softmax step

struct Dims {
  int64_t b, t, n, kv, h, g;  // batch, tokens, query heads, kv heads, head dim, n / kv
};

// C[M, N] (+)= A[M, K] . B[K, N] in f32. A: bf16 rows (lda elements apart), each row's K
// values contiguous. B: bf16 pairs ("VNNI"): row pair p = (2p, 2p + 1) of B at b + p * ldb,
// holding column j's two values at 2j, 2j + 1 (the layout both AMX and vdpbf16ps read).
#if defined(__AMX_BF16__)
// AMX: 32 x 32 blocks of C in four 16 x 16 f32 tiles, A and B in 16-row tiles of 32 bf16 of K.
// M, N, K multiples of 32.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every thread that runs a Gemm configures its tiles first (the configuration is per thread).
void ConfigureTiles() {
  TileConfig config;
  for (int i = 0; i < 8; ++i) {
    config.colsb[i] = 64;
    config.rows[i] = 16;
  }
  _tile_loadconfig(&config);
}

void ReleaseTiles() { _tile_release(); }

void Gemm(int64_t m, int64_t n, int64_t k, const bf16* a, int64_t lda, const bf16* b,
          int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  const int64_t sa = lda * 2, sb = ldb * 2, sc = ldc * 4;  // strides in bytes
  for (int64_t j = 0; j < n; j += 32) {
    for (int64_t i = 0; i < m; i += 32) {
      float* cc = c + i * ldc + j;
      if (accumulate) {
        _tile_loadd(0, cc, sc);
        _tile_loadd(1, cc + 16, sc);
        _tile_loadd(2, cc + 16 * ldc, sc);
        _tile_loadd(3, cc + 16 * ldc + 16, sc);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t p = 0; p < k; p += 32) {
        _tile_loadd(4, a + i * lda + p, sa);
        _tile_loadd(5, a + (i + 16) * lda + p, sa);
        _tile_loadd(6, b + (p / 2) * ldb + 2 * j, sb);
        _tile_loadd(7, b + (p / 2) * ldb + 2 * (j + 16), sb);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, cc, sc);
      _tile_stored(1, cc + 16, sc);
      _tile_stored(2, cc + 16 * ldc, sc);
      _tile_stored(3, cc + 16 * ldc + 16, sc);
    }
  }
}
#else
// vdpbf16ps: 8 rows x 32 columns of accumulators in registers. M % 8 == 0, N % 32 == 0, K even.
void ConfigureTiles() {}
void ReleaseTiles() {}

inline void Micro(const bf16* a, int64_t lda, const bf16* b, int64_t ldb, float* c, int64_t ldc,
                  int64_t k, bool accumulate) {
  __m512 acc[8][2];
  for (int r = 0; r < 8; ++r) {
    acc[r][0] = accumulate ? _mm512_loadu_ps(c + r * ldc) : _mm512_setzero_ps();
    acc[r][1] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < k / 2; ++p) {
    const bf16* bp = b + p * ldb;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + 32);
    for (int r = 0; r < 8; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * p, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  }
  for (int r = 0; r < 8; ++r) {
    _mm512_storeu_ps(c + r * ldc, acc[r][0]);
    _mm512_storeu_ps(c + r * ldc + 16, acc[r][1]);
  }
}

void Gemm(int64_t m, int64_t n, int64_t k, const bf16* a, int64_t lda, const bf16* b,
          int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < n; j += 32) {
    for (int64_t i = 0; i < m; i += 8) {
      Micro(a + i * lda, lda, b + 2 * j, ldb, c + i * ldc + j, ldc, k, accumulate);
    }
  }
}
#endif

inline float Sum(__m512 v) { return _mm512_reduce_add_ps(v); }

// Lanes of 16 keys that query (seg, pos) sees.
inline __mmask16 Visible(const int32_t* kseg, const int32_t* kpos, int32_t seg, int32_t pos) {
  if (seg == 0) return 0;
  const __m512i s = _mm512_loadu_si512(kseg), p = _mm512_loadu_si512(kpos);
  return _mm512_cmpeq_epi32_mask(s, _mm512_set1_epi32(seg)) &
         _mm512_cmple_epi32_mask(p, _mm512_set1_epi32(pos));
}

// Segment and position ranges of a run of tokens (segment 0 excluded): a query block can see
// a key tile only if their segment ranges meet and the tile's least position is <= the
// block's greatest.
struct Range {
  int32_t seg_lo = INT32_MAX, seg_hi = INT32_MIN, pos_lo = INT32_MAX, pos_hi = INT32_MIN;
  Range(const int32_t* seg, const int32_t* pos, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      if (seg[i] == 0) continue;
      seg_lo = std::min(seg_lo, seg[i]);
      seg_hi = std::max(seg_hi, seg[i]);
      pos_lo = std::min(pos_lo, pos[i]);
      pos_hi = std::max(pos_hi, pos[i]);
    }
  }
  bool empty() const { return seg_lo > seg_hi; }
};

inline bool MaySee(const Range& q, const Range& k) {
  return !q.empty() && !k.empty() && q.seg_lo <= k.seg_hi && k.seg_lo <= q.seg_hi &&
         k.pos_lo <= q.pos_hi;
}

// The first and one past the last key tile a query block may see ([0, 0) when none).
std::pair<int64_t, int64_t> KeyTiles(const std::vector<Range>& tiles, const Range& q) {
  int64_t first = -1, last = -1;
  for (int64_t i = 0; i < static_cast<int64_t>(tiles.size()); ++i) {
    if (MaySee(q, tiles[i])) {
      if (first < 0) first = i;
      last = i;
    }
  }
  return first < 0 ? std::make_pair(int64_t{0}, int64_t{0}) : std::make_pair(first, last + 1);
}

// Packing of one (batch row, kv head)'s [T, H] keys or values, rows `ld` elements apart. The
// loops run over 32-row blocks with the rows innermost, so that writes strided by T stay
// within a few cache lines (row by row, the transposes took half of the backward's time).
constexpr int64_t kPackRows = 32;

// Pairs over H ("transposed"): B[h][j] for products contracting H (q . k, dO . v).
void PackPairsOverH(const bf16* src, int64_t ld, int64_t t, int64_t h, bf16* dst) {
  for (int64_t j0 = 0; j0 < t; j0 += kPackRows) {
    for (int64_t d = 0; d < h; ++d) {
      bf16* out = dst + (d / 2) * 2 * t + (d & 1);
      for (int64_t j = j0; j < j0 + kPackRows; ++j) out[2 * j] = src[j * ld + d];
    }
  }
}

// Pairs over T: B[j][h] for products contracting the keys (p . v, dS . k).
void PackPairsOverT(const bf16* src, int64_t ld, int64_t t, int64_t h, bf16* dst) {
  for (int64_t j = 0; j < t; ++j) {
    for (int64_t d = 0; d < h; ++d) dst[(j / 2) * 2 * h + 2 * d + (j & 1)] = src[j * ld + d];
  }
}

// [T, H] rows `ld` apart -> [H, T] row-major (A operands contracting the queries).
void Transpose(const bf16* src, int64_t ld, int64_t t, int64_t h, bf16* dst) {
  for (int64_t j0 = 0; j0 < t; j0 += kPackRows) {
    for (int64_t d = 0; d < h; ++d) {
      for (int64_t j = j0; j < j0 + kPackRows; ++j) dst[d * t + j] = src[j * ld + d];
    }
  }
}

// [H, T] f32 -> [T, H] bf16 rows `ld` apart.
void TransposeRound(const float* src, int64_t t, int64_t h, bf16* dst, int64_t ld) {
  for (int64_t j0 = 0; j0 < t; j0 += kPackRows) {
    for (int64_t d = 0; d < h; ++d) {
      for (int64_t j = j0; j < j0 + kPackRows; ++j) dst[j * ld + d] = FloatToBf16(src[d * t + j]);
    }
  }
}

// Two rows of 16 f32 -> 16 interleaved bf16 pairs (row0[i], row1[i]), rounded to nearest even.
inline __m512i Interleave(__m512 row0, __m512 row1) {
  const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(row1, row0);  // row0 lanes, then row1's
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                         24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                         16, 0);
  return _mm512_permutexvar_epi16(order, packed);
}

inline __m512 LoadBf16(const bf16* p) {
  return WidenBf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline void StoreBf16(bf16* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), RoundBf16(v));
}

struct Inputs {
  Dims d;
  const bf16 *q, *k, *v;
  const int32_t *pos, *seg;
  float scale;
};

// Key tile ranges of every batch row: [B][T / 32].
std::vector<std::vector<Range>> TileRanges(const Inputs& in) {
  const Dims& d = in.d;
  std::vector<std::vector<Range>> out(d.b);
  for (int64_t b = 0; b < d.b; ++b) {
    for (int64_t j = 0; j < d.t; j += kKeyTile) {
      out[b].emplace_back(in.seg + b * d.t + j, in.pos + b * d.t + j, kKeyTile);
    }
  }
  return out;
}

template <typename T>
T* Scratch(std::vector<T>& buffer, size_t n) {
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// ------------------------------------------------------------------------------------------
// Forward: out [B, T, N, H] bf16, lse [B, N, T] f32.

void ForwardItem(const Inputs& in, const std::vector<std::vector<Range>>& tiles,
                 const bf16* kt_pairs, const bf16* v_pairs, const float* v_mean, int64_t b,
                 int64_t n, int64_t q0, bf16* out, float* lse) {
  const Dims& d = in.d;
  const int64_t m = std::min(kQueryBlock, d.t - q0), h = d.h, ld = d.n * d.h;
  const int32_t* seg = in.seg + b * d.t;
  const int32_t* pos = in.pos + b * d.t;
  thread_local std::vector<float> s_buf, o_buf, m_buf, l_buf;
  thread_local std::vector<bf16> p_buf;
  float* s = Scratch(s_buf, kQueryBlock * kKeyChunk);
  bf16* p = Scratch(p_buf, kQueryBlock * kKeyChunk);
  float* o = Scratch(o_buf, kQueryBlock * h);
  float* row_max = Scratch(m_buf, kQueryBlock);
  float* row_sum = Scratch(l_buf, kQueryBlock);
  std::fill(o, o + m * h, 0.0f);
  std::fill(row_max, row_max + m, -INFINITY);
  std::fill(row_sum, row_sum + m, 0.0f);
  const bf16* q_rows = in.q + (b * d.t + q0) * ld + n * h;
  ConfigureTiles();
  const auto [first, last] = KeyTiles(tiles[b], Range(seg + q0, pos + q0, m));
  for (int64_t c0 = first * kKeyTile; c0 < last * kKeyTile; c0 += kKeyChunk) {
    const int64_t w = std::min(kKeyChunk, last * kKeyTile - c0);
    Gemm(m, w, h, q_rows, ld, kt_pairs + 2 * c0, 2 * d.t, s, kKeyChunk, false);
    for (int64_t r = 0; r < m; ++r) {
      float* sr = s + r * kKeyChunk;
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < w; j += 16) {
        const __mmask16 vis = Visible(seg + c0 + j, pos + c0 + j, seg[q0 + r], pos[q0 + r]);
        const __m512 x = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), vis,
                                            _mm512_loadu_ps(sr + j), _mm512_set1_ps(in.scale));
        _mm512_storeu_ps(sr + j, x);
        mx = _mm512_max_ps(mx, x);
      }
      const float m_new = std::max(row_max[r], _mm512_reduce_max_ps(mx));
      bf16* pr = p + r * kKeyChunk;
      if (m_new == -INFINITY) {  // nothing visible yet
        std::memset(pr, 0, w * sizeof(bf16));
        continue;
      }
      const float corr = std::exp(row_max[r] - m_new);
      row_max[r] = m_new;
      __m512 total = _mm512_setzero_ps();
      for (int64_t j = 0; j < w; j += 16) {
        const __m512 x = _mm512_loadu_ps(sr + j);
        const __mmask16 vis = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        const __m512 e = _mm512_maskz_mov_ps(vis, Exp(_mm512_sub_ps(x, _mm512_set1_ps(m_new))));
        total = _mm512_add_ps(total, e);
        StoreBf16(pr + j, e);
      }
      row_sum[r] = row_sum[r] * corr + Sum(total);
      if (corr != 1.0f) {
        for (int64_t j = 0; j < h; ++j) o[r * h + j] *= corr;
      }
    }
    Gemm(m, h, w, p, kKeyChunk, v_pairs + c0 * h, 2 * h, o, h, true);
  }
  for (int64_t r = 0; r < m; ++r) {
    const float l = row_sum[r];
    bf16* dst = out + (b * d.t + q0 + r) * ld + n * h;
    for (int64_t j = 0; j < h; j += 16) {  // no key seen: the mean of all values
      StoreBf16(dst + j, l > 0 ? _mm512_mul_ps(_mm512_loadu_ps(o + r * h + j),
                                               _mm512_set1_ps(1.0f / l))
                               : _mm512_loadu_ps(v_mean + j));
    }
    lse[(b * d.n + n) * d.t + q0 + r] = l > 0 ? row_max[r] + std::log(l) : INFINITY;
  }
  ReleaseTiles();
}

void Forward(ffi::ThreadPool& pool, const Inputs& in, bf16* out, float* lse) {
  const Dims& d = in.d;
  const int64_t units = d.b * d.kv, unit_size = d.t * d.h, ld = d.kv * d.h;
  std::vector<bf16> kt_pairs(units * unit_size), v_pairs(units * unit_size);
  std::vector<float> v_mean(units * d.h, 0.0f);
  const auto tiles = TileRanges(in);
  const int64_t blocks = (d.t + kQueryBlock - 1) / kQueryBlock;
  auto team = StartTeam(pool);
  team->Phase(0, units, [&](int64_t u) {
    const int64_t b = u / d.kv, kh = u % d.kv;
    const int64_t at = b * d.t * ld + kh * d.h;
    PackPairsOverH(in.k + at, ld, d.t, d.h, kt_pairs.data() + u * unit_size);
    PackPairsOverT(in.v + at, ld, d.t, d.h, v_pairs.data() + u * unit_size);
    float* mean = v_mean.data() + u * d.h;
    for (int64_t j = 0; j < d.t; ++j) {
      for (int64_t e = 0; e < d.h; ++e) mean[e] += Bf16ToFloat(in.v[at + j * ld + e]);
    }
    for (int64_t e = 0; e < d.h; ++e) mean[e] /= static_cast<float>(d.t);
  });
  // Items in order of decreasing work (late query blocks see more keys) balance the threads.
  team->Phase(1, d.b * d.n * blocks, [&](int64_t i) {
    const int64_t qb = blocks - 1 - i / (d.b * d.n), bn = i % (d.b * d.n);
    const int64_t b = bn / d.n, n = bn % d.n, u = b * d.kv + n / d.g;
    ForwardItem(in, tiles, kt_pairs.data() + u * unit_size, v_pairs.data() + u * unit_size,
                v_mean.data() + u * d.h, b, n, qb * kQueryBlock, out, lse);
  });
  team->finished.store(true, std::memory_order_release);
}

// ------------------------------------------------------------------------------------------
// Backward: dq [B, T, N, H], dk, dv [B, T, K, H] (bf16), one (batch row, kv head) per work
// item (its dK, dV sum over its G query heads and every query block).

struct Grads {
  const bf16 *out, *d_out;
  const float* lse;
  bf16 *dq, *dk, *dv;
};

void BackwardUnit(const Inputs& in, const Grads& gr, const std::vector<Range>& tiles, int64_t b,
                  int64_t kh) {
  const Dims& d = in.d;
  const int64_t t = d.t, h = d.h, ld = d.n * d.h, kv_ld = d.kv * d.h;
  const int32_t* seg = in.seg + b * t;
  const int32_t* pos = in.pos + b * t;
  thread_local std::vector<bf16> kt_buf, vt_buf, k_buf, qt_buf, dot_buf, ds_buf, dsp_buf, pp_buf;
  thread_local std::vector<float> dkt_buf, dvt_buf, s_buf, dp_buf, dq_buf, delta_buf;
  bf16* kt_pairs = Scratch(kt_buf, t * h);
  bf16* vt_pairs = Scratch(vt_buf, t * h);
  bf16* k_pairs = Scratch(k_buf, t * h);
  bf16* q_t = Scratch(qt_buf, t * h);
  bf16* do_t = Scratch(dot_buf, t * h);
  bf16* ds = Scratch(ds_buf, kQueryBlock * kKeyChunk);      // dS rows
  bf16* ds_pairs = Scratch(dsp_buf, kQueryBlock * kKeyChunk);  // dS, pairs over queries
  bf16* p_pairs = Scratch(pp_buf, kQueryBlock * kKeyChunk);    // P, pairs over queries
  float* dk_t = Scratch(dkt_buf, t * h);
  float* dv_t = Scratch(dvt_buf, t * h);
  float* s = Scratch(s_buf, kQueryBlock * kKeyChunk);
  float* dp = Scratch(dp_buf, kQueryBlock * kKeyChunk);
  float* dq = Scratch(dq_buf, kQueryBlock * h);
  float* delta = Scratch(delta_buf, t);
  const int64_t at = b * t * kv_ld + kh * h;
  PackPairsOverH(in.k + at, kv_ld, t, h, kt_pairs);
  PackPairsOverH(in.v + at, kv_ld, t, h, vt_pairs);
  PackPairsOverT(in.k + at, kv_ld, t, h, k_pairs);
  std::fill(dk_t, dk_t + t * h, 0.0f);
  std::fill(dv_t, dv_t + t * h, 0.0f);
  std::vector<float> unseen(h, 0.0f);  // sum of dO over the queries that saw no key
  ConfigureTiles();
  for (int64_t g = 0; g < d.g; ++g) {
    const int64_t n = kh * d.g + g;
    const bf16* q_head = in.q + b * t * ld + n * h;
    const bf16* do_head = gr.d_out + b * t * ld + n * h;
    const bf16* o_head = gr.out + b * t * ld + n * h;
    const float* lse = gr.lse + (b * d.n + n) * t;
    Transpose(q_head, ld, t, h, q_t);
    Transpose(do_head, ld, t, h, do_t);
    for (int64_t i = 0; i < t; ++i) {  // delta = rowsum(dO * O)
      if (lse[i] == INFINITY) {
        for (int64_t e = 0; e < h; ++e) unseen[e] += Bf16ToFloat(do_head[i * ld + e]);
      }
      __m512 acc = _mm512_setzero_ps();
      for (int64_t j = 0; j < h; j += 16) {
        acc = _mm512_fmadd_ps(LoadBf16(do_head + i * ld + j), LoadBf16(o_head + i * ld + j), acc);
      }
      delta[i] = Sum(acc);
    }
    for (int64_t q0 = 0; q0 < t; q0 += kQueryBlock) {
      const int64_t m = std::min(kQueryBlock, t - q0);
      const auto [first, last] = KeyTiles(tiles, Range(seg + q0, pos + q0, m));
      std::fill(dq, dq + m * h, 0.0f);
      for (int64_t c0 = first * kKeyTile; c0 < last * kKeyTile; c0 += kKeyChunk) {
        const int64_t w = std::min(kKeyChunk, last * kKeyTile - c0);
        Gemm(m, w, h, q_head + q0 * ld, ld, kt_pairs + 2 * c0, 2 * t, s, kKeyChunk, false);
        Gemm(m, w, h, do_head + q0 * ld, ld, vt_pairs + 2 * c0, 2 * t, dp, kKeyChunk, false);
        for (int64_t r = 0; r < m; r += 2) {  // rows in pairs: the query-pair layouts
          for (int64_t j = 0; j < w; j += 16) {
            __m512 pv[2], dsv[2];
            for (int64_t e = 0; e < 2; ++e) {
              const int64_t row = r + e, qi = q0 + row;
              const __mmask16 vis = Visible(seg + c0 + j, pos + c0 + j, seg[qi], pos[qi]);
              const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(s + row * kKeyChunk + j),
                                               _mm512_set1_ps(in.scale), _mm512_set1_ps(lse[qi]));
              pv[e] = _mm512_maskz_mov_ps(vis, Exp(x));
              const __m512 dpv = _mm512_sub_ps(_mm512_loadu_ps(dp + row * kKeyChunk + j),
                                               _mm512_set1_ps(delta[qi]));
              dsv[e] = _mm512_mul_ps(_mm512_mul_ps(pv[e], dpv), _mm512_set1_ps(in.scale));
              StoreBf16(ds + row * kKeyChunk + j, dsv[e]);
            }
            const int64_t at = (r / 2) * 2 * kKeyChunk + 2 * j;
            _mm512_storeu_si512(p_pairs + at, Interleave(pv[0], pv[1]));
            _mm512_storeu_si512(ds_pairs + at, Interleave(dsv[0], dsv[1]));
          }
        }
        Gemm(m, h, w, ds, kKeyChunk, k_pairs + c0 * h, 2 * h, dq, h, true);
        Gemm(h, w, m, q_t + q0, t, ds_pairs, 2 * kKeyChunk, dk_t + c0, t, true);
        Gemm(h, w, m, do_t + q0, t, p_pairs, 2 * kKeyChunk, dv_t + c0, t, true);
      }
      bf16* dst = gr.dq + (b * t + q0) * ld + n * h;
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t j = 0; j < h; j += 16) {
          StoreBf16(dst + r * ld + j, _mm512_loadu_ps(dq + r * h + j));
        }
      }
    }
  }
  ReleaseTiles();
  for (int64_t e = 0; e < h; ++e) {  // their output was the mean of all values
    const float share = unseen[e] / static_cast<float>(t);
    if (share != 0.0f) {
      for (int64_t j = 0; j < t; ++j) dv_t[e * t + j] += share;
    }
  }
  TransposeRound(dk_t, t, h, gr.dk + at, kv_ld);
  TransposeRound(dv_t, t, h, gr.dv + at, kv_ld);
}

void Backward(ffi::ThreadPool& pool, const Inputs& in, const Grads& gr) {
  const Dims& d = in.d;
  const auto tiles = TileRanges(in);
  ForEachChunk(pool, d.b * d.kv, [&](int64_t u) {
    BackwardUnit(in, gr, tiles[u / d.kv], u / d.kv, u % d.kv);
  });
}

// ------------------------------------------------------------------------------------------

const bf16* Bf16Data(const ffi::AnyBuffer& x) {
  return static_cast<const bf16*>(x.untyped_data());
}

ffi::Error Check(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                 const ffi::Buffer<ffi::S32>& pos, const ffi::Buffer<ffi::S32>& seg, Dims* d) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 ||
      !std::equal(kd.begin(), kd.end(), vd.begin())) {
    return ffi::Error::InvalidArgument("attention kernel: q must be [B, T, N, H], k and v "
                                       "[B, T, K, H]");
  }
  *d = Dims{qd[0], qd[1], qd[2], kd[2], qd[3], kd[2] ? qd[2] / kd[2] : 0};
  if (q.element_type() != ffi::DataType::BF16 || k.element_type() != ffi::DataType::BF16 ||
      v.element_type() != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("attention kernel: q, k, v must be bfloat16");
  }
  if (kd[0] != d->b || kd[1] != d->t || kd[3] != d->h || d->kv == 0 || d->n % d->kv ||
      d->t % kKeyTile || d->h % 32 ||
      static_cast<int64_t>(pos.element_count()) != d->b * d->t ||
      static_cast<int64_t>(seg.element_count()) != d->b * d->t) {
    return ffi::Error::InvalidArgument("attention kernel: needs T % 32 == 0, H % 32 == 0, "
                                       "N % K == 0 and positions, segments [B, T]");
  }
  return ffi::Error::Success();
}

ffi::Error AttentionForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                                ffi::AnyBuffer v, ffi::Buffer<ffi::S32> pos,
                                ffi::Buffer<ffi::S32> seg, ffi::Result<ffi::AnyBuffer> out,
                                ffi::ResultBuffer<ffi::F32> lse) {
  Dims d;
  if (auto e = Check(q, k, v, pos, seg, &d); e.failure()) return e;
  const Inputs in{d, Bf16Data(q), Bf16Data(k), Bf16Data(v), pos.typed_data(), seg.typed_data(),
                  1.0f / std::sqrt(static_cast<float>(d.h))};
  Forward(pool, in, static_cast<bf16*>(out->untyped_data()), lse->typed_data());
  return ffi::Error::Success();
}

ffi::Error AttentionBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                                 ffi::AnyBuffer v, ffi::Buffer<ffi::S32> pos,
                                 ffi::Buffer<ffi::S32> seg, ffi::AnyBuffer out,
                                 ffi::AnyBuffer d_out, ffi::Buffer<ffi::F32> lse,
                                 ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                                 ffi::Result<ffi::AnyBuffer> dv) {
  Dims d;
  if (auto e = Check(q, k, v, pos, seg, &d); e.failure()) return e;
  const Inputs in{d, Bf16Data(q), Bf16Data(k), Bf16Data(v), pos.typed_data(), seg.typed_data(),
                  1.0f / std::sqrt(static_cast<float>(d.h))};
  const Grads gr{Bf16Data(out), Bf16Data(d_out), lse.typed_data(),
                 static_cast<bf16*>(dq->untyped_data()), static_cast<bf16*>(dk->untyped_data()),
                 static_cast<bf16*>(dv->untyped_data())};
  Backward(pool, in, gr);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttentionForward, AttentionForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AttentionBackward, AttentionBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
#endif  // __AVX512BF16__
