// y = x @ w.T (+ bias) on CPU in float32, from a weight packed in panels of 16 outputs.
//
// For the few rows of a decode step MKL's GEMM spends its time packing the weight
// (a copy of it on every call) and its one-row path is slower still, while the
// weight is nearly all of a step's memory traffic. So the weight is packed once,
// at load, as [out / 16, in, 16]: a panel holds 16 outputs' weights with the 16
// values of one input side by side, and is read front to back, one vector per
// input. A tile of up to 8 rows of x multiplies each vector by a broadcast input
// value into 8 accumulators that stay in registers: no horizontal sums, no
// strided reads. Threads take ranges of panels. The same loop serves prompt
// chunks (hundreds of rows), where it kept pace with MKL in measurements.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>

namespace {

constexpr int64_t kWidth = 16;
typedef float v16 __attribute__((vector_size(kWidth * sizeof(float))));

inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Rows rows of x against one panel; `width` (16, or fewer in the last panel) columns kept.
template <int Rows>
inline void tile(const float* panel, const float* x, const v16& bias, float* y, int64_t in,
                 int64_t out_cols, int64_t width) {
  v16 acc[Rows];
  for (int r = 0; r < Rows; ++r) acc[r] = bias;
  for (int64_t i = 0; i < in; ++i) {
    const v16 w = load(panel + i * kWidth);
    for (int r = 0; r < Rows; ++r) acc[r] += w * x[r * in + i];
  }
  for (int r = 0; r < Rows; ++r) std::memcpy(y + r * out_cols, &acc[r], width * sizeof(float));
}

}  // namespace

torch::Tensor pack_weight(torch::Tensor w) {
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.dim() == 2, "pack_weight: float32 [out, in]");
  const int64_t out_cols = w.size(0), in = w.size(1);
  const int64_t panels = (out_cols + kWidth - 1) / kWidth;
  auto padded = torch::zeros({panels * kWidth, in}, w.options());
  padded.narrow(0, 0, out_cols).copy_(w);
  return padded.view({panels, kWidth, in}).transpose(1, 2).contiguous();
}

torch::Tensor packed_linear(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias,
                            int64_t out_cols) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && packed.scalar_type() == torch::kFloat32,
              "packed_linear: float32 only");
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 3 && packed.size(2) == kWidth &&
                  x.size(1) == packed.size(1) && packed.is_contiguous(),
              "packed_linear: x [rows, in] and a weight from pack_weight");
  x = x.contiguous();
  const torch::Tensor b = bias.has_value() ? bias->contiguous() : torch::Tensor();
  const int64_t rows = x.size(0), in = x.size(1), panels = packed.size(0);
  auto y = torch::empty({rows, out_cols}, x.options());
  const float* x_ptr = x.data_ptr<float>();
  const float* p_ptr = packed.data_ptr<float>();
  const float* b_ptr = b.defined() ? b.data_ptr<float>() : nullptr;
  float* y_ptr = y.data_ptr<float>();
  at::parallel_for(0, panels, 4, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* panel = p_ptr + p * in * kWidth;
      const int64_t col = p * kWidth, width = std::min(kWidth, out_cols - col);
      v16 bias_v = {};
      if (b_ptr) std::memcpy(&bias_v, b_ptr + col, width * sizeof(float));
      int64_t row = 0;
      for (; row + 8 <= rows; row += 8)
        tile<8>(panel, x_ptr + row * in, bias_v, y_ptr + row * out_cols + col, in, out_cols, width);
      for (; row + 4 <= rows; row += 4)
        tile<4>(panel, x_ptr + row * in, bias_v, y_ptr + row * out_cols + col, in, out_cols, width);
      for (; row < rows; ++row)
        tile<1>(panel, x_ptr + row * in, bias_v, y_ptr + row * out_cols + col, in, out_cols, width);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_weight", &pack_weight, "[out, in] -> [ceil(out / 16), in, 16], zero-padded");
  m.def("packed_linear", &packed_linear, "x @ w.T (+ bias) from a packed weight (float32, CPU)");
}
