// The two CPU kernels of a decode step (llama_jax/cpu_kernels.py), called through jax.ffi.
//
// SmallMatmul: y[M, N] (f32) = x[M, K] (f32) . w (f32 or bf16), for the few rows of a step.
// w arrives packed as [N / 32, K, 32] (llama_jax/cpu_kernels.py: Packed): each 32-column tile
// is one contiguous stream and each tile's M x 32 accumulators stay in registers while w is
// read exactly once. The tiles are claimed one at a time by the caller and helpers from XLA's
// intra-op thread pool (the FFI ThreadPool context; `Team` below). XLA:CPU reads the
// same weights slower (one Eigen thread at batch 1, YNNPACK re-packing at 2-8 rows, and a
// bf16 -> f32 conversion of the weights in every bf16 dot). Without AVX-512 a plain C++ loop
// does the same work.
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "team.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 32;
constexpr int64_t kMaxRows = 8;

inline float Load(float v) { return v; }
inline float Load(uint16_t v) { return Bf16ToFloat(v); }
inline void Store(float* p, float v) { *p = v; }
inline void Store(uint16_t* p, float v) { *p = FloatToBf16(v); }

#if defined(__AVX512F__)
template <typename W>
inline __m512 Load16(const W* p) {
  if constexpr (sizeof(W) == 2) {  // bf16: the high half of an f32
    return WidenBf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {
    return _mm512_loadu_ps(p);
  }
}

template <int M, typename W>
void Tile(const float* __restrict x, const W* __restrict w, float* __restrict y, int64_t k_dim,
          int64_t n_dim) {
  __m512 lo[M], hi[M];
  for (int m = 0; m < M; ++m) lo[m] = hi[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_dim; ++k) {
    const __m512 w0 = Load16(w + k * kTile), w1 = Load16(w + k * kTile + 16);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512 xm = _mm512_set1_ps(x[m * k_dim + k]);
      lo[m] = _mm512_fmadd_ps(xm, w0, lo[m]);
      hi[m] = _mm512_fmadd_ps(xm, w1, hi[m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    _mm512_storeu_ps(y + m * n_dim, lo[m]);
    _mm512_storeu_ps(y + m * n_dim + 16, hi[m]);
  }
}
#else
template <int M, typename W>
void Tile(const float* __restrict x, const W* __restrict w, float* __restrict y, int64_t k_dim,
          int64_t n_dim) {
  float acc[M][kTile] = {};
  for (int64_t k = 0; k < k_dim; ++k) {
    for (int m = 0; m < M; ++m) {
      const float xm = x[m * k_dim + k];
      for (int64_t j = 0; j < kTile; ++j) acc[m][j] += xm * Load(w[k * kTile + j]);
    }
  }
  for (int m = 0; m < M; ++m) std::memcpy(y + m * n_dim, acc[m], sizeof(acc[m]));
}
#endif

// A packed weight [T, K, 32]: rows x [B, K] times tile t into y [B, T * 32] (row stride).
template <typename W>
void TileRows(const float* x, const W* w, int64_t t, float* y, int64_t b, int64_t k_dim,
              int64_t n_pad) {
  const W* wt = w + t * k_dim * kTile;
  for (int64_t m0 = 0; m0 < b; m0 += kMaxRows) {
    const float* xm = x + m0 * k_dim;
    float* ym = y + m0 * n_pad + t * kTile;
    switch (b - m0 < kMaxRows ? b - m0 : kMaxRows) {
      case 1: Tile<1>(xm, wt, ym, k_dim, n_pad); break;
      case 2: Tile<2>(xm, wt, ym, k_dim, n_pad); break;
      case 3: Tile<3>(xm, wt, ym, k_dim, n_pad); break;
      case 4: Tile<4>(xm, wt, ym, k_dim, n_pad); break;
      case 5: Tile<5>(xm, wt, ym, k_dim, n_pad); break;
      case 6: Tile<6>(xm, wt, ym, k_dim, n_pad); break;
      case 7: Tile<7>(xm, wt, ym, k_dim, n_pad); break;
      default: Tile<8>(xm, wt, ym, k_dim, n_pad); break;
    }
  }
}


// Starts a team for one call: helpers (XLA's pool size - 1, at least 1) join its phases.

// y = x . w, every row, the tiles claimed by the caller and the helpers.
template <typename W>
void Product(ffi::ThreadPool& pool, const float* x, const W* w, float* y, int64_t rows,
             int64_t k_dim, int64_t tiles) {
  ForEachChunk(pool, tiles, [&](int64_t t) { TileRows(x, w, t, y, rows, k_dim, tiles * kTile); });
}

ffi::Error SmallMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                           ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  if (wd.size() != 3 || wd[2] != kTile) {
    return ffi::Error::InvalidArgument("small_matmul: w must be packed as [N / 32, K, 32]");
  }
  const int64_t k_dim = wd[1], n_dim = wd[0] * kTile;
  const int64_t rows = static_cast<int64_t>(x.element_count()) / k_dim;
  if (rows * k_dim != static_cast<int64_t>(x.element_count()) ||
      rows * n_dim != static_cast<int64_t>(y->element_count())) {
    return ffi::Error::InvalidArgument("small_matmul: x must be [M, K] and y [M, N]");
  }
  if (w.element_type() == ffi::DataType::BF16) {
    Product(pool, x.typed_data(), static_cast<const uint16_t*>(w.untyped_data()),
            y->typed_data(), rows, k_dim, wd[0]);
  } else if (w.element_type() == ffi::DataType::F32) {
    Product(pool, x.typed_data(), static_cast<const float*>(w.untyped_data()), y->typed_data(),
            rows, k_dim, wd[0]);
  } else {
    return ffi::Error::InvalidArgument("small_matmul: w must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SmallMatmul, SmallMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// DecodeLayer: one transformer block (model.Block) for the single new token of each of B
// rows, in one call: RMSNorm, q/k/v products, RoPE, the k/v write into the stacked cache
// [L, B, S, K, H] (f32 or bf16, updated in place: the cache operands alias the results),
// attention over the cache, the output product and residual, RMSNorm, SwiGLU and the down
// product and residual. XLA:CPU ran the same block as ~20 operations per layer and token
// (a scatter rewriting the whole stacked cache, a copy and transposes of the layer's slice,
// two small dots, norms and elementwise fusions each waking its thread pool), ~0.2 ms per
// layer per token on the bench shape against ~0.14 ms for reading the layer's weights.
//
// The math and its roundings are decode_forward._layer's: values in the compute dtype
// (`round`: bf16, every elementwise result rounded to nearest even as XLA does), products
// and softmax in f32. Attention is attention.dot_product_attention under attention_mask's
// rule: slots s with kv_seg[b, s] == q_seg[b] != 0 and kv_pos[b, s] <= q_pos[b]; masked
// scores -FLT_MAX, so a fully masked row is uniform over all slots; probabilities rounded
// to the cache dtype before the value product. A slot >= S drops the row's k/v (padding).
//
// Work is split into phases (the products' 32-column tiles, the attention's (row, kv head)
// pairs); the caller and helpers from XLA's intra-op pool claim a phase's chunks from an
// atomic counter, and the caller runs the small elementwise steps between phases. A helper
// that starts late finds the chunks taken; the caller never waits for an unclaimed chunk.
namespace {
struct LayerShape {
  int64_t b, d, f, n, k, h, s;  // rows, model dim, ffn dim, heads, kv heads, head dim, slots
};

struct Weight {  // one packed projection
  const void* data;
  int64_t tiles;
  int64_t pad() const { return tiles * kTile; }
};

template <typename C>
struct LayerArgs {
  LayerShape d;
  bool round;
  float eps;
  const float* x;
  const void* attn_norm;
  const void* mlp_norm;
  bool norm_bf16;
  Weight wq, wk, wv, wo, w_gate, w_up, w_down;
  const float *cos, *sin;
  const int32_t *slot, *q_pos, *q_seg, *kv_pos, *kv_seg;
  C *ck, *cv;  // this layer's [B, S, K, H]
  float* out;
};

struct Rounder {
  bool on;
  float operator()(float v) const { return on ? Bf16ToFloat(FloatToBf16(v)) : v; }
};

// Elementwise steps over float arrays: 16 lanes at a time with AVX-512 (masked tails), else
// scalar. Exp is Cephes' expf (range reduction by ln 2, degree-6 polynomial; within 2 ulp),
// 0 below -103.97 as IEEE underflow gives, NaN kept.
#if defined(__AVX512F__)
inline __m512 RoundV(__m512 v, bool on) {
  if (!on) return v;
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __m512i high = _mm512_set1_epi32(int32_t(0xffff0000u));
  r = _mm512_and_si512(r, high);
  const __m512i quiet = _mm512_or_si512(_mm512_and_si512(u, high), _mm512_set1_epi32(0x00400000));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_castsi512_ps(_mm512_mask_blend_epi32(nan, r, quiet));
}

inline __m512 ExpV(__m512 x) {
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-103.972076416f), _CMP_LT_OQ);
  const __m512 xc = _mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  __m512 y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  y = _mm512_scalef_ps(_mm512_add_ps(y, _mm512_set1_ps(1.0f)), n);
  y = _mm512_mask_mov_ps(y, under, _mm512_setzero_ps());
  return _mm512_mask_mov_ps(y, nan, x);
}
#endif

// x[i] = exp(x[i] - shift); returns the sum.
float ExpShifted(float* x, int64_t n, float shift) {
#if defined(__AVX512F__)
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = Lanes(n - i);
    const __m512 e = ExpV(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_set1_ps(shift)));
    _mm512_mask_storeu_ps(x + i, m, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
  }
  return _mm512_reduce_add_ps(sum);
#else
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) sum += (x[i] = std::exp(x[i] - shift));
  return sum;
#endif
}

// x[i] = round(x[i] / d) (round: to bf16 and back).
void DivideRound(float* x, int64_t n, float d, bool round) {
#if defined(__AVX512F__)
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = Lanes(n - i);
    const __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_set1_ps(d));
    _mm512_mask_storeu_ps(x + i, m, RoundV(v, round));
  }
#else
  const Rounder r{round};
  for (int64_t i = 0; i < n; ++i) x[i] = r(x[i] / d);
#endif
}

// act = silu(gate) * up as jax.nn.silu lowers (x * 1 / (1 + exp(-x))), one rounding per
// operation; n columns of one row.
void SiluMul(const float* gate, const float* up, float* act, int64_t n, bool round) {
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = Lanes(n - i);
    const __m512 g = RoundV(_mm512_maskz_loadu_ps(m, gate + i), round);
    const __m512 e = RoundV(ExpV(_mm512_sub_ps(_mm512_setzero_ps(), g)), round);
    const __m512 sig = RoundV(_mm512_div_ps(one, RoundV(_mm512_add_ps(e, one), round)), round);
    const __m512 u = RoundV(_mm512_maskz_loadu_ps(m, up + i), round);
    _mm512_mask_storeu_ps(act + i, m,
                          RoundV(_mm512_mul_ps(RoundV(_mm512_mul_ps(g, sig), round), u), round));
  }
#else
  const Rounder r{round};
  for (int64_t i = 0; i < n; ++i) {
    const float g = r(gate[i]);
    const float sig = r(1.0f / r(r(std::exp(-g)) + 1.0f));
    act[i] = r(r(g * sig) * r(up[i]));
  }
#endif
}

// model.RMSNorm as decode_forward._rms_norm: normalise in f32, round, scale, round.
void RmsNorm(const float* x, const void* scale, bool scale_bf16, bool round, float eps,
             int64_t b, int64_t d, float* y) {
  for (int64_t i = 0; i < b; ++i) {
    const float* xi = x + i * d;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < d; ++j) ss += xi[j] * xi[j];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    float* yi = y + i * d;
#if defined(__AVX512F__)
    for (int64_t j = 0; j < d; j += 16) {
      const __mmask16 m = Lanes(d - j);
      const __m512 g = scale_bf16
          ? WidenBf16(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(scale) + j))
          : _mm512_maskz_loadu_ps(m, static_cast<const float*>(scale) + j);
      const __m512 v = RoundV(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, xi + j), _mm512_set1_ps(inv)),
                              round);
      _mm512_mask_storeu_ps(yi + j, m, RoundV(_mm512_mul_ps(v, g), round));
    }
#else
    const Rounder r{round};
    for (int64_t j = 0; j < d; ++j) {
      const float g = scale_bf16 ? Bf16ToFloat(static_cast<const uint16_t*>(scale)[j])
                                 : static_cast<const float*>(scale)[j];
      yi[j] = r(r(xi[j] * inv) * g);
    }
#endif
  }
}

// out[i] = round(x[i] + round(y[i])), n values (a residual add).
void AddRound(const float* x, const float* y, float* out, int64_t n, bool round) {
#if defined(__AVX512F__)
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = Lanes(n - i);
    const __m512 v = RoundV(_mm512_maskz_loadu_ps(m, y + i), round);
    _mm512_mask_storeu_ps(out + i, m,
                          RoundV(_mm512_add_ps(_mm512_maskz_loadu_ps(m, x + i), v), round));
  }
#else
  const Rounder r{round};
  for (int64_t i = 0; i < n; ++i) out[i] = r(x[i] + r(y[i]));
#endif
}

float Dot(const float* x, const float* y, int64_t n) {
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = Lanes(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += x[i] * y[i];
  return acc;
#endif
}

void Axpy(float a, const float* x, float* y, int64_t n) {  // y += a x
#if defined(__AVX512F__)
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = Lanes(n - i);
    const __m512 v = _mm512_fmadd_ps(_mm512_set1_ps(a), _mm512_maskz_loadu_ps(m, x + i),
                                     _mm512_maskz_loadu_ps(m, y + i));
    _mm512_mask_storeu_ps(y + i, m, v);
  }
#else
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
#endif
}

// model.apply_rope on `heads` heads of one row: pairs (j, j + H/2), f32 math, rounded.
void Rope(float* v, int64_t heads, int64_t h, const float* cos, const float* sin, Rounder r) {
  const int64_t half = h / 2;
  for (int64_t n = 0; n < heads; ++n) {
    float* x = v + n * h;
    for (int64_t j = 0; j < half; ++j) {
      const float x1 = x[j], x2 = x[j + half];
      x[j] = r(x1 * cos[j] - x2 * sin[j]);
      x[j + half] = r(x2 * cos[j] + x1 * sin[j]);
    }
  }
}

// The cache rows of one kv head are H values every K * H: a stride the hardware prefetcher
// follows too late (at 2k slots the row loads were ~60% of the attention's time), so rows
// kAhead slots ahead are prefetched by hand (8 and 16 measured alike). Prefetching past
// the end is harmless (a prefetch never faults).
constexpr int64_t kAhead = 16;

template <typename C>
inline void Prefetch(const C* p, int64_t n) {
  for (int64_t i = 0; i < n * static_cast<int64_t>(sizeof(C)); i += 64) {
    __builtin_prefetch(reinterpret_cast<const char*>(p) + i);
  }
}

// Row b, kv head kh: round and rotate its q heads and its k, round its v (model.apply_rope),
// write k/v at the row's slot, then attend with the G query heads of kv head kh.
// q [B, N*H pad], k_new/v_new [B, K*H pad] (this chunk's heads modified in place),
// out [B, N*H].
template <typename C>
void AttendHead(const LayerArgs<C>& a, int64_t b, int64_t kh, float* q, int64_t q_pad,
                float* k_new, float* v_new, int64_t kv_pad, float* out) {
  const LayerShape& d = a.d;
  const int64_t S = d.s, K = d.k, H = d.h, G = d.n / d.k;
  const Rounder r{a.round};
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  float* qk = q + b * q_pad + kh * G * H;
  float* kn = k_new + b * kv_pad + kh * H;
  float* vn = v_new + b * kv_pad + kh * H;
  for (int64_t i = 0; i < G * H; ++i) qk[i] = r(qk[i]);
  for (int64_t i = 0; i < H; ++i) kn[i] = r(kn[i]), vn[i] = r(vn[i]);
  const float* cos = a.cos + b * (H / 2);
  const float* sin = a.sin + b * (H / 2);
  Rope(qk, G, H, cos, sin, r);
  Rope(kn, 1, H, cos, sin, r);
  C* kb = a.ck + b * S * K * H;
  C* vb = a.cv + b * S * K * H;
  const int32_t slot = a.slot[b];
  if (slot >= 0 && slot < S) {
    for (int64_t i = 0; i < H; ++i) {
      Store(kb + (slot * K + kh) * H + i, kn[i]);
      Store(vb + (slot * K + kh) * H + i, vn[i]);
    }
  }
  // Per-thread scratch, kept between calls (no allocation in the steady state).
  thread_local std::vector<float> scores, row, acc;
  scores.resize(G * S);
  row.resize(H);
  acc.assign(G * H, 0.0f);
  const int32_t* pos = a.kv_pos + b * S;
  const int32_t* seg = a.kv_seg + b * S;
  for (int64_t s = 0; s < S; ++s) {
    if (seg[s] == 0 || seg[s] != a.q_seg[b] || pos[s] > a.q_pos[b]) {
      for (int64_t g = 0; g < G; ++g) scores[g * S + s] = -FLT_MAX;
      continue;
    }
    const C* kr = kb + (s * K + kh) * H;
    Prefetch(kr + kAhead * K * H, H);
    for (int64_t i = 0; i < H; ++i) row[i] = Load(kr[i]);
    for (int64_t g = 0; g < G; ++g) scores[g * S + s] = Dot(qk + g * H, row.data(), H) * scale;
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sc = scores.data() + g * S;
    const float sum = ExpShifted(sc, S, *std::max_element(sc, sc + S));
    DivideRound(sc, S, sum, sizeof(C) == 2);  // probabilities in the cache dtype
  }
  for (int64_t s = 0; s < S; ++s) {  // each v row read once for the G heads
    bool any = false;
    for (int64_t g = 0; g < G; ++g) any |= scores[g * S + s] != 0.0f;
    if (!any) continue;
    const C* vr = vb + (s * K + kh) * H;
    Prefetch(vr + kAhead * K * H, H);
    for (int64_t i = 0; i < H; ++i) row[i] = Load(vr[i]);
    for (int64_t g = 0; g < G; ++g) Axpy(scores[g * S + s], row.data(), acc.data() + g * H, H);
  }
  std::memcpy(out + b * d.n * H + kh * G * H, acc.data(), G * H * sizeof(float));
}

template <typename W, typename C>
void Layer(ffi::ThreadPool& pool, const LayerArgs<C>& a) {
  const LayerShape& d = a.d;
  const Rounder r{a.round};
  const int64_t B = d.b, D = d.d, NH = d.n * d.h;
  const int64_t qp = a.wq.pad(), kp = a.wk.pad(), op = a.wo.pad(), fp = a.w_gate.pad(),
                dp = a.w_down.pad();
  // The caller thread's scratch, kept between calls; helpers reach it through the phases.
  thread_local std::vector<float> scratch;
  const int64_t sizes[] = {B * D, B * qp, B * kp, B * kp, B * NH, B * op, B * D, B * fp,
                           B * fp, B * d.f, B * dp};
  int64_t total = 0;
  for (int64_t n : sizes) total += (n + 15) / 16 * 16;  // 64-byte aligned offsets
  if (static_cast<int64_t>(scratch.size()) < total) scratch.resize(total);
  float* bufs[11];
  for (int64_t i = 0, off = 0; i < 11; off += (sizes[i] + 15) / 16 * 16, ++i) {
    bufs[i] = scratch.data() + off;
  }
  float *y = bufs[0], *q = bufs[1], *k = bufs[2], *v = bufs[3], *att = bufs[4], *o = bufs[5],
        *h = bufs[6], *gate = bufs[7], *up = bufs[8], *act = bufs[9], *down = bufs[10];
  const W *wq = static_cast<const W*>(a.wq.data), *wk = static_cast<const W*>(a.wk.data),
          *wv = static_cast<const W*>(a.wv.data), *wo = static_cast<const W*>(a.wo.data),
          *wg = static_cast<const W*>(a.w_gate.data), *wu = static_cast<const W*>(a.w_up.data),
          *wd = static_cast<const W*>(a.w_down.data);

  auto team = StartTeam(pool);

  RmsNorm(a.x, a.attn_norm, a.norm_bf16, a.round, a.eps, B, D, y);
  const int64_t tq = a.wq.tiles, tk = a.wk.tiles;
  team->Phase(0, tq + 2 * tk, [&](int64_t i) {
    if (i < tq) return TileRows(y, wq, i, q, B, D, qp);
    if (i < tq + tk) return TileRows(y, wk, i - tq, k, B, D, kp);
    TileRows(y, wv, i - tq - tk, v, B, D, kp);
  });
  team->Phase(1, B * d.k, [&](int64_t i) {
    AttendHead(a, i / d.k, i % d.k, q, qp, k, v, kp, att);
    const int64_t heads = d.n / d.k * d.h;  // the attention output rounded to the compute dtype
    float* out = att + (i / d.k) * NH + (i % d.k) * heads;
    for (int64_t j = 0; j < heads; ++j) out[j] = r(out[j]);
  });
  team->Phase(2, a.wo.tiles, [&](int64_t i) { TileRows(att, wo, i, o, B, NH, op); });
  for (int64_t b = 0; b < B; ++b) AddRound(a.x + b * D, o + b * op, h + b * D, D, a.round);
  RmsNorm(h, a.mlp_norm, a.norm_bf16, a.round, a.eps, B, D, y);
  team->Phase(3, a.w_gate.tiles, [&](int64_t t) {  // a gate tile, its up tile, their SwiGLU
    TileRows(y, wg, t, gate, B, D, fp);
    TileRows(y, wu, t, up, B, D, fp);
    const int64_t j = t * kTile, n = std::min(kTile, d.f - j);
    for (int64_t b = 0; b < B; ++b) {
      SiluMul(gate + b * fp + j, up + b * fp + j, act + b * d.f + j, n, a.round);
    }
  });
  team->Phase(4, a.w_down.tiles, [&](int64_t i) { TileRows(act, wd, i, down, B, d.f, dp); });
  team->finished.store(true, std::memory_order_release);
  for (int64_t b = 0; b < B; ++b) {
    AddRound(h + b * D, down + b * dp, a.out + b * D, D, a.round);
  }
}

Weight Packed(const ffi::AnyBuffer& w) { return {w.untyped_data(), w.dimensions()[0]}; }

ffi::Error DecodeLayerImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer attn_norm,
                           ffi::AnyBuffer mlp_norm, ffi::AnyBuffer wq, ffi::AnyBuffer wk,
                           ffi::AnyBuffer wv, ffi::AnyBuffer wo, ffi::AnyBuffer w_gate,
                           ffi::AnyBuffer w_up, ffi::AnyBuffer w_down,
                           ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                           ffi::Buffer<ffi::S32> slot, ffi::Buffer<ffi::S32> q_pos,
                           ffi::Buffer<ffi::S32> q_seg, ffi::Buffer<ffi::S32> kv_pos,
                           ffi::Buffer<ffi::S32> kv_seg, ffi::AnyBuffer, ffi::AnyBuffer,
                           int64_t layer, int64_t n_heads, int64_t ffn_dim, float eps,
                           bool round, ffi::ResultBuffer<ffi::F32> out,
                           ffi::Result<ffi::AnyBuffer> ck, ffi::Result<ffi::AnyBuffer> cv) {
  auto cd = ck->dimensions();
  auto xd = x.dimensions();
  const ffi::AnyBuffer* ws[] = {&wq, &wk, &wv, &wo, &w_gate, &w_up, &w_down};
  for (const ffi::AnyBuffer* w : ws) {
    if (w->dimensions().size() != 3 || w->dimensions()[2] != kTile ||
        w->element_type() != wq.element_type()) {
      return ffi::Error::InvalidArgument(
          "decode_layer: every projection must be packed [N / 32, K, 32], all one dtype");
    }
  }
  if (cd.size() != 5 || xd.size() != 2 || layer < 0 || layer >= cd[0] || xd[0] != cd[1] ||
      n_heads % cd[3] != 0 || cd[4] % 2 != 0 || ck->element_type() != cv->element_type()) {
    return ffi::Error::InvalidArgument(
        "decode_layer: expected x [B, D] and caches [L, B, S, K, H] with K dividing the heads");
  }
  const LayerShape d{cd[1], xd[1], ffn_dim, n_heads, cd[3], cd[4], cd[2]};
  if (wq.dimensions()[1] != d.d || wq.dimensions()[0] * kTile < d.n * d.h ||
      wk.dimensions()[0] * kTile < d.k * d.h || wo.dimensions()[1] != d.n * d.h ||
      wo.dimensions()[0] * kTile < d.d || w_gate.dimensions()[0] * kTile < d.f ||
      w_down.dimensions()[1] != d.f || w_down.dimensions()[0] * kTile < d.d) {
    return ffi::Error::InvalidArgument("decode_layer: projection shapes do not match the model");
  }
  const int64_t layer_elems = d.b * d.s * d.k * d.h;
  const bool norm_bf16 = attn_norm.element_type() == ffi::DataType::BF16;
  auto run = [&](auto weight_tag, auto cache_tag) {
    using W = decltype(weight_tag);
    using C = decltype(cache_tag);
    LayerArgs<C> a{d, round, eps, x.typed_data(), attn_norm.untyped_data(),
                   mlp_norm.untyped_data(), norm_bf16, Packed(wq), Packed(wk), Packed(wv),
                   Packed(wo), Packed(w_gate), Packed(w_up), Packed(w_down), cos.typed_data(),
                   sin.typed_data(), slot.typed_data(), q_pos.typed_data(), q_seg.typed_data(),
                   kv_pos.typed_data(), kv_seg.typed_data(),
                   static_cast<C*>(ck->untyped_data()) + layer * layer_elems,
                   static_cast<C*>(cv->untyped_data()) + layer * layer_elems, out->typed_data()};
    Layer<W, C>(pool, a);
  };
  const bool w16 = wq.element_type() == ffi::DataType::BF16;
  const bool c16 = ck->element_type() == ffi::DataType::BF16;
  if ((!w16 && wq.element_type() != ffi::DataType::F32) ||
      (!c16 && ck->element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("decode_layer: weights and cache must be f32 or bf16");
  }
  if (w16 && c16) run(uint16_t{}, uint16_t{});
  if (w16 && !c16) run(uint16_t{}, float{});
  if (!w16 && c16) run(float{}, uint16_t{});
  if (!w16 && !c16) run(float{}, float{});
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeLayer, DecodeLayerImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [B, D]
                                  .Arg<ffi::AnyBuffer>()         // attn_norm [D]
                                  .Arg<ffi::AnyBuffer>()         // mlp_norm [D]
                                  .Arg<ffi::AnyBuffer>()         // wq (packed)
                                  .Arg<ffi::AnyBuffer>()         // wk
                                  .Arg<ffi::AnyBuffer>()         // wv
                                  .Arg<ffi::AnyBuffer>()         // wo
                                  .Arg<ffi::AnyBuffer>()         // w_gate
                                  .Arg<ffi::AnyBuffer>()         // w_up
                                  .Arg<ffi::AnyBuffer>()         // w_down
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos [B, H/2]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin [B, H/2]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // slot [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_pos [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_seg [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_pos [B, S]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_seg [B, S]
                                  .Arg<ffi::AnyBuffer>()         // cache k (aliased)
                                  .Arg<ffi::AnyBuffer>()         // cache v (aliased)
                                  .Attr<int64_t>("layer")
                                  .Attr<int64_t>("n_heads")
                                  .Attr<int64_t>("ffn_dim")
                                  .Attr<float>("eps")
                                  .Attr<bool>("round")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // x out [B, D]
                                  .Ret<ffi::AnyBuffer>()         // cache k
                                  .Ret<ffi::AnyBuffer>());       // cache v
