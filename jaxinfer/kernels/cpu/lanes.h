// 16 float lanes, one implementation per instruction set (AVX-512, AVX2+FMA, plain C++), shared
// by the CPU kernels (int8_matmul.cc, gguf_matmul.cc, paged_attention.cc). Each kernel adds its
// own loads of weights into Lanes; this file holds what their summation orders rest on: Fma is
// one fused multiply-add per lane, Mul one product, Broadcast and Store exact, and Reduce adds 16
// lanes in a fixed tree (l + 8, then + 4, + 2, + 1). The GGUF kernel accumulates an output y[t, o]
// across the 16 lanes (lane l holding i = l (mod 16), in increasing i) and then Reduces; the int8
// kernel gives each output a lane of its own (cpu/int8_matmul.cc). The three implementations
// below compute the same sequences, so a build for any of them gives the same bits; the build
// uses -ffp-contract=off so that the compiler fuses nothing on its own.
//
// Also here: the tile shape each instruction set's register file suits for a kernel whose tiles
// hold 16-lane accumulators per output (tiles.h runs the tiles).
// The kernels' build (kernels/native_build.py) hashes every header in this folder with the source.
//
// Internal linkage (an unnamed namespace), as when this lived in each source: every header here
// is included by one translation unit per library, and the library exports only its FFI symbols.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 16;

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
// not measure faster for int8 rows (before the int8 kernel took panels), nor 6 x 3, 6 x 2 and
// 8 x 2 for the GGUF blocks at 16 and 64 rows (the loaded 2-core CPU). A lone row (decode at
// batch 1) takes 8 channels: more weight rows in flight.
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
inline Lanes Broadcast(float x) { return {_mm512_set1_ps(x)}; }
inline Lanes Fma(Lanes x, Lanes w, Lanes acc) { return {_mm512_fmadd_ps(x.v, w.v, acc.v)}; }
inline Lanes Mul(Lanes a, Lanes b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline void Store(Lanes a, float* p) { _mm512_storeu_ps(p, a.v); }
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
inline Lanes Broadcast(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline Lanes Fma(Lanes x, Lanes w, Lanes acc) {
  return {_mm256_fmadd_ps(x.low, w.low, acc.low), _mm256_fmadd_ps(x.high, w.high, acc.high)};
}
inline Lanes Mul(Lanes a, Lanes b) {
  return {_mm256_mul_ps(a.low, b.low), _mm256_mul_ps(a.high, b.high)};
}
inline void Store(Lanes a, float* p) {
  _mm256_storeu_ps(p, a.low);
  _mm256_storeu_ps(p + 8, a.high);
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
inline Lanes Broadcast(float x) {
  Lanes out;
  for (int64_t l = 0; l < kLanes; ++l) out.v[l] = x;
  return out;
}
inline Lanes Fma(Lanes x, Lanes w, Lanes acc) {
  for (int64_t l = 0; l < kLanes; ++l) acc.v[l] = std::fma(x.v[l], w.v[l], acc.v[l]);
  return acc;
}
inline Lanes Mul(Lanes a, Lanes b) {
  for (int64_t l = 0; l < kLanes; ++l) a.v[l] *= b.v[l];
  return a;
}
inline void Store(Lanes a, float* p) { std::memcpy(p, a.v, sizeof(a.v)); }
inline float Reduce(Lanes a) {
  float s8[8], s4[4], s2[2];
  for (int l = 0; l < 8; ++l) s8[l] = a.v[l] + a.v[l + 8];
  for (int l = 0; l < 4; ++l) s4[l] = s8[l] + s8[l + 4];
  for (int l = 0; l < 2; ++l) s2[l] = s4[l] + s4[l + 2];
  return s2[0] + s2[1];
}
#endif

// Prefetches the 64-byte line `ahead` bytes past `at` in each of C rows `row_bytes` apart (the
// weight rows of one tile's channels).
template <int C>
inline void PrefetchRows(const void* at, int64_t row_bytes, int64_t ahead) {
  const char* first = static_cast<const char*>(at) + ahead;
  for (int c = 0; c < C; ++c) __builtin_prefetch(first + c * row_bytes, 0, 3);
}

}  // namespace
