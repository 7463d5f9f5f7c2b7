// Shared by the CPU kernels: bf16 conversions as XLA rounds them (scalar and AVX-512), the
// lanes of a row's tail, an AVX-512 exp, and `Team`, the caller plus helpers from XLA's
// intra-op thread pool (the FFI ThreadPool context) that claim the chunks of each phase of one
// call from atomic counters (`ForEachChunk` for a call of one phase).
#ifndef LLAMA_JAX_KERNELS_TEAM_H_
#define LLAMA_JAX_KERNELS_TEAM_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

inline void Pause(int64_t& spins) {
#if defined(__x86_64__)
  if (++spins < 4096) {
    __builtin_ia32_pause();
    return;
  }
#else
  ++spins;
#endif
  std::this_thread::yield();
}

// The phases one call runs: per phase a chunk count and the work of one chunk, published
// by the caller in order; claim and done counters per phase, so nothing is ever reset.
struct Team {
  static constexpr int kPhases = 5;
  std::atomic<int64_t> claim[kPhases] = {};
  std::atomic<int64_t> done[kPhases] = {};
  std::atomic<int> ready{-1};
  std::atomic<bool> finished{false};
  int64_t chunks[kPhases] = {};
  void (*work[kPhases])(void*, int64_t) = {};  // work[p](context[p], chunk)
  void* context[kPhases] = {};

  void Run(int p) {
    for (;;) {
      const int64_t i = claim[p].fetch_add(1);
      if (i >= chunks[p]) return;
      work[p](context[p], i);
      done[p].fetch_add(1, std::memory_order_release);
    }
  }

  // Caller: publish phase p (fn(chunk) for chunks 0..n-1), work on it, wait until every
  // chunk is done. No allocation: fn lives in the caller's frame for the whole phase.
  template <typename F>
  void Phase(int p, int64_t n, F&& fn) {
    chunks[p] = n;
    context[p] = &fn;
    work[p] = [](void* f, int64_t i) { (*static_cast<std::remove_reference_t<F>*>(f))(i); };
    ready.store(p, std::memory_order_release);
    Run(p);
    int64_t spins = 0;
    while (done[p].load(std::memory_order_acquire) < n) Pause(spins);
  }

  // Helper: join every phase as it is published; leave when the caller has finished.
  void Help() {
    for (int p = 0; p < kPhases; ++p) {
      int64_t spins = 0;
      while (ready.load(std::memory_order_acquire) < p) {
        if (finished.load(std::memory_order_acquire)) return;
        Pause(spins);
      }
      Run(p);
    }
  }
};

// Starts the helpers of one call (at most one per pool thread besides the caller's).
std::shared_ptr<Team> StartTeam(xla::ffi::ThreadPool& pool) {
  auto team = std::make_shared<Team>();
  const std::thread::id caller = std::this_thread::get_id();
  const int64_t helpers = std::max<int64_t>(1, pool.num_threads() - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([team, caller]() {
      if (std::this_thread::get_id() != caller) team->Help();  // not inline: a pool-less run
    });
  }
  return team;
}

// One phase of `chunks` work items fn(chunk), claimed by the caller and the pool's helpers.
template <typename F>
void ForEachChunk(xla::ffi::ThreadPool& pool, int64_t chunks, F&& fn) {
  auto team = StartTeam(pool);
  team->Phase(0, chunks, std::forward<F>(fn));
  team->finished.store(true, std::memory_order_release);
}

#if defined(__AVX512F__)
// The first min(left, 16) lanes: the tail of a row that is not a multiple of 16.
inline __mmask16 Lanes(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
}

// 16 bf16 -> f32 (exact: the high half of an f32).
inline __m512 WidenBf16(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
#endif

#if defined(__AVX512BF16__)
// 16 f32 -> bf16, rounded to nearest even as XLA's convert.
inline __m256i RoundBf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
#endif

#if defined(__AVX512F__)
// exp(x) for x <= 88: 2^n * e^r, |r| <= ln2 / 2, degree-6 Taylor polynomial (relative error
// < 2e-7). Inputs below -87 give ~1e-38, not 0: callers zero masked lanes themselves.
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

}  // namespace

#endif  // LLAMA_JAX_KERNELS_TEAM_H_
