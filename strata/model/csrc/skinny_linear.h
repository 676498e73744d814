// y = x @ w.T (+ bias) on CPU in float32, from a weight packed in panels of 16 outputs.
//
// For the few rows of a decode step MKL's GEMM spends its time packing the weight
// (a copy of it on every call) and its one-row path is slower still, while the
// weight is nearly all of a step's memory traffic. So the weight is packed once,
// at load, as [out / 16, in, 16]: a panel holds 16 outputs' weights with the 16
// values of one input side by side, and is read front to back, one vector per
// input. A tile of up to 8 rows of x multiplies each vector by a broadcast input
// value into 8 accumulators that stay in registers (4 on AVX2): no horizontal sums, no
// strided reads. Threads take ranges of panels. The same loop serves prompt
// chunks (hundreds of rows), where it kept pace with MKL in measurements.
//
// The weight may also be int8 with one float scale per output (weight-only
// quantization, per channel): a quarter of the bytes to read, each vector widened
// to float in registers, and the scales applied once per tile at the end. Or bfloat16
// (--dtype bfloat16 on CPU): half the bytes, each value widened exactly (its 16 bits
// are a float32's high half) and multiplied in float32.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "simd.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// Internal linkage: each module that includes this has a copy of its own.
namespace strata::linear {
namespace {

constexpr int64_t kWidth = 16;  // outputs per panel

// Vectors of the CPU's own width (simd.h): a 16-float generic vector on AVX2 (two ymm
// registers) went through the stack, several times slower than two 8-float vectors. A
// row's accumulator is kVecs vectors; AVX-512 has 32 registers for 8 rows of one, AVX2 16
// for 4 rows of two (8 rows would spill).
using simd::kLanes;
using simd::load;
using simd::vec;
constexpr int kTileRows = kLanes == 16 ? 8 : 4;
constexpr int kVecs = kWidth / kLanes;
typedef int8_t vec_i8 __attribute__((vector_size(kLanes)));
typedef uint16_t vec_u16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t vec_u32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// GCC widens generic narrow vectors one lane at a time, on AVX2 and on AVX-512 alike (an
// int8 decode step of the 19.5M model took 3.8 ms on an AVX-512 Xeon, 0.95 ms with these).
inline vec load(const int8_t* p) {
#if defined(__AVX512F__)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vec>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)));
#elif defined(__AVX2__)
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vec>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)));
#else
  vec_i8 v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(v, vec);
#endif
}

inline vec load(const at::BFloat16* p) {
#if defined(__AVX512F__)
  const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return reinterpret_cast<vec>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
#elif defined(__AVX2__)
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vec>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
#else
  vec_u16 halves;
  std::memcpy(&halves, p, sizeof(halves));
  return reinterpret_cast<vec>(__builtin_convertvector(halves, vec_u32) << 16);
#endif
}

// Rows rows of x against one panel; `width` (16, or fewer in the last panel) columns kept.
// A quantized panel's sums are scaled (by `scale`) before the bias is added.
template <int Rows, bool Scaled, typename W>
inline void tile(const W* panel, const float* x, const vec* bias, const vec* scale, float* y,
                 int64_t in, int64_t out_cols, int64_t width) {
  vec acc[Rows][kVecs];
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = Scaled ? vec{} : bias[v];
  for (int64_t i = 0; i < in; ++i) {
    vec w[kVecs];
    for (int v = 0; v < kVecs; ++v) w[v] = load(panel + i * kWidth + v * kLanes);
    for (int r = 0; r < Rows; ++r) {
      const float value = x[r * in + i];
      for (int v = 0; v < kVecs; ++v) acc[r][v] += w[v] * value;
    }
  }
  for (int r = 0; r < Rows; ++r) {
    if constexpr (Scaled)
      for (int v = 0; v < kVecs; ++v) acc[r][v] = acc[r][v] * scale[v] + bias[v];
    std::memcpy(y + r * out_cols, acc[r], width * sizeof(float));
  }
}

// One row against `Panels` consecutive full panels. A single row's tile is one chain of
// dependent multiply-adds, whose latency sets the pace where the weights are narrow (int8
// at one row ran at ~2.4 weights a cycle on an AVX-512 Xeon): here several panels' chains
// interleave. Each output's sum runs in tile<1>'s order, to the same values.
template <int Panels, bool Scaled, typename W>
inline void row_panels(const W* first, const float* x, const float* bias, const float* scales,
                       float* y, int64_t in) {
  vec acc[Panels][kVecs], bias_v[Panels][kVecs] = {}, scale_v[Panels][kVecs] = {};
  for (int n = 0; n < Panels; ++n) {
    if (bias) std::memcpy(bias_v[n], bias + n * kWidth, sizeof(bias_v[n]));
    if (scales) std::memcpy(scale_v[n], scales + n * kWidth, sizeof(scale_v[n]));
    for (int v = 0; v < kVecs; ++v) acc[n][v] = Scaled ? vec{} : bias_v[n][v];
  }
  for (int64_t i = 0; i < in; ++i) {
    const float value = x[i];
    for (int n = 0; n < Panels; ++n)
      for (int v = 0; v < kVecs; ++v)
        acc[n][v] += load(first + (n * in + i) * kWidth + v * kLanes) * value;
  }
  for (int n = 0; n < Panels; ++n) {
    if constexpr (Scaled)
      for (int v = 0; v < kVecs; ++v) acc[n][v] = acc[n][v] * scale_v[n][v] + bias_v[n][v];
    std::memcpy(y + n * kWidth, acc[n], sizeof(acc[n]));
  }
}

constexpr int kRowPanels = 4;

// Every row of x against one panel, in tiles.
template <bool Scaled, typename W>
inline void panel_rows(const W* panel, const float* x, const vec* bias, const vec* scale,
                       float* y, int64_t rows, int64_t in, int64_t out_cols, int64_t width) {
  int64_t row = 0;
  for (; row + kTileRows <= rows; row += kTileRows)
    tile<kTileRows, Scaled>(panel, x + row * in, bias, scale, y + row * out_cols, in, out_cols,
                            width);
  if constexpr (kTileRows > 4)
    for (; row + 4 <= rows; row += 4)
      tile<4, Scaled>(panel, x + row * in, bias, scale, y + row * out_cols, in, out_cols, width);
  for (; row < rows; ++row)
    tile<1, Scaled>(panel, x + row * in, bias, scale, y + row * out_cols, in, out_cols, width);
}

template <typename W>
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, const float* scales,
                     c10::optional<torch::Tensor> bias, int64_t out_cols) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "packed_linear: float32 rows only");
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(2) == kWidth &&
                  x.size(1) == packed.size(1) && packed.is_contiguous(),
              "packed_linear: x [rows, in] and a weight from pack_weight");
  x = x.contiguous();
  const torch::Tensor b = bias.has_value() ? bias->contiguous() : torch::Tensor();
  const int64_t rows = x.size(0), in = x.size(1), panels = packed.size(0);
  auto y = torch::empty({rows, out_cols}, x.options());
  const float* x_ptr = x.data_ptr<float>();
  const W* p_ptr = packed.data_ptr<W>();
  const float* b_ptr = b.defined() ? b.data_ptr<float>() : nullptr;
  float* y_ptr = y.data_ptr<float>();
  constexpr bool scaled = std::is_same_v<W, int8_t>, narrow = !std::is_same_v<W, float>;
  at::parallel_for(0, panels, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> widened;  // a narrow panel in float32, for more rows than a tile
    int64_t p = begin;
    if (rows == 1)
      for (; p + kRowPanels <= end && (p + kRowPanels) * kWidth <= out_cols; p += kRowPanels)
        row_panels<kRowPanels, scaled>(p_ptr + p * in * kWidth, x_ptr,
                                       b_ptr ? b_ptr + p * kWidth : nullptr,
                                       scales ? scales + p * kWidth : nullptr,
                                       y_ptr + p * kWidth, in);
    for (; p < end; ++p) {
      const W* panel = p_ptr + p * in * kWidth;
      const int64_t col = p * kWidth, width = std::min(kWidth, out_cols - col);
      vec bias_v[kVecs] = {}, scale_v[kVecs] = {};
      if (b_ptr) std::memcpy(bias_v, b_ptr + col, width * sizeof(float));
      if (scales) std::memcpy(scale_v, scales + col, width * sizeof(float));
      if (narrow && rows > kTileRows) {
        // Widening costs more than reading fewer bytes saves once several tiles would
        // each widen the panel again: widen it once (in x 16 floats, within L2) instead.
        widened.resize(in * kWidth);
        for (int64_t i = 0; i < in * kWidth; i += kLanes) {
          const vec v = load(panel + i);
          std::memcpy(widened.data() + i, &v, sizeof(v));
        }
        panel_rows<scaled>(widened.data(), x_ptr, bias_v, scale_v, y_ptr + col, rows, in,
                           out_cols, width);
      } else {
        panel_rows<scaled>(panel, x_ptr, bias_v, scale_v, y_ptr + col, rows, in, out_cols,
                           width);
      }
    }
  });
  return y;
}

// Unused where only the products are wanted (decode_step.cpp): no warning there.
[[maybe_unused]] torch::Tensor pack_weight(torch::Tensor w) {
  TORCH_CHECK((w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kInt8 ||
               w.scalar_type() == torch::kBFloat16) &&
                  w.dim() == 2,
              "pack_weight: float32, int8 or bfloat16 [out, in]");
  const int64_t out_cols = w.size(0), in = w.size(1);
  const int64_t panels = (out_cols + kWidth - 1) / kWidth;
  auto padded = torch::zeros({panels * kWidth, in}, w.options());
  padded.narrow(0, 0, out_cols).copy_(w);
  return padded.view({panels, kWidth, in}).transpose(1, 2).contiguous();
}

torch::Tensor packed_linear(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias,
                            int64_t out_cols) {
  TORCH_CHECK(packed.scalar_type() == torch::kFloat32, "packed_linear: a float32 weight");
  return linear<float>(x, packed, nullptr, bias, out_cols);
}

torch::Tensor packed_linear_int8(torch::Tensor x, torch::Tensor packed, torch::Tensor scales,
                                 c10::optional<torch::Tensor> bias, int64_t out_cols) {
  TORCH_CHECK(packed.scalar_type() == torch::kInt8 && scales.scalar_type() == torch::kFloat32 &&
                  scales.is_contiguous() && scales.numel() == out_cols,
              "packed_linear_int8: an int8 weight and float32 scales, one per output");
  return linear<int8_t>(x, packed, scales.data_ptr<float>(), bias, out_cols);
}

torch::Tensor packed_linear_bf16(torch::Tensor x, torch::Tensor packed,
                                 c10::optional<torch::Tensor> bias, int64_t out_cols) {
  TORCH_CHECK(packed.scalar_type() == torch::kBFloat16, "packed_linear_bf16: a bfloat16 weight");
  return linear<at::BFloat16>(x, packed, nullptr, bias, out_cols);
}

}  // namespace
}  // namespace strata::linear
