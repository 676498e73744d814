// A decode step from its tokens to the final norm, in one call, on CPU in float32.
//
// At one sequence of the 19.5M model a layer's kernels took ~0.35 ms on an AVX2 EPYC and
// the interpreter between them ~0.4 ms more: module calls, views, splits, checks, each
// a few microseconds, some forty a layer. Here the embedding, the rotary tables' rows,
// the layer loop and the final norm run in C++ and call the same kernels
// (skinny_linear.h, fused_ops.h, paged_decode.h, oneDNN's linear) and torch's silu and mul, in
// the same order on the same values: its outputs are the Python path's bit for bit
// (tests/test_decode_step.py), and that path stays for prompt chunks, mixed steps,
// cascade attention and every model or kernel this does not cover (decode_step.py says
// which).
#include "fused_ops.h"
#include "paged_decode.h"
#include "skinny_linear.h"

#include <vector>

namespace {

// oneDNN's linear (torch's mkldnn::_linear_pointwise, as layers.py calls it) over a weight
// reordered for it. Called boxed: its C++ signature is not in torch's headers.
torch::Tensor onednn_linear(const torch::Tensor& x, const torch::Tensor& reordered,
                            const c10::optional<torch::Tensor>& bias) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  // The fixed arguments built once (the op reads them, it does not change them).
  static const c10::IValue attr(std::string("none")), algorithm(std::string(""));
  static const c10::IValue scalars{c10::List<c10::optional<c10::Scalar>>()};
  std::vector<c10::IValue> stack{x, reordered, bias, attr, scalars, algorithm};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// Which product a Linear's kernel (layers.py) is.
enum class Product : int64_t { kPacked = 0, kOneDNN = 1, kTorch = 2 };

// A Linear's weight as its kernel takes it: packed for the C++ kernel in float32, bfloat16
// (--dtype bfloat16) or int8 with a scale per output (--quantization int8); reordered for
// oneDNN, in float32 or bfloat16 (its input rounded to bfloat16, its output widened); or
// the [out, in] weight of torch's own product.
struct PackedLinear {
  torch::Tensor packed;
  c10::optional<torch::Tensor> scales, bias;
  int64_t out_features;
  Product product;

  torch::Tensor operator()(const torch::Tensor& x) const {
    namespace linear = strata::linear;
    const bool bf16 = packed.scalar_type() == torch::kBFloat16;
    if (product == Product::kTorch) return at::linear(x, packed, bias);
    if (product == Product::kOneDNN && !bf16) return onednn_linear(x, packed, bias);
    if (product == Product::kOneDNN) {
      torch::Tensor y = onednn_linear(x.to(torch::kBFloat16), packed, c10::nullopt);
      y = y.to(torch::kFloat32);
      return bias.has_value() ? y.add_(*bias) : y;
    }
    if (scales.has_value())
      return linear::packed_linear_int8(x, packed, *scales, bias, out_features);
    if (bf16) return linear::packed_linear_bf16(x, packed, bias, out_features);
    return linear::packed_linear(x, packed, bias, out_features);
  }
};

struct Layer {
  torch::Tensor input_norm, post_attention_norm;
  PackedLinear qkv, o, gate_up, down;
  torch::Tensor k_cache, v_cache;  // [blocks, block_size, kv_heads, head_dim]
  torch::Tensor k_slots, v_slots;  // the same, as [slots, kv_heads, head_dim]
  int64_t sliding_window;          // 0: none
};

class DecoderLayers {
 public:
  // embedding: [vocab, hidden]; cos, sin: the rotary tables, [positions, head_dim / 2].
  DecoderLayers(torch::Tensor embedding, torch::Tensor cos, torch::Tensor sin,
                torch::Tensor final_norm, int64_t heads, int64_t kv_heads, int64_t head_dim,
                int64_t intermediate, double eps, double scale)
      : embedding_(embedding), cos_(cos), sin_(sin), final_norm_(final_norm), heads_(heads),
        kv_heads_(kv_heads), head_dim_(head_dim), intermediate_(intermediate), eps_(eps),
        scale_(scale) {}

  void add_layer(torch::Tensor input_norm, torch::Tensor post_attention_norm,
                 PackedLinear qkv, PackedLinear o, PackedLinear gate_up, PackedLinear down,
                 torch::Tensor k_cache, torch::Tensor v_cache, int64_t sliding_window) {
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(2) == kv_heads_ &&
                    k_cache.size(3) == head_dim_ && v_cache.sizes() == k_cache.sizes(),
                "add_layer: caches must be [blocks, block_size, kv_heads, head_dim]");
    TORCH_CHECK(qkv.out_features == (heads_ + 2 * kv_heads_) * head_dim_ &&
                    gate_up.out_features == 2 * intermediate_,
                "add_layer: the qkv and gate_up products do not fit the heads and sizes");
    const std::vector<int64_t> rows = {-1, kv_heads_, head_dim_};
    layers_.push_back({input_norm, post_attention_norm, qkv, o, gate_up, down, k_cache,
                       v_cache, k_cache.view(rows), v_cache.view(rows), sliding_window});
  }

  // The step's tokens (one decode of each sequence) and their positions, then the
  // attention's inputs as paged_decode_attention takes them. Returns the final norm's
  // output, [tokens, hidden], as the Python model does.
  torch::Tensor forward(torch::Tensor input_ids, torch::Tensor positions, torch::Tensor slots,
                        torch::Tensor block_tables, torch::Tensor context_starts,
                        torch::Tensor context_lens) const {
    namespace fused = strata::fused;
    const int64_t tokens = input_ids.size(0), q_size = heads_ * head_dim_,
                  kv_size = kv_heads_ * head_dim_;
    const torch::Tensor cos = cos_.index_select(0, positions);
    const torch::Tensor sin = sin_.index_select(0, positions);
    torch::Tensor residual = embedding_.index_select(0, input_ids), x;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      x = i == 0 ? fused::rms_norm(residual, layer.input_norm, eps_)
                 : fused::add_rms_norm(x, residual, layer.input_norm, eps_);
      const torch::Tensor qkv = layer.qkv(x);
      const torch::Tensor qk =
          qkv.narrow(1, 0, q_size + kv_size).view({tokens, heads_ + kv_heads_, head_dim_});
      const torch::Tensor v =
          qkv.narrow(1, q_size + kv_size, kv_size).view({tokens, kv_heads_, head_dim_});
      fused::rotary_write_kv(qk, v, cos, sin, layer.k_slots, layer.v_slots, slots, kv_heads_);
      const torch::Tensor q = qk.narrow(1, 0, heads_).contiguous();
      const torch::Tensor attended = torch::empty_like(q);
      const torch::Tensor lse = torch::empty({tokens, heads_}, q.options());
      strata::attention::paged_decode_attention(attended, lse, q, layer.k_cache,
                                                layer.v_cache, block_tables, context_starts,
                                                context_lens, scale_, layer.sliding_window);
      x = fused::add_rms_norm(layer.o(attended.view({tokens, q_size})), residual,
                              layer.post_attention_norm, eps_);
      const torch::Tensor gate_up = layer.gate_up(x);
      x = layer.down(at::silu(gate_up.narrow(1, 0, intermediate_))
                         .mul_(gate_up.narrow(1, intermediate_, intermediate_)));
    }
    return fused::add_rms_norm(x, residual, final_norm_, eps_);
  }

 private:
  torch::Tensor embedding_, cos_, sin_, final_norm_;
  int64_t heads_, kv_heads_, head_dim_, intermediate_;
  double eps_, scale_;
  std::vector<Layer> layers_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<PackedLinear>(m, "PackedLinear")
      .def(py::init([](torch::Tensor packed, c10::optional<torch::Tensor> scales,
                       c10::optional<torch::Tensor> bias, int64_t out_features,
                       int64_t product) {
             TORCH_CHECK(product >= 0 && product <= 2, "PackedLinear: product 0, 1 or 2");
             return PackedLinear{packed, scales, bias, out_features, Product(product)};
           }),
           py::arg("packed"), py::arg("scales"), py::arg("bias"), py::arg("out_features"),
           py::arg("product"));
  py::class_<DecoderLayers>(m, "DecoderLayers")
      .def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t,
                    int64_t, int64_t, int64_t, double, double>(),
           py::arg("embedding"), py::arg("cos"), py::arg("sin"), py::arg("final_norm"),
           py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("intermediate"),
           py::arg("eps"), py::arg("scale"))
      .def("add_layer", &DecoderLayers::add_layer)
      .def("forward", &DecoderLayers::forward, py::call_guard<py::gil_scoped_release>(),
           "a decode-only step from its tokens to the final norm's output");
}
