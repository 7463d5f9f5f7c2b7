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
// fused multiply-adds (as XLA:CPU computes it):
//   t = trigger ? g : (g / g_norm) * max_norm          clip_by_global_norm
//   m = (1 - b1) * t + b1 * m;  v = (1 - b2) * (t * t) + b2 * v
//   u = (m / bc1) / (sqrt(v / bc2) + eps)               bc = 1 - b ** count (from the caller)
//   u = u + wd * p   (decayed parameters only);  p = p + u * step      step = -learning rate
// and nothing changes when `apply` is 0 (a skipped, non-finite step).

#include <cmath>
#include <cstdint>

#include "team.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per work item

// scalars: apply, trigger, g_norm, max_norm, bc1, bc2, step, weight decay.
struct Scalars {
  float apply, trigger, g_norm, max_norm, bc1, bc2, step, wd;
};

// Built with -ffp-contract=off (no fused multiply-add: XLA:CPU rounds each product) and
// -fno-math-errno (so that sqrt, and with it the loop, vectorises): cpu_kernels._SOURCE_FLAGS.
// The branches are template arguments, so that each loop is straight-line.
template <bool kClip, bool kDecay>
void Update(float* __restrict p, const float* __restrict g, float* __restrict m,
            float* __restrict v, int64_t n, const Scalars& s, float b1, float b2, float eps) {
  const float c1 = static_cast<float>(1.0 - static_cast<double>(b1));
  const float c2 = static_cast<float>(1.0 - static_cast<double>(b2));
  for (int64_t i = 0; i < n; ++i) {
    const float t = kClip ? (g[i] / s.g_norm) * s.max_norm : g[i];
    const float mi = c1 * t + b1 * m[i];
    const float vi = c2 * (t * t) + b2 * v[i];
    float u = (mi / s.bc1) / (std::sqrt(vi / s.bc2) + eps);
    if (kDecay) u = u + s.wd * p[i];
    p[i] = p[i] + u * s.step;
    m[i] = mi;
    v[i] = vi;
  }
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
  ForEachChunk(pool, (n + kChunk - 1) / kChunk, [&](int64_t c) {
    const int64_t lo = c * kChunk, len = std::min(kChunk, n - lo);
    const bool clip = s.trigger == 0.0f;  // optax clips when the norm is not below max_norm
    auto* update = clip ? (decay ? Update<true, true> : Update<true, false>)
                        : (decay ? Update<false, true> : Update<false, false>);
    update(pp + lo, gp + lo, mp + lo, vp + lo, len, s, b1, b2, eps);
  });
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
