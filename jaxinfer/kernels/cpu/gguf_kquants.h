// The GGUF K-quants' decoders for gguf_matmul.cc: a 256-element super-block of Q4_K or Q6_K is
// decoded one group of 16 consecutive elements at a time into lanes.h's 16 float lanes. Which
// bytes hold what: jaxinfer/models/gguf_kquants.py; why the values are bitwise gguf-py's: the top
// of gguf_matmul.cc. AVX2 (and AVX-512 builds, which have it) use vector code, else plain C++;
// both give the same bits.

#pragma once

#include <cstdint>
#include <cstring>

#include "lanes.h"

namespace {

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
using Quants16 = __m128i;  // a K-quant group's 16 quants as int8
#else
struct Quants16 {
  int8_t v[kLanes];
};
#endif

// The group's 16 weights: fma(q, scale, offset) per element, one rounding (exact for Q6_K).
#if defined(__AVX512F__)
inline Lanes AffineGroup(Quants16 q, float scale, float offset) {
  return {_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), _mm512_set1_ps(scale),
                          _mm512_set1_ps(offset))};
}
#elif defined(__AVX2__) && defined(__FMA__)
inline Lanes AffineGroup(Quants16 q, float scale, float offset) {
  const __m256 s = _mm256_set1_ps(scale), b = _mm256_set1_ps(offset);
  return {_mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), s, b),
          _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8))), s, b)};
}
#else
inline Lanes AffineGroup(Quants16 q, float scale, float offset) {
  Lanes out;
  for (int64_t l = 0; l < kLanes; ++l) {
    out.v[l] = std::fma(static_cast<float>(q.v[l]), scale, offset);
  }
  return out;
}
#endif

// ---- group g's 16 quants as int8 ----

// Q4_K's nibble (0..15): 32-element sub-block j = g / 2 lies in bytes 32 (j / 2) .. + 31, low
// nibbles for even j, high for odd.
inline Quants16 Q4KGroupQuants(const uint8_t* block, int g) {
#if defined(__AVX2__) && defined(__FMA__)
  const __m128i low4 = _mm_set1_epi8(0x0f);
  const __m128i bytes =
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 32 * (g / 4) + 16 * (g % 2)));
  return _mm_and_si128(_mm_srl_epi16(bytes, _mm_cvtsi32_si128(4 * ((g / 2) % 2))), low4);
#else
  Quants16 out;
  for (int64_t l = 0; l < kLanes; ++l) {
    const int byte = block[32 * (g / 4) + 16 * (g % 2) + l];
    out.v[l] = static_cast<int8_t>((byte >> (4 * ((g / 2) % 2))) & 0x0f);
  }
  return out;
#endif
}

// Q6_K's 6-bit value less 32 (-32..31): half h = g / 8 of the block (128 elements) takes ql bytes
// 64 h .. + 63 (element r of the half: byte r % 64, low nibble for r < 64) and qh bytes
// 128 + 32 h .. + 31 (element r: byte r % 32, bits 2 (r / 32) and up).
inline Quants16 Q6KGroupQuants(const uint8_t* block, int g) {
  const int h = g / 8, r = g % 8;
#if defined(__AVX2__) && defined(__FMA__)
  const __m128i low4 = _mm_set1_epi8(0x0f);
  __m128i ql = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 64 * h + 16 * (r % 4)));
  __m128i qh =
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 128 + 32 * h + 16 * (r % 2)));
  ql = _mm_and_si128(_mm_srl_epi16(ql, _mm_cvtsi32_si128(4 * (r / 4))), low4);
  qh = _mm_and_si128(_mm_srl_epi16(qh, _mm_cvtsi32_si128(2 * (r / 2))), _mm_set1_epi8(0x03));
  // qh holds 2 bits per byte: shifting the 16-bit lanes by 4 moves nothing across bytes.
  return _mm_sub_epi8(_mm_or_si128(ql, _mm_slli_epi16(qh, 4)), _mm_set1_epi8(32));
#else
  Quants16 out;
  for (int64_t l = 0; l < kLanes; ++l) {
    const int ql = (block[64 * h + 16 * (r % 4) + l] >> (4 * (r / 4))) & 0x0f;
    const int qh = (block[128 + 32 * h + 16 * (r % 2) + l] >> (2 * (r / 2))) & 0x03;
    out.v[l] = static_cast<int8_t>((ql | (qh << 4)) - 32);
  }
  return out;
#endif
}

// ---- a super-block's sub-block scales, decoded once per block and output channel ----

struct GroupScales {  // group g's weights are fma(q, scale, offset) (see DecodeGroup)
  float scale[16];  // Q4_K: d sc[j] for sub-block j = g / 2; Q6_K: d scale[g]
  float offset[8];  // Q4_K: -dmin m[j]; Q6_K: unused (-0)
};

// Q4_K, from its 12 sub-scale bytes `s` and the block's d and dmin (`m`). D = d sc and M = dmin m
// are exact in float32 (11 + 6 significant bits).
inline GroupScales Q4KGroupScales(const uint8_t* s, float d, float m) {
  // ggml's get_scale_min_k4: bytes 0..3 hold scales 0..3 (low 6 bits), 4..7 mins 0..3; bytes
  // 8..11 the low 4 bits of scales 4..7 and, high nibble, of mins 4..7, whose top 2 bits are
  // the top bits of bytes 0..3 (scales) and 4..7 (mins). Four bytes at a time, as ggml unpacks
  // them (little-endian words: byte k of a word is byte k of the block).
  uint32_t low, high, rest;
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
}

// Q6_K, from its 16 int8 sub-scales `s` (one per group) and the block's d.
inline GroupScales Q6KGroupScales(const int8_t* s, float d) {
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
}

}  // namespace
