// y = x W^T (+ b) in bfloat16 for CPUs with AVX-512 BF16 (one kernel for decoding and prefill).
//
// Why a hand-written kernel: decoding one token is a matrix-vector product per layer, bound by how fast the
// weights stream from memory. oneDNN's prepacked bf16 kernel reads them at ~80% of this machine's streaming
// rate; this one reads a layout made for it (below) front to back and gets within a few percent of it, and it
// matches oneDNN on prefill-sized products (M = 128..1024), so the model keeps one copy of each weight.
//
// Weight layout ("pair-interleaved panels"): [ceil(N/64)][ceil(K/2)][64][2]. Panel p holds output features
// 64p..64p+63; inside it, for every pair of input features (2k, 2k+1), the 64 features' two weights side by
// side. One `vdpbf16ps` then takes a broadcast pair of x and 16 features' pairs and adds both products into 16
// float32 sums, so a panel is read strictly in order and no horizontal reduction is needed. N is padded with
// zero rows and K with a zero column (the output and x are never padded).
//
// Arithmetic: products of bf16 are exact in float32. Each chunk of `chunk` input features is summed in float32
// in input-feature order, starting from zero, and the chunk sums are added in order; then the bias is added in
// float32 and the result rounded to bf16 once (round to nearest even). With the chunk oneDNN uses for the shape
// (`cpu_kernels.onednn_chunk`) every output equals oneDNN's, bit for bit, so the model gives what the reference
// (transformers, whose bf16 matmuls run on oneDNN) gives.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlockN = 64;    // output features per panel: 4 zmm accumulators per row of x
constexpr int kMaxRows = 6;        // rows of x per tile: 6 x 4 accumulators + 4 weight registers < 32 zmm

int64_t panels(int64_t n) { return (n + kBlockN - 1) / kBlockN; }
int64_t pairs(int64_t k) { return (k + 1) / 2; }

// x's input features 2p and 2p+1 as one 32-bit lane (low half = 2p); the odd tail pairs with zero.
inline int32_t x_pair(const uint16_t* row, int64_t p, int64_t k) {
  if (2 * p + 1 < k) {
    int32_t v;
    std::memcpy(&v, row + 2 * p, sizeof v);
    return v;
  }
  return static_cast<int32_t>(row[2 * p]);
}

// One tile: `rows` rows of x times one panel over input pairs [p0, p1), summed from zero and added to
// `partial` (or stored there, for the first chunk); the last chunk adds the bias, rounds to bf16 and stores the
// valid columns of `out`.
template <int Rows>
void tile(const uint16_t* x, int64_t ldx, int64_t k, const uint16_t* panel, int64_t p0, int64_t p1,
          float* partial, bool first, bool last, const float* bias, const __mmask16* masks,
          uint16_t* out, int64_t ldo) {
  __m512 acc[Rows][4];
  for (int r = 0; r < Rows; r++)
    for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = p0; p < p1; p++) {
    const uint16_t* w = panel + p * kBlockN * 2;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 32);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 64);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + 96);
    if (Rows <= 2) _mm_prefetch(reinterpret_cast<const char*>(w + 4096), _MM_HINT_T0);  // streaming: run ahead
    for (int r = 0; r < Rows; r++) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(x_pair(x + r * ldx, p, k));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, w3);
    }
  }
  for (int r = 0; r < Rows; r++) {
    for (int j = 0; j < 4; j++) {
      float* sum = partial + r * kBlockN + 16 * j;
      __m512 v = first ? acc[r][j] : _mm512_add_ps(_mm512_loadu_ps(sum), acc[r][j]);
      if (!last) {
        _mm512_storeu_ps(sum, v);
        continue;
      }
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[j], bias + 16 * j));
      const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(v);
      _mm256_mask_storeu_epi16(out + r * ldo + 16 * j, masks[j], rounded);
    }
  }
}

using TileFn = void (*)(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, float*, bool, bool,
                        const float*, const __mmask16*, uint16_t*, int64_t);
constexpr TileFn kTiles[kMaxRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

void check_weight(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kBFloat16 && w.dim() == 2,
              "bf16_matmul: weight must be a 2-D bfloat16 CPU tensor, got ", w.scalar_type(), " of shape ",
              w.sizes(), " on ", w.device());
}

at::Tensor pack(const at::Tensor& weight) {
  check_weight(weight);
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1), np = panels(n), kp = pairs(k);
  at::Tensor out = at::zeros({np, kp, kBlockN, 2}, w.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; row++) {
      uint16_t* base = dst + (row / kBlockN) * kp * kBlockN * 2 + (row % kBlockN) * 2;
      for (int64_t c = 0; c < k; c++) base[(c / 2) * kBlockN * 2 + (c % 2)] = src[row * k + c];
    }
  });
  return out;
}

at::Tensor unpack(const at::Tensor& packed, int64_t n, int64_t k) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(0) == panels(n) && packed.size(1) == pairs(k) &&
                  packed.size(2) == kBlockN && packed.size(3) == 2,
              "bf16_matmul: packed weight of shape ", packed.sizes(), " does not hold a ", n, " x ", k, " weight");
  return packed.permute({0, 2, 1, 3}).reshape({panels(n) * kBlockN, pairs(k) * 2}).narrow(0, 0, n)
      .narrow(1, 0, k).contiguous();
}

at::Tensor linear(const at::Tensor& input, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                  int64_t n, int64_t chunk) {
  TORCH_CHECK(chunk > 0 && chunk % 2 == 0, "bf16_matmul: chunk must be a positive even number, got ", chunk);
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kBFloat16,
              "bf16_matmul: input must be bfloat16 on the CPU, got ", input.scalar_type(), " on ", input.device());
  const int64_t k = input.size(-1);
  TORCH_CHECK(packed.dim() == 4 && packed.size(0) == panels(n) && packed.size(1) == pairs(k),
              "bf16_matmul: input has ", k, " features but the packed weight holds ", packed.size(1) * 2,
              " (padded) x ", packed.size(0) * kBlockN, " outputs for ", n);
  const at::Tensor x = input.reshape({-1, k}).contiguous();
  const int64_t m = x.size(0), np = panels(n), kp = pairs(k);
  std::vector<int64_t> sizes(input.sizes().begin(), input.sizes().end());
  sizes.back() = n;
  at::Tensor out = at::empty(sizes, input.options());
  if (m == 0 || n == 0) return out;
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, "bf16_matmul: bias has ", bias->numel(), " values for ", n, " outputs");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint16_t* ws = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  uint16_t* os = reinterpret_cast<uint16_t*>(out.data_ptr());
  const float* bs = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const bool chunked = k > chunk;
  at::parallel_for(0, np, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> partial(chunked ? static_cast<size_t>(m) * kBlockN : 0);
    for (int64_t b = b0; b < b1; b++) {
      const int64_t valid = std::min(kBlockN, n - b * kBlockN);
      __mmask16 masks[4];
      for (int j = 0; j < 4; j++) {
        const int64_t cols = std::clamp<int64_t>(valid - 16 * j, 0, 16);
        masks[j] = static_cast<__mmask16>((1u << cols) - 1u);
      }
      const uint16_t* panel = ws + b * kp * kBlockN * 2;
      const float* panel_bias = bs == nullptr ? nullptr : bs + b * kBlockN;
      for (int64_t p0 = 0; p0 < kp; p0 += chunk / 2) {
        const int64_t p1 = std::min(kp, p0 + chunk / 2);
        for (int64_t r = 0; r < m; r += kMaxRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, m - r));
          kTiles[rows](xs + r * k, k, k, panel, p0, p1, partial.data() + (chunked ? r * kBlockN : 0), p0 == 0,
                       p1 == kp, panel_bias, masks, os + r * n + b * kBlockN, n);
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(idefics, m) {
  m.def("bf16_pack(Tensor weight) -> Tensor");
  m.def("bf16_unpack(Tensor packed, int n, int k) -> Tensor");
  m.def("bf16_linear(Tensor input, Tensor packed, Tensor? bias, int n, int chunk) -> Tensor");
}

TORCH_LIBRARY_IMPL(idefics, CPU, m) {
  m.impl("bf16_pack", pack);
  m.impl("bf16_unpack", unpack);
  m.impl("bf16_linear", linear);
}
