// Paged attention on XLA:CPU, reading the cache blocks in place through the block table: an XLA
// FFI custom call (jaxinfer/kernels/paged_attention_cpu.py builds it on first use and registers
// "jaxinfer_paged_attention_f32" / "..._bf16" / "..._f8e4m3" / "..._f8e5m2", one per cache dtype). It computes what
// pallas_kernels/reference.py::paged_attention does, for decode rows (row s owns exactly token s)
// and for ragged prefill chunks alike.
//
// Why a kernel: the jnp reference gathers the context in 128-position chunks into float32 copies
// [K, S, C, D] and runs every sequence as far as the longest context in the step; attention was
// about half of a batched SmolLM2 decode step on the 2-core CPU (benchmarks/RESULTS.md). For a
// prefill step it scores every token against every token of the step and masks ([T, T] per
// head: 4 prompts of 128 tokens in a 512-token step do 8x the causal work, and a third of an
// int8 SmolLM2 prefill step went there). Here each (token, kv head) work item reads its own
// sequence's keys only, stops at its own position (and starts at its sliding window), and keeps
// the softmax state of its G query heads in L1.
//
// Shapes (the reference's legend): q [T, H, D], k_new / v_new [T, K, D] float32; k_cache / v_cache
// [K, N, P, D] float32, bfloat16 or 8-bit float (e4m3fn, e5m2); block_tables [S, B], context_lens [S] (tokens after this step,
// the new ones included), query_start_loc [S + 1] int32; out [T, H, D] float32, H = K * G. Token t
// belongs to the sequence s with query_start_loc[s] <= t < query_start_loc[s + 1] (the handler
// maps them once per call); tokens past query_start_loc[S] are padding.
//
// One work item (t, kh): the G query heads kh * G .. kh * G + G - 1 of token t, pre-scaled by
// `scale`, score the token itself (always visible) first, then the cached positions
// lo .. cached - 1 block by block (cached = context_lens[s] - q_len; with a sliding window
// lo = position - window + 1, else 0), then the step's earlier tokens of its sequence, P at a
// time (none for a decode row, whose result is therefore what it was when the kernel took decode
// rows only). The heads go in groups of up to four, whose partial sums stay in
// registers while each key and value row is loaded once for the group. Scores: one lane-wise
// fused multiply-add per element over D (lanes.h's order, the tail of D zero padded), Reduce,
// then soft_cap * tanh(score / soft_cap) if asked. Online softmax per block: the new max over the
// block, one rescale of the running sum and output by Exp(old max - new max), the block's weights
// Exp(score - max) 16 at a time (Exp below: Cephes' polynomial, within 1 ulp), their sum in
// position order, then the weighted V rows added position by position. While a block is scored,
// the next block's rows are prefetched (blocks are scattered; the hardware prefetcher stops at a
// page). Padding tokens write zeros and read nothing, so NaN there does not leak; nor do cache
// slots outside [lo, cached), which are never read. The order of every operation depends on the
// item alone and each helper below is one IEEE operation per lane, so the AVX-512, AVX2 and plain
// C++ builds give the same bits, and a token's result does not depend on the other sequences of
// the step or on the threads.
//
// Threads: tiles.h's RunTiles over one "row" of T * K "channels" (the work items), with a nominal
// row size of a whole channel block so that each unit of work is one tile of kSingleRowCols items
// (8 with AVX-512): 6 units for both cores at T = 16 (SmolLM2 has K = 3), handed out through its
// atomic counter, which also evens out ragged context lengths.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "lanes.h"
#include "tiles.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---- 8-bit float caches (EngineConfig.kv_cache_dtype "fp8" = e4m3fn, "fp8_e5m2"): one byte per
// element, widened exactly to float32 by integer arithmetic on 16 lanes, the same in the three
// builds: the sign moves to bit 31; a normal number's exponent and mantissa bits move up to
// float32's places and the exponent is rebiased; a subnormal one (exponent field 0) is its
// mantissa times 2^(1 - bias - mantissa bits), exact in float32; e4m3fn's 0x7f is NaN (it has no
// infinity), e5m2's all-ones exponent is infinity or NaN as in IEEE. (A 256-entry table gathered
// per lane did the same 1.3-2.5x slower than the float32 cache's loads.) ----
struct Fp8E4M3 {  // sign, 4 exponent bits (bias 7), 3 mantissa bits
  uint8_t bits;
  static constexpr int kMantissa = 3, kBias = 7;
  static constexpr bool kIeeeSpecials = false;
};
struct Fp8E5M2 {  // sign, 5 exponent bits (bias 15), 2 mantissa bits
  uint8_t bits;
  static constexpr int kMantissa = 2, kBias = 15;
  static constexpr bool kIeeeSpecials = true;
};

template <typename F>
inline float WidenScalar(uint8_t x) {
  constexpr int M = F::kMantissa;
  const uint32_t mag = x & 0x7fu, sign = static_cast<uint32_t>(x & 0x80u) << 24;
  uint32_t bits;
  if (mag < (1u << M)) {  // subnormal or zero: mantissa x 2^(1 - bias - M), exact
    const float sub = static_cast<float>(mag) * std::ldexp(1.0f, 1 - F::kBias - M);
    std::memcpy(&bits, &sub, sizeof(bits));
  } else {
    bits = (mag << (23 - M)) + (static_cast<uint32_t>(127 - F::kBias) << 23);
  }
  if (F::kIeeeSpecials && mag >= 0x7cu) bits = 0x7f800000u | ((mag & 3u) << 21);
  if (!F::kIeeeSpecials && mag == 0x7fu) bits = 0x7fc00000u;
  bits |= sign;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// ---- what this kernel adds to lanes.h: element-wise arithmetic, exp, and loads of a cache row.
// Each is one IEEE operation per lane (or an exact conversion), the same in the three
// implementations, so Exp below gives the same bits everywhere. ----
#if defined(__AVX512F__)
inline Lanes Add(Lanes a, Lanes b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Lanes Max(Lanes a, Lanes b) { return {_mm512_max_ps(a.v, b.v)}; }
inline Lanes Min(Lanes a, Lanes b) { return {_mm512_min_ps(a.v, b.v)}; }
inline Lanes RoundToEven(Lanes a) {
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline Lanes TwoTo(Lanes n) {  // 2^n for whole n in [-126, 127]: the exponent bits
  __m512i biased = _mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127));
  __m512i bits = _mm512_slli_epi32(biased, 23);
  return {_mm512_castsi512_ps(bits)};
}
inline Lanes LoadCache(const float* p) { return LoadX(p); }
inline Lanes LoadCache(const uint16_t* p) {  // 16 bfloat16 -> float32 (exact: a 16-bit shift)
  __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16))};
}
template <typename F>
inline Lanes LoadFp8(const F* p) {  // 16 bytes -> 16 floats (WidenScalar's arithmetic)
  constexpr int M = F::kMantissa;
  const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i mag = _mm512_and_si512(x, _mm512_set1_epi32(0x7f));
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x80)), 24);
  const __m512i normal =
      _mm512_add_epi32(_mm512_slli_epi32(mag, 23 - M), _mm512_set1_epi32((127 - F::kBias) << 23));
  const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(mag),
                                   _mm512_set1_ps(std::ldexp(1.0f, 1 - F::kBias - M)));
  __m512i bits = _mm512_mask_blend_epi32(_mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(1 << M)),
                                         normal, _mm512_castps_si512(sub));
  if constexpr (F::kIeeeSpecials) {
    const __m512i special = _mm512_or_si512(_mm512_set1_epi32(0x7f800000),
                                            _mm512_slli_epi32(_mm512_and_si512(mag, _mm512_set1_epi32(3)), 21));
    bits = _mm512_mask_blend_epi32(_mm512_cmpge_epi32_mask(mag, _mm512_set1_epi32(0x7c)), bits,
                                   special);
  } else {
    bits = _mm512_mask_blend_epi32(_mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7f)), bits,
                                   _mm512_set1_epi32(0x7fc00000));
  }
  return {_mm512_castsi512_ps(_mm512_or_si512(bits, sign))};
}
#elif defined(__AVX2__) && defined(__FMA__)
inline Lanes Add(Lanes a, Lanes b) {
  return {_mm256_add_ps(a.low, b.low), _mm256_add_ps(a.high, b.high)};
}
inline Lanes Max(Lanes a, Lanes b) {
  return {_mm256_max_ps(a.low, b.low), _mm256_max_ps(a.high, b.high)};
}
inline Lanes Min(Lanes a, Lanes b) {
  return {_mm256_min_ps(a.low, b.low), _mm256_min_ps(a.high, b.high)};
}
inline Lanes RoundToEven(Lanes a) {
  constexpr int kMode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.low, kMode), _mm256_round_ps(a.high, kMode)};
}
inline __m256 EightTwoTo(__m256 n) {
  __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  __m256i bits = _mm256_slli_epi32(biased, 23);
  return _mm256_castsi256_ps(bits);
}
inline Lanes TwoTo(Lanes n) { return {EightTwoTo(n.low), EightTwoTo(n.high)}; }
inline Lanes LoadCache(const float* p) { return LoadX(p); }
inline __m256 EightHalves(const uint16_t* p) {
  __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}
inline Lanes LoadCache(const uint16_t* p) { return {EightHalves(p), EightHalves(p + 8)}; }
template <typename F>
inline __m256 EightFp8(const uint8_t* p) {  // 8 bytes -> 8 floats (WidenScalar's arithmetic)
  constexpr int M = F::kMantissa;
  const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i mag = _mm256_and_si256(x, _mm256_set1_epi32(0x7f));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x80)), 24);
  const __m256i normal =
      _mm256_add_epi32(_mm256_slli_epi32(mag, 23 - M), _mm256_set1_epi32((127 - F::kBias) << 23));
  const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(mag),
                                   _mm256_set1_ps(std::ldexp(1.0f, 1 - F::kBias - M)));
  const __m256i is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(1 << M), mag);
  __m256i bits = _mm256_blendv_epi8(normal, _mm256_castps_si256(sub), is_sub);
  if constexpr (F::kIeeeSpecials) {
    const __m256i special = _mm256_or_si256(_mm256_set1_epi32(0x7f800000),
                                            _mm256_slli_epi32(_mm256_and_si256(mag, _mm256_set1_epi32(3)), 21));
    bits = _mm256_blendv_epi8(bits, special, _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7b)));
  } else {
    bits = _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x7fc00000),
                              _mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7f)));
  }
  return _mm256_castsi256_ps(_mm256_or_si256(bits, sign));
}
template <typename F>
inline Lanes LoadFp8(const F* p) {
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(p);
  return {EightFp8<F>(bytes), EightFp8<F>(bytes + 8)};
}
#else
inline Lanes Add(Lanes a, Lanes b) {
  for (int64_t l = 0; l < kLanes; ++l) a.v[l] += b.v[l];
  return a;
}
// The SIMD max / min's rule: b where either is NaN (so Exp's clamp also turns NaN into a number).
inline Lanes Max(Lanes a, Lanes b) {
  for (int64_t l = 0; l < kLanes; ++l) a.v[l] = a.v[l] > b.v[l] ? a.v[l] : b.v[l];
  return a;
}
inline Lanes Min(Lanes a, Lanes b) {
  for (int64_t l = 0; l < kLanes; ++l) a.v[l] = a.v[l] < b.v[l] ? a.v[l] : b.v[l];
  return a;
}
inline Lanes RoundToEven(Lanes a) {
  for (int64_t l = 0; l < kLanes; ++l) a.v[l] = std::nearbyint(a.v[l]);  // default: to even
  return a;
}
inline Lanes TwoTo(Lanes n) {
  Lanes out;
  for (int64_t l = 0; l < kLanes; ++l) {
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n.v[l]) + 127) << 23;
    std::memcpy(&out.v[l], &bits, sizeof(float));
  }
  return out;
}
inline Lanes LoadCache(const float* p) { return LoadX(p); }
inline Lanes LoadCache(const uint16_t* p) {
  Lanes out;
  for (int64_t l = 0; l < kLanes; ++l) {
    const uint32_t bits = static_cast<uint32_t>(p[l]) << 16;
    std::memcpy(&out.v[l], &bits, sizeof(float));
  }
  return out;
}
template <typename F>
inline Lanes LoadFp8(const F* p) {
  Lanes out;
  for (int64_t l = 0; l < kLanes; ++l) out.v[l] = WidenScalar<F>(p[l].bits);
  return out;
}
#endif
inline Lanes LoadCache(const Fp8E4M3* p) { return LoadFp8(p); }
inline Lanes LoadCache(const Fp8E5M2* p) { return LoadFp8(p); }

// exp(x) for x <= 0 (scores minus their running max), Cephes' expf: x = n ln2 + r with n whole
// and |r| <= ln2 / 2 (ln2 in two parts, so r is exact), a degree-6 polynomial for exp(r), times
// 2^n. Within 1 ulp of exp for -87 <= x <= 0 (measured on a sample of floats there). x is
// clamped to that range first: weights under 1e-38 come out as exp(-87), and lanes past a block's
// last position, never used, may hold anything; the clamp keeps 2^n's conversion defined.
inline Lanes Exp(Lanes x) {
  x = Min(Max(x, Broadcast(-87.0f)), Broadcast(0.0f));
  const Lanes n = RoundToEven(Mul(x, Broadcast(1.44269504088896341f)));
  Lanes r = Fma(n, Broadcast(-0.693359375f), x);
  r = Fma(n, Broadcast(2.12194440e-4f), r);
  Lanes p = Broadcast(1.9875691500e-4f);
  p = Fma(p, r, Broadcast(1.3981999507e-3f));
  p = Fma(p, r, Broadcast(8.3334519073e-3f));
  p = Fma(p, r, Broadcast(4.1665795894e-2f));
  p = Fma(p, r, Broadcast(1.6666665459e-1f));
  p = Fma(p, r, Broadcast(5.0000001201e-1f));
  const Lanes e = Add(Fma(p, Mul(r, r), r), Broadcast(1.0f));
  return Mul(e, TwoTo(n));
}

// Lanes i .. i + 15 of a row of `width` elements, those past the end zero (never read).
template <typename T>
inline Lanes LoadRowLanes(const T* row, int64_t i, int64_t width) {
  if (i + kLanes <= width) return LoadCache(row + i);
  alignas(64) T tail[kLanes] = {};
  std::memcpy(tail, row + i, (width - i) * sizeof(T));
  return LoadCache(tail);
}

inline float SoftCap(float score, float soft_cap) {
  return soft_cap > 0.0f ? soft_cap * std::tanh(score / soft_cap) : score;
}

// Query heads are taken in groups of at most kHeadsAtOnce, whose partial dot products and output
// lanes stay in registers while a key or value row is loaded once for all of them.
constexpr int64_t kHeadsAtOnce = 4;

template <typename T>  // float, uint16_t (bfloat16 bits), Fp8E4M3 or Fp8E5M2: the cache's element
struct Problem {       // the kernel tiles.h runs: item o = t * kv_heads + kh
  const float* q;            // [T, H, D]
  const float* k_new;        // [T, K, D]
  const float* v_new;        // [T, K, D]
  const T* k_cache;          // [K, N, P, D]
  const T* v_cache;          // [K, N, P, D]
  const int32_t* tables;     // [S, B]
  const int32_t* lens;       // [S]
  const int32_t* starts;     // [S + 1]
  const int32_t* token_seq;  // [T]: each token's sequence, -1 for padding (the handler's)
  float* out;                // [T, H, D]
  int64_t tokens, seqs, heads, kv_heads, head_dim, num_blocks, block_size, table_width;
  float scale, soft_cap;     // soft_cap 0: none
  int64_t window;            // 0: none

  // Tile shape for tiles.h: one row, kSingleRowCols (lanes.h's) items per tile.
  static constexpr int kTileRows = 1, kTileCols = 1, kSingleRowCols = ::kSingleRowCols;

  // Items o .. o + C - 1 of the one row.
  template <int R, int C>
  void Tile(int64_t, int64_t o) const {
    const int64_t chunks = (head_dim + kLanes - 1) / kLanes;
    const int64_t score_room = (block_size + kLanes - 1) / kLanes * kLanes;
    // Scratch of one head group: scaled queries and outputs [4, chunks * 16], scores [4, room].
    std::vector<float> scratch(kHeadsAtOnce * (2 * chunks * kLanes + score_room));
    for (int64_t c = 0; c < C; ++c) {
      const int64_t item = o + c, t = item / kv_heads, kh = item % kv_heads;
      const int64_t group = heads / kv_heads;
      if (token_seq[t] < 0) {  // a padding token: zeros, and nothing of it is read
        float* rows = out + (t * heads + kh * group) * head_dim;
        std::fill(rows, rows + group * head_dim, 0.0f);
        continue;
      }
      for (int64_t g = 0; g < group; g += kHeadsAtOnce) {
        switch (std::min(kHeadsAtOnce, group - g)) {
          case 1: Heads<1>(t, kh, kh * group + g, scratch.data()); break;
          case 2: Heads<2>(t, kh, kh * group + g, scratch.data()); break;
          case 3: Heads<3>(t, kh, kh * group + g, scratch.data()); break;
          case 4: Heads<4>(t, kh, kh * group + g, scratch.data()); break;
        }
      }
    }
  }

  template <int G>
  void Heads(int64_t t, int64_t kh, int64_t first_head, float* scratch) const;

  // Folds key / value rows from .. to - 1 (row j at keys + j * stride) into the softmax state
  // of G heads; `next_keys` / `next_values` (or null): the next block, prefetched meanwhile.
  template <int G, typename R>
  void Absorb(const R* keys, const R* values, int64_t stride, int64_t from, int64_t to,
              const char* next_keys, const char* next_values, const float* qs, float* acc,
              float* scores, float* top, float* total) const;
};

// Query heads first_head .. first_head + G - 1 of token t (all of kv head kh).
template <typename T>
template <int G>
void Problem<T>::Heads(int64_t t, int64_t kh, int64_t first_head, float* scratch) const {
  const int64_t D = head_dim, P = block_size;
  const int64_t chunks = (D + kLanes - 1) / kLanes, padded = chunks * kLanes;
  float* qs = scratch;                 // [G, padded]: q * scale, zero tail
  float* acc = qs + G * padded;        // [G, padded]: the unnormalized output
  float* scores = acc + G * padded;    // [G, room]: one block's scores, then weights
  float top[G], total[G];

  const float* own_k = k_new + (t * kv_heads + kh) * D;  // [D]
  const float* own_v = v_new + (t * kv_heads + kh) * D;
  for (int g = 0; g < G; ++g) {
    const float* q_row = q + (t * heads + first_head + g) * D;
    for (int64_t d = 0; d < D; ++d) qs[g * padded + d] = q_row[d] * scale;
    std::fill(qs + g * padded + D, qs + (g + 1) * padded, 0.0f);
  }
  {  // The token itself first: its score starts the running max, its value row with weight 1.
    Lanes dot[G];
    for (int g = 0; g < G; ++g) dot[g] = Zero();
    for (int64_t c = 0; c < chunks; ++c) {
      const Lanes k = LoadRowLanes(own_k, c * kLanes, D);
      for (int g = 0; g < G; ++g) dot[g] = Fma(LoadX(qs + g * padded + c * kLanes), k, dot[g]);
    }
    for (int g = 0; g < G; ++g) {
      top[g] = SoftCap(Reduce(dot[g]), soft_cap);
      total[g] = 1.0f;
      for (int64_t c = 0; c < chunks; ++c)
        Store(LoadRowLanes(own_v, c * kLanes, D), acc + g * padded + c * kLanes);
    }
  }

  const int64_t s = token_seq[t], start = starts[s];
  const int64_t q_len = starts[s + 1] - start;
  const int64_t cached = std::clamp<int64_t>(lens[s] - q_len, 0, table_width * P);
  const int64_t position = cached + (t - start);  // a decode row's: `cached`
  const int64_t first = window > 0 ? std::max<int64_t>(position - window + 1, 0) : 0;
  const int32_t* table = tables + s * table_width;
  auto block_at = [&](int64_t b) {
    return (kh * num_blocks + std::clamp<int64_t>(table[b], 0, num_blocks - 1)) * P * D;
  };
  for (int64_t b = first / P; b * P < cached; ++b) {  // the cached context, block by block
    const bool has_next = (b + 1) * P < cached;
    const int64_t next = has_next ? block_at(b + 1) : 0;
    Absorb<G>(k_cache + block_at(b), v_cache + block_at(b), D, std::max<int64_t>(first - b * P, 0),
              std::min<int64_t>(cached - b * P, P),
              has_next ? reinterpret_cast<const char*>(k_cache + next) : nullptr,
              has_next ? reinterpret_cast<const char*>(v_cache + next) : nullptr, qs, acc, scores,
              top, total);
  }
  // Then the step's earlier tokens of the same sequence (a prefill chunk's; none for a decode
  // row), P rows at a time, in position order.
  const int64_t stride = kv_heads * D;
  for (int64_t u = start + std::max<int64_t>(first - cached, 0); u < t; u += P) {
    const int64_t offset = (u * kv_heads + kh) * D;
    Absorb<G>(k_new + offset, v_new + offset, stride, 0, std::min<int64_t>(t - u, P), nullptr,
              nullptr, qs, acc, scores, top, total);
  }
  for (int g = 0; g < G; ++g) {
    float* out_row = out + (t * heads + first_head + g) * D;
    for (int64_t d = 0; d < D; ++d) out_row[d] = acc[g * padded + d] / total[g];
  }
}

template <typename T>
template <int G, typename R>
void Problem<T>::Absorb(const R* keys, const R* values, int64_t stride, int64_t from, int64_t to,
                        const char* next_keys, const char* next_values, const float* qs,
                        float* acc, float* scores, float* top, float* total) const {
  const int64_t D = head_dim;
  const int64_t chunks = (D + kLanes - 1) / kLanes, padded = chunks * kLanes;
  const int64_t room = (block_size + kLanes - 1) / kLanes * kLanes;
  const int64_t row_bytes = D * sizeof(R);
  for (int64_t j = from; j < to; ++j) {
    // The next block lies elsewhere (the hardware prefetcher stops at its page): ask for its
    // rows, one per position scored here (64 rows x 512 positions, one thread: 9.5 -> 3.5 ms).
    if (next_keys != nullptr) {
      for (int64_t line = 0; line < row_bytes; line += 64) {
        __builtin_prefetch(next_keys + j * row_bytes + line, 0, 3);
        __builtin_prefetch(next_values + j * row_bytes + line, 0, 3);
      }
    }
    Lanes dot[G];
    for (int g = 0; g < G; ++g) dot[g] = Zero();
    for (int64_t c = 0; c < chunks; ++c) {
      const Lanes k = LoadRowLanes(keys + j * stride, c * kLanes, D);
      for (int g = 0; g < G; ++g) dot[g] = Fma(LoadX(qs + g * padded + c * kLanes), k, dot[g]);
    }
    for (int g = 0; g < G; ++g) scores[g * room + j] = SoftCap(Reduce(dot[g]), soft_cap);
  }
  Lanes rescale[G];
  bool rescaled = false;
  for (int g = 0; g < G; ++g) {
    float* row = scores + g * room;
    float new_top = top[g];
    for (int64_t j = from; j < to; ++j) new_top = std::max(new_top, row[j]);
    rescale[g] = Broadcast(1.0f);
    if (new_top > top[g]) {  // exp(old max - new max), the same Exp as the weights
      alignas(64) float factor[kLanes];
      Store(Exp(Broadcast(top[g] - new_top)), factor);
      total[g] *= factor[0];
      rescale[g] = Broadcast(factor[0]);
      rescaled = true;
      top[g] = new_top;
    }
    for (int64_t j = from / kLanes * kLanes; j < to; j += kLanes)  // lanes past `to` unused
      Store(Exp(Add(LoadX(row + j), Broadcast(-new_top))), row + j);
    float block_total = 0.0f;
    for (int64_t j = from; j < to; ++j) block_total += row[j];
    total[g] += block_total;
  }
  for (int64_t c = 0; c < chunks; ++c) {  // each group of output lanes over the block's rows
    Lanes sums[G];
    for (int g = 0; g < G; ++g) {
      sums[g] = LoadX(acc + g * padded + c * kLanes);
      if (rescaled) sums[g] = Mul(sums[g], rescale[g]);
    }
    for (int64_t j = from; j < to; ++j) {
      const Lanes v = LoadRowLanes(values + j * stride, c * kLanes, D);
      for (int g = 0; g < G; ++g) sums[g] = Fma(Broadcast(scores[g * room + j]), v, sums[g]);
    }
    for (int g = 0; g < G; ++g) Store(sums[g], acc + g * padded + c * kLanes);
  }
}

template <typename A, typename B>
bool SameDims(const A& a, const B& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// The handler's body for a cache of element type T (float, bfloat16 bits, or an fp8 struct),
// the caches given as any buffers whose element type the caller checked.
template <typename T>
ffi::Error RunPagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                             ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                             ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                             ffi::Buffer<ffi::S32> block_tables,
                             ffi::Buffer<ffi::S32> context_lens,
                             ffi::Buffer<ffi::S32> query_start_loc,
                             ffi::ResultBuffer<ffi::F32> out, float scale, int64_t sliding_window,
                             float soft_cap, int64_t max_threads) {
  auto q_dims = q.dimensions(), cache_dims = k_cache.dimensions();
  auto table_dims = block_tables.dimensions();
  if (q_dims.size() != 3 || cache_dims.size() != 4 || table_dims.size() != 2) {
    return ffi::Error::InvalidArgument(
        "jaxinfer_paged_attention: q [T, H, D], caches [K, N, P, D], block_tables [S, B]");
  }
  const int64_t tokens = q_dims[0], heads = q_dims[1], head_dim = q_dims[2];
  const int64_t seqs = table_dims[0], kv_heads = cache_dims[0];
  const bool agree =
      cache_dims[3] == head_dim && kv_heads > 0 && heads % kv_heads == 0 &&
      SameDims(v_cache.dimensions(), cache_dims) && k_new.dimensions().size() == 3 &&
      k_new.dimensions()[0] == tokens && k_new.dimensions()[1] == kv_heads &&
      k_new.dimensions()[2] == head_dim && SameDims(v_new.dimensions(), k_new.dimensions()) &&
      static_cast<int64_t>(context_lens.element_count()) == seqs &&
      static_cast<int64_t>(query_start_loc.element_count()) == seqs + 1 &&
      SameDims(out->dimensions(), q_dims) && cache_dims[1] > 0 && cache_dims[2] > 0;
  if (!agree) return ffi::Error::InvalidArgument("jaxinfer_paged_attention: shapes do not agree");
  // Each token's sequence (its rows of query_start_loc), -1 past the last sequence's tokens.
  const int32_t* starts = query_start_loc.typed_data();
  std::vector<int32_t> token_seq(tokens, -1);
  for (int64_t s = 0; s < seqs; ++s) {
    const int64_t begin = std::clamp<int64_t>(starts[s], 0, tokens);
    const int64_t end = std::clamp<int64_t>(starts[s + 1], begin, tokens);
    std::fill(token_seq.begin() + begin, token_seq.begin() + end, static_cast<int32_t>(s));
  }
  const Problem<T> problem{
      q.typed_data(),       k_new.typed_data(),        v_new.typed_data(),
      static_cast<const T*>(k_cache.untyped_data()),
      static_cast<const T*>(v_cache.untyped_data()),   block_tables.typed_data(),
      context_lens.typed_data(), starts, token_seq.data(), out->typed_data(),
      tokens, seqs, heads, kv_heads, head_dim, /*num_blocks=*/cache_dims[1],
      /*block_size=*/cache_dims[2], /*table_width=*/table_dims[1], scale, soft_cap,
      /*window=*/sliding_window};
  // One row of T * K items; a nominal row size of a whole block makes each unit one tile.
  RunTiles(pool, problem, 1, tokens * kv_heads, /*row_bytes=*/kBlockBytes, max_threads);
  return ffi::Error::Success();
}

// One handler per cache element type: `Element` is what the kernel reads, `Type` what XLA holds.
template <typename Element, ffi::DataType Type>
ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                          ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                          ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                          ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> context_lens,
                          ffi::Buffer<ffi::S32> query_start_loc, ffi::ResultBuffer<ffi::F32> out,
                          float scale, int64_t sliding_window, float soft_cap,
                          int64_t max_threads) {
  if (k_cache.element_type() != Type || v_cache.element_type() != Type) {
    return ffi::Error::InvalidArgument("jaxinfer_paged_attention: the caches' element type is "
                                       "not this target's");
  }
  return RunPagedAttention<Element>(pool, q, k_new, v_new, k_cache, v_cache, block_tables,
                                    context_lens, query_start_loc, out, scale, sliding_window,
                                    soft_cap, max_threads);
}

}  // namespace

// The handlers' binding (the caches' element type is each handler's to check).
#define JAXINFER_PAGED_ATTENTION_BINDING \
  ffi::Ffi::Bind()                       \
      .Ctx<ffi::ThreadPool>()            \
      .Arg<ffi::Buffer<ffi::F32>>()      \
      .Arg<ffi::Buffer<ffi::F32>>()      \
      .Arg<ffi::Buffer<ffi::F32>>()      \
      .Arg<ffi::AnyBuffer>()             \
      .Arg<ffi::AnyBuffer>()             \
      .Arg<ffi::Buffer<ffi::S32>>()      \
      .Arg<ffi::Buffer<ffi::S32>>()      \
      .Arg<ffi::Buffer<ffi::S32>>()      \
      .Ret<ffi::Buffer<ffi::F32>>()      \
      .Attr<float>("scale")              \
      .Attr<int64_t>("sliding_window")   \
      .Attr<float>("soft_cap")           \
      .Attr<int64_t>("max_threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferPagedAttentionF32, (PagedAttention<float, ffi::F32>),
                              JAXINFER_PAGED_ATTENTION_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferPagedAttentionBF16, (PagedAttention<uint16_t, ffi::BF16>),
                              JAXINFER_PAGED_ATTENTION_BINDING);
// 8-bit float caches arrive as their bytes (the engine keeps them as uint8: runtime/kv_cache.py).
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferPagedAttentionF8E4M3, (PagedAttention<Fp8E4M3, ffi::U8>),
                              JAXINFER_PAGED_ATTENTION_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferPagedAttentionF8E5M2, (PagedAttention<Fp8E5M2, ffi::U8>),
                              JAXINFER_PAGED_ATTENTION_BINDING);

// Which of the three implementations this build holds (for tests and the benchmark's table).
extern "C" const char* JaxinferPagedAttentionIsa() { return kIsa; }
