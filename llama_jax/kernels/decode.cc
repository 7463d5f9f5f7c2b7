// The two CPU kernels of a decode step (llama_jax/cpu_kernels.py), called through jax.ffi.
//
// SmallMatmul: y[M, N] (f32) = x[M, K] (f32) . w (f32 or bf16), for the few rows of a step.
// w arrives packed as [N / 32, K, 32] (llama_jax/cpu_kernels.py: Packed): each 32-column tile
// is one contiguous stream and each tile's M x 32 accumulators stay in registers while w is
// read exactly once. The second half of the tiles is offered to XLA's intra-op thread pool
// (the FFI ThreadPool context) and run by whichever thread claims it first. XLA:CPU reads the
// same weights slower (one Eigen thread at batch 1, YNNPACK re-packing at 2-8 rows, and a
// bf16 -> f32 conversion of the weights in every bf16 dot). Without AVX-512 a plain C++ loop
// does the same work.
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 32;
constexpr int64_t kMaxRows = 8;

#if defined(__AVX512F__)
template <typename W>
inline __m512 Load16(const W* p) {
  if constexpr (sizeof(W) == 2) {  // bf16: the high half of an f32
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
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
inline float ToFloat(float v) { return v; }
inline float ToFloat(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <int M, typename W>
void Tile(const float* __restrict x, const W* __restrict w, float* __restrict y, int64_t k_dim,
          int64_t n_dim) {
  float acc[M][kTile] = {};
  for (int64_t k = 0; k < k_dim; ++k) {
    for (int m = 0; m < M; ++m) {
      const float xm = x[m * k_dim + k];
      for (int64_t j = 0; j < kTile; ++j) acc[m][j] += xm * ToFloat(w[k * kTile + j]);
    }
  }
  for (int m = 0; m < M; ++m) std::memcpy(y + m * n_dim, acc[m], sizeof(acc[m]));
}
#endif

template <int M, typename W>
void Tiles(const float* x, const W* w, float* y, int64_t k_dim, int64_t n_dim, int64_t t0,
           int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) Tile<M>(x, w + t * k_dim * kTile, y + t * kTile, k_dim, n_dim);
}

// The second half of the tiles is offered to XLA's intra-op pool; whichever thread claims it
// first runs it, so the caller never waits on a task that has not started.
struct Half {
  std::atomic<int> claimed{0};
  std::atomic<int> done{0};
};

template <int M, typename W>
void Split(ffi::ThreadPool& pool, const float* x, const W* w, float* y, int64_t k_dim,
           int64_t n_dim) {
  const int64_t tiles = n_dim / kTile, mid = tiles / 2;
  auto half = std::make_shared<Half>();
  auto run_second = [=]() {
    if (half->claimed.exchange(1) == 0) {
      Tiles<M>(x, w, y, k_dim, n_dim, mid, tiles);
      half->done.store(1, std::memory_order_release);
    }
  };
  if (mid > 0) pool.Schedule(std::move(run_second));
  Tiles<M>(x, w, y, k_dim, n_dim, 0, mid);
  if (mid == 0 || half->claimed.exchange(1) == 0) {
    Tiles<M>(x, w, y, k_dim, n_dim, mid, tiles);
  } else {
    while (half->done.load(std::memory_order_acquire) == 0) std::this_thread::yield();
  }
}

template <typename W>
void Rows(ffi::ThreadPool& pool, int64_t m, const float* x, const W* w, float* y,
          int64_t k_dim, int64_t n_dim) {
  switch (m) {
    case 1: return Split<1>(pool, x, w, y, k_dim, n_dim);
    case 2: return Split<2>(pool, x, w, y, k_dim, n_dim);
    case 3: return Split<3>(pool, x, w, y, k_dim, n_dim);
    case 4: return Split<4>(pool, x, w, y, k_dim, n_dim);
    case 5: return Split<5>(pool, x, w, y, k_dim, n_dim);
    case 6: return Split<6>(pool, x, w, y, k_dim, n_dim);
    case 7: return Split<7>(pool, x, w, y, k_dim, n_dim);
    default: return Split<8>(pool, x, w, y, k_dim, n_dim);
  }
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
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  for (int64_t m0 = 0; m0 < rows; m0 += kMaxRows) {
    const int64_t m = rows - m0 < kMaxRows ? rows - m0 : kMaxRows;
    if (w.element_type() == ffi::DataType::BF16) {
      Rows(pool, m, xp + m0 * k_dim, static_cast<const uint16_t*>(w.untyped_data()),
           yp + m0 * n_dim, k_dim, n_dim);
    } else if (w.element_type() == ffi::DataType::F32) {
      Rows(pool, m, xp + m0 * k_dim, static_cast<const float*>(w.untyped_data()),
           yp + m0 * n_dim, k_dim, n_dim);
    } else {
      return ffi::Error::InvalidArgument("small_matmul: w must be float32 or bfloat16");
    }
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

// DecodeAttention: one layer's attention for the single new token of each row, over the
// stacked cache [L, B, S, K, H] (f32 or bf16) updated in place (the cache operands alias the
// results). For row b it first writes k_new/v_new [B, K, H] at slot[b] of layer `layer` (a
// slot >= S is dropped, as padding is), then for every query head n of kv head n / G
// (q [B, N, H], G = N / K) computes softmax(q . k_s / sqrt(H)) . v over the slots s with
// kv_seg[b, s] == q_seg[b] != 0 and kv_pos[b, s] <= q_pos[b] (attention.attention_mask).
// The math is attention.dot_product_attention's: f32 scores, masked scores set to
// -FLT_MAX so a fully masked row is uniform over all slots, probabilities rounded to the
// cache dtype before the value product, f32 accumulation. XLA runs the same step as a
// scatter that rewrites the whole stacked cache, a copy of the layer's slice, two transposes
// and two small dots per layer (~0.2 ms per layer per token on the bench shape).
namespace {

inline float Bf16ToFloat(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t FloatToBf16(float f) {  // round to nearest even, as XLA's convert
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float Load(float v) { return v; }
inline float Load(uint16_t v) { return Bf16ToFloat(v); }
inline void Store(float* p, float v) { *p = v; }
inline void Store(uint16_t* p, float v) { *p = FloatToBf16(v); }

struct AttentionShape {
  int64_t b, s, k, g, h;
};

// Rows [b0, b1) of the batch, every kv head.
template <typename C>
void AttendRows(const AttentionShape& d, int64_t b0, int64_t b1, const float* q,
                const float* k_new, const float* v_new, const int32_t* slot,
                const int32_t* q_pos, const int32_t* q_seg, const int32_t* kv_pos,
                const int32_t* kv_seg, C* ck, C* cv, float* out) {
  const int64_t S = d.s, K = d.k, G = d.g, H = d.h, N = K * G;
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  std::vector<float> scores(G * S), krow(H);
  std::vector<char> valid(S);
  for (int64_t b = b0; b < b1; ++b) {
    C* kb = ck + b * S * K * H;
    C* vb = cv + b * S * K * H;
    if (slot[b] >= 0 && slot[b] < S) {
      for (int64_t i = 0; i < K * H; ++i) {
        Store(kb + slot[b] * K * H + i, k_new[b * K * H + i]);
        Store(vb + slot[b] * K * H + i, v_new[b * K * H + i]);
      }
    }
    for (int64_t s = 0; s < S; ++s) {
      const int32_t seg = kv_seg[b * S + s];
      valid[s] = seg != 0 && seg == q_seg[b] && kv_pos[b * S + s] <= q_pos[b];
    }
    for (int64_t kh = 0; kh < K; ++kh) {
      const float* qk = q + (b * N + kh * G) * H;  // the G query heads of kv head kh
      for (int64_t s = 0; s < S; ++s) {
        if (!valid[s]) {
          for (int64_t g = 0; g < G; ++g) scores[g * S + s] = -FLT_MAX;
          continue;
        }
        const C* kr = kb + (s * K + kh) * H;
        for (int64_t i = 0; i < H; ++i) krow[i] = Load(kr[i]);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qk + g * H;
          float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
          for (int64_t i = 0; i < H; ++i) acc += qg[i] * krow[i];
          scores[g * S + s] = acc * scale;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sc = scores.data() + g * S;
        const float m = *std::max_element(sc, sc + S);
        float sum = 0.0f;
        for (int64_t s = 0; s < S; ++s) {
          sc[s] = std::exp(sc[s] - m);
          sum += sc[s];
        }
        for (int64_t s = 0; s < S; ++s) {
          float p = sc[s] / sum;
          if constexpr (sizeof(C) == 2) p = Bf16ToFloat(FloatToBf16(p));
          sc[s] = p;
        }
        float* o = out + (b * N + kh * G + g) * H;
        for (int64_t i = 0; i < H; ++i) o[i] = 0.0f;
        for (int64_t s = 0; s < S; ++s) {
          const float p = sc[s];
          if (p == 0.0f) continue;
          const C* vr = vb + (s * K + kh) * H;
#pragma omp simd
          for (int64_t i = 0; i < H; ++i) o[i] += p * Load(vr[i]);
        }
      }
    }
  }
}

template <typename C>
void Attend(ffi::ThreadPool& pool, const AttentionShape& d, const float* q, const float* k_new,
            const float* v_new, const int32_t* slot, const int32_t* q_pos, const int32_t* q_seg,
            const int32_t* kv_pos, const int32_t* kv_seg, C* ck, C* cv, float* out) {
  // Rows split in two halves, the second offered to XLA's pool as SmallMatmul's tiles are.
  const int64_t mid = d.b / 2;
  if (mid == 0) {
    AttendRows(d, 0, d.b, q, k_new, v_new, slot, q_pos, q_seg, kv_pos, kv_seg, ck, cv, out);
    return;
  }
  auto half = std::make_shared<Half>();
  auto second = [=]() {
    if (half->claimed.exchange(1) == 0) {
      AttendRows(d, mid, d.b, q, k_new, v_new, slot, q_pos, q_seg, kv_pos, kv_seg, ck, cv, out);
      half->done.store(1, std::memory_order_release);
    }
  };
  pool.Schedule(std::move(second));
  AttendRows(d, 0, mid, q, k_new, v_new, slot, q_pos, q_seg, kv_pos, kv_seg, ck, cv, out);
  if (half->claimed.exchange(1) == 0) {
    AttendRows(d, mid, d.b, q, k_new, v_new, slot, q_pos, q_seg, kv_pos, kv_seg, ck, cv, out);
  } else {
    while (half->done.load(std::memory_order_acquire) == 0) std::this_thread::yield();
  }
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                               ffi::Buffer<ffi::S32> slot, ffi::Buffer<ffi::S32> q_pos,
                               ffi::Buffer<ffi::S32> q_seg, ffi::Buffer<ffi::S32> kv_pos,
                               ffi::Buffer<ffi::S32> kv_seg, ffi::AnyBuffer, ffi::AnyBuffer,
                               int64_t layer, ffi::ResultBuffer<ffi::F32> out,
                               ffi::Result<ffi::AnyBuffer> ck, ffi::Result<ffi::AnyBuffer> cv) {
  auto cd = ck->dimensions();
  auto qd = q.dimensions();
  if (cd.size() != 5 || qd.size() != 3 || layer < 0 || layer >= cd[0] || qd[0] != cd[1] ||
      qd[2] != cd[4] || qd[1] % cd[3] != 0 || ck->element_type() != cv->element_type()) {
    return ffi::Error::InvalidArgument(
        "decode_attention: expected q [B, N, H] and caches [L, B, S, K, H] with K dividing N");
  }
  const AttentionShape d{cd[1], cd[2], cd[3], qd[1] / cd[3], cd[4]};
  const int64_t layer_elems = d.b * d.s * d.k * d.h;
  if (ck->element_type() == ffi::DataType::BF16) {
    auto* kp = static_cast<uint16_t*>(ck->untyped_data()) + layer * layer_elems;
    auto* vp = static_cast<uint16_t*>(cv->untyped_data()) + layer * layer_elems;
    Attend(pool, d, q.typed_data(), k_new.typed_data(), v_new.typed_data(), slot.typed_data(),
           q_pos.typed_data(), q_seg.typed_data(), kv_pos.typed_data(), kv_seg.typed_data(), kp,
           vp, out->typed_data());
  } else if (ck->element_type() == ffi::DataType::F32) {
    auto* kp = static_cast<float*>(ck->untyped_data()) + layer * layer_elems;
    auto* vp = static_cast<float*>(cv->untyped_data()) + layer * layer_elems;
    Attend(pool, d, q.typed_data(), k_new.typed_data(), v_new.typed_data(), slot.typed_data(),
           q_pos.typed_data(), q_seg.typed_data(), kv_pos.typed_data(), kv_seg.typed_data(), kp,
           vp, out->typed_data());
  } else {
    return ffi::Error::InvalidArgument("decode_attention: the cache must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_new
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_new
                                  .Arg<ffi::Buffer<ffi::S32>>()   // slot
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_seg
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_seg
                                  .Arg<ffi::AnyBuffer>()          // cache k (aliased)
                                  .Arg<ffi::AnyBuffer>()          // cache v (aliased)
                                  .Attr<int64_t>("layer")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::AnyBuffer>()          // cache k
                                  .Ret<ffi::AnyBuffer>());        // cache v
