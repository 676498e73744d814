#include "fused_ops.h"

using namespace strata::fused;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row (float32)");
  m.def("add_rms_norm", &add_rms_norm,
        "residual += x in place, then the RMSNorm of each residual row (float32)");
  m.def("argmax_rows", &argmax_rows,
        "each row's index of its largest value, as torch.argmax(-1) (float32 rows)");
  m.def("rotary_write_kv", &rotary_write_kv,
        "rotate q and k in place (neox halves), then store k and v at their cache slots");
}
