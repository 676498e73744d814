// y = x @ w.T (+ bias) for the few rows of a decode batch, float32, on CPU.
//
// For a handful of rows MKL's GEMM spends its time packing the weight (a copy of
// it on every call) and its matrix-vector path is slower still, so the weight,
// which is nearly all the memory traffic, streams at a fraction of bandwidth.
// Here each weight row is loaded once, 8 floats at a time, and multiplied into
// one vector accumulator per input row of a tile of up to 8 rows (the tile stays
// in L1, the accumulators in registers); threads take ranges of weight rows.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstring>

namespace {

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Rows r of x (row-major, `in` wide) dotted with one weight row; results to y[r * out_cols].
template <int Rows>
inline void dot_rows(const float* w_row, const float* x, int64_t in, float* y,
                     int64_t out_cols, float bias) {
  v8 acc[Rows] = {};
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    const v8 weights = load8(w_row + i);
    for (int r = 0; r < Rows; ++r) acc[r] += weights * load8(x + r * in + i);
  }
  for (int r = 0; r < Rows; ++r) {
    float sum = bias;
    for (int lane = 0; lane < 8; ++lane) sum += acc[r][lane];
    for (int64_t j = i; j < in; ++j) sum += w_row[j] * x[r * in + j];
    y[r * out_cols] = sum;
  }
}

}  // namespace

torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32,
              "skinny_linear: float32 only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "skinny_linear: x [rows, in] and w [out, in]");
  TORCH_CHECK(w.is_contiguous(), "skinny_linear: contiguous weight only");
  x = x.contiguous();
  const torch::Tensor b = bias.has_value() ? bias->contiguous() : torch::Tensor();
  const int64_t rows = x.size(0), in = x.size(1), out_cols = w.size(0);
  auto y = torch::empty({rows, out_cols}, x.options());
  const float* x_ptr = x.data_ptr<float>();
  const float* w_ptr = w.data_ptr<float>();
  const float* b_ptr = b.defined() ? b.data_ptr<float>() : nullptr;
  float* y_ptr = y.data_ptr<float>();
  at::parallel_for(0, out_cols, 64, [&](int64_t begin, int64_t end) {
    for (int64_t col = begin; col < end; ++col) {
      const float* w_row = w_ptr + col * in;
      const float b_col = b_ptr ? b_ptr[col] : 0.f;
      int64_t row = 0;
      for (; row + 8 <= rows; row += 8)
        dot_rows<8>(w_row, x_ptr + row * in, in, y_ptr + row * out_cols + col, out_cols, b_col);
      for (; row + 4 <= rows; row += 4)
        dot_rows<4>(w_row, x_ptr + row * in, in, y_ptr + row * out_cols + col, out_cols, b_col);
      for (; row < rows; ++row)
        dot_rows<1>(w_row, x_ptr + row * in, in, y_ptr + row * out_cols + col, out_cols, b_col);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear", &skinny_linear, "x @ w.T (+ bias) for a few rows of x (float32, CPU)");
}
