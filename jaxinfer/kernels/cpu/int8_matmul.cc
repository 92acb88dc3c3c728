// y[T, out] = x[T, in] @ (values[out, in] * scale[out, None])^T, reading the int8 weight bytes
// directly: an XLA FFI custom call for XLA:CPU (jaxinfer/kernels/int8_matmul.py builds it on first
// use with the system compiler and registers it as "jaxinfer_int8_matmul").
//
// Why a kernel: XLA:CPU does not fuse the int8 -> float convert into the dot; it writes a float32
// copy of the weight and multiplies that (benchmarks/RESULTS.md, "Weight-only int8"), so an int8
// model read more bytes than a float32 one. Here each output channel's int8 row is converted in
// registers, 16 values at a time, and multiplied with x's rows while it is in cache.
//
// Summation order (what makes the result batch invariant): lanes.h's, 16 float lanes of one fused
// multiply-add per element in increasing i (the tail of `in` zero padded) added in a fixed tree,
// then multiplied by scale[o]. That sequence depends on `in` alone: not on T, on the row's
// position, on the tile it lands in, nor on the thread that computes it (tiles.h), so a row's
// result is bitwise the same whatever else is in the batch. The AVX-512, AVX2+FMA and plain C++
// loads of the int8 rows below are exact, so every build gives the same bits.
//
// Threads: tiles.h hands blocks of output channels to the calling thread and to tasks on XLA's own
// intra-op thread pool.

#include <cstdint>
#include <cstring>

#include "lanes.h"
#include "tiles.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Software prefetch this many bytes ahead in each weight row: at one row of x the product is a
// stream of int8 rows, and without it one core read them at ~10 GB/s instead of ~20 (measured on
// the 2-core CPU, all of SmolLM2's products at T = 1; 1-8 KiB ahead all did about as well).
#ifndef JAXINFER_PREFETCH
#define JAXINFER_PREFETCH 8192
#endif

// 16 int8 weights as 16 float lanes (exact).
#if defined(__AVX512F__)
inline Lanes LoadW(const int8_t* p) {
  __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes))};
}
#elif defined(__AVX2__) && defined(__FMA__)
inline __m256 EightBytes(const int8_t* p) {
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}
inline Lanes LoadW(const int8_t* p) { return {EightBytes(p), EightBytes(p + 8)}; }
#else
inline Lanes LoadW(const int8_t* p) {
  Lanes out;
  for (int64_t l = 0; l < kLanes; ++l) out.v[l] = static_cast<float>(p[l]);
  return out;
}
#endif

// ---- one tile: R rows of x against C output channels ----

struct Problem {  // the kernel tiles.h runs
  const float* x;       // [rows, in]
  const int8_t* w;      // [out, in]
  const float* scale;   // [out]
  float* y;             // [rows, out]
  int64_t rows, in, out;

  template <int R, int C>
  void Tile(int64_t t, int64_t o) const;
};

template <int R, int C>
void Problem::Tile(int64_t t, int64_t o) const {
  const Problem& p = *this;
  Lanes acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Zero();
  const float* x = p.x + t * p.in;
  const int8_t* w = p.w + o * p.in;
  const int64_t whole = p.in - p.in % kLanes;
  for (int64_t i = 0; i < whole; i += kLanes) {
#if JAXINFER_PREFETCH > 0
    if (i % 64 == 0) PrefetchRows<C>(w + i, p.in, JAXINFER_PREFETCH);
#endif
    Lanes weights[C];
    for (int c = 0; c < C; ++c) weights[c] = LoadW(w + c * p.in + i);
    for (int r = 0; r < R; ++r) {
      Lanes xs = LoadX(x + r * p.in + i);
      for (int c = 0; c < C; ++c) acc[r][c] = Fma(xs, weights[c], acc[r][c]);
    }
  }
  if (whole < p.in) {  // the tail of `in`, zero padded to one more group of lanes
    const int64_t rest = p.in - whole;
    alignas(64) int8_t w_tail[C][kLanes] = {};
    alignas(64) float x_tail[kLanes] = {};
    Lanes weights[C];
    for (int c = 0; c < C; ++c) {
      std::memcpy(w_tail[c], w + c * p.in + whole, rest);
      weights[c] = LoadW(w_tail[c]);
    }
    for (int r = 0; r < R; ++r) {
      std::memcpy(x_tail, x + r * p.in + whole, rest * sizeof(float));
      Lanes xs = LoadX(x_tail);
      for (int c = 0; c < C; ++c) acc[r][c] = Fma(xs, weights[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) p.y[(t + r) * p.out + o + c] = Reduce(acc[r][c]) * p.scale[o + c];
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> values,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y,
                      int64_t max_threads) {
  auto x_dims = x.dimensions(), w_dims = values.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 2 || scale.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument(
        "jaxinfer_int8_matmul: x [T, in], values [out, in], scale [out]");
  }
  const int64_t rows = x_dims[0], in = x_dims[1], out = w_dims[0];
  if (w_dims[1] != in || scale.dimensions()[0] != out || y->dimensions()[0] != rows ||
      y->dimensions()[1] != out) {
    return ffi::Error::InvalidArgument("jaxinfer_int8_matmul: shapes do not agree");
  }
  const Problem problem{x.typed_data(), values.typed_data(), scale.typed_data(), y->typed_data(),
                        rows, in, out};
  RunTiles(pool, problem, rows, out, /*row_bytes=*/in, max_threads);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("max_threads"));

// Which of the three implementations this build holds (for tests and the benchmark's table).
extern "C" const char* JaxinferInt8MatmulIsa() { return kIsa; }
