// y[T, out] = x[T, in] @ (values[out, in] * scale[out, None])^T, reading the int8 weight bytes
// directly: an XLA FFI custom call for XLA:CPU (jaxinfer/kernels/int8_matmul.py builds it on first
// use with the system compiler and registers it as "jaxinfer_int8_matmul").
//
// Why a kernel: XLA:CPU does not fuse the int8 -> float convert into the dot; it writes a float32
// copy of the weight and multiplies that (benchmarks/RESULTS.md, "Weight-only int8"), so an int8
// model read more bytes than a float32 one. Here each output channel's int8 row is converted in
// registers, 16 values at a time, and multiplied with x's rows while it is in cache.
//
// Summation order (what makes the result batch invariant): y[t, o] is accumulated in 16 float
// lanes, lane l holding sum over i = l (mod 16) of x[t, i] * w[o, i] by one fused multiply-add per
// element in increasing i (the tail of `in` zero padded), then the lanes are added in a fixed tree
// (l + 8, then + 4, + 2, + 1) and multiplied by scale[o]. That sequence depends on `in` alone: not
// on T, on the row's position, on the tile it lands in, nor on the thread that computes it, so a
// row's result is bitwise the same whatever else is in the batch. The three instruction sets below
// (AVX-512, AVX2+FMA, plain C++) compute that same sequence; the build uses -ffp-contract=off so
// that the compiler fuses nothing on its own.
//
// Threads: the output channels are cut into blocks handed out through an atomic counter to the
// calling thread and to tasks on XLA's own intra-op thread pool (idle while a custom call runs);
// a task that starts after every block is taken returns at once.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
// Software prefetch this many bytes ahead in each weight row: at one row of x the product is a
// stream of int8 rows, and without it one core read them at ~10 GB/s instead of ~20 (measured on
// the 2-core CPU, all of SmolLM2's products at T = 1; 1-8 KiB ahead all did about as well).
#ifndef JAXINFER_PREFETCH
#define JAXINFER_PREFETCH 8192
#endif

// ---- 16 float lanes, one implementation per instruction set, the same arithmetic in each ----

#if defined(__AVX2__) && defined(__FMA__)
inline float ReduceEight(__m256 s8) {  // s8[l] = a[l] + a[l + 8] already
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
  return _mm_cvtss_f32(s1);
}
#endif

#if defined(__AVX512F__)
constexpr const char* kIsa = "avx512";
// Tile shape (rows of x x output channels), overridable with -D to measure others: 4 x 4
// accumulators + 4 weight vectors + 1 x vector fit AVX-512's 32 registers; 6 x 4 and 8 x 2 did
// not measure faster. A lone row (decode at batch 1) takes 8 channels: more weight rows in flight.
#ifndef JAXINFER_TILE_ROWS
#define JAXINFER_TILE_ROWS 4
#define JAXINFER_TILE_COLS 4
#endif
#ifndef JAXINFER_SINGLE_ROW_COLS
#define JAXINFER_SINGLE_ROW_COLS 8
#endif
constexpr int kTileRows = JAXINFER_TILE_ROWS;
constexpr int kTileCols = JAXINFER_TILE_COLS;
constexpr int kSingleRowCols = JAXINFER_SINGLE_ROW_COLS;
struct Lanes {
  __m512 v;
};
inline Lanes Zero() { return {_mm512_setzero_ps()}; }
inline Lanes LoadX(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Lanes LoadW(const int8_t* p) {
  __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes))};
}
inline Lanes Fma(Lanes x, Lanes w, Lanes acc) { return {_mm512_fmadd_ps(x.v, w.v, acc.v)}; }
inline float Reduce(Lanes a) {
  __m256 low = _mm512_castps512_ps256(a.v);
  __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1));
  return ReduceEight(_mm256_add_ps(low, high));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* kIsa = "avx2";
constexpr int kTileRows = 2;  // 2 x 2 accumulators of 2 ymm each, within 16 ymm
constexpr int kTileCols = 2;
constexpr int kSingleRowCols = 4;
struct Lanes {
  __m256 low, high;  // lanes 0..7, 8..15
};
inline Lanes Zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Lanes LoadX(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline __m256 EightBytes(const int8_t* p) {
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}
inline Lanes LoadW(const int8_t* p) { return {EightBytes(p), EightBytes(p + 8)}; }
inline Lanes Fma(Lanes x, Lanes w, Lanes acc) {
  return {_mm256_fmadd_ps(x.low, w.low, acc.low), _mm256_fmadd_ps(x.high, w.high, acc.high)};
}
inline float Reduce(Lanes a) { return ReduceEight(_mm256_add_ps(a.low, a.high)); }
#else
constexpr const char* kIsa = "portable";
constexpr int kTileRows = 2;
constexpr int kTileCols = 2;
constexpr int kSingleRowCols = 2;
struct Lanes {
  float v[kLanes];
};
inline Lanes Zero() { return Lanes{}; }
inline Lanes LoadX(const float* p) {
  Lanes out;
  std::memcpy(out.v, p, sizeof(out.v));
  return out;
}
inline Lanes LoadW(const int8_t* p) {
  Lanes out;
  for (int64_t l = 0; l < kLanes; ++l) out.v[l] = static_cast<float>(p[l]);
  return out;
}
inline Lanes Fma(Lanes x, Lanes w, Lanes acc) {
  for (int64_t l = 0; l < kLanes; ++l) acc.v[l] = std::fma(x.v[l], w.v[l], acc.v[l]);
  return acc;
}
inline float Reduce(Lanes a) {
  float s8[8], s4[4], s2[2];
  for (int l = 0; l < 8; ++l) s8[l] = a.v[l] + a.v[l + 8];
  for (int l = 0; l < 4; ++l) s4[l] = s8[l] + s8[l + 4];
  for (int l = 0; l < 2; ++l) s2[l] = s4[l] + s4[l + 2];
  return s2[0] + s2[1];
}
#endif

// ---- one tile: R rows of x against C output channels ----

struct Problem {
  const float* x;       // [rows, in]
  const int8_t* w;      // [out, in]
  const float* scale;   // [out]
  float* y;             // [rows, out]
  int64_t rows, in, out;
};

template <int R, int C>
void Tile(const Problem& p, int64_t t, int64_t o) {
  Lanes acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Zero();
  const float* x = p.x + t * p.in;
  const int8_t* w = p.w + o * p.in;
  const int64_t whole = p.in - p.in % kLanes;
  for (int64_t i = 0; i < whole; i += kLanes) {
#if JAXINFER_PREFETCH > 0
    if (i % 64 == 0) {
      for (int c = 0; c < C; ++c) __builtin_prefetch(w + c * p.in + i + JAXINFER_PREFETCH, 0, 3);
    }
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

template <int R, int C = kTileCols>
void RowTile(const Problem& p, int64_t t, int64_t o_begin, int64_t o_end) {
  int64_t o = o_begin;
  for (; o + C <= o_end; o += C) Tile<R, C>(p, t, o);
  for (; o < o_end; ++o) Tile<R, 1>(p, t, o);
}

// Rows [t_begin, t_end) x channels [o_begin, o_end): tiles of kTileRows rows, each running over
// the channel block (whose int8 rows stay in cache from one row tile to the next).
void Block(const Problem& p, int64_t t_begin, int64_t t_end, int64_t o_begin, int64_t o_end) {
  for (int64_t t = t_begin; t < t_end; t += kTileRows) {
    switch (std::min<int64_t>(kTileRows, t_end - t)) {
      case 1: RowTile<1, kSingleRowCols>(p, t, o_begin, o_end); break;
      case 2: RowTile<2>(p, t, o_begin, o_end); break;
#if defined(__AVX512F__)
      case 3: RowTile<3>(p, t, o_begin, o_end); break;
      case 4: RowTile<4>(p, t, o_begin, o_end); break;
#if JAXINFER_TILE_ROWS > 4
      case 5: RowTile<5>(p, t, o_begin, o_end); break;
      case 6: RowTile<6>(p, t, o_begin, o_end); break;
#endif
#if JAXINFER_TILE_ROWS > 6
      case 7: RowTile<7>(p, t, o_begin, o_end); break;
      case 8: RowTile<8>(p, t, o_begin, o_end); break;
#endif
#endif
    }
  }
}

// Work units: blocks of output channels of about kBlockBytes of weights (kept in L2 while every
// row tile of the unit passes over them) times chunks of kChunkRows rows of x.
constexpr int64_t kBlockBytes = 48 * 1024;
constexpr int64_t kChunkRows = 64;

struct Work {
  Problem problem;
  int64_t channels_per_block, num_channel_blocks, num_units;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};

  void Run() {
    for (int64_t unit = next.fetch_add(1); unit < num_units; unit = next.fetch_add(1)) {
      const int64_t chunk = unit / num_channel_blocks, block = unit % num_channel_blocks;
      const int64_t t_begin = chunk * kChunkRows;
      const int64_t o_begin = block * channels_per_block;
      Block(problem, t_begin, std::min(problem.rows, t_begin + kChunkRows), o_begin,
            std::min(problem.out, o_begin + channels_per_block));
      finished.fetch_add(1);
    }
  }
};

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
  if (rows == 0 || out == 0) return ffi::Error::Success();
  auto work = std::make_shared<Work>();
  work->problem = Problem{x.typed_data(), values.typed_data(), scale.typed_data(),
                          y->typed_data(), rows, in, out};
  constexpr int64_t kStep = std::max(kTileCols, kSingleRowCols);  // both powers of two
  int64_t per_block = std::max<int64_t>(kBlockBytes / std::max<int64_t>(in, 1), kStep);
  per_block -= per_block % kStep;
  work->channels_per_block = per_block;
  work->num_channel_blocks = (out + per_block - 1) / per_block;
  work->num_units = work->num_channel_blocks * ((rows + kChunkRows - 1) / kChunkRows);

  int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  if (max_threads > 0) threads = std::min(threads, max_threads);
  const int64_t helpers = std::min(threads, work->num_units) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->finished.load() < work->num_units) std::this_thread::yield();
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
