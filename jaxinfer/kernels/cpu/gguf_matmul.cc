// y[T, out] = x[T, in] @ W^T where W[out, in] is a GGUF weight kept in its 32-element blocks
// (Q8_0, Q4_0 or Q4_1): an XLA FFI custom call for XLA:CPU (jaxinfer/kernels/gguf_matmul.py
// builds it on first use with the system compiler and registers "jaxinfer_gguf_<type>_matmul").
//
// Why: a GGUF dequantized at load holds 4 bytes per weight; these blocks hold 1.06 (Q8_0), 0.56
// (Q4_0) or 0.63 (Q4_1), and decode reads every weight once per step. The blocks arrive split
// into arrays (jaxinfer/models/gguf_weight.py): quants [out, in] int8 (Q8_0) or [out, in / 2]
// uint8 (Q4: byte j of a block holds element j in its low nibble and element j + 16 in its high
// nibble, ggml's layout), scales d [out, in / 32] and, for Q4_1, mins m [out, in / 32], float16.
//
// Values: each 16-element half of a block is decoded in registers to the float32 weights ggml
// (and gguf-py's dequantize, and so the dequantize-first path) gives: Q8_0 d * q, Q4_0
// d * (q - 8), Q4_1 d * q + m. d * q is exact in float32 (11 + 8 significant bits), so Q4_1's
// one rounding is the same whether computed as fma(d, q, m) or as gguf-py's (d * q) + m. The
// kernel therefore multiplies bitwise the weights the float path multiplies: only the summation
// order differs.
//
// Summation order (batch invariance): as in int8_matmul.cc, y[t, o] is accumulated in 16 float
// lanes, lane l holding sum over i = l (mod 16) of x[t, i] * w[o, i] by one fused multiply-add per
// element in increasing i (`in` is a whole number of blocks, so there is no tail), then the lanes
// are added in the fixed tree (l + 8, + 4, + 2, + 1). That depends on `in` alone: not on T, the
// row's position, its tile or its thread. The AVX-512, AVX2+FMA and plain C++ paths compute that
// same sequence; -ffp-contract=off keeps the compiler from fusing anything on its own.
//
// Threads: blocks of output channels handed out through an atomic counter to the calling thread
// and tasks on XLA's intra-op pool, as in int8_matmul.cc.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 32;  // elements per GGUF block of these three types
#ifndef JAXINFER_PREFETCH
#define JAXINFER_PREFETCH 4096
#endif

enum class Format { kQ8_0, kQ4_0, kQ4_1 };

template <Format F>
constexpr int64_t kQuantBytes = F == Format::kQ8_0 ? 32 : 16;  // quant bytes per block

// float16 -> float32 (exact). F16C where the build has it, else the bit manipulation.
inline float HalfToFloat(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    exponent = 113;
    while ((mantissa & 0x400) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
#endif
}

// ---- 16 float lanes and the decoding of one half block, per instruction set ----

#if defined(__AVX2__) && defined(__FMA__)
inline float ReduceEight(__m256 s8) {
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
  return _mm_cvtss_f32(s1);
}
#endif

#if defined(__AVX512F__)
constexpr const char* kIsa = "avx512";
// Tile shape, overridable with -D to measure others: 6 x 3, 6 x 2 and 8 x 2 did not measure
// clearly faster than 4 x 4 at 16 and 64 rows on the (loaded) 2-core CPU.
#ifndef JAXINFER_TILE_ROWS
#define JAXINFER_TILE_ROWS 4
#define JAXINFER_TILE_COLS 4
#endif
constexpr int kTileRows = JAXINFER_TILE_ROWS;
constexpr int kTileCols = JAXINFER_TILE_COLS;
constexpr int kSingleRowCols = 8;
struct Lanes {
  __m512 v;
};
inline Lanes Zero() { return {_mm512_setzero_ps()}; }
inline Lanes LoadX(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Lanes Fma(Lanes x, Lanes w, Lanes acc) { return {_mm512_fmadd_ps(x.v, w.v, acc.v)}; }
inline float Reduce(Lanes a) {
  __m256 low = _mm512_castps512_ps256(a.v);
  __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1));
  return ReduceEight(_mm256_add_ps(low, high));
}
// Half `half` (0: elements 0..15, 1: 16..31) of one block as 16 float32 weights.
template <Format F>
inline Lanes Decode(const uint8_t* quants, int half, float d, float m) {
  const __m512 scale = _mm512_set1_ps(d);
  if constexpr (F == Format::kQ8_0) {
    __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(quants + 16 * half));
    return {_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), scale)};
  } else {
    __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(quants));
    if (half) bytes = _mm_srli_epi16(bytes, 4);
    bytes = _mm_and_si128(bytes, _mm_set1_epi8(0x0f));
    __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
    if constexpr (F == Format::kQ4_0) {
      return {_mm512_mul_ps(_mm512_sub_ps(q, _mm512_set1_ps(8.0f)), scale)};
    } else {
      return {_mm512_fmadd_ps(q, scale, _mm512_set1_ps(m))};
    }
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* kIsa = "avx2";
constexpr int kTileRows = 2;
constexpr int kTileCols = 2;
constexpr int kSingleRowCols = 4;
struct Lanes {
  __m256 low, high;  // lanes 0..7, 8..15
};
inline Lanes Zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Lanes LoadX(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline Lanes Fma(Lanes x, Lanes w, Lanes acc) {
  return {_mm256_fmadd_ps(x.low, w.low, acc.low), _mm256_fmadd_ps(x.high, w.high, acc.high)};
}
inline float Reduce(Lanes a) { return ReduceEight(_mm256_add_ps(a.low, a.high)); }
template <Format F>
inline __m256 DecodeEight(__m128i eight_bytes, __m256 scale, __m256 min) {
  if constexpr (F == Format::kQ8_0) {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight_bytes)), scale);
  } else {
    __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight_bytes));
    if constexpr (F == Format::kQ4_0) {
      return _mm256_mul_ps(_mm256_sub_ps(q, _mm256_set1_ps(8.0f)), scale);
    }
    return _mm256_fmadd_ps(q, scale, min);
  }
}
template <Format F>
inline Lanes Decode(const uint8_t* quants, int half, float d, float m) {
  const __m256 scale = _mm256_set1_ps(d), min = _mm256_set1_ps(m);
  __m128i bytes;
  if constexpr (F == Format::kQ8_0) {
    bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(quants + 16 * half));
  } else {
    bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(quants));
    if (half) bytes = _mm_srli_epi16(bytes, 4);
    bytes = _mm_and_si128(bytes, _mm_set1_epi8(0x0f));
  }
  return {DecodeEight<F>(bytes, scale, min), DecodeEight<F>(_mm_srli_si128(bytes, 8), scale, min)};
}
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
template <Format F>
inline Lanes Decode(const uint8_t* quants, int half, float d, float m) {
  Lanes out;
  for (int64_t l = 0; l < kLanes; ++l) {
    if constexpr (F == Format::kQ8_0) {
      out.v[l] = static_cast<float>(static_cast<int8_t>(quants[16 * half + l])) * d;
    } else {
      const float q = static_cast<float>(half ? quants[l] >> 4 : quants[l] & 0x0f);
      if constexpr (F == Format::kQ4_0) {
        out.v[l] = (q - 8.0f) * d;
      } else {
        out.v[l] = std::fma(q, d, m);
      }
    }
  }
  return out;
}
#endif

// ---- one tile: R rows of x against C output channels ----

struct Problem {
  const float* x;          // [rows, in]
  const uint8_t* quants;   // [out, blocks * quant bytes]
  const uint16_t* scales;  // [out, blocks] float16
  const uint16_t* mins;    // [out, blocks] float16 (Q4_1), else null
  float* y;                // [rows, out]
  int64_t rows, in, out;
};

template <Format F, int R, int C>
void Tile(const Problem& p, int64_t t, int64_t o) {
  constexpr int64_t kQB = kQuantBytes<F>;
  const int64_t blocks = p.in / kBlock, row_bytes = blocks * kQB;
  Lanes acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Zero();
  const float* x = p.x + t * p.in;
  const uint8_t* quants = p.quants + o * row_bytes;
  const uint16_t* scales = p.scales + o * blocks;
  const uint16_t* mins = F == Format::kQ4_1 ? p.mins + o * blocks : nullptr;
  for (int64_t b = 0; b < blocks; ++b) {
#if JAXINFER_PREFETCH > 0
    if ((b * kQB) % 64 == 0) {
      for (int c = 0; c < C; ++c)
        __builtin_prefetch(quants + c * row_bytes + b * kQB + JAXINFER_PREFETCH, 0, 3);
    }
#endif
    float d[C], m[C];
    for (int c = 0; c < C; ++c) {
      d[c] = HalfToFloat(scales[c * blocks + b]);
      m[c] = F == Format::kQ4_1 ? HalfToFloat(mins[c * blocks + b]) : 0.0f;
    }
    for (int half = 0; half < 2; ++half) {
      Lanes weights[C];
      for (int c = 0; c < C; ++c)
        weights[c] = Decode<F>(quants + c * row_bytes + b * kQB, half, d[c], m[c]);
      for (int r = 0; r < R; ++r) {
        Lanes xs = LoadX(x + r * p.in + b * kBlock + half * kLanes);
        for (int c = 0; c < C; ++c) acc[r][c] = Fma(xs, weights[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) p.y[(t + r) * p.out + o + c] = Reduce(acc[r][c]);
}

template <Format F, int R, int C = kTileCols>
void RowTile(const Problem& p, int64_t t, int64_t o_begin, int64_t o_end) {
  int64_t o = o_begin;
  for (; o + C <= o_end; o += C) Tile<F, R, C>(p, t, o);
  for (; o < o_end; ++o) Tile<F, R, 1>(p, t, o);
}

template <Format F>
void Block(const Problem& p, int64_t t_begin, int64_t t_end, int64_t o_begin, int64_t o_end) {
  for (int64_t t = t_begin; t < t_end; t += kTileRows) {
    switch (std::min<int64_t>(kTileRows, t_end - t)) {
      case 1: RowTile<F, 1, kSingleRowCols>(p, t, o_begin, o_end); break;
      case 2: RowTile<F, 2>(p, t, o_begin, o_end); break;
#if defined(__AVX512F__)
      case 3: RowTile<F, 3>(p, t, o_begin, o_end); break;
      case 4: RowTile<F, 4>(p, t, o_begin, o_end); break;
#if JAXINFER_TILE_ROWS > 4
      case 5: RowTile<F, 5>(p, t, o_begin, o_end); break;
      case 6: RowTile<F, 6>(p, t, o_begin, o_end); break;
#endif
#if JAXINFER_TILE_ROWS > 6
      case 7: RowTile<F, 7>(p, t, o_begin, o_end); break;
      case 8: RowTile<F, 8>(p, t, o_begin, o_end); break;
#endif
#endif
    }
  }
}

constexpr int64_t kBlockBytes = 48 * 1024;  // quant bytes of one unit's channel block (L2)
constexpr int64_t kChunkRows = 64;

template <Format F>
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
      Block<F>(problem, t_begin, std::min(problem.rows, t_begin + kChunkRows), o_begin,
               std::min(problem.out, o_begin + channels_per_block));
      finished.fetch_add(1);
    }
  }
};

template <Format F>
ffi::Error Run(ffi::ThreadPool& pool, const Problem& problem, int64_t max_threads) {
  if (problem.rows == 0 || problem.out == 0) return ffi::Error::Success();
  auto work = std::make_shared<Work<F>>();
  work->problem = problem;
  constexpr int64_t kStep = std::max(kTileCols, kSingleRowCols);
  const int64_t row_bytes = problem.in / kBlock * kQuantBytes<F>;
  int64_t per_block = std::max<int64_t>(kBlockBytes / std::max<int64_t>(row_bytes, 1), kStep);
  per_block -= per_block % kStep;
  work->channels_per_block = per_block;
  work->num_channel_blocks = (problem.out + per_block - 1) / per_block;
  work->num_units = work->num_channel_blocks * ((problem.rows + kChunkRows - 1) / kChunkRows);
  int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  if (max_threads > 0) threads = std::min(threads, max_threads);
  const int64_t helpers = std::min(threads, work->num_units) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->finished.load() < work->num_units) std::this_thread::yield();
  return ffi::Error::Success();
}

// Shapes: x [T, in], quants [out, in / 32 * quant bytes], scales (and mins) [out, in / 32].
template <Format F, typename QuantBuffer>
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, QuantBuffer quants,
                  ffi::Buffer<ffi::F16> scales, const uint16_t* mins,
                  ffi::Span<const int64_t> mins_dims, ffi::ResultBuffer<ffi::F32> y,
                  int64_t max_threads) {
  auto x_dims = x.dimensions(), q_dims = quants.dimensions(), s_dims = scales.dimensions();
  if (x_dims.size() != 2 || q_dims.size() != 2 || s_dims.size() != 2) {
    return ffi::Error::InvalidArgument("jaxinfer_gguf_matmul: x [T, in], quants and scales 2-D");
  }
  const int64_t rows = x_dims[0], in = x_dims[1], out = q_dims[0];
  const bool mins_agree =
      F != Format::kQ4_1 || (mins_dims.size() == 2 && mins_dims[0] == out &&
                             mins_dims[1] == in / kBlock);
  if (in % kBlock != 0 || q_dims[1] != in / kBlock * kQuantBytes<F> || s_dims[0] != out ||
      s_dims[1] != in / kBlock || !mins_agree || y->dimensions()[0] != rows ||
      y->dimensions()[1] != out) {
    return ffi::Error::InvalidArgument("jaxinfer_gguf_matmul: shapes do not agree");
  }
  const Problem problem{x.typed_data(),
                        reinterpret_cast<const uint8_t*>(quants.typed_data()),
                        scales.typed_data(),
                        mins,
                        y->typed_data(),
                        rows,
                        in,
                        out};
  return Run<F>(pool, problem, max_threads);
}

ffi::Error Q8_0Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> quants,
                      ffi::Buffer<ffi::F16> scales, ffi::ResultBuffer<ffi::F32> y,
                      int64_t max_threads) {
  return Matmul<Format::kQ8_0>(pool, x, quants, scales, nullptr, {}, y, max_threads);
}

ffi::Error Q4_0Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> quants,
                      ffi::Buffer<ffi::F16> scales, ffi::ResultBuffer<ffi::F32> y,
                      int64_t max_threads) {
  return Matmul<Format::kQ4_0>(pool, x, quants, scales, nullptr, {}, y, max_threads);
}

ffi::Error Q4_1Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> quants,
                      ffi::Buffer<ffi::F16> scales, ffi::Buffer<ffi::F16> mins,
                      ffi::ResultBuffer<ffi::F32> y, int64_t max_threads) {
  return Matmul<Format::kQ4_1>(pool, x, quants, scales, mins.typed_data(), mins.dimensions(), y,
                               max_threads);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferQ8_0Matmul, Q8_0Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferQ4_0Matmul, Q4_0Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferQ4_1Matmul, Q4_1Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("max_threads"));

extern "C" const char* JaxinferGgufMatmulIsa() { return kIsa; }
