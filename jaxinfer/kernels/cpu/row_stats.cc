// Per-row statistics of logits x [S, V] (float32) in two passes over each row: whether every
// entry is finite, and of the row with the entries its bitmask [S, ceil(V / 32)] clears set to
// -inf (structured outputs; bit i % 32 of word i / 32, as sampling.apply_token_bitmask): the
// first index of the maximum (a NaN counts as the maximum, as jnp.argmax), the maximum, and the
// log-normalizer of the log-softmax:
//
//   shift = max if it is finite, else 0;  log_sum = log(sum_i exp(x_i - shift))
//
// so that log_softmax(x) = (x - shift) - log_sum. An XLA FFI custom call for XLA:CPU
// (jaxinfer/kernels/row_stats.py builds it on first use, registered as "jaxinfer_row_stats").
//
// Why a kernel: XLA:CPU reduces along a row's last axis one element at a time (~2 GB/s), so the
// sampler's reductions over a [S, 49152] vocabulary (the greedy argmax through TopK, the finite
// check, the max and the sum of the log-softmax) took more time than some decode steps' weight
// reads: 0.35 ms of a 6 ms batch-1 SmolLM2 step, 21 ms of a ~180 ms step at 64 rows
// (benchmarks/RESULTS.md, "Sampler reductions"). Here each pass is vectorized over 16 lanes.
//
// Summation order (what makes it batch invariant): lane l adds exp(x_i - shift) for i = l
// (mod 16) in increasing i from 0, then the 16 lanes are added in a fixed tree (l + 8, + 4, + 2,
// + 1), each lane's running sum compensated (Kahan). It depends on V alone: not on S, on the
// row's position or on the thread. The code is written on 16-lane GCC/Clang vectors, compiled with
// -ffp-contract=off and no -ffast-math: the compiler maps the lanes to the registers it has but
// never reorders or fuses, so every instruction set gives the same bits.
//
// exp: Cephes' expf (range reduction by ln 2 in two parts, a degree-5 polynomial, then times
// 2^n built in the exponent bits), every step one IEEE product or sum (no fused multiply-add:
// the vector extensions below have none), within ~2 ulp of the exact value. Arguments below -80 give 0: they add less than 2e-35 to a sum of at
// least 1 (the maximum's own term), so the sum cannot tell, and a masked (-inf) entry gives 0
// exactly, as exp(-inf) does.
//
// Rows whose maximum is not finite follow the formula with shift 0 as the batch-invariant
// log-softmax does (jaxinfer/models/invariant.py): a NaN anywhere gives log_sum NaN, a +inf
// gives +inf, a row of -inf gives log(0) = -inf.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "tiles.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kExpFloor = -80.0f;  // exp of anything below: 0 (see the top of the file)

// 16 lanes as a GCC/Clang vector: the compiler lowers each operation to the widest registers
// the target has (one zmm, two ymm, or 16 scalars), lane by lane, so every build computes the
// same values.
typedef float Floats __attribute__((vector_size(64)));
typedef int32_t Ints __attribute__((vector_size(64)));
static_assert(sizeof(Floats) == kLanes * sizeof(float), "16 lanes");

inline Floats Load(const float* p) {
  Floats v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline Floats Splat(float x) { return Floats{} + x; }

// exp(d) for d <= 0 (or -inf), lane by lane; see the top of the file. Round to nearest by the
// 1.5 * 2^23 trick (exact for |t| < 2^22), each step one IEEE operation.
inline Floats ExpNonPositive(Floats d) {
  const Floats floor_ = Splat(kExpFloor);
  const Floats c = d >= floor_ ? d : floor_;  // keeps n in range (and -inf out of it)
  const Floats magic = Splat(12582912.0f);
  const Floats n = (c * 1.44269504088896341f + magic) - magic;
  const Floats r = (c - n * 0.693359375f) + n * 2.12194440e-4f;
  Floats p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * (r * r) + r) + 1.0f;
  const Ints bits = (__builtin_convertvector(n, Ints) + 127) << 23;  // 2^n, n in [-116, 0]
  Floats scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return d >= floor_ ? p * scale : Floats{};
}

struct Stats {
  int32_t argmax;
  float max, shift, log_sum;
  bool finite;
};

// Lanes of entries i .. i + 15 (i a multiple of 16) that the row's bitmask allows: bit i % 32 of
// word i / 32 (a structured output's grammar; all ones otherwise).
inline Ints Allowed(const int32_t* bitmask, int64_t i) {
  const uint32_t word = static_cast<uint32_t>(bitmask[i / 32]) >> (i % 32);
  const Ints lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const Ints bits = Ints{} + static_cast<int32_t>(word & 0xFFFFu);
  return ((bits >> lane) & 1) != 0;
}

inline bool AllowedAt(const int32_t* bitmask, int64_t i) {
  return ((static_cast<uint32_t>(bitmask[i / 32]) >> (i % 32)) & 1u) != 0;
}

// The row with its disallowed entries at -inf, 16 entries from i (i a multiple of 16; entries
// past v are -inf too).
inline Floats MaskedLanes(const float* x, const int32_t* bitmask, int64_t i, int64_t v) {
  const float inf = std::numeric_limits<float>::infinity();
  Floats value;
  if (i + kLanes <= v) {
    value = Load(x + i);
  } else {
    alignas(64) float tail[kLanes];
    std::fill(tail, tail + kLanes, -inf);
    std::copy(x + i, x + v, tail);
    value = Load(tail);
  }
  return Allowed(bitmask, i) ? value : Splat(-inf);
}

// Pass 1: whether every entry of the raw row is finite, and the maximum of the masked row (or
// its first NaN).
Stats FirstPass(const float* x, const int32_t* bitmask, int64_t v) {
  const float inf = std::numeric_limits<float>::infinity();
  Floats lane_max = Splat(-inf);
  Ints lane_nan = Ints{}, lane_nonfinite = Ints{};
  const int64_t full = v - v % kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
    const Floats raw = Load(x + i);
    const Floats value = Allowed(bitmask, i) ? raw : Splat(-inf);
    lane_max = value > lane_max ? value : lane_max;
    lane_nan |= value != value;
    lane_nonfinite |= (raw - raw) != 0.0f;  // NaN for an infinity or a NaN
  }
  float top = -inf;
  bool nan = false, nonfinite = false;
  for (int64_t l = 0; l < kLanes; ++l) {
    top = lane_max[l] > top ? lane_max[l] : top;
    nan |= lane_nan[l] != 0;
    nonfinite |= lane_nonfinite[l] != 0;
  }
  for (int64_t i = full; i < v; ++i) {
    const float value = AllowedAt(bitmask, i) ? x[i] : -inf;
    top = value > top ? value : top;
    nan |= value != value;
    nonfinite |= (x[i] - x[i]) != 0.0f;
  }
  Stats s{};
  s.finite = !nonfinite;
  auto masked = [&](int64_t i) { return AllowedAt(bitmask, i) ? x[i] : -inf; };
  int64_t at = 0;
  if (nan) {
    while (!(masked(at) != masked(at))) ++at;  // the first NaN, as jnp.argmax
    s.max = masked(at);
  } else {
    while (at + 1 < v && masked(at) != top) ++at;  // the first maximum (0 for a row of -inf)
    s.max = top;
  }
  s.argmax = static_cast<int32_t>(at);
  s.shift = std::isfinite(s.max) ? s.max : 0.0f;
  return s;
}

// Pass 2: log(sum exp(x - shift)) in the order stated at the top of the file, each lane's sum
// compensated (Kahan: a lane adds V / 16 terms, 9,496 for a 151,936-token vocabulary, and a
// plain running sum lost ~8 ulp of log_sum there).
float LogSum(const float* x, const int32_t* bitmask, int64_t v, float shift) {
  Floats sum = Floats{}, carry = Floats{};
  auto add = [&](Floats term) {
    const Floats y = term - carry;
    const Floats t = sum + y;
    carry = (t - sum) - y;
    sum = t;
  };
  for (int64_t i = 0; i < v; i += kLanes) add(ExpNonPositive(MaskedLanes(x, bitmask, i, v) - shift));
  float s8[8], s4[4], s2[2];
  for (int l = 0; l < 8; ++l) s8[l] = sum[l] + sum[l + 8];
  for (int l = 0; l < 4; ++l) s4[l] = s8[l] + s8[l + 4];
  for (int l = 0; l < 2; ++l) s2[l] = s4[l] + s4[l + 2];
  return std::log(s2[0] + s2[1]);
}

struct Problem {  // the kernel tiles.h runs: a column unit is one row of x
  static constexpr int kTileRows = 1, kTileCols = 1, kSingleRowCols = 1;
  const float* x;
  const int32_t* bitmask;  // [rows, words]
  int32_t* argmax;
  float *max, *shift, *log_sum;
  int32_t* finite;
  int64_t vocab, words;

  template <int R, int C>
  void Tile(int64_t, int64_t row) const {
    const float* values = x + row * vocab;
    const int32_t* mask = bitmask + row * words;
    Stats s = FirstPass(values, mask, vocab);
    // A NaN maximum gives NaN, +inf gives +inf; anything else (a row of -inf too) the formula.
    const bool nan = s.max != s.max, plus_inf = s.max == std::numeric_limits<float>::infinity();
    s.log_sum = nan        ? std::numeric_limits<float>::quiet_NaN()
                : plus_inf ? std::numeric_limits<float>::infinity()
                           : LogSum(values, mask, vocab, s.shift);
    argmax[row] = s.argmax;
    max[row] = s.max;
    shift[row] = s.shift;
    log_sum[row] = s.log_sum;
    finite[row] = s.finite ? 1 : 0;
  }
};

ffi::Error RowStats(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> bitmask,
                    ffi::ResultBuffer<ffi::S32> argmax, ffi::ResultBuffer<ffi::F32> max,
                    ffi::ResultBuffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> log_sum,
                    ffi::ResultBuffer<ffi::S32> finite, int64_t max_threads) {
  auto dims = x.dimensions(), mask_dims = bitmask.dimensions();
  if (dims.size() != 2 || dims[1] < 1 || mask_dims.size() != 2 || mask_dims[0] != dims[0] ||
      mask_dims[1] != (dims[1] + 31) / 32) {
    return ffi::Error::InvalidArgument(
        "jaxinfer_row_stats: x [S, V] with V >= 1, bitmask [S, ceil(V / 32)]");
  }
  const int64_t rows = dims[0], vocab = dims[1];
  const Problem problem{x.typed_data(),       bitmask.typed_data(),  argmax->typed_data(),
                        max->typed_data(),    shift->typed_data(),   log_sum->typed_data(),
                        finite->typed_data(), vocab,                 mask_dims[1]};
  // One nominal row of S units (rows of x), each a tile of its own.
  RunTiles(pool, problem, 1, rows, /*unit_bytes=*/vocab * 4, max_threads);
  return ffi::Error::Success();
}

// ---- the top logprobs: each row's token logprob, its rank and the k largest ----
//
// For logits x [T, V], tokens [T] and the row's normalizer (shift, log_sum) from RowStats:
//   token_logprob = (x[token] - shift) - log_sum
//   rank = #{i : (x_i - shift) - log_sum >= token_logprob}          (vLLM's rank: ties count)
//   top ids: the k largest x_i, in decreasing order (-0 below +0), the lower index first among
//   equal values (lax.top_k's order), and their logprobs (x_i - shift) - log_sum.
// Each logprob is the same two float32 subtractions XLA makes of `(x - shift) - log_sum`, so the
// values and the rank are bitwise those of sampling.top_logprobs_of_logits given the same
// normalizer. A NaN never enters the top k (a NaN row is reported as non-finite anyway).

constexpr int64_t kScanBlock = 256;  // entries whose maximum is checked before a closer look

// lax.top_k's order of floats: as the values, and -0 below +0 (the sign bit flips the rest).
inline int32_t OrderKey(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits ^ ((bits >> 31) & 0x7fffffff);
}

struct TopProblem {  // the kernel tiles.h runs: a column unit is one row of x
  static constexpr int kTileRows = 1, kTileCols = 1, kSingleRowCols = 1;
  const float* x;
  const int32_t* tokens;
  const float *shift, *log_sum;
  float* token_logprob;
  int32_t* rank;
  int32_t* top_ids;
  float* top_logprobs;
  int64_t vocab, k;

  template <int R, int C>
  void Tile(int64_t, int64_t row) const {
    const float* values = x + row * vocab;
    const float a = shift[row], b = log_sum[row];
    const int64_t token = std::clamp<int64_t>(tokens[row], 0, vocab - 1);
    const float wanted = (values[token] - a) - b;
    token_logprob[row] = wanted;
    rank[row] = static_cast<int32_t>(Rank(values, a, b, wanted));
    if (k > 0) TopK(values, top_ids + row * k, top_logprobs + row * k, a, b);
  }

  int64_t Rank(const float* values, float a, float b, float wanted) const {
    Ints count = Ints{};
    const int64_t full = vocab - vocab % kLanes;
    for (int64_t i = 0; i < full; i += kLanes) count -= ((Load(values + i) - a) - b) >= wanted;
    int64_t total = 0;
    for (int64_t l = 0; l < kLanes; ++l) total += count[l];
    for (int64_t i = full; i < vocab; ++i) total += ((values[i] - a) - b) >= wanted;
    return total;
  }

  void TopK(const float* values, int32_t* ids, float* logprobs, float a, float b) const {
    // ids / logprobs hold the best `filled` so far, by decreasing value (then increasing id).
    float* best = logprobs;  // the raw values first; turned into logprobs at the end
    int64_t filled = 0;
    auto offer = [&](int64_t i) {
      const float value = values[i];
      if (value != value) return;  // NaN never enters
      const int32_t key = OrderKey(value);
      if (filled == k && key <= OrderKey(best[k - 1])) return;
      int64_t at = std::min(filled, k - 1);
      while (at > 0 && OrderKey(best[at - 1]) < key) {  // equal values keep the lower id first
        best[at] = best[at - 1];
        ids[at] = ids[at - 1];
        --at;
      }
      best[at] = value;
      ids[at] = static_cast<int32_t>(i);
      filled = std::min(filled + 1, k);
    };
    int64_t i = 0;
    for (; i < vocab && filled < k; ++i) offer(i);
    const float inf = std::numeric_limits<float>::infinity();
    for (; i + kScanBlock <= vocab; i += kScanBlock) {
      Floats block_max = Splat(-inf);
      for (int64_t j = 0; j < kScanBlock; j += kLanes) {
        const Floats v = Load(values + i + j);
        block_max = v > block_max ? v : block_max;
      }
      bool promising = false;
      // >=: a +0 must still displace a -0 at the bottom of the list
      for (int64_t l = 0; l < kLanes; ++l) promising |= block_max[l] >= best[k - 1];
      if (promising) {
        for (int64_t j = 0; j < kScanBlock; ++j) offer(i + j);
      }
    }
    for (; i < vocab; ++i) offer(i);
    for (int64_t j = 0; j < filled; ++j) logprobs[j] = (best[j] - a) - b;
    for (int64_t j = filled; j < k; ++j) {  // fewer than k non-NaN entries in the row
      ids[j] = 0;
      logprobs[j] = std::numeric_limits<float>::quiet_NaN();
    }
  }
};

ffi::Error TopLogprobs(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::S32> tokens, ffi::Buffer<ffi::F32> shift,
                       ffi::Buffer<ffi::F32> log_sum, ffi::ResultBuffer<ffi::F32> token_logprob,
                       ffi::ResultBuffer<ffi::S32> rank, ffi::ResultBuffer<ffi::S32> top_ids,
                       ffi::ResultBuffer<ffi::F32> top_logprobs, int64_t max_threads) {
  auto dims = x.dimensions();
  const int64_t rows = dims.size() == 2 ? dims[0] : -1;
  auto top_dims = top_ids->dimensions();
  if (dims.size() != 2 || dims[1] < 1 || tokens.dimensions().size() != 1 ||
      tokens.dimensions()[0] != rows || shift.dimensions()[0] != rows ||
      log_sum.dimensions()[0] != rows || top_dims.size() != 2 || top_dims[0] != rows ||
      top_dims[1] > dims[1]) {
    return ffi::Error::InvalidArgument(
        "jaxinfer_top_logprobs: x [T, V], tokens / shift / log_sum [T], top [T, k <= V]");
  }
  const TopProblem problem{x.typed_data(),
                           tokens.typed_data(),
                           shift.typed_data(),
                           log_sum.typed_data(),
                           token_logprob->typed_data(),
                           rank->typed_data(),
                           top_ids->typed_data(),
                           top_logprobs->typed_data(),
                           dims[1],
                           top_dims[1]};
  RunTiles(pool, problem, 1, rows, /*unit_bytes=*/dims[1] * 4, max_threads);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferRowStats, RowStats,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferTopLogprobs, TopLogprobs,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("max_threads"));

// Which instruction set the build targets (the code is the same plain C++ for all of them).
extern "C" const char* JaxinferRowStatsIsa() { return kIsa; }
