// How the CPU kernels (int8_matmul.cc, gguf_matmul.cc, paged_attention.cc) cut y[rows, out] into
// tiles and hand the tiles to threads. A kernel is a small struct with its tile shape and one
// member template,
//
//   static constexpr int kTileRows, kTileCols, kSingleRowCols;
//   template <int R, int C> void Tile(int64_t t, int64_t o) const;
//
// which computes rows t .. t + R - 1 of y at column units o .. o + C - 1: a unit is an output
// channel for the GGUF kernel, a panel of 64 channels for the int8 one. A tile takes up to
// kTileRows rows and kTileCols units, a lone row (decode at batch 1) kSingleRowCols units. Nothing
// here changes an output's summation order: that is inside Tile and depends on `in` alone, so the
// tile a row lands in, its chunk and its thread do not change its bits.
//
// Threads: the work is cut into units, blocks of column units of about kBlockBytes of weights
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

template <int R, int C, typename Kernel>
void RowTile(const Kernel& kernel, int64_t t, int64_t o_begin, int64_t o_end) {
  int64_t o = o_begin;
  for (; o + C <= o_end; o += C) kernel.template Tile<R, C>(t, o);
  for (; o < o_end; ++o) kernel.template Tile<R, 1>(t, o);
}

// One row tile of R rows, or of fewer when only `left` rows remain (R, R - 1, ..., 1 are all
// instantiated): a lone row takes the kernel's kSingleRowCols units at a time.
template <int R, typename Kernel>
void RowsTile(const Kernel& kernel, int64_t t, int64_t left, int64_t o_begin, int64_t o_end) {
  if constexpr (R > 1) {
    if (left < R) return RowsTile<R - 1>(kernel, t, left, o_begin, o_end);
  }
  constexpr int C = R == 1 ? Kernel::kSingleRowCols : Kernel::kTileCols;
  RowTile<R, C>(kernel, t, o_begin, o_end);
}

// Rows [t_begin, t_end) x units [o_begin, o_end): tiles of kTileRows rows, each running over the
// unit block (whose weights stay in cache from one row tile to the next).
template <typename Kernel>
void Block(const Kernel& kernel, int64_t t_begin, int64_t t_end, int64_t o_begin, int64_t o_end) {
  for (int64_t t = t_begin; t < t_end; t += Kernel::kTileRows)
    RowsTile<Kernel::kTileRows>(kernel, t, t_end - t, o_begin, o_end);
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

// Computes all of y[rows, units] with `kernel` on the calling thread and at most max_threads - 1
// (0: no limit) of the pool's; `unit_bytes` is one column unit's weight bytes. The Work is
// shared with the pool's tasks, which may start after this returns.
template <typename Kernel>
void RunTiles(xla::ffi::ThreadPool& pool, const Kernel& kernel, int64_t rows, int64_t out,
              int64_t unit_bytes, int64_t max_threads) {
  if (rows == 0 || out == 0) return;
  auto work = std::make_shared<Work<Kernel>>();
  work->kernel = kernel;
  work->rows = rows;
  work->out = out;
  constexpr int64_t kStep = std::max(Kernel::kTileCols, Kernel::kSingleRowCols);  // powers of 2
  int64_t per_block = std::max<int64_t>(kBlockBytes / std::max<int64_t>(unit_bytes, 1), kStep);
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
