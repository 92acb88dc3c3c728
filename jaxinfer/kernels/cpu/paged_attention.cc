// Paged attention of decode rows (row s owns exactly token s) on XLA:CPU, reading the cache blocks
// in place through the block table: an XLA FFI custom call (jaxinfer/kernels/paged_attention_cpu.py
// builds it on first use and registers "jaxinfer_paged_attention_f32" / "..._bf16", one per cache
// dtype). It computes what pallas_kernels/reference.py::paged_attention(decode_only=True) does.
//
// Why a kernel: the jnp reference gathers the context in 128-position chunks into float32 copies
// [K, S, C, D] and runs every sequence as far as the longest context in the step; attention was
// about half of a batched SmolLM2 decode step on the 2-core CPU (benchmarks/RESULTS.md). Here each
// (sequence, kv head) work item reads its own blocks, stops at its own context length (and starts
// at its sliding window), and keeps the softmax state of its G query heads in L1.
//
// Shapes (the reference's legend): q [S, H, D], k_new / v_new [S, K, D] float32; k_cache / v_cache
// [K, N, P, D] float32 or bfloat16; block_tables [S, B], context_lens [S] (tokens after this step,
// the new one included), query_start_loc [S + 1] int32; out [S, H, D] float32, H = K * G.
//
// One work item (s, kh): the G query heads kh * G .. kh * G + G - 1 of row s, pre-scaled by
// `scale`, score the row's new token (always visible) and then the cached positions
// lo .. cached - 1 block by block (cached = context_lens[s] - q_len, lo = cached - window + 1 with a
// sliding window, else 0). Scores: one lane-wise fused multiply-add per element over D (lanes.h's
// order, the tail of D zero padded), Reduce, then soft_cap * tanh(score / soft_cap) if asked.
// Online softmax per block: new max over the block, one rescale of the running sum and output,
// then exp(score - max) weights and the weighted V rows added position by position. Rows past
// query_start_loc[S] (padding) write zeros and read nothing, so NaN there does not leak; nor do
// cache slots outside [lo, cached), which are never read. The order of every operation depends on
// the item alone, so the AVX-512, AVX2 and plain C++ builds give the same bits, and a row's result
// does not depend on the other rows of the step.
//
// Threads: tiles.h's RunTiles over one "row" of S * K "channels" (the work items), with a nominal
// row size of a whole channel block so that each unit of work is one tile of kTileCols /
// kSingleRowCols items: enough units for both cores at S = 16 (SmolLM2 has K = 3), handed out
// through its atomic counter, which also evens out ragged context lengths.

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

// ---- what this kernel adds to lanes.h: broadcast, store, and loads of a cache row ----
#if defined(__AVX512F__)
inline Lanes Broadcast(float w) { return {_mm512_set1_ps(w)}; }
inline void Store(Lanes a, float* p) { _mm512_storeu_ps(p, a.v); }
inline Lanes LoadCache(const float* p) { return LoadX(p); }
inline Lanes LoadCache(const uint16_t* p) {  // 16 bfloat16 -> float32 (exact: a 16-bit shift)
  __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16))};
}
#elif defined(__AVX2__) && defined(__FMA__)
inline Lanes Broadcast(float w) { return {_mm256_set1_ps(w), _mm256_set1_ps(w)}; }
inline void Store(Lanes a, float* p) {
  _mm256_storeu_ps(p, a.low);
  _mm256_storeu_ps(p + 8, a.high);
}
inline Lanes LoadCache(const float* p) { return LoadX(p); }
inline __m256 EightHalves(const uint16_t* p) {
  __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}
inline Lanes LoadCache(const uint16_t* p) { return {EightHalves(p), EightHalves(p + 8)}; }
#else
inline Lanes Broadcast(float w) {
  Lanes out;
  for (int64_t l = 0; l < kLanes; ++l) out.v[l] = w;
  return out;
}
inline void Store(Lanes a, float* p) { std::memcpy(p, a.v, sizeof(a.v)); }
inline Lanes LoadCache(const float* p) { return LoadX(p); }
inline Lanes LoadCache(const uint16_t* p) {
  Lanes out;
  for (int64_t l = 0; l < kLanes; ++l) {
    const uint32_t bits = static_cast<uint32_t>(p[l]) << 16;
    std::memcpy(&out.v[l], &bits, sizeof(float));
  }
  return out;
}
#endif

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

template <typename T>  // float or uint16_t (bfloat16 bits): the cache's element type
struct Problem {       // the kernel tiles.h runs: item o = s * kv_heads + kh
  const float* q;            // [S, H, D]
  const float* k_new;        // [S, K, D]
  const float* v_new;        // [S, K, D]
  const T* k_cache;          // [K, N, P, D]
  const T* v_cache;          // [K, N, P, D]
  const int32_t* tables;     // [S, B]
  const int32_t* lens;       // [S]
  const int32_t* starts;     // [S + 1]
  float* out;                // [S, H, D]
  int64_t seqs, heads, kv_heads, head_dim, num_blocks, block_size, table_width;
  float scale, soft_cap;     // soft_cap 0: none
  int64_t window;            // 0: none

  // Items o .. o + C - 1. RunTiles runs one row (R = 1; the other row counts are compiled, never
  // called).
  template <int R, int C>
  void Tile(int64_t, int64_t o) const {
    const int64_t group = heads / kv_heads;
    const int64_t chunks = (head_dim + kLanes - 1) / kLanes;
    const int64_t padded = chunks * kLanes;
    // Scratch of one item: scaled queries and outputs [G, padded], scores [G, P], max/sum [G].
    std::vector<float> scratch(group * (2 * padded + block_size + 2));
    for (int64_t c = 0; c < C; ++c) Item(o + c, group, chunks, padded, scratch.data());
  }

  void Item(int64_t item, int64_t group, int64_t chunks, int64_t padded, float* scratch) const;
};

template <typename T>
void Problem<T>::Item(int64_t item, int64_t group, int64_t chunks, int64_t padded,
                      float* scratch) const {
  const int64_t s = item / kv_heads, kh = item % kv_heads, D = head_dim, P = block_size;
  float* out_rows = out + (s * heads + kh * group) * D;  // [G, D]
  if (s >= starts[seqs]) {  // a padding row: zeros, and nothing of it is read
    std::fill(out_rows, out_rows + group * D, 0.0f);
    return;
  }
  float* qs = scratch;                    // [G, padded]
  float* acc = qs + group * padded;       // [G, padded]
  float* scores = acc + group * padded;   // [G, P]
  float* top = scores + group * P;        // [G]
  float* total = top + group;             // [G]

  const float* own_k = k_new + item * D;  // [D]
  const float* own_v = v_new + item * D;
  for (int64_t g = 0; g < group; ++g) {
    const float* q_row = q + (s * heads + kh * group + g) * D;
    float* q_scaled = qs + g * padded;
    for (int64_t d = 0; d < D; ++d) q_scaled[d] = q_row[d] * scale;
    std::fill(q_scaled + D, q_scaled + padded, 0.0f);
    // The new token first: weight exp(0) = 1 for its value row.
    Lanes dot = Zero();
    for (int64_t c = 0; c < chunks; ++c)
      dot = Fma(LoadX(q_scaled + c * kLanes), LoadRowLanes(own_k, c * kLanes, D), dot);
    top[g] = SoftCap(Reduce(dot), soft_cap);
    total[g] = 1.0f;
    for (int64_t c = 0; c < chunks; ++c)
      Store(LoadRowLanes(own_v, c * kLanes, D), acc + g * padded + c * kLanes);
  }

  const int64_t q_len = starts[s + 1] - starts[s];
  const int64_t cached = std::clamp<int64_t>(lens[s] - q_len, 0, table_width * P);
  const int64_t first = window > 0 ? std::max<int64_t>(cached - window + 1, 0) : 0;
  const int32_t* table = tables + s * table_width;
  for (int64_t b = first / P; b * P < cached; ++b) {
    const int64_t block = std::clamp<int64_t>(table[b], 0, num_blocks - 1);
    const int64_t from = std::max<int64_t>(first - b * P, 0);
    const int64_t to = std::min<int64_t>(cached - b * P, P);
    const T* keys = k_cache + ((kh * num_blocks + block) * P) * D;  // [P, D]
    const T* values = v_cache + ((kh * num_blocks + block) * P) * D;
    for (int64_t j = from; j < to; ++j) {
      for (int64_t g = 0; g < group; ++g) {
        Lanes dot = Zero();
        for (int64_t c = 0; c < chunks; ++c)
          dot = Fma(LoadX(qs + g * padded + c * kLanes), LoadRowLanes(keys + j * D, c * kLanes, D),
                    dot);
        scores[g * P + j] = SoftCap(Reduce(dot), soft_cap);
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      float* row_scores = scores + g * P;
      float new_top = top[g];
      for (int64_t j = from; j < to; ++j) new_top = std::max(new_top, row_scores[j]);
      if (new_top > top[g]) {
        const float rescale = std::exp(top[g] - new_top);
        total[g] *= rescale;
        const Lanes factor = Broadcast(rescale);
        for (int64_t c = 0; c < chunks; ++c) {
          float* at = acc + g * padded + c * kLanes;
          Store(Fma(LoadX(at), factor, Zero()), at);
        }
        top[g] = new_top;
      }
      float block_total = 0.0f;
      for (int64_t j = from; j < to; ++j) {
        row_scores[j] = std::exp(row_scores[j] - new_top);
        block_total += row_scores[j];
      }
      total[g] += block_total;
    }
    for (int64_t j = from; j < to; ++j) {
      for (int64_t c = 0; c < chunks; ++c) {
        const Lanes v = LoadRowLanes(values + j * D, c * kLanes, D);
        for (int64_t g = 0; g < group; ++g) {
          float* at = acc + g * padded + c * kLanes;
          Store(Fma(Broadcast(scores[g * P + j]), v, LoadX(at)), at);
        }
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t d = 0; d < D; ++d) out_rows[g * D + d] = acc[g * padded + d] / total[g];
  }
}

template <typename A, typename B>
bool SameDims(const A& a, const B& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

template <ffi::DataType CacheType>
ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                          ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                          ffi::Buffer<CacheType> k_cache, ffi::Buffer<CacheType> v_cache,
                          ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> context_lens,
                          ffi::Buffer<ffi::S32> query_start_loc, ffi::ResultBuffer<ffi::F32> out,
                          float scale, int64_t sliding_window, float soft_cap,
                          int64_t max_threads) {
  auto q_dims = q.dimensions(), cache_dims = k_cache.dimensions();
  auto table_dims = block_tables.dimensions();
  if (q_dims.size() != 3 || cache_dims.size() != 4 || table_dims.size() != 2) {
    return ffi::Error::InvalidArgument(
        "jaxinfer_paged_attention: q [S, H, D], caches [K, N, P, D], block_tables [S, B]");
  }
  const int64_t seqs = q_dims[0], heads = q_dims[1], head_dim = q_dims[2];
  const int64_t kv_heads = cache_dims[0];
  const bool agree =
      cache_dims[3] == head_dim && kv_heads > 0 && heads % kv_heads == 0 &&
      SameDims(v_cache.dimensions(), cache_dims) && k_new.dimensions().size() == 3 &&
      k_new.dimensions()[0] == seqs && k_new.dimensions()[1] == kv_heads &&
      k_new.dimensions()[2] == head_dim && SameDims(v_new.dimensions(), k_new.dimensions()) &&
      table_dims[0] == seqs && static_cast<int64_t>(context_lens.element_count()) == seqs &&
      static_cast<int64_t>(query_start_loc.element_count()) == seqs + 1 && SameDims(out->dimensions(), q_dims) &&
      cache_dims[1] > 0 && cache_dims[2] > 0;
  if (!agree) return ffi::Error::InvalidArgument("jaxinfer_paged_attention: shapes do not agree");
  using T = ffi::NativeType<CacheType>;
  const Problem<T> problem{q.typed_data(),       k_new.typed_data(),
                           v_new.typed_data(),   k_cache.typed_data(),
                           v_cache.typed_data(), block_tables.typed_data(),
                           context_lens.typed_data(), query_start_loc.typed_data(),
                           out->typed_data(),    seqs,
                           heads,                kv_heads,
                           head_dim,             cache_dims[1],
                           cache_dims[2],        table_dims[1],
                           scale,                soft_cap,
                           sliding_window};
  // One row of S * K items; a nominal row size of a whole block makes each unit one tile.
  RunTiles(pool, problem, 1, seqs * kv_heads, /*row_bytes=*/kBlockBytes, max_threads);
  return ffi::Error::Success();
}

}  // namespace

// The handler's binding for one cache element type.
#define JAXINFER_PAGED_ATTENTION_BINDING(CacheType) \
  ffi::Ffi::Bind()                                  \
      .Ctx<ffi::ThreadPool>()                       \
      .Arg<ffi::Buffer<ffi::F32>>()                 \
      .Arg<ffi::Buffer<ffi::F32>>()                 \
      .Arg<ffi::Buffer<ffi::F32>>()                 \
      .Arg<ffi::Buffer<CacheType>>()                \
      .Arg<ffi::Buffer<CacheType>>()                \
      .Arg<ffi::Buffer<ffi::S32>>()                 \
      .Arg<ffi::Buffer<ffi::S32>>()                 \
      .Arg<ffi::Buffer<ffi::S32>>()                 \
      .Ret<ffi::Buffer<ffi::F32>>()                 \
      .Attr<float>("scale")                         \
      .Attr<int64_t>("sliding_window")              \
      .Attr<float>("soft_cap")                      \
      .Attr<int64_t>("max_threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferPagedAttentionF32, PagedAttention<ffi::F32>,
                              JAXINFER_PAGED_ATTENTION_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxinferPagedAttentionBF16, PagedAttention<ffi::BF16>,
                              JAXINFER_PAGED_ATTENTION_BINDING(ffi::BF16));

// Which of the three implementations this build holds (for tests and the benchmark's table).
extern "C" const char* JaxinferPagedAttentionIsa() { return kIsa; }
