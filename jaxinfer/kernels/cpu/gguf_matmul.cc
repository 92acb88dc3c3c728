// y[T, out] = x[T, in] @ W^T where W[out, in] is a GGUF weight kept in its blocks (Q8_0, Q4_0 or
// Q4_1: 32 elements; the K-quants Q4_K and Q6_K: 256-element super-blocks): an XLA FFI custom call
// for XLA:CPU (jaxinfer/kernels/gguf_matmul.py builds it on first use with the system compiler and
// registers "jaxinfer_gguf_<type>_matmul").
//
// Why: a GGUF dequantized at load holds 4 bytes per weight; these blocks hold 1.06 (Q8_0), 0.56
// (Q4_0, Q4_K), 0.63 (Q4_1) or 0.82 (Q6_K), and decode reads every weight once per step. The
// blocks arrive split into arrays (jaxinfer/models/gguf_blocks.py): quants [out, in] int8 (Q8_0)
// or [out, in / 2] uint8 (Q4: byte j of a block holds element j in its low nibble and element
// j + 16 in its high nibble, ggml's layout), scales d [out, in / 32] and, for Q4_1, mins m
// [out, in / 32], float16.
// A K-quant super-block arrives as the same arrays plus its raw sub-block scale bytes
// (jaxinfer/models/gguf_kquants.py says which bytes go where):
//   Q4_K: quants [out, in / 256 * 128] (ggml's nibbles), scales d and mins dmin [out, in / 256]
//         float16, sub_scales [out, in / 256 * 12] uint8: eight 6-bit scales and eight 6-bit mins
//         packed as ggml's get_scale_min_k4 unpacks them, decoded once per block and channel
//         (gguf_kquants.h).
//   Q6_K: quants [out, in / 256 * 192] (128 bytes ql, 64 bytes qh), scales d [out, in / 256]
//         float16, sub_scales [out, in / 256 * 16] int8 (one per 16 elements).
//
// Values: each 16-element group (half a 32-element block) is decoded in registers to the float32
// weights ggml (and gguf-py's dequantize, and so the dequantize-first path) gives: Q8_0 d * q, Q4_0
// d * (q - 8), Q4_1 d * q + m. d * q is exact in float32 (11 + 8 significant bits), so Q4_1's
// one rounding is the same whether computed as fma(d, q, m) or as gguf-py's (d * q) + m. The
// kernel therefore multiplies bitwise the weights the float path multiplies: only the summation
// order differs.
// The K-quants too: Q4_K's weight is round(D q - M) with D = d sc and M = dmin m exact in float32
// (11 + 6 significant bits) and D q exact (+ 4 bits), so fma(q, D, -M) rounds once like gguf-py's
// (d * sc) * q - dmin * m; Q6_K's d * scale * (q - 32) is exact in any order (11 + 7 + 5 bits), and
// fma(q, D, -0) returns that product, signed zeros included.
//
// Summation order (batch invariance): lanes.h's, as in int8_matmul.cc: 16 float lanes of one
// fused multiply-add per element in increasing i (`in` is a whole number of blocks, so there is
// no tail; a block is decoded 16 consecutive elements, a group, at a time) added in a fixed tree.
// That depends on `in` alone: not on T, the row's position, its tile or its thread (tiles.h). The
// AVX-512, AVX2+FMA and plain C++ decoders here and in gguf_kquants.h give the same weights, so
// every build gives the same bits.
//
// Threads: tiles.h hands blocks of output channels to the calling thread and to tasks on XLA's
// intra-op pool, as for int8_matmul.cc.

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gguf_kquants.h"
#include "lanes.h"
#include "tiles.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#ifndef JAXINFER_PREFETCH
#define JAXINFER_PREFETCH 4096
#endif

enum class Format { kQ8_0, kQ4_0, kQ4_1, kQ4_K, kQ6_K };

template <Format F>
constexpr bool kIsK = F == Format::kQ4_K || F == Format::kQ6_K;
template <Format F>
constexpr int64_t kBlockElements = kIsK<F> ? 256 : 32;
template <Format F>
constexpr int64_t kGroups = kBlockElements<F> / kLanes;  // 16-element groups per block
template <Format F>  // quant bytes per block
constexpr int64_t kQuantBytes = F == Format::kQ8_0   ? 32
                                : F == Format::kQ4_K ? 128
                                : F == Format::kQ6_K ? 192
                                                     : 16;
template <Format F>  // sub-block scale bytes per block (K-quants)
constexpr int64_t kSubScaleBytes = F == Format::kQ4_K ? 12 : F == Format::kQ6_K ? 16 : 0;
template <Format F>  // a float16 min (Q4_1's m, Q4_K's dmin) per block
constexpr bool kHasMins = F == Format::kQ4_1 || F == Format::kQ4_K;

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

// ---- the decoding of one half block (Q8_0, Q4_0, Q4_1), per instruction set ----

// Half `half` (0: elements 0..15, 1: 16..31) of one block as 16 float32 weights.
#if defined(__AVX512F__)
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

// What one block's header decodes to, once per block and output channel.
struct BlockScales {  // Q8_0, Q4_0, Q4_1: d (and m); the K-quants: gguf_kquants.h's GroupScales
  float d, m;
};
template <Format F>
using Header = std::conditional_t<kIsK<F>, GroupScales, BlockScales>;

// ---- one tile: R rows of x against C output channels ----

struct Problem {
  const float* x;             // [rows, in]
  const uint8_t* quants;      // [out, blocks * quant bytes]
  const uint16_t* scales;     // [out, blocks] float16
  const uint16_t* mins;       // [out, blocks] float16 (Q4_1, Q4_K), else null
  const uint8_t* sub_scales;  // [out, blocks * sub-scale bytes] (Q4_K, Q6_K), else null
  float* y;                   // [rows, out]
  int64_t rows, in, out;
};

// Block b of output channel o: d (and m), or a K-quant's per-group scale and offset, which
// multiply out exactly in float32 (see the top of the file).
template <Format F>
inline Header<F> ReadHeader(const Problem& p, int64_t o, int64_t b) {
  const int64_t at = o * (p.in / kBlockElements<F>) + b;
  const float d = HalfToFloat(p.scales[at]);
  const float m = kHasMins<F> ? HalfToFloat(p.mins[at]) : 0.0f;
  if constexpr (F == Format::kQ4_K) {
    return Q4KGroupScales(p.sub_scales + at * kSubScaleBytes<F>, d, m);
  } else if constexpr (F == Format::kQ6_K) {
    const uint8_t* s = p.sub_scales + at * kSubScaleBytes<F>;
    return Q6KGroupScales(reinterpret_cast<const int8_t*>(s), d);
  } else {
    return {d, m};
  }
}

template <Format F>
inline Lanes DecodeGroup(const uint8_t* block, int g, const Header<F>& h) {
  if constexpr (F == Format::kQ4_K) {
    return AffineGroup(Q4KGroupQuants(block, g), h.scale[g / 2], h.offset[g / 2]);
  } else if constexpr (F == Format::kQ6_K) {
    return AffineGroup(Q6KGroupQuants(block, g), h.scale[g], -0.0f);  // x + -0 == x, +0 too
  } else {
    return Decode<F>(block, g, h.d, h.m);
  }
}

template <Format F>
struct Kernel {  // the kernel tiles.h runs: a column unit is one output channel
  static constexpr int kTileRows = ::kTileRows, kTileCols = ::kTileCols;
  static constexpr int kSingleRowCols = ::kSingleRowCols;
  Problem problem;

  template <int R, int C>
  void Tile(int64_t t, int64_t o) const;
};

template <Format F>
template <int R, int C>
void Kernel<F>::Tile(int64_t t, int64_t o) const {
  const Problem& p = problem;
  constexpr int64_t kQB = kQuantBytes<F>, kElements = kBlockElements<F>;
  const int64_t blocks = p.in / kElements, row_bytes = blocks * kQB;
  Lanes acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Zero();
  const float* x = p.x + t * p.in;
  const uint8_t* quants = p.quants + o * row_bytes;
  for (int64_t b = 0; b < blocks; ++b) {
#if JAXINFER_PREFETCH > 0
    // One prefetch per 64-byte line of quants: a K-quant block's 2 or 3 lines, else at the
    // blocks that start a line.
    if constexpr (kQB >= 64) {
      for (int64_t line = 0; line < kQB; line += 64)
        PrefetchRows<C>(quants + b * kQB + line, row_bytes, JAXINFER_PREFETCH);
    } else if ((b * kQB) % 64 == 0) {
      PrefetchRows<C>(quants + b * kQB, row_bytes, JAXINFER_PREFETCH);
    }
#endif
    Header<F> header[C];
    for (int c = 0; c < C; ++c) header[c] = ReadHeader<F>(p, o + c, b);
#pragma GCC unroll 16
    for (int g = 0; g < kGroups<F>; ++g) {
      Lanes weights[C];
      for (int c = 0; c < C; ++c)
        weights[c] = DecodeGroup<F>(quants + c * row_bytes + b * kQB, g, header[c]);
      for (int r = 0; r < R; ++r) {
        Lanes xs = LoadX(x + r * p.in + b * kElements + g * kLanes);
        for (int c = 0; c < C; ++c) acc[r][c] = Fma(xs, weights[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) p.y[(t + r) * p.out + o + c] = Reduce(acc[r][c]);
}

// Shapes, with n = in / block elements: x [T, in], quants [out, n * quant bytes], scales (and
// mins) [out, n], sub_scales [out, n * sub-scale bytes].
template <Format F, typename QuantBuffer>
ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, QuantBuffer quants,
                  ffi::Buffer<ffi::F16> scales, const uint16_t* mins,
                  ffi::Span<const int64_t> mins_dims, const uint8_t* sub_scales,
                  ffi::Span<const int64_t> sub_dims, ffi::ResultBuffer<ffi::F32> y,
                  int64_t max_threads) {
  auto x_dims = x.dimensions(), q_dims = quants.dimensions(), s_dims = scales.dimensions();
  if (x_dims.size() != 2 || q_dims.size() != 2 || s_dims.size() != 2) {
    return ffi::Error::InvalidArgument("jaxinfer_gguf_matmul: x [T, in], quants and scales 2-D");
  }
  const int64_t rows = x_dims[0], in = x_dims[1], out = q_dims[0];
  const int64_t blocks = in / kBlockElements<F>;
  const bool mins_agree = !kHasMins<F> || (mins_dims.size() == 2 && mins_dims[0] == out &&
                                           mins_dims[1] == blocks);
  const bool subs_agree = !kIsK<F> || (sub_dims.size() == 2 && sub_dims[0] == out &&
                                       sub_dims[1] == blocks * kSubScaleBytes<F>);
  if (in % kBlockElements<F> != 0 || q_dims[1] != blocks * kQuantBytes<F> || s_dims[0] != out ||
      s_dims[1] != blocks || !mins_agree || !subs_agree || y->dimensions()[0] != rows ||
      y->dimensions()[1] != out) {
    return ffi::Error::InvalidArgument("jaxinfer_gguf_matmul: shapes do not agree");
  }
  const Problem problem{x.typed_data(),
                        reinterpret_cast<const uint8_t*>(quants.typed_data()),
                        scales.typed_data(),
                        mins,
                        sub_scales,
                        y->typed_data(),
                        rows,
                        in,
                        out};
  RunTiles(pool, Kernel<F>{problem}, rows, out, blocks * kQuantBytes<F>, max_threads);
  return ffi::Error::Success();
}

ffi::Error Q8_0Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> quants,
                      ffi::Buffer<ffi::F16> scales, ffi::ResultBuffer<ffi::F32> y,
                      int64_t max_threads) {
  return Matmul<Format::kQ8_0>(pool, x, quants, scales, nullptr, {}, nullptr, {}, y, max_threads);
}

ffi::Error Q4_0Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> quants,
                      ffi::Buffer<ffi::F16> scales, ffi::ResultBuffer<ffi::F32> y,
                      int64_t max_threads) {
  return Matmul<Format::kQ4_0>(pool, x, quants, scales, nullptr, {}, nullptr, {}, y, max_threads);
}

ffi::Error Q4_1Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> quants,
                      ffi::Buffer<ffi::F16> scales, ffi::Buffer<ffi::F16> mins,
                      ffi::ResultBuffer<ffi::F32> y, int64_t max_threads) {
  return Matmul<Format::kQ4_1>(pool, x, quants, scales, mins.typed_data(), mins.dimensions(),
                               nullptr, {}, y, max_threads);
}

ffi::Error Q4_KMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> quants,
                      ffi::Buffer<ffi::F16> scales, ffi::Buffer<ffi::F16> mins,
                      ffi::Buffer<ffi::U8> sub_scales, ffi::ResultBuffer<ffi::F32> y,
                      int64_t max_threads) {
  return Matmul<Format::kQ4_K>(pool, x, quants, scales, mins.typed_data(), mins.dimensions(),
                               sub_scales.typed_data(), sub_scales.dimensions(), y, max_threads);
}

ffi::Error Q6_KMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> quants,
                      ffi::Buffer<ffi::F16> scales, ffi::Buffer<ffi::S8> sub_scales,
                      ffi::ResultBuffer<ffi::F32> y, int64_t max_threads) {
  return Matmul<Format::kQ6_K>(pool, x, quants, scales, nullptr, {},
                               reinterpret_cast<const uint8_t*>(sub_scales.typed_data()),
                               sub_scales.dimensions(), y, max_threads);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferQ4_KMatmul, Q4_KMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("max_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferQ6_KMatmul, Q6_KMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("max_threads"));

extern "C" const char* JaxinferGgufMatmulIsa() { return kIsa; }
