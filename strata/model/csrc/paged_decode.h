// Paged attention for single-token queries (decodes) on CPU: float32 queries and
// outputs, a cache of float32, float16 or bfloat16 (--kv-cache-dtype), each K/V value
// widened to float32 as it is read (F16C's conversion where the CPU has it).
//
// Reads each sequence's K/V straight from the cache blocks named by its block
// table: no gathered copy of the context, which is what the pure-PyTorch path
// pays for (a read, a write and a read again of every context token per layer).
// A work item is one sequence (or, when the batch is smaller than the thread
// count, a slice of its KV heads): it walks the context token by token, reading
// each K/V row once for every query head that uses it.
//
// A sequence may start reading at `context_starts[seq]`: the tokens before are a
// prefix shared with other sequences, attended once for all of them elsewhere
// (cascade attention). `lse` gets each head's log-sum-exp of scores, so that the
// two parts can be merged.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// Internal linkage: each module that includes this has a copy of its own.
namespace strata::attention {
namespace {

struct BFloat16 {
  uint16_t bits;
};

inline float widen(_Float16 x) { return static_cast<float>(x); }
inline float widen(BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// One KV head's `n` values as float32: a float32 cache is read in place; a 16-bit one is
// widened into `buffer` first, once for every query head that reads it.
inline const float* as_float(const float* values, float*, int64_t) { return values; }

template <typename T>
inline const float* as_float(const T* values, float* buffer, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  if constexpr (std::is_same_v<T, _Float16>)  // GCC widens _Float16 one value at a time
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(buffer + i,
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(values + i))));
#endif
  for (; i < n; ++i) buffer[i] = widen(values[i]);
  return buffer;
}

// Vectors of the CPU's width (simd.h) for the per-head loops below, whose head dimension
// is a multiple of it (every Llama-family size on AVX2 and AVX-512).
using simd::kLanes;
using fvec = simd::vec;
typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline float sum_lanes(fvec v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#elif defined(__AVX2__)
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(reinterpret_cast<__m256>(v)),
                        _mm256_extractf128_ps(reinterpret_cast<__m256>(v), 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
#else
  float total = 0.f;
  for (int i = 0; i < kLanes; ++i) total += v[i];
  return total;
#endif
}

// exp(x) for x <= 0 (a score less the row's largest), Cephes' expf polynomial: within
// 2 ulp of std::exp, a vector at a time (std::exp was a call per score).
inline fvec exp_nonpositive(fvec x) {
  x = x < -87.3f ? fvec{} - 87.3f : x;  // below: 0 within float's range, and n >= -126
  const ivec n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, ivec);  // round
  const fvec nf = __builtin_convertvector(n, fvec);
  const fvec r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  fvec p = fvec{} + 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.f;
  const ivec bits = (n + 127) << 23;  // 2^n
  return p * reinterpret_cast<fvec>(bits);
}

// One head's scores against `n` keys, then its softmax and weighted sum of values, with
// Vecs vectors a head (head_dim = Vecs x kLanes): q, the running sums and the output
// stay in registers, and the keys' and values' rows are read straight from the blocks.
// `row_of(j)` is token j's K or V row of this KV head.
template <int Vecs, typename Row>
inline float attend_head(const float* query, float* scores, float* output, int64_t first,
                         int64_t len, float scale, Row key_of, Row value_of) {
  const int64_t n = len - first;
  fvec q[Vecs];
  for (int v = 0; v < Vecs; ++v) q[v] = simd::load(query + v * kLanes);
  for (int64_t j = 0; j < n; ++j) {
    const float* key = key_of(first + j);
    fvec dot = q[0] * simd::load(key);
    for (int v = 1; v < Vecs; ++v) dot += q[v] * simd::load(key + v * kLanes);
    scores[j] = sum_lanes(dot) * scale;
  }
  float top = -INFINITY;
  for (int64_t j = 0; j < n; ++j) top = std::max(top, scores[j]);
  fvec total_v = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const fvec e = exp_nonpositive(simd::load(scores + j) - top);
    std::memcpy(scores + j, &e, sizeof(e));
    total_v += e;
  }
  float total = sum_lanes(total_v);
  for (; j < n; ++j) total += (scores[j] = std::exp(scores[j] - top));
  const float inverse = 1.f / total;
  fvec acc[Vecs] = {};
  for (int64_t t = 0; t < n; ++t) {
    const float* value = value_of(first + t);
    const float weight = scores[t] * inverse;
    for (int v = 0; v < Vecs; ++v) acc[v] += weight * simd::load(value + v * kLanes);
  }
  std::memcpy(output, acc, sizeof(acc));
  return top + std::log(total);
}

template <typename T>
void attend(torch::Tensor out, torch::Tensor lse, torch::Tensor q, torch::Tensor k_cache,
            torch::Tensor v_cache, torch::Tensor block_tables, torch::Tensor context_starts,
            torch::Tensor context_lens, double scale, int64_t window) {
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && block_tables.is_contiguous() &&
                  context_lens.is_contiguous() && context_starts.is_contiguous() &&
                  lse.is_contiguous(),
              "paged_decode_attention: contiguous tensors only");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t per_kv = heads / kv_heads, max_blocks = block_tables.size(1);
  const int64_t token_stride = kv_heads * dim, block_stride = block_size * token_stride;
  const float* q_ptr = q.data_ptr<float>();
  const T* k_ptr = static_cast<const T*>(k_cache.data_ptr());
  const T* v_ptr = static_cast<const T*>(v_cache.data_ptr());
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* starts = context_starts.data_ptr<int64_t>();
  float* out_ptr = out.data_ptr<float>();
  float* lse_ptr = lse.data_ptr<float>();
  const float softmax_scale = static_cast<float>(scale);

  // Enough work items to keep every thread busy even for a batch of one.
  const int64_t splits = std::min<int64_t>(
      kv_heads, std::max<int64_t>(1, (2 * at::get_num_threads() + batch - 1) / batch));
  const int64_t kv_per_split = (kv_heads + splits - 1) / splits;

  // Items are dealt round-robin, not in contiguous ranges: the running list is
  // oldest first, so contiguous ranges would hand one thread the longest contexts.
  const int64_t items = batch * splits;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  const int64_t vecs = dim % kLanes == 0 ? dim / kLanes : 0;
  at::parallel_for(0, threads, 1, [&](int64_t thread_begin, int64_t thread_end) {
    std::vector<float> scores, widened(dim);
    for (int64_t thread = thread_begin; thread < thread_end; ++thread) {
      for (int64_t item = thread; item < items; item += threads) {
        const int64_t seq = item / splits;
        const int64_t head_begin = (item % splits) * kv_per_split * per_kv;
        const int64_t head_end = std::min(kv_heads, (item % splits + 1) * kv_per_split) * per_kv;
        const int64_t len = lens[seq];
        const int64_t first = std::max<int64_t>(starts[seq], window > 0 ? len - window : 0);
        const int64_t n = len - first;
        const int64_t* table = tables + seq * max_blocks;
        const float* queries = q_ptr + seq * heads * dim;
        float* outputs = out_ptr + seq * heads * dim;
        // A head of its own KV head (no grouped queries): the per-head loop. Grouped heads
        // keep the loop below, which reads each K/V row once for the group (the per-head
        // loop, reading it again for each, was 1.5x slower at 32 heads over 8).
        if (per_kv == 1 && (vecs == 1 || vecs == 2 || vecs == 4 || vecs == 8)) {
          scores.resize(n);
          for (int64_t h = head_begin; h < head_end; ++h) {
            const int64_t offset = h * dim;  // this head's K or V in a token's row
            const auto rows = [&](const T* cache) {
              return [&, cache](int64_t j) {
                return as_float(cache + table[j / block_size] * block_stride +
                                    (j % block_size) * token_stride + offset,
                                widened.data(), dim);
              };
            };
            const auto head = [&](auto vecs_constant) {
              return attend_head<decltype(vecs_constant)::value>(
                  queries + h * dim, scores.data(), outputs + h * dim, first, len,
                  softmax_scale, rows(k_ptr), rows(v_ptr));
            };
            float& lse_h = lse_ptr[seq * heads + h];
            switch (vecs) {
              case 1: lse_h = head(std::integral_constant<int, 1>()); break;
              case 2: lse_h = head(std::integral_constant<int, 2>()); break;
              case 4: lse_h = head(std::integral_constant<int, 4>()); break;
              default: lse_h = head(std::integral_constant<int, 8>());
            }
          }
          continue;
        }
        scores.assign(heads * n, 0.f);
        for (int64_t j = first; j < len; ++j) {
          const T* row = k_ptr + table[j / block_size] * block_stride +
                         (j % block_size) * token_stride;
          for (int64_t g = head_begin / per_kv; g < head_end / per_kv; ++g) {
            const float* key = as_float(row + g * dim, widened.data(), dim);
            for (int64_t h = g * per_kv; h < (g + 1) * per_kv; ++h) {
              const float* query = queries + h * dim;
              float dot = 0.f;
  #pragma omp simd reduction(+ : dot)
              for (int64_t d = 0; d < dim; ++d) dot += query[d] * key[d];
              scores[h * n + (j - first)] = dot * softmax_scale;
            }
          }
        }
        for (int64_t h = head_begin; h < head_end; ++h) {
          float* row = scores.data() + h * n;
          const float top = *std::max_element(row, row + n);
          float total = 0.f;
          for (int64_t j = 0; j < n; ++j) total += (row[j] = std::exp(row[j] - top));
          const float inverse = 1.f / total;
          for (int64_t j = 0; j < n; ++j) row[j] *= inverse;
          lse_ptr[seq * heads + h] = top + std::log(total);
          std::fill(outputs + h * dim, outputs + (h + 1) * dim, 0.f);
        }
        for (int64_t j = first; j < len; ++j) {
          const T* row = v_ptr + table[j / block_size] * block_stride +
                         (j % block_size) * token_stride;
          for (int64_t g = head_begin / per_kv; g < head_end / per_kv; ++g) {
            const float* value = as_float(row + g * dim, widened.data(), dim);
            for (int64_t h = g * per_kv; h < (g + 1) * per_kv; ++h) {
              const float weight = scores[h * n + (j - first)];
              float* output = outputs + h * dim;
  #pragma omp simd
              for (int64_t d = 0; d < dim; ++d) output[d] += weight * value[d];
            }
          }
        }
      }
    }
  });
}


void paged_decode_attention(torch::Tensor out, torch::Tensor lse, torch::Tensor q,
                            torch::Tensor k_cache, torch::Tensor v_cache,
                            torch::Tensor block_tables, torch::Tensor context_starts,
                            torch::Tensor context_lens, double scale, int64_t window) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == v_cache.scalar_type(),
              "paged_decode_attention: float32 queries, K and V caches of one dtype");
  switch (k_cache.scalar_type()) {
    case torch::kFloat32:
      return attend<float>(out, lse, q, k_cache, v_cache, block_tables, context_starts,
                           context_lens, scale, window);
    case torch::kFloat16:
      return attend<_Float16>(out, lse, q, k_cache, v_cache, block_tables, context_starts,
                              context_lens, scale, window);
    case torch::kBFloat16:
      return attend<BFloat16>(out, lse, q, k_cache, v_cache, block_tables, context_starts,
                              context_lens, scale, window);
    default:
      TORCH_CHECK(false, "paged_decode_attention: a float32, float16 or bfloat16 cache");
  }
}

}  // namespace
}  // namespace strata::attention
