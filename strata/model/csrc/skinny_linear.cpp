#include "skinny_linear.h"

using namespace strata::linear;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_weight", &pack_weight, "[out, in] -> [ceil(out / 16), in, 16], zero-padded");
  m.def("packed_linear", &packed_linear, "x @ w.T (+ bias) from a packed weight (float32, CPU)");
  m.def("packed_linear_int8", &packed_linear_int8,
        "x @ (w * scales[:, None]).T (+ bias) from a packed int8 weight (CPU)");
  m.def("packed_linear_bf16", &packed_linear_bf16,
        "x @ w.T (+ bias) from a packed bfloat16 weight, in float32 (CPU)");
}
