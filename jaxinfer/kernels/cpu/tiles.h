// How the CPU kernels (int8_matmul.cc, gguf_matmul.cc) cut y[rows, out] into tiles and hand the
// tiles to threads. A kernel is a small struct with one member template,
//
//   template <int R, int C> void Tile(int64_t t, int64_t o) const;
//
// which computes rows t .. t + R - 1 of y at channels o .. o + C - 1 (lanes.h's accumulation for
// each). Nothing here changes an output's summation order: that is inside Tile and depends on
// `in` alone, so the tile a row lands in, its chunk and its thread do not change its bits.
//
// Threads: the work is cut into units, blocks of output channels of about kBlockBytes of weights
// (kept in L2 while every row tile of the unit passes over them) times chunks of kChunkRows rows
// of x, handed out through an atomic counter to the calling thread and to tasks on XLA's own
// intra-op thread pool (idle while a custom call runs); a task that starts after every unit is
// taken returns at once.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "lanes.h"
#include "xla/ffi/api/ffi.h"

namespace {

template <int R, int C = kTileCols, typename Kernel>
void RowTile(const Kernel& kernel, int64_t t, int64_t o_begin, int64_t o_end) {
  int64_t o = o_begin;
  for (; o + C <= o_end; o += C) kernel.template Tile<R, C>(t, o);
  for (; o < o_end; ++o) kernel.template Tile<R, 1>(t, o);
}

// Rows [t_begin, t_end) x channels [o_begin, o_end): tiles of kTileRows rows, each running over
// the channel block (whose weight rows stay in cache from one row tile to the next).
template <typename Kernel>
void Block(const Kernel& kernel, int64_t t_begin, int64_t t_end, int64_t o_begin, int64_t o_end) {
  for (int64_t t = t_begin; t < t_end; t += kTileRows) {
    switch (std::min<int64_t>(kTileRows, t_end - t)) {
      case 1: RowTile<1, kSingleRowCols>(kernel, t, o_begin, o_end); break;
      case 2: RowTile<2>(kernel, t, o_begin, o_end); break;
#if defined(__AVX512F__)
      case 3: RowTile<3>(kernel, t, o_begin, o_end); break;
      case 4: RowTile<4>(kernel, t, o_begin, o_end); break;
#if JAXINFER_TILE_ROWS > 4
      case 5: RowTile<5>(kernel, t, o_begin, o_end); break;
      case 6: RowTile<6>(kernel, t, o_begin, o_end); break;
#endif
#if JAXINFER_TILE_ROWS > 6
      case 7: RowTile<7>(kernel, t, o_begin, o_end); break;
      case 8: RowTile<8>(kernel, t, o_begin, o_end); break;
#endif
#endif
    }
  }
}

constexpr int64_t kBlockBytes = 48 * 1024;  // weight bytes of one unit's channel block (L2)
constexpr int64_t kChunkRows = 64;

template <typename Kernel>
struct Work {
  Kernel kernel;
  int64_t rows, out;
  int64_t channels_per_block, num_channel_blocks, num_units;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};

  void Run() {
    for (int64_t unit = next.fetch_add(1); unit < num_units; unit = next.fetch_add(1)) {
      const int64_t chunk = unit / num_channel_blocks, block = unit % num_channel_blocks;
      const int64_t t_begin = chunk * kChunkRows;
      const int64_t o_begin = block * channels_per_block;
      Block(kernel, t_begin, std::min(rows, t_begin + kChunkRows), o_begin,
            std::min(out, o_begin + channels_per_block));
      finished.fetch_add(1);
    }
  }
};

// Computes all of y[rows, out] with `kernel` on the calling thread and at most max_threads - 1
// (0: no limit) of the pool's; `row_bytes` is one output channel's weight bytes. The Work is
// shared with the pool's tasks, which may start after this returns.
template <typename Kernel>
void RunTiles(xla::ffi::ThreadPool& pool, const Kernel& kernel, int64_t rows, int64_t out,
              int64_t row_bytes, int64_t max_threads) {
  if (rows == 0 || out == 0) return;
  auto work = std::make_shared<Work<Kernel>>();
  work->kernel = kernel;
  work->rows = rows;
  work->out = out;
  constexpr int64_t kStep = std::max(kTileCols, kSingleRowCols);  // both powers of two
  int64_t per_block = std::max<int64_t>(kBlockBytes / std::max<int64_t>(row_bytes, 1), kStep);
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
}

}  // namespace
