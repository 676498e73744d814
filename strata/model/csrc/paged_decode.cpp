#include "paged_decode.h"

using namespace strata::attention;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "Paged attention of single-token queries through block tables (CPU; float32 queries, "
        "a float32, float16 or bfloat16 cache)");
}
