// y[M, N] (f32) = x[M, K] (f32) . w (f32 or bf16), for the few rows of a decode step.
//
// w arrives packed as [N / 32, K, 32] (llama_jax/cpu_kernels.py: Packed): each 32-column tile
// is one contiguous stream and each tile's M x 32 accumulators stay in registers while w is
// read exactly once. The second half of the tiles is offered to XLA's intra-op thread pool
// (the FFI ThreadPool context) and run by whichever thread claims it first. XLA:CPU reads the
// same weights slower (one Eigen thread at batch 1, YNNPACK re-packing at 2-8 rows, and a
// bf16 -> f32 conversion of the weights in every bf16 dot). Without AVX-512 a plain C++ loop
// does the same work.
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>

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
    while (half->done.load(std::memory_order_acquire) == 0) {
    }
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
