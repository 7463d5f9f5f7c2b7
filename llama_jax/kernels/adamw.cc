// The AdamW update of one float32 parameter in place, called through jax.ffi
// (llama_jax/cpu_kernels.py: adamw; used by llama_jax/optim.py: fused_update).
//
// XLA:CPU runs optax's clip + AdamW + apply + skip-if-not-finite as one fusion per output
// (new parameter, first moment, second moment), each reading the gradient and the moments
// again: on the bench shape ~1.4 GB of memory traffic per step where one pass needs 0.87 GB
// (read p, g, m, v; write p, m, v). This kernel is that one pass, split into chunks claimed
// by the caller and helpers from XLA's intra-op pool, with the parameter and moments updated
// in place (they alias the results).
//
// The arithmetic is optax's, operation for operation and in the same order, in f32 without
// fused multiply-adds (as XLA:CPU computes it), 16 lanes at a time with AVX-512:
//   t = trigger ? g : (g / g_norm) * max_norm          clip_by_global_norm
//   m = (1 - b1) * t + b1 * m;  v = (1 - b2) * (t * t) + b2 * v
//   u = (m / bc1) / (sqrt(v / bc2) + eps)               bc = 1 - b ** count (from the caller)
//   u = u + wd * p   (decayed parameters only);  p = p + u * step      step = -learning rate
// and nothing changes when `apply` is 0 (a skipped, non-finite step).

#include <cmath>
#include <cstdint>

#include "team.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per work item

// scalars: apply, trigger, g_norm, max_norm, bc1, bc2, step, weight decay.
struct Scalars {
  float apply, trigger, g_norm, max_norm, bc1, bc2, step, wd;
};

// One element, as optax computes it (separate multiplies and adds: no fused multiply-add).
struct Step1 {
  float c1, c2, b1, b2, eps;
  const Scalars& s;
  bool trigger, decay;

  void operator()(float& p, float g, float& m, float& v) const {
    const float t = trigger ? g : (g / s.g_norm) * s.max_norm;
    const volatile float c1t = c1 * t, b1m = b1 * m;  // volatile: keeps the two roundings
    const float mi = c1t + b1m;
    const volatile float tt = t * t;
    const volatile float c2tt = c2 * tt, b2v = b2 * v;
    const float vi = c2tt + b2v;
    float u = (mi / s.bc1) / (std::sqrt(vi / s.bc2) + eps);
    if (decay) {
      const volatile float wdp = s.wd * p;
      u = u + wdp;
    }
    const volatile float us = u * s.step;
    p = p + us;
    m = mi;
    v = vi;
  }
};

void Update(float* __restrict p, const float* __restrict g, float* __restrict m,
            float* __restrict v, int64_t n, const Scalars& s, float b1, float b2, float eps,
            bool decay) {
  const float c1 = static_cast<float>(1.0 - static_cast<double>(b1));
  const float c2 = static_cast<float>(1.0 - static_cast<double>(b2));
  const bool trigger = s.trigger != 0.0f;
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vc1 = _mm512_set1_ps(c1), vc2 = _mm512_set1_ps(c2), vb1 = _mm512_set1_ps(b1),
               vb2 = _mm512_set1_ps(b2), veps = _mm512_set1_ps(eps),
               norm = _mm512_set1_ps(s.g_norm), max_norm = _mm512_set1_ps(s.max_norm),
               bc1 = _mm512_set1_ps(s.bc1), bc2 = _mm512_set1_ps(s.bc2),
               step = _mm512_set1_ps(s.step), wd = _mm512_set1_ps(s.wd);
  for (; i + 16 <= n; i += 16) {
    __m512 t = _mm512_loadu_ps(g + i);
    if (!trigger) t = _mm512_mul_ps(_mm512_div_ps(t, norm), max_norm);
    const __m512 mi =
        _mm512_add_ps(_mm512_mul_ps(vc1, t), _mm512_mul_ps(vb1, _mm512_loadu_ps(m + i)));
    const __m512 vi = _mm512_add_ps(_mm512_mul_ps(vc2, _mm512_mul_ps(t, t)),
                                    _mm512_mul_ps(vb2, _mm512_loadu_ps(v + i)));
    __m512 u = _mm512_div_ps(_mm512_div_ps(mi, bc1),
                             _mm512_add_ps(_mm512_sqrt_ps(_mm512_div_ps(vi, bc2)), veps));
    const __m512 pi = _mm512_loadu_ps(p + i);
    if (decay) u = _mm512_add_ps(u, _mm512_mul_ps(wd, pi));
    _mm512_storeu_ps(p + i, _mm512_add_ps(pi, _mm512_mul_ps(u, step)));
    _mm512_storeu_ps(m + i, mi);
    _mm512_storeu_ps(v + i, vi);
  }
#endif
  const Step1 one{c1, c2, b1, b2, eps, s, trigger, decay};
  for (; i < n; ++i) one(p[i], g[i], m[i], v[i]);
}

ffi::Error AdamWImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> g,
                     ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> v,
                     ffi::Buffer<ffi::F32> scalars, float b1, float b2, float eps, bool decay,
                     ffi::ResultBuffer<ffi::F32> p_out, ffi::ResultBuffer<ffi::F32> m_out,
                     ffi::ResultBuffer<ffi::F32> v_out) {
  const int64_t n = static_cast<int64_t>(p.element_count());
  if (static_cast<int64_t>(g.element_count()) != n ||
      static_cast<int64_t>(m.element_count()) != n ||
      static_cast<int64_t>(v.element_count()) != n || scalars.element_count() != 8) {
    return ffi::Error::InvalidArgument("adamw kernel: p, g, m, v must have one size and "
                                       "scalars 8 values");
  }
  if (p_out->typed_data() != p.typed_data() || m_out->typed_data() != m.typed_data() ||
      v_out->typed_data() != v.typed_data()) {
    return ffi::Error::InvalidArgument("adamw kernel: p, m, v must alias the results");
  }
  Scalars s;
  const float* sv = scalars.typed_data();
  s = Scalars{sv[0], sv[1], sv[2], sv[3], sv[4], sv[5], sv[6], sv[7]};
  if (s.apply == 0.0f) return ffi::Error::Success();
  float* pp = p_out->typed_data();
  float* mp = m_out->typed_data();
  float* vp = v_out->typed_data();
  const float* gp = g.typed_data();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  auto team = StartTeam(pool);
  team->Phase(0, chunks, [&](int64_t c) {
    const int64_t lo = c * kChunk, len = std::min(kChunk, n - lo);
    Update(pp + lo, gp + lo, mp + lo, vp + lo, len, s, b1, b2, eps, decay);
  });
  team->finished.store(true, std::memory_order_release);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamW, AdamWImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("eps")
                                  .Attr<bool>("decay")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
