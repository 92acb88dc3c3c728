// y[T, out] = x[T, in] @ W^T where W[out, in] is a GGUF weight kept in its blocks (Q8_0, Q4_0 or
// Q4_1: 32 elements; the K-quants Q4_K and Q6_K: 256-element super-blocks): an XLA FFI custom call
// for XLA:CPU (jaxinfer/kernels/gguf_matmul.py builds it on first use with the system compiler and
// registers "jaxinfer_gguf_<type>_matmul").
//
// Why: a GGUF dequantized at load holds 4 bytes per weight; these blocks hold 1.06 (Q8_0), 0.56
// (Q4_0, Q4_K), 0.63 (Q4_1) or 0.82 (Q6_K), and decode reads every weight once per step. The blocks
// arrive split into arrays (jaxinfer/models/gguf_blocks.py): quants [out, in] int8 (Q8_0) or [out, in / 2]
// uint8 (Q4: byte j of a block holds element j in its low nibble and element j + 16 in its high
// nibble, ggml's layout), scales d [out, in / 32] and, for Q4_1, mins m [out, in / 32], float16.
// A K-quant super-block arrives as the same arrays plus its raw sub-block scale bytes
// (jaxinfer/models/gguf_kquants.py says which bytes go where):
//   Q4_K: quants [out, in / 256 * 128] (ggml's nibbles), scales d and mins dmin [out, in / 256]
//         float16, sub_scales [out, in / 256 * 12] uint8: eight 6-bit scales and eight 6-bit mins
//         packed as ggml's get_scale_min_k4 unpacks them, decoded here once per block and channel.
//   Q6_K: quants [out, in / 256 * 192] (128 bytes ql, 64 bytes qh), scales d [out, in / 256]
//         float16, sub_scales [out, in / 256 * 16] int8 (one per 16 elements).
//
// Values: each 16-element group (half a 32-element block) is decoded in registers to the float32 weights ggml
// (and gguf-py's dequantize, and so the dequantize-first path) gives: Q8_0 d * q, Q4_0
// d * (q - 8), Q4_1 d * q + m. d * q is exact in float32 (11 + 8 significant bits), so Q4_1's
// one rounding is the same whether computed as fma(d, q, m) or as gguf-py's (d * q) + m. The
// kernel therefore multiplies bitwise the weights the float path multiplies: only the summation
// order differs.
// The K-quants too: Q4_K's weight is round(D q - M) with D = d sc and M = dmin m exact in float32
// (11 + 6 significant bits) and D q exact (+ 4 bits), so fma(q, D, -M) rounds once like gguf-py's
// (d * sc) * q - dmin * m; Q6_K's d * scale * (q - 32) is exact in any order (11 + 7 + 5 bits), and
// fma(q, D, -0) returns that product, signed zeros included.
//
// Summation order (batch invariance): as in int8_matmul.cc, y[t, o] is accumulated in 16 float
// lanes, lane l holding sum over i = l (mod 16) of x[t, i] * w[o, i] by one fused multiply-add per
// element in increasing i (`in` is a whole number of blocks, so there is no tail; a block is
// decoded 16 consecutive elements, a group, at a time), then the lanes are added in the fixed
// tree (l + 8, + 4, + 2, + 1). That depends on `in` alone: not on T, the row's position, its
// tile or its thread. The AVX-512, AVX2+FMA and plain C++ paths compute that same sequence;
// -ffp-contract=off keeps the compiler from fusing anything on its own.
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
#include <type_traits>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;  // also the elements of one decoded group
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
using Quants16 = __m128i;  // a K-quant group's 16 quants as int8
inline Lanes AffineGroup(Quants16 q, float scale, float offset) {
  return {_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), _mm512_set1_ps(scale),
                          _mm512_set1_ps(offset))};
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
using Quants16 = __m128i;
inline Lanes AffineGroup(Quants16 q, float scale, float offset) {
  const __m256 s = _mm256_set1_ps(scale), b = _mm256_set1_ps(offset);
  return {_mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), s, b),
          _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8))), s, b)};
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
struct Quants16 {
  int8_t v[kLanes];
};
inline Lanes AffineGroup(Quants16 q, float scale, float offset) {
  Lanes out;
  for (int64_t l = 0; l < kLanes; ++l) {
    out.v[l] = std::fma(static_cast<float>(q.v[l]), scale, offset);
  }
  return out;
}
#endif

// ---- K-quant groups: 16 consecutive elements of a 256-element super-block ----

// Group g's 16 quants as int8: Q4_K's nibble (0..15), Q6_K's 6-bit value less 32 (-32..31).
// Q4_K: 32-element sub-block j = g / 2 lies in bytes 32 (j / 2) .. + 31, low nibbles for even j,
// high for odd. Q6_K: half h = g / 8 of the block (128 elements) takes ql bytes 64 h .. + 63
// (element r of the half: byte r % 64, low nibble for r < 64) and qh bytes 128 + 32 h .. + 31
// (element r: byte r % 32, bits 2 (r / 32) and up).
template <Format F>
inline Quants16 GroupQuants(const uint8_t* block, int g) {
#if defined(__AVX2__) && defined(__FMA__)
  const __m128i low4 = _mm_set1_epi8(0x0f);
  if constexpr (F == Format::kQ4_K) {
    const __m128i bytes =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 32 * (g / 4) + 16 * (g % 2)));
    return _mm_and_si128(_mm_srl_epi16(bytes, _mm_cvtsi32_si128(4 * ((g / 2) % 2))), low4);
  } else {
    const int h = g / 8, r = g % 8;
    __m128i ql = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 64 * h + 16 * (r % 4)));
    __m128i qh =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 128 + 32 * h + 16 * (r % 2)));
    ql = _mm_and_si128(_mm_srl_epi16(ql, _mm_cvtsi32_si128(4 * (r / 4))), low4);
    qh = _mm_and_si128(_mm_srl_epi16(qh, _mm_cvtsi32_si128(2 * (r / 2))), _mm_set1_epi8(0x03));
    // qh holds 2 bits per byte: shifting the 16-bit lanes by 4 moves nothing across bytes.
    return _mm_sub_epi8(_mm_or_si128(ql, _mm_slli_epi16(qh, 4)), _mm_set1_epi8(32));
  }
#else
  Quants16 out;
  for (int64_t l = 0; l < kLanes; ++l) {
    if constexpr (F == Format::kQ4_K) {
      const int byte = block[32 * (g / 4) + 16 * (g % 2) + l];
      out.v[l] = static_cast<int8_t>((byte >> (4 * ((g / 2) % 2))) & 0x0f);
    } else {
      const int h = g / 8, r = g % 8;
      const int ql = (block[64 * h + 16 * (r % 4) + l] >> (4 * (r / 4))) & 0x0f;
      const int qh = (block[128 + 32 * h + 16 * (r % 2) + l] >> (2 * (r / 2))) & 0x03;
      out.v[l] = static_cast<int8_t>((ql | (qh << 4)) - 32);
    }
  }
  return out;
#endif
}

// What one block's header decodes to, once per block and output channel.
struct BlockScales {  // Q8_0, Q4_0, Q4_1: d (and m)
  float d, m;
};
struct GroupScales {  // K-quants: group g's weights are fma(q, scale, offset) (see DecodeGroup)
  float scale[16];  // Q4_K: d sc[j] for sub-block j = g / 2; Q6_K: d scale[g]
  float offset[8];  // Q4_K: -dmin m[j]; Q6_K: unused (-0)
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
    // ggml's get_scale_min_k4: bytes 0..3 hold scales 0..3 (low 6 bits), 4..7 mins 0..3; bytes
    // 8..11 the low 4 bits of scales 4..7 and, high nibble, of mins 4..7, whose top 2 bits are
    // the top bits of bytes 0..3 (scales) and 4..7 (mins). Four bytes at a time, as ggml unpacks
    // them (little-endian words: byte k of a word is byte k of the block).
    uint32_t low, high, rest;
    const uint8_t* s = p.sub_scales + at * kSubScaleBytes<F>;
    std::memcpy(&low, s, 4);
    std::memcpy(&high, s + 4, 4);
    std::memcpy(&rest, s + 8, 4);
    const uint32_t words[4] = {low & 0x3f3f3f3fu,
                               (rest & 0x0f0f0f0fu) | ((low >> 2) & 0x30303030u),
                               high & 0x3f3f3f3fu,
                               ((rest >> 4) & 0x0f0f0f0fu) | ((high >> 2) & 0x30303030u)};
    GroupScales out;  // the same products either way: one float32 rounding each (exact here)
#if defined(__AVX2__) && defined(__FMA__)
    const __m128i sc_mn = _mm_set_epi32(static_cast<int>(words[3]), static_cast<int>(words[2]),
                                        static_cast<int>(words[1]), static_cast<int>(words[0]));
    const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc_mn));
    const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sc_mn, 8)));
    _mm256_storeu_ps(out.scale, _mm256_mul_ps(sc, _mm256_set1_ps(d)));
    const __m256 sign = _mm256_set1_ps(-0.0f);  // negation: flip the sign bit, exactly
    _mm256_storeu_ps(out.offset, _mm256_xor_ps(_mm256_mul_ps(mn, _mm256_set1_ps(m)), sign));
#else
    uint8_t sc_mn[16];  // sc[0..7], m[0..7]
    std::memcpy(sc_mn, words, 16);
    for (int j = 0; j < 8; ++j) {
      out.scale[j] = d * static_cast<float>(sc_mn[j]);
      out.offset[j] = -(m * static_cast<float>(sc_mn[8 + j]));
    }
#endif
    return out;
  } else if constexpr (F == Format::kQ6_K) {
    const auto* s = reinterpret_cast<const int8_t*>(p.sub_scales + at * kSubScaleBytes<F>);
    GroupScales out;
#if defined(__AVX2__) && defined(__FMA__)
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
    const __m256 scale = _mm256_set1_ps(d);
    _mm256_storeu_ps(out.scale,
                     _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), scale));
    _mm256_storeu_ps(out.scale + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                      _mm_srli_si128(bytes, 8))),
                                                  scale));
#else
    for (int g = 0; g < 16; ++g) out.scale[g] = d * static_cast<float>(s[g]);
#endif
    return out;
  } else {
    return {d, m};
  }
}

template <Format F>
inline Lanes DecodeGroup(const uint8_t* block, int g, const Header<F>& h) {
  if constexpr (F == Format::kQ4_K) {
    return AffineGroup(GroupQuants<F>(block, g), h.scale[g / 2], h.offset[g / 2]);
  } else if constexpr (F == Format::kQ6_K) {
    return AffineGroup(GroupQuants<F>(block, g), h.scale[g], -0.0f);  // x + -0 == x, +0 too
  } else {
    return Decode<F>(block, g, h.d, h.m);
  }
}

template <Format F, int R, int C>
void Tile(const Problem& p, int64_t t, int64_t o) {
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
      for (int64_t line = 0; line < kQB; line += 64) {
        for (int c = 0; c < C; ++c)
          __builtin_prefetch(quants + c * row_bytes + b * kQB + line + JAXINFER_PREFETCH, 0, 3);
      }
    } else if ((b * kQB) % 64 == 0) {
      for (int c = 0; c < C; ++c)
        __builtin_prefetch(quants + c * row_bytes + b * kQB + JAXINFER_PREFETCH, 0, 3);
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
  const int64_t row_bytes = problem.in / kBlockElements<F> * kQuantBytes<F>;
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
  return Run<F>(pool, problem, max_threads);
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
