// SwiGLU's elementwise part for bf16 training on CPU, forward and backward, called through
// jax.ffi (llama_jax/cpu_kernels.py: swiglu_forward / swiglu_backward; used by
// llama_jax/dense.py: swiglu).
//
// XLA:CPU writes the gate and up products as f32, converts each to bf16 in its own pass, runs
// silu(g) * u as another, and in the backward computes dg and du in two more passes that each
// re-read dh, g and u (it fuses into one output per pass): on the bench shape ~0.1 s of a
// 0.67 s bf16 step for [2048, 1408] arrays. Here the forward reads the two f32 products once
// and writes h, g and u (bf16), the backward reads dh, g, u once and writes dg and du.
//
// Roundings: g and u are the products rounded to bf16 (as the bf16 model stores them);
// silu(g) * u = g * sigmoid(g) * u and the gradients are computed in f32 from them and
// rounded once to bf16 (XLA rounds after each bf16 operation):
//   dg = dh * u * s * (1 + g * (1 - s)),  du = dh * g * s,  s = sigmoid(g).

#include <cstdint>

#include "team.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// 1 when this build has the kernels (the CPU has AVX-512 BF16), else 0.
extern "C" int LlamaJaxSwigluKernel() {
#if defined(__AVX512BF16__)
  return 1;
#else
  return 0;
#endif
}

#if defined(__AVX512BF16__)
namespace {

using bf16 = uint16_t;
constexpr int64_t kChunk = 1 << 14;  // elements per work item (a multiple of 16)

inline __m512 Sigmoid(__m512 x) {  // 1 / (1 + exp(-x))
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, Exp(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

void ForwardChunk(const float* gate, const float* up, bf16* h, bf16* g, bf16* u, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = Lanes(n - i);
    const __m256i g16 = RoundBf16(_mm512_maskz_loadu_ps(k, gate + i));
    const __m256i u16 = RoundBf16(_mm512_maskz_loadu_ps(k, up + i));
    const __m512 gf = WidenBf16(g16), uf = WidenBf16(u16);
    const __m256i hv = RoundBf16(_mm512_mul_ps(_mm512_mul_ps(gf, Sigmoid(gf)), uf));
    _mm256_mask_storeu_epi16(h + i, k, hv);
    _mm256_mask_storeu_epi16(g + i, k, g16);
    _mm256_mask_storeu_epi16(u + i, k, u16);
  }
}

void BackwardChunk(const bf16* dh, const bf16* g, const bf16* u, bf16* dg, bf16* du,
                   int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = Lanes(n - i);
    const auto load = [&](const bf16* p) { return WidenBf16(_mm256_maskz_loadu_epi16(k, p + i)); };
    const __m512 d = load(dh), gf = load(g), uf = load(u);
    const __m512 s = Sigmoid(gf);
    const __m512 ds = _mm512_mul_ps(d, s);
    const __m512 dgv = _mm512_mul_ps(
        _mm512_mul_ps(ds, uf), _mm512_add_ps(one, _mm512_mul_ps(gf, _mm512_sub_ps(one, s))));
    _mm256_mask_storeu_epi16(dg + i, k, RoundBf16(dgv));
    _mm256_mask_storeu_epi16(du + i, k, RoundBf16(_mm512_mul_ps(ds, gf)));
  }
}

// fn(lo, len) over [0, n) in chunks of kChunk elements.
template <typename F>
void Chunks(ffi::ThreadPool& pool, int64_t n, F&& fn) {
  ForEachChunk(pool, (n + kChunk - 1) / kChunk, [&](int64_t c) {
    const int64_t lo = c * kChunk;
    fn(lo, std::min(kChunk, n - lo));
  });
}

ffi::Error SwigluForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gate,
                             ffi::Buffer<ffi::F32> up, ffi::Result<ffi::AnyBuffer> h,
                             ffi::Result<ffi::AnyBuffer> g, ffi::Result<ffi::AnyBuffer> u) {
  const int64_t n = static_cast<int64_t>(gate.element_count());
  if (static_cast<int64_t>(up.element_count()) != n ||
      static_cast<int64_t>(h->element_count()) != n || h->element_type() != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("swiglu kernel: gate and up f32 of one shape, h bf16");
  }
  const float* gp = gate.typed_data();
  const float* upp = up.typed_data();
  auto* hp = static_cast<bf16*>(h->untyped_data());
  auto* g16 = static_cast<bf16*>(g->untyped_data());
  auto* u16 = static_cast<bf16*>(u->untyped_data());
  Chunks(pool, n, [&](int64_t lo, int64_t len) {
    ForwardChunk(gp + lo, upp + lo, hp + lo, g16 + lo, u16 + lo, len);
  });
  return ffi::Error::Success();
}

ffi::Error SwigluBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer dh, ffi::AnyBuffer g,
                              ffi::AnyBuffer u, ffi::Result<ffi::AnyBuffer> dg,
                              ffi::Result<ffi::AnyBuffer> du) {
  const int64_t n = static_cast<int64_t>(dh.element_count());
  for (const ffi::AnyBuffer* b : {&dh, &g, &u}) {
    if (static_cast<int64_t>(b->element_count()) != n ||
        b->element_type() != ffi::DataType::BF16) {
      return ffi::Error::InvalidArgument("swiglu kernel: dh, g, u bf16 of one shape");
    }
  }
  const auto* dhp = static_cast<const bf16*>(dh.untyped_data());
  const auto* gp = static_cast<const bf16*>(g.untyped_data());
  const auto* up = static_cast<const bf16*>(u.untyped_data());
  auto* dgp = static_cast<bf16*>(dg->untyped_data());
  auto* dup = static_cast<bf16*>(du->untyped_data());
  Chunks(pool, n, [&](int64_t lo, int64_t len) {
    BackwardChunk(dhp + lo, gp + lo, up + lo, dgp + lo, dup + lo, len);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SwigluForward, SwigluForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SwigluBackward, SwigluBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
#endif  // __AVX512BF16__
