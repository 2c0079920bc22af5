// The CPU ops of this extension, callable from each other's files (decoder_layer.cpp runs a whole layer on them).
// Each is registered as torch.ops.idefics.<name>; kernels.py documents them.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace idefics {

// Most of x one thread keeps in L2 (2 MiB here) beside the weight panel it works on: a long prompt's rows are
// split into groups of at most this size, each group meeting every panel (matmul.cpp, amx.cpp).
constexpr int64_t kRowGroupBytes = 768 << 10;

// matmul.cpp: y = x W^T (+ b) on a packed weight; chunk <= 0 picks oneDNN's summation blocks (`default_chunk`).
at::Tensor pack(const at::Tensor& weight);
at::Tensor unpack(const at::Tensor& packed, int64_t n, int64_t k);
int64_t default_chunk(at::ScalarType weight, int64_t rows, int64_t k);
at::Tensor linear(const at::Tensor& input, const at::Tensor& packed, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& bias, int64_t n, int64_t chunk);

// `count` pair-rows of an int8 panel (128 bytes each) widened to bf16 (exact), in the same order.
void widen_int8(const int8_t* src, int64_t count, uint16_t* dst);

// amx.cpp: the product on AMX tiles (x: [M, K] contiguous bf16; packed bf16, or int8 with a float32 scale per
// output; bias: n float32 values or null), and whether this CPU and kernel let the process use the tiles. `linear`
// hands bf16 weights (int8 ones for more than one row) to it when they do, whatever its `chunk`.
bool amx_usable();
at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed, const float* scale, const float* bias,
                      int64_t n);

// norm_rope.cpp
at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps);
at::Tensor rotary_into_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                             const at::Tensor& sin, at::Tensor& keys, at::Tensor& values, int64_t layer,
                             int64_t start);

// attention.cpp
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask);

}  // namespace idefics
