// y[T, out] = x[T, in] @ (W * scale[:, None])^T for an int8 W [out, in] stored in panels of 64
// output channels, values [ceil(out / 64), in, 64] (panel p, row i holds W[64p .. 64p + 63, i];
// the last panel zero padded), reading the int8 bytes directly: an XLA FFI custom call for
// XLA:CPU (jaxinfer/kernels/int8_matmul.py packs the panels and builds this on first use with the
// system compiler, registered as "jaxinfer_int8_matmul").
//
// Why a kernel: XLA:CPU does not fuse the int8 -> float convert into the dot; it writes a float32
// copy of the weight and multiplies that (benchmarks/RESULTS.md, "Weight-only int8"), so an int8
// model read more bytes than a float32 one. Here the int8 weights are converted in registers.
//
// Why panels: a panel is read front to back as one stream; each 64-byte line is one input's 64
// weights, converted to 4 x 16 float lanes and multiplied by that input broadcast from x, so the
// 64 outputs accumulate in lanes and nothing is summed across lanes at the end. With W's rows
// instead ([out, in], each output a dot product of two rows), one core streamed ~7 GB/s (8
// channels of 16 lanes, then 8 horizontal sums); with panels ~20 GB/s, one core's read bandwidth
// (benchmarks/RESULTS.md, "int8 kernel layout"). A row tile of R rows reuses each converted line
// R times.
//
// Summation order (what makes the result batch invariant): y[t, o] is one chain of fused
// multiply-adds, x[t, i] * W[o, i] for i = 0, 1, ..., in - 1 from 0, then multiplied by scale[o].
// That sequence depends on `in` alone: not on T, on the row's position, on the tile it lands in,
// nor on the thread that computes it (tiles.h), so a row's result is bitwise the same whatever
// else is in the batch. The AVX-512, AVX2+FMA and plain C++ (std::fma) builds compute the same
// sequence with exact int8 loads, so every build gives the same bits.
//
// Threads: tiles.h hands blocks of panels to the calling thread and to tasks on XLA's own
// intra-op thread pool.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "lanes.h"
#include "tiles.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

// ---- one tile: R rows of x against C panels ----

constexpr int64_t kPanel = 64;                     // output channels per panel
constexpr int64_t kPanelLanes = kPanel / kLanes;  // Lanes per line of a panel

// Software prefetch this many bytes ahead in each panel's stream (0: none). 0, 1 KiB and 4 KiB
// measured alike (SmolLM2's products at T = 1 on the 2-core CPU: the hardware prefetcher follows
// a panel's stream); kept for CPUs whose prefetcher does less.
#ifndef JAXINFER_PANEL_PREFETCH
#define JAXINFER_PANEL_PREFETCH 1024
#endif

// Tile shape, overridable with -D to measure others. AVX-512: 6 rows x 1 panel, 6 x 4 16-lane
// accumulators + 6 broadcasts + one converted vector within its 32 registers; a lone row takes 2
// panels (two streams in flight). 4 and 5 rows, 1 and 4 lone-row panels measured within noise of
// it (T = 1, 16, 64). AVX2's 16 registers hold 2 rows x 1 panel.
#if !defined(JAXINFER_PANEL_TILE_ROWS) && defined(__AVX512F__)
#define JAXINFER_PANEL_TILE_ROWS 6
#define JAXINFER_LONE_ROW_PANELS 2
#elif !defined(JAXINFER_PANEL_TILE_ROWS)
#define JAXINFER_PANEL_TILE_ROWS 2
#define JAXINFER_LONE_ROW_PANELS 1
#endif

struct Problem {  // the kernel tiles.h runs: a column unit is one panel of 64 channels
  static constexpr int kTileRows = JAXINFER_PANEL_TILE_ROWS, kTileCols = 1;
  static constexpr int kSingleRowCols = JAXINFER_LONE_ROW_PANELS;
  const float* x;      // [rows, in]
  const int8_t* w;     // [panels, in, 64]
  const float* scale;  // [out]
  float* y;            // [rows, out]
  int64_t rows, in, out;

  template <int R, int C>
  void Tile(int64_t t, int64_t panel) const;
};

template <int R, int C>
void Problem::Tile(int64_t t, int64_t panel) const {
  const Problem& p = *this;
  const int64_t panel_bytes = p.in * kPanel;
  Lanes acc[R][C][kPanelLanes];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      for (int v = 0; v < kPanelLanes; ++v) acc[r][c][v] = Zero();
  const float* x = p.x + t * p.in;
  const int8_t* w = p.w + panel * panel_bytes;
  for (int64_t i = 0; i < p.in; ++i) {
    const int8_t* line = w + i * kPanel;
#if JAXINFER_PANEL_PREFETCH > 0
    for (int c = 0; c < C; ++c)
      __builtin_prefetch(line + c * panel_bytes + JAXINFER_PANEL_PREFETCH, 0, 3);
#endif
    Lanes xs[R];
    for (int r = 0; r < R; ++r) xs[r] = Broadcast(x[r * p.in + i]);
    for (int c = 0; c < C; ++c) {
      for (int v = 0; v < kPanelLanes; ++v) {
        const Lanes weights = LoadW(line + c * panel_bytes + v * kLanes);
        for (int r = 0; r < R; ++r) acc[r][c][v] = Fma(xs[r], weights, acc[r][c][v]);
      }
    }
  }
  for (int c = 0; c < C; ++c) {
    for (int v = 0; v < kPanelLanes; ++v) {
      const int64_t o = (panel + c) * kPanel + v * kLanes;
      if (o >= p.out) break;  // the padding of the last panel
      const int64_t n = std::min<int64_t>(kLanes, p.out - o);
      alignas(64) float scale_tail[kLanes] = {}, y_tail[kLanes];
      if (n < kLanes) std::memcpy(scale_tail, p.scale + o, n * sizeof(float));
      const Lanes scale = LoadX(n < kLanes ? scale_tail : p.scale + o);
      for (int r = 0; r < R; ++r) {
        float* y = p.y + (t + r) * p.out + o;
        if (n == kLanes) {
          Store(Mul(acc[r][c][v], scale), y);
        } else {
          Store(Mul(acc[r][c][v], scale), y_tail);
          std::memcpy(y, y_tail, n * sizeof(float));
        }
      }
    }
  }
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> values,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y,
                      int64_t max_threads) {
  auto x_dims = x.dimensions(), w_dims = values.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 3 || scale.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument(
        "jaxinfer_int8_matmul: x [T, in], values [panels, in, 64], scale [out]");
  }
  const int64_t rows = x_dims[0], in = x_dims[1], out = scale.dimensions()[0];
  const int64_t panels = w_dims[0];
  if (w_dims[1] != in || w_dims[2] != kPanel || panels != (out + kPanel - 1) / kPanel ||
      y->dimensions()[0] != rows || y->dimensions()[1] != out) {
    return ffi::Error::InvalidArgument("jaxinfer_int8_matmul: shapes do not agree");
  }
  const Problem problem{x.typed_data(), values.typed_data(), scale.typed_data(), y->typed_data(),
                        rows, in, out};
  RunTiles(pool, problem, rows, panels, /*unit_bytes=*/in * kPanel, max_threads);
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
