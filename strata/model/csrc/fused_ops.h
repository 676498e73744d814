// The small ops of a decoder layer, fused, on CPU in float32.
//
// At a decode step of a few rows each of these is a handful of torch calls on a few
// hundred floats: F.rms_norm took 35-40 us for one 256-float row on an AVX2 EPYC (a
// reduction's set-up, several kernels), the residual add 3-4 us, the rotary embedding
// eight calls and write_kv four, where the arithmetic is well under a microsecond. Here
// each is one call:
// - rms_norm: out = x * rsqrt(mean(x^2) + eps) * weight, as Hugging Face's LlamaRMSNorm
//   computes it (in float32, the scale applied before the weight);
// - add_rms_norm: residual += x, then out = rms_norm(residual), vLLM's fused residual;
// - rotary_write_kv: q and k rotated in place (neox halves: x1 cos - x2 sin, x2 cos +
//   x1 sin), then k and v stored at their cache slots (rounded to a 16-bit cache's type);
// and, for the sampler, argmax_rows: torch.argmax(-1) of each row of logits.
// Rows are independent and each row's arithmetic is the same whatever the batch (batch
// invariance); rows go to threads only when there are enough of them to pay for it.
// No fused multiply-adds: they would round differently from torch's separate products.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

// Internal linkage: each module that includes this has a copy of its own.
namespace strata::fused {
namespace {

// Scoped to this file's functions: a module that includes it keeps its own contraction.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

constexpr int64_t kGrainFloats = 1 << 15;  // work below this stays on the calling thread

int64_t grain(int64_t row_floats) { return std::max<int64_t>(1, kGrainFloats / row_floats); }

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be [rows, dim] with unit stride");
}

// out = x * rsqrt(mean(x^2) + eps) * w for one row; 8 partial sums (one vector) for the
// mean, as a vectorised reduction keeps them.
inline void norm_row(const float* x, const float* w, float* out, int64_t dim, float eps) {
  float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= dim; i += 8)
    for (int j = 0; j < 8; ++j) partial[j] += x[i + j] * x[i + j];
  float sum = 0;
  for (int j = 0; j < 8; ++j) sum += partial[j];
  for (; i < dim; ++i) sum += x[i] * x[i];
  const float scale = 1.0f / std::sqrt(sum / static_cast<float>(dim) + eps);
  for (int64_t k = 0; k < dim; ++k) out[k] = (x[k] * scale) * w[k];
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_rows(x, "x");
  const int64_t rows = x.size(0), dim = x.size(1);
  TORCH_CHECK(weight.numel() == dim && weight.is_contiguous(), "weight must be [dim]");
  auto out = torch::empty({rows, dim}, x.options());
  const float* xs = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t stride = x.stride(0);
  at::parallel_for(0, rows, grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      norm_row(xs + r * stride, w, o + r * dim, dim, static_cast<float>(eps));
  });
  return out;
}

torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight,
                           double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  const int64_t rows = x.size(0), dim = x.size(1);
  TORCH_CHECK(residual.size(0) == rows && residual.size(1) == dim,
              "residual must have x's shape");
  TORCH_CHECK(weight.numel() == dim && weight.is_contiguous(), "weight must be [dim]");
  auto out = torch::empty({rows, dim}, x.options());
  const float* xs = x.data_ptr<float>();
  float* res = residual.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t x_stride = x.stride(0), res_stride = residual.stride(0);
  at::parallel_for(0, rows, grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = res + r * res_stride;
      const float* add = xs + r * x_stride;
      for (int64_t k = 0; k < dim; ++k) row[k] = add[k] + row[k];
      norm_row(row, w, o + r * dim, dim, static_cast<float>(eps));
    }
  });
  return out;
}

// A K or V row into its cache slot, in the cache's type: float32 as is, float16 and
// bfloat16 rounded to nearest even by c10's conversions, the ones a tensor's .to() uses.
template <typename T>
inline void store_row(T* to, const float* from, int64_t n) {
  if constexpr (std::is_same_v<T, float>)
    std::memcpy(to, from, n * sizeof(float));
  else
    for (int64_t i = 0; i < n; ++i) to[i] = static_cast<T>(from[i]);
}

template <typename T>
void rotate_and_store(float* qks, const float* vs, const float* cs, const float* ss, T* kc,
                      T* vc, const int64_t* slot, int64_t tokens, int64_t all_heads,
                      int64_t q_heads, int64_t head_dim, int64_t qk_stride, int64_t v_stride) {
  const int64_t half = head_dim / 2, row_floats = (all_heads - q_heads) * head_dim;
  at::parallel_for(0, tokens, grain(all_heads * head_dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cs + t * half;
      const float* s = ss + t * half;
      for (int64_t h = 0; h < all_heads; ++h) {
        float* x = qks + t * qk_stride + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = x[i], x2 = x[i + half];
          x[i] = x1 * c[i] - x2 * s[i];
          x[i + half] = x2 * c[i] + x1 * s[i];
        }
      }
      const int64_t to = slot[t] * row_floats;
      store_row(kc + to, qks + t * qk_stride + q_heads * head_dim, row_floats);
      store_row(vc + to, vs + t * v_stride, row_floats);
    }
  });
}

// qk: [tokens, heads + kv_heads, head_dim] (rows may be strided: a view of the qkv
// product), v: [tokens, kv_heads, head_dim], cos and sin: [tokens, head_dim / 2], all
// float32; caches: [slots, kv_heads, head_dim] contiguous, float32, float16 or bfloat16
// (--kv-cache-dtype); slots: [tokens] int64.
void rotary_write_kv(torch::Tensor qk, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
                     torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                     int64_t kv_heads) {
  TORCH_CHECK(qk.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32 &&
                  cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32,
              "rotary_write_kv: float32 q, k, v and angles");
  const auto cache_type = k_cache.scalar_type();
  TORCH_CHECK((cache_type == torch::kFloat32 || cache_type == torch::kFloat16 ||
               cache_type == torch::kBFloat16) &&
                  v_cache.scalar_type() == cache_type,
              "rotary_write_kv: K and V caches of one type, float32, float16 or bfloat16");
  TORCH_CHECK(qk.dim() == 3 && qk.stride(2) == 1 && qk.stride(1) == qk.size(2),
              "qk must be [tokens, heads, head_dim] with contiguous heads");
  TORCH_CHECK(v.dim() == 3 && v.stride(2) == 1 && v.stride(1) == v.size(2),
              "v must be [tokens, kv_heads, head_dim] with contiguous heads");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous(), "slots: int64");
  const int64_t tokens = qk.size(0), all_heads = qk.size(1), head_dim = qk.size(2);
  const int64_t half = head_dim / 2, q_heads = all_heads - kv_heads;
  TORCH_CHECK(head_dim % 2 == 0 && v.size(0) == tokens && v.size(1) == kv_heads &&
                  v.size(2) == head_dim && slots.numel() == tokens,
              "rotary_write_kv: mismatched shapes");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == tokens * half &&
                  sin.numel() == tokens * half,
              "cos and sin must be [tokens, head_dim / 2], contiguous");
  const int64_t row_floats = kv_heads * head_dim;
  TORCH_CHECK(k_cache.numel() % row_floats == 0 && v_cache.numel() == k_cache.numel(),
              "caches must be [slots, kv_heads, head_dim]");
  const int64_t num_slots = k_cache.numel() / row_floats;
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "slot ", slot[t], " out of the cache");
  const auto run = [&](auto* kc, auto* vc) {
    rotate_and_store(qk.data_ptr<float>(), v.data_ptr<float>(), cos.data_ptr<float>(),
                     sin.data_ptr<float>(), kc, vc, slot, tokens, all_heads, q_heads, head_dim,
                     qk.stride(0), v.stride(0));
  };
  if (cache_type == torch::kFloat32)
    run(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  else if (cache_type == torch::kFloat16)
    run(k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>());
  else
    run(k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>());
}

// Each row's index of its largest value, as torch.argmax(-1) gives it: the first of equal
// maxima, a NaN counted above everything. torch's took ~30 us per 32,000-float row here,
// scalar; this keeps a running maximum and its index in each of 8 lanes (one pass, the
// lanes merged at the end), and looks for a NaN only where the pass saw one. Unused where
// only the layers are wanted (decode_step.cpp): no warning there.
[[maybe_unused]] torch::Tensor argmax_rows(torch::Tensor x) {
  check_rows(x, "x");
  TORCH_CHECK(x.size(1) > 0, "argmax_rows: rows must not be empty");
  const int64_t rows = x.size(0), cols = x.size(1), stride = x.stride(0);
  auto out = torch::empty({rows}, x.options().dtype(torch::kInt64));
  const float* xs = x.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  typedef float lanes_f __attribute__((vector_size(32)));
  typedef int32_t lanes_i __attribute__((vector_size(32)));
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xs + r * stride;
      const int64_t vectors = cols < (int64_t{1} << 31) ? cols / 8 * 8 : 0;  // int32 lanes
      int64_t best_index = 0;
      float best = row[0];
      bool nan = false;
      if (vectors > 0) {
        lanes_f top, v;
        std::memcpy(&top, row, sizeof(top));
        lanes_i index = {0, 1, 2, 3, 4, 5, 6, 7}, at = index;
        const lanes_i step = {8, 8, 8, 8, 8, 8, 8, 8};
        lanes_i unordered = top != top;
        for (int64_t i = 8; i < vectors; i += 8) {
          std::memcpy(&v, row + i, sizeof(v));
          at += step;
          const lanes_i greater = v > top;  // strictly: an equal value keeps the earlier
          top = greater ? v : top;
          index = greater ? at : index;
          unordered |= v != v;
        }
        for (int lane = 0; lane < 8; ++lane) {
          nan |= unordered[lane] != 0;
          if (top[lane] > best || (top[lane] == best && index[lane] < best_index)) {
            best = top[lane];
            best_index = index[lane];
          }
        }
      }
      for (int64_t i = vectors; i < cols; ++i) {  // the tail, or a row under 8 values
        nan |= row[i] != row[i];
        if (row[i] > best) {
          best = row[i];
          best_index = i;
        }
      }
      if (nan)  // every value was looked at: a NaN anywhere set it
        for (int64_t i = 0; i < cols; ++i)
          if (row[i] != row[i]) {
            best_index = i;
            break;
          }
      o[r] = best_index;
    }
  });
  return out;
}

#pragma GCC pop_options

}  // namespace
}  // namespace strata::fused
