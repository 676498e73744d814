// y = x @ w.T (+ bias) for the few rows of a decode batch, float32, on CPU.
//
// For a handful of rows MKL's GEMM spends its time packing the weight (a copy of
// it on every call) and its matrix-vector path is slower still, so the weight,
// which is nearly all the memory traffic, streams at a fraction of bandwidth.
// Here the weight is stored transposed, wt = [in, out], so that 16 neighbouring
// outputs are one vector: for a block of 16 outputs and a tile of up to 8 input
// rows, each wt row segment is loaded once and multiplied by a broadcast input
// value into 8 vector accumulators that stay in registers, with no horizontal
// sums. The 16 x in block stays in L1 while the row tiles pass over it; threads
// take ranges of output blocks.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstring>

namespace {

constexpr int64_t kWidth = 16;
typedef float v16 __attribute__((vector_size(kWidth * sizeof(float))));

inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int Rows>
inline void block(const float* wt, const float* x, const float* bias, float* y, int64_t in,
                  int64_t out_cols, int64_t col) {
  v16 acc[Rows];
  const v16 b = bias ? load(bias + col) : v16{};
  for (int r = 0; r < Rows; ++r) acc[r] = b;
  for (int64_t i = 0; i < in; ++i) {
    const v16 w = load(wt + i * out_cols + col);
    for (int r = 0; r < Rows; ++r) acc[r] += w * x[r * in + i];
  }
  for (int r = 0; r < Rows; ++r) std::memcpy(y + r * out_cols + col, &acc[r], sizeof(v16));
}

// The last out_cols % 16 outputs, one at a time.
void tail(const float* wt, const float* x, const float* bias, float* y, int64_t rows,
          int64_t in, int64_t out_cols, int64_t col) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = col; c < out_cols; ++c) {
      float sum = bias ? bias[c] : 0.f;
      for (int64_t i = 0; i < in; ++i) sum += wt[i * out_cols + c] * x[r * in + i];
      y[r * out_cols + c] = sum;
    }
  }
}

}  // namespace

torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor wt, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && wt.scalar_type() == torch::kFloat32,
              "skinny_linear: float32 only");
  TORCH_CHECK(x.dim() == 2 && wt.dim() == 2 && x.size(1) == wt.size(0),
              "skinny_linear: x [rows, in] and wt [in, out]");
  TORCH_CHECK(wt.is_contiguous(), "skinny_linear: contiguous transposed weight only");
  x = x.contiguous();
  const torch::Tensor b = bias.has_value() ? bias->contiguous() : torch::Tensor();
  const int64_t rows = x.size(0), in = x.size(1), out_cols = wt.size(1);
  auto y = torch::empty({rows, out_cols}, x.options());
  const float* x_ptr = x.data_ptr<float>();
  const float* w_ptr = wt.data_ptr<float>();
  const float* b_ptr = b.defined() ? b.data_ptr<float>() : nullptr;
  float* y_ptr = y.data_ptr<float>();
  const int64_t blocks = out_cols / kWidth;
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t col = blk * kWidth;
      int64_t row = 0;
      for (; row + 8 <= rows; row += 8)
        block<8>(w_ptr, x_ptr + row * in, b_ptr, y_ptr + row * out_cols, in, out_cols, col);
      for (; row + 4 <= rows; row += 4)
        block<4>(w_ptr, x_ptr + row * in, b_ptr, y_ptr + row * out_cols, in, out_cols, col);
      for (; row < rows; ++row)
        block<1>(w_ptr, x_ptr + row * in, b_ptr, y_ptr + row * out_cols, in, out_cols, col);
    }
  });
  tail(w_ptr, x_ptr, b_ptr, y_ptr, rows, in, out_cols, blocks * kWidth);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear", &skinny_linear,
        "x @ wt (+ bias) for a few rows of x, the weight stored transposed (float32, CPU)");
}
