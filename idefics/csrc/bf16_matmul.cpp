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
// int8 weights (weight-only quantization, `quantize.Int8Linear`) use the same layout with one byte per weight: each
// chunk of a panel is widened to bf16 in a scratch buffer that stays in L2 (int8 values are exact in bf16), the
// same tiles run on it, and each output is multiplied by its float32 scale before the bias.
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

// One tile: `rows` rows of x times one panel over input pairs [p0, p1) (`w` holds the weights of pair p0 on),
// summed from zero and added to `partial` (or stored there, for the first chunk); the last chunk applies the
// scale and bias, rounds to bf16 and stores the valid columns of `out`.
template <int Rows>
void tile(const uint16_t* x, int64_t ldx, int64_t k, const uint16_t* w, int64_t p0, int64_t p1, float* partial,
          bool first, bool last, const float* scale, const float* bias, const __mmask16* masks, uint16_t* out,
          int64_t ldo) {
  __m512 acc[Rows][4];
  for (int r = 0; r < Rows; r++)
    for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = p0; p < p1; p++, w += kBlockN * 2) {
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
      if (scale != nullptr) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(masks[j], scale + 16 * j));
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[j], bias + 16 * j));
      const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(v);
      _mm256_mask_storeu_epi16(out + r * ldo + 16 * j, masks[j], rounded);
    }
  }
}

using TileFn = void (*)(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, float*, bool, bool,
                        const float*, const float*, const __mmask16*, uint16_t*, int64_t);
constexpr TileFn kTiles[kMaxRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

// `pairs` pair-rows of an int8 panel (128 bytes each) widened to bf16, in the same order.
void widen_int8(const int8_t* src, int64_t pairs, uint16_t* dst) {
  for (int64_t i = 0; i < pairs * kBlockN * 2; i += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(src + i + 2048), _MM_HINT_T0);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    const __m512 hi =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16))));
    _mm512_storeu_si512(dst + i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// One row of x times one int8 panel over pairs [p0, p1), for decoding: widening to bf16 costs more than the
// product at one row, so the weights go to float32 (one conversion per 16) and meet x's float32 pair broadcast
// to every lane pair; lane 2i sums the even input features of output i, lane 2i+1 the odd ones, added at the
// end. `xf` is x in float32, padded to whole pairs. Epilogue as in `tile`.
void int8_row(const float* xf, const int8_t* w, int64_t p0, int64_t p1, float* partial, bool first, bool last,
              const float* scale, const float* bias, const __mmask16* masks, uint16_t* out) {
  __m512 acc[8];
  for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_ps();
  for (int64_t p = p0; p < p1; p++, w += kBlockN * 2) {
    _mm_prefetch(reinterpret_cast<const char*>(w + 2048), _MM_HINT_T0);
    double pair;
    std::memcpy(&pair, xf + 2 * p, sizeof pair);
    const __m512 xx = _mm512_castpd_ps(_mm512_set1_pd(pair));
    for (int j = 0; j < 8; j++) {
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16 * j));
      acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), xx, acc[j]);
    }
  }
  alignas(64) float sums[kBlockN];
  for (int j = 0; j < 8; j++) {
    const __m512 both = _mm512_add_ps(acc[j], _mm512_permute_ps(acc[j], 0xB1));  // even + odd of each output
    _mm512_mask_compressstoreu_ps(sums + 8 * j, 0x5555, both);
  }
  for (int j = 0; j < 4; j++) {
    float* sum = partial + 16 * j;
    __m512 v = _mm512_load_ps(sums + 16 * j);
    if (!first) v = _mm512_add_ps(_mm512_loadu_ps(sum), v);
    if (!last) {
      _mm512_storeu_ps(sum, v);
      continue;
    }
    v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(masks[j], scale + 16 * j));
    if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[j], bias + 16 * j));
    _mm256_mask_storeu_epi16(out + 16 * j, masks[j], (__m256i)_mm512_cvtneps_pbh(v));
  }
}

void check_weight(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kChar) &&
                  w.dim() == 2,
              "bf16_matmul: weight must be a 2-D bfloat16 or int8 CPU tensor, got ", w.scalar_type(), " of shape ",
              w.sizes(), " on ", w.device());
}

template <typename T>
void pack_into(const T* src, int64_t n, int64_t k, T* dst) {
  const int64_t kp = pairs(k);
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; row++) {
      T* base = dst + (row / kBlockN) * kp * kBlockN * 2 + (row % kBlockN) * 2;
      for (int64_t c = 0; c < k; c++) base[(c / 2) * kBlockN * 2 + (c % 2)] = src[row * k + c];
    }
  });
}

at::Tensor pack(const at::Tensor& weight) {
  check_weight(weight);
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  at::Tensor out = at::zeros({panels(n), pairs(k), kBlockN, 2}, w.options());
  if (w.scalar_type() == at::kChar) {
    pack_into(w.data_ptr<int8_t>(), n, k, out.data_ptr<int8_t>());
  } else {
    pack_into(reinterpret_cast<const uint16_t*>(w.data_ptr()), n, k, reinterpret_cast<uint16_t*>(out.data_ptr()));
  }
  return out;
}

at::Tensor unpack(const at::Tensor& packed, int64_t n, int64_t k) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(0) == panels(n) && packed.size(1) == pairs(k) &&
                  packed.size(2) == kBlockN && packed.size(3) == 2,
              "bf16_matmul: packed weight of shape ", packed.sizes(), " does not hold a ", n, " x ", k, " weight");
  return packed.permute({0, 2, 1, 3}).reshape({panels(n) * kBlockN, pairs(k) * 2}).narrow(0, 0, n)
      .narrow(1, 0, k).contiguous();
}

// Per-output float32 values (scale or bias) or nullptr.
at::Tensor per_output(const std::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->numel() == n, "bf16_matmul: ", what, " has ", t->numel(), " values for ", n, " outputs");
  return t->to(at::kFloat).contiguous();
}

at::Tensor linear(const at::Tensor& input, const at::Tensor& packed, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& bias, int64_t n, int64_t chunk) {
  TORCH_CHECK(chunk > 0 && chunk % 2 == 0, "bf16_matmul: chunk must be a positive even number, got ", chunk);
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kBFloat16,
              "bf16_matmul: input must be bfloat16 on the CPU, got ", input.scalar_type(), " on ", input.device());
  const int64_t k = input.size(-1);
  TORCH_CHECK(packed.dim() == 4 && packed.size(0) == panels(n) && packed.size(1) == pairs(k),
              "bf16_matmul: input has ", k, " features but the packed weight holds ", packed.size(1) * 2,
              " (padded) x ", packed.size(0) * kBlockN, " outputs for ", n);
  const bool int8 = packed.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || packed.scalar_type() == at::kBFloat16, "bf16_matmul: packed weight must be bf16 or int8");
  const at::Tensor scale_f = per_output(scale, n, "scale"), bias_f = per_output(bias, n, "bias");
  TORCH_CHECK(int8 == scale_f.defined(), "bf16_matmul: int8 weights need a scale per output (and bf16 ones none)");
  const at::Tensor x = input.reshape({-1, k}).contiguous();
  const int64_t m = x.size(0), np = panels(n), kp = pairs(k);
  std::vector<int64_t> sizes(input.sizes().begin(), input.sizes().end());
  sizes.back() = n;
  at::Tensor out = at::empty(sizes, input.options());
  if (m == 0 || n == 0) return out;
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const char* ws = reinterpret_cast<const char*>(packed.data_ptr());
  const int64_t panel_bytes = kp * kBlockN * 2 * packed.element_size();
  uint16_t* os = reinterpret_cast<uint16_t*>(out.data_ptr());
  const float* ss = scale_f.defined() ? scale_f.data_ptr<float>() : nullptr;
  const float* bs = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const bool chunked = k > chunk, int8_decode = int8 && m == 1;
  std::vector<float> xf(int8_decode ? static_cast<size_t>(kp) * 2 : 0, 0.0f);
  for (int64_t c = 0; c < static_cast<int64_t>(xf.size()) && c < k; c++) {
    const uint32_t bits = static_cast<uint32_t>(xs[c]) << 16;
    std::memcpy(&xf[c], &bits, sizeof bits);
  }
  at::parallel_for(0, np, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> partial(chunked ? static_cast<size_t>(m) * kBlockN : 0);
    std::vector<uint16_t> widened(int8 && !int8_decode ? static_cast<size_t>(chunk / 2) * kBlockN * 2 : 0);
    for (int64_t b = b0; b < b1; b++) {
      const int64_t valid = std::min(kBlockN, n - b * kBlockN);
      __mmask16 masks[4];
      for (int j = 0; j < 4; j++) {
        const int64_t cols = std::clamp<int64_t>(valid - 16 * j, 0, 16);
        masks[j] = static_cast<__mmask16>((1u << cols) - 1u);
      }
      const char* panel = ws + b * panel_bytes;
      const float* panel_scale = ss == nullptr ? nullptr : ss + b * kBlockN;
      const float* panel_bias = bs == nullptr ? nullptr : bs + b * kBlockN;
      for (int64_t p0 = 0; p0 < kp; p0 += chunk / 2) {
        const int64_t p1 = std::min(kp, p0 + chunk / 2);
        if (int8_decode) {
          int8_row(xf.data(), reinterpret_cast<const int8_t*>(panel) + p0 * kBlockN * 2, p0, p1, partial.data(),
                   p0 == 0, p1 == kp, panel_scale, panel_bias, masks, os + b * kBlockN);
          continue;
        }
        const uint16_t* w = reinterpret_cast<const uint16_t*>(panel) + p0 * kBlockN * 2;
        if (int8) {
          widen_int8(reinterpret_cast<const int8_t*>(panel) + p0 * kBlockN * 2, p1 - p0, widened.data());
          w = widened.data();
        }
        for (int64_t r = 0; r < m; r += kMaxRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, m - r));
          kTiles[rows](xs + r * k, k, k, w, p0, p1, partial.data() + (chunked ? r * kBlockN : 0), p0 == 0,
                       p1 == kp, panel_scale, panel_bias, masks, os + r * n + b * kBlockN, n);
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
  m.def("bf16_linear(Tensor input, Tensor packed, Tensor? scale, Tensor? bias, int n, int chunk) -> Tensor");
}

TORCH_LIBRARY_IMPL(idefics, CPU, m) {
  m.impl("bf16_pack", pack);
  m.impl("bf16_unpack", unpack);
  m.impl("bf16_linear", linear);
}
