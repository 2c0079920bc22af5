// One decoding step (one new position per row) of a LLaMA decoder layer, and of a gated cross-attention layer,
// with fused, packed weights, in C++.
//
// Why: with the matmuls at the memory's pace, what was left of a bf16 step was Python: each of a layer's ~25
// tensor operations cost a few microseconds of argument parsing and module calls, ~1.5 ms of a ~21 ms step for
// the 16 layers. Here the layer is the same sequence of the same operations (this extension's ops and ATen's),
// called from C++ - so the results are those of `language_model.DecoderLayer.forward` and
// `cross_attention.GatedCrossAttentionLayer.forward` bit for bit (tests/cpu/test_decoder_layer.py), and that Python
// code stays the definition of the layers.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"

namespace {

// `layers.SwiGLU` on its (normed) input: gate and up in one matmul.
at::Tensor swiglu(const at::Tensor& x, const at::Tensor& gate_up, const std::optional<at::Tensor>& gate_up_scale,
                  const at::Tensor& down, const std::optional<at::Tensor>& down_scale, int64_t hidden) {
  const at::Tensor gu = idefics::linear(x, gate_up, gate_up_scale, std::nullopt, 2 * hidden, 0);
  const auto gate = gu.split_with_sizes({hidden, hidden}, -1);
  return idefics::linear(at::silu(gate[0]) * gate[1], down, down_scale, std::nullopt, x.size(-1), 0);
}

}  // namespace

namespace idefics {

// x [B, 1, D] -> the layer's output [B, 1, D]; `keys`/`values` the position-major cache [layers, B, max_len,
// kv_heads, d] whose positions [0, start) are filled; cos/sin the rotary tables of the new position; mask
// [B or 1, 1, 1, start + 1] boolean or none. Weights as `packing.FusedLinear` / `PackedLinear` hold them, or int8
// ones as `quantize.FusedInt8Linear` / `Int8Linear` do, with their per-output scales (x bf16).
at::Tensor decoder_layer_step(const at::Tensor& x, const at::Tensor& input_norm, const at::Tensor& post_norm,
                              double eps, const at::Tensor& qkv, const at::Tensor& o, const at::Tensor& gate_up,
                              const at::Tensor& down, int64_t heads, int64_t kv_heads, int64_t hidden,
                              const at::Tensor& cos, const at::Tensor& sin, at::Tensor& keys, at::Tensor& values,
                              int64_t layer, int64_t start, const std::optional<at::Tensor>& mask,
                              const std::optional<at::Tensor>& qkv_scale, const std::optional<at::Tensor>& o_scale,
                              const std::optional<at::Tensor>& gate_up_scale,
                              const std::optional<at::Tensor>& down_scale) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && keys.dim() == 5, "idefics decoder step: x must be [B, 1, D] and "
              "the cache [layers, B, max_len, kv_heads, d], got ", x.sizes(), " and ", keys.sizes());
  const int64_t b = x.size(0), dim = x.size(2), d = keys.size(4);
  // self-attention: norm, q/k/v in one matmul, rotary + cache write, attention over the cache, output projection
  const at::Tensor projected = linear(rms_norm(x, input_norm, eps), qkv, qkv_scale, std::nullopt,
                                      (heads + 2 * kv_heads) * d, 0);
  const auto parts = projected.split_with_sizes({heads * d, kv_heads * d, kv_heads * d}, -1);
  const at::Tensor q = rotary_into_cache(parts[0], parts[1], parts[2], cos, sin, keys, values, layer, start);
  const at::Tensor k = keys.select(0, layer).slice(1, 0, start + 1).transpose(1, 2);
  const at::Tensor v = values.select(0, layer).slice(1, 0, start + 1).transpose(1, 2);
  const at::Tensor attended = decode_attention(q, k, v, mask).transpose(1, 2).reshape({b, 1, heads * d});
  const at::Tensor h = x + linear(attended, o, o_scale, std::nullopt, dim, 0);
  return h + swiglu(rms_norm(h, post_norm, eps), gate_up, gate_up_scale, down, down_scale, hidden);
}

// x [B, 1, D] -> the gated cross-attention layer's output. `k`/`v` the image keys/values [B, heads, L, d]
// (`CrossAttention.project_images`), `mask` additive [B, 1, 1, L] and `gate` [B, 1] (1 where the row sees an
// image); no k (no row sees an image): the dense sub-block only. `q_norm` the per-head query RMSNorm, or none.
at::Tensor gated_cross_attention_step(const at::Tensor& x, const at::Tensor& input_norm, const at::Tensor& post_norm,
                                      double eps, const at::Tensor& q_weight, const at::Tensor& o,
                                      const at::Tensor& gate_up, const at::Tensor& down, int64_t heads,
                                      int64_t hidden, const std::optional<at::Tensor>& q_norm, double q_norm_eps,
                                      const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
                                      const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& gate,
                                      const at::Tensor& alpha_attn, const at::Tensor& alpha_dense,
                                      const std::optional<at::Tensor>& q_scale,
                                      const std::optional<at::Tensor>& o_scale,
                                      const std::optional<at::Tensor>& gate_up_scale,
                                      const std::optional<at::Tensor>& down_scale) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "idefics cross-attention step: x must be [B, 1, D], got ", x.sizes());
  at::Tensor h = x;
  if (k.has_value() && k->defined()) {
    TORCH_CHECK(v.has_value() && gate.has_value() && k->dim() == 4,
                "idefics cross-attention step: k [B, heads, L, d] comes with v and the gate");
    const int64_t b = x.size(0), d = k->size(3);
    at::Tensor q = linear(rms_norm(x, input_norm, eps), q_weight, q_scale, std::nullopt, heads * d, 0)
                       .view({b, 1, heads, d}).transpose(1, 2);
    if (q_norm.has_value() && q_norm->defined()) q = rms_norm(q, *q_norm, q_norm_eps);
    const at::Tensor attended = decode_attention(q, *k, *v, mask).transpose(1, 2).reshape({b, 1, heads * d});
    const at::Tensor attn = linear(attended, o, o_scale, std::nullopt, x.size(2), 0)
                                .masked_fill(gate->eq(0).unsqueeze(2), 0.0);
    h = x + at::tanh(alpha_attn) * attn;
  }
  return h + at::tanh(alpha_dense) * swiglu(rms_norm(h, post_norm, eps), gate_up, gate_up_scale, down, down_scale,
                                            hidden);
}

}  // namespace idefics

TORCH_LIBRARY_FRAGMENT(idefics, m) {
  m.def("decoder_layer_step(Tensor x, Tensor input_norm, Tensor post_norm, float eps, Tensor qkv, Tensor o, "
        "Tensor gate_up, Tensor down, int heads, int kv_heads, int hidden, Tensor cos, Tensor sin, Tensor(a!) keys, "
        "Tensor(b!) values, int layer, int start, Tensor? mask, Tensor? qkv_scale, Tensor? o_scale, "
        "Tensor? gate_up_scale, Tensor? down_scale) -> Tensor");
  m.def("gated_cross_attention_step(Tensor x, Tensor input_norm, Tensor post_norm, float eps, Tensor q, Tensor o, "
        "Tensor gate_up, Tensor down, int heads, int hidden, Tensor? q_norm, float q_norm_eps, Tensor? k, Tensor? v, "
        "Tensor? mask, Tensor? gate, Tensor alpha_attn, Tensor alpha_dense, Tensor? q_scale, Tensor? o_scale, "
        "Tensor? gate_up_scale, Tensor? down_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(idefics, CPU, m) {
  m.impl("decoder_layer_step", idefics::decoder_layer_step);
  m.impl("gated_cross_attention_step", idefics::gated_cross_attention_step);
}
