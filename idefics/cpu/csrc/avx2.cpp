// y = x W^T (+ b) on CPUs with AVX2 and FMA but no AVX-512, for bf16 or float32 weights, or int8 ones with a float32
// scale per output (multiplied before the bias), kept in their plain [N, K] layout; and, as `idefics::linear`, the
// product the decoding steps of decoder_layer.cpp call. This file is the AVX2 extension's own part: it is built
// with -mavx2 (the main extension is compiled for AVX-512 throughout and would fault here) together with
// norm_rope.cpp, attention.cpp and decoder_layer.cpp, which compile to 8-lane code for it (vec.h).
//
// Why: on such CPUs (most laptops, AMD Zen 2/3 servers) oneDNN has no bf16 matmul and ATen's bf16 matrix-vector
// product reads the weights at about half the streaming rate; decoding is bound by that read. Here, for up to
// kFewRows rows, every output feature's weight row is read once, front to back, widened to float32 in registers
// and met by x in FMAs; several rows of x (batched decoding) re-read each weight row from L1. For float32 weights
// that read ran 1.10-1.33x oneDNN's packed kernel over a 463M model's 64 decoder products (oneDNN is what float32
// weights got before). Longer products (prefill) run float32 GEMM: ATen's (MKL) on a float32 weight or a widened
// bf16 one (ATen's bf16 GEMM: ~14 GFLOP/s), oneDNN's on an int8 one widened block by block (torch's int8 kernel:
// 40-50).
//
// Arithmetic: float32. Output o sums x[k] * W[o, k] in 16 lanes (one per k mod 16), the lanes added at the end,
// then the bias in float32, rounded once to x's dtype (round to nearest even). Not the bits of ATen's bf16 path
// (its summation order is its own): equal to a float64 product within float32 summation error and one rounding.
// The lanes of each sum are added in a fixed tree, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kAhead = 4;     // software prefetch this many weight rows ahead
constexpr int64_t kFewRows = 16;  // up to this many rows on `run` (packing.WIDENED_FEW_ROWS)

// 16 bf16 weights from k on as float32: the even ones (k, k+2, ..) and the odd ones. Shifting and masking stay
// within 32-bit lanes (one cheap op each); widening in order (vpmovzxwd) ran at half the rate. x is stored in the
// same even/odd order (`deinterleave`), so each product still meets its own x.
inline void widen(const uint16_t* w, __m256& even, __m256& odd) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(h, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
// 16 int8 weights (weight-only quantization) from k on as float32, in order (x is not reordered for them). Each
// half is widened straight from memory (vpmovsxbd's load): one shuffle fewer than a 16-byte load split in two.
inline void widen(const int8_t* w, __m256& lo, __m256& hi) {
  lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
  hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 8))));
}
inline void widen(const float* w, __m256& lo, __m256& hi) {
  lo = _mm256_loadu_ps(w);
  hi = _mm256_loadu_ps(w + 8);
}
inline float scalar(float w) { return w; }
inline float scalar(int8_t w) { return static_cast<float>(w); }
inline float scalar(uint16_t w) {
  uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// x (float32, k values) → per block of 16: its 8 even then its 8 odd values; the tail (k mod 16) as it is.
void deinterleave(const float* x, int64_t k, float* out) {
  const int64_t body = k - k % 16;
  for (int64_t b = 0; b < body; b += 16) {
    for (int64_t i = 0; i < 8; ++i) {
      out[b + i] = x[b + 2 * i];
      out[b + 8 + i] = x[b + 2 * i + 1];
    }
  }
  for (int64_t i = body; i < k; ++i) out[i] = x[i];
}

inline float horizontal_sum(__m256 a, __m256 b) {
  __m256 s = _mm256_add_ps(a, b);
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

// S outputs for each of R rows of x at once: x rows (deinterleaved for bf16 weights, k values, the row r at
// x + r * k) . W[o_s] for the weight rows w[s], each read front to back and widened once for all R rows. S rows
// from far-apart parts of a thread's range keep S streams of reads in flight: for bf16, two read ~20% faster than
// one here (paired runs, 1-4 MiB rows per thread; three or four no faster, and four adjacent rows ~20% slower);
// float32 and int8 ones alike (int8: 10-35% faster, interleaved runs of the 463M model's shapes). R rows share
// each widened weight (batched decoding: widening, not the read, bounded it when every row re-widened); each
// (row, output) sum takes the same FMAs in the same order whatever R and S, so the bits do not depend on them.
template <int S, int R, bool kFromMemory, typename W>
void dot_rows(const float* x, const W* const* w, int64_t k, float* out) {
  __m256 even[R][S], odd[R][S];
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) even[r][s] = odd[r][s] = _mm256_setzero_ps();
  const int64_t body = k - k % 16;
  for (int64_t i = 0; i < body; i += 16) {
    for (int s = 0; s < S; ++s) {
      if constexpr (kFromMemory) _mm_prefetch(reinterpret_cast<const char*>(w[s] + i + kAhead * k), _MM_HINT_T0);
      __m256 a, b;
      widen(w[s] + i, a, b);
      for (int r = 0; r < R; ++r) {
        even[r][s] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + i), a, even[r][s]);
        odd[r][s] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + i + 8), b, odd[r][s]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) {
      float& v = out[r * S + s];
      v = horizontal_sum(even[r][s], odd[r][s]);
      for (int64_t i = body; i < k; ++i) v += x[r * k + i] * scalar(w[s][i]);
    }
}

// Rows of x per widened weight: all 16 ymm registers hold 2 R S sums, the S widened pairs and the bf16 mask (S 1:
// the odd row out of a thread's range).
template <int S>
constexpr int kBlockRows = S == 1 ? 6 : 3;

// The outputs o[s] (s < S) for the rows row0 + r (r < R) of x. The first block of rows (row0 0) reads the weight
// rows from memory, and prefetches them; the others find them in L1 (prefetching there only took load slots).
template <int S, int R, typename W, typename T>
void store_outputs(const float* xs, int64_t row0, const W* const* w, const int64_t* o, int64_t k, const float* scale,
                   const float* bias, int64_t n, T* ys) {
  float v[R * S];
  row0 == 0 ? dot_rows<S, R, true>(xs, w, k, v) : dot_rows<S, R, false>(xs + row0 * k, w, k, v);
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) {
      const float scaled = scale == nullptr ? v[r * S + s] : v[r * S + s] * scale[o[s]];
      ys[(row0 + r) * n + o[s]] = static_cast<T>(bias == nullptr ? scaled : scaled + bias[o[s]]);  // bf16: nearest even
    }
}

// The last rows of x (fewer than a block) on the block size that fits them: R counts down to 1.
template <int S, int R, typename W, typename T>
void store_remaining(const float* xs, int64_t row0, int64_t rows, const W* const* w, const int64_t* o, int64_t k,
                     const float* scale, const float* bias, int64_t n, T* ys) {
  if constexpr (R > 0) {
    if (rows == R) return store_outputs<S, R>(xs, row0, w, o, k, scale, bias, n, ys);
    store_remaining<S, R - 1>(xs, row0, rows, w, o, k, scale, bias, n, ys);
  }
}

// Outputs o0 + s * part + i for s < S, i < part, for every row of x, kBlockRows rows of x per widened weight.
template <int S, typename W, typename T>
void outputs(const float* xs, int64_t m, const W* weight, int64_t k, const float* scale, const float* bias, int64_t n,
             int64_t o0, int64_t part, T* ys) {
  constexpr int R = kBlockRows<S>;
  for (int64_t i = 0; i < part; ++i) {
    const W* w[S];
    int64_t o[S];
    for (int s = 0; s < S; ++s) {
      o[s] = o0 + s * part + i;
      w[s] = weight + o[s] * k;
    }
    int64_t row0 = 0;
    for (; row0 + R <= m; row0 += R) store_outputs<S, R>(xs, row0, w, o, k, scale, bias, n, ys);
    store_remaining<S, R - 1>(xs, row0, m - row0, w, o, k, scale, bias, n, ys);
  }
}

template <typename W, typename T>
void run(const at::Tensor& x, const W* weight, const float* scale, const float* bias, int64_t n, at::Tensor& y) {
  const int64_t m = x.size(0), k = x.size(1);
  // x as float32 in memory torch's allocator aligns to 64 bytes, so with k a multiple of 16 its 32-byte loads never
  // straddle cache lines (a view or a vector's 16-byte alignment split every other one: 10-20% slower blocks of
  // rows); for bf16 weights in their even/odd order
  at::Tensor aligned = at::empty({m, k}, x.options().dtype(at::kFloat));
  float* xs = aligned.data_ptr<float>();
  if constexpr (std::is_same_v<W, uint16_t>) {
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    for (int64_t row = 0; row < m; ++row) deinterleave(xf.data_ptr<float>() + row * k, k, xs + row * k);
  } else {
    aligned.copy_(x);
  }
  T* ys = reinterpret_cast<T*>(y.data_ptr());
  at::parallel_for(0, n, 64, [&](int64_t o0, int64_t o1) {
    constexpr int S = 2;
    const int64_t part = (o1 - o0) / S;
    outputs<S>(xs, m, weight, k, scale, bias, n, o0, part, ys);
    outputs<1>(xs, m, weight, k, scale, bias, n, o0 + S * part, o1 - o0 - S * part, ys);  // an odd one out
  });
}

// x W^T (+ b) for float32 x [M, K] and a plain float32 W [N, K] on oneDNN (`torch.ops.mkldnn._linear_pointwise`,
// which takes a plain weight too), through the dispatcher: ATen exposes no C++ function for it.
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, weight, bias, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                          std::optional<std::string>()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// x W^T * scale for an int8 W [N, K] and many rows of x: W widened to float32 (exactly: int8 values) a block of
// outputs at a time, oneDNN's float32 GEMM, then each output's scale, as the row kernel applies it. torch's int8
// kernel (`_weight_int8pack_mm`, bf16 x and bf16 scales) ran these products at 30-57 GFLOP/s here, this at 90-100.
// Blocks of 4 MiB of widened weight: memory that size is reused from call to call, where a larger block is mapped
// afresh each time and its page faults halved the rate (idefics-9b's gate/up product would need 344 MiB at once).
at::Tensor int8_prompt(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t block = std::max<int64_t>(64, (int64_t{4} << 20) / (4 * k));
  std::vector<at::Tensor> parts;
  for (int64_t o = 0; o < n; o += block)
    parts.push_back(onednn_linear(xf, weight.narrow(0, o, std::min(block, n - o)).to(at::kFloat), std::nullopt));
  return (parts.size() == 1 ? parts[0] : at::cat(parts, 1)).mul_(scale);
}

at::Tensor widening_linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(), "widening_linear: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "widening_linear: weight must be a contiguous [N, K]");
  const bool int8 = weight.scalar_type() == at::kChar, fp32 = weight.scalar_type() == at::kFloat;
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 || int8 || fp32, "widening_linear: weight must be bfloat16, "
              "float32 or int8, got ", weight.scalar_type());
  TORCH_CHECK(int8 == scale.has_value(), "widening_linear: int8 weights need their per-output scales (and only they)");
  TORCH_CHECK(!(int8 && bias.has_value()), "widening_linear: int8 weights take no bias");
  TORCH_CHECK(input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kFloat,
              "widening_linear: input must be bfloat16 or float32, got ", input.scalar_type());
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(input.size(-1) == k, "widening_linear: input has ", input.size(-1), " features, weight ", k);
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n, "widening_linear: bias has ", bias->numel(), " values for ", n, " outputs");
    b = bias->to(at::kFloat).contiguous();
  }
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = n;
  const at::Tensor x = input.reshape({-1, k});
  at::Tensor sc;
  if (int8) {
    TORCH_CHECK(scale->numel() == n, "widening_linear: ", scale->numel(), " scales for ", n, " outputs");
    sc = scale->to(at::kFloat).contiguous();
  }
  if (x.size(0) > kFewRows) {  // prefill-sized: float32 GEMM on the weight widened (int8: block by block)
    // float32 and bf16 weights on ATen's float32 GEMM (MKL), the reference's own: at the 463M model's prompt
    // shapes it ran 150 ms against oneDNN's 176 (interleaved, weights cold; 155-183 GFLOP/s at 257-1284 rows, at
    // this CPU's FMA peak, against 137-148; alike at 128). bf16 on oneDNN also decoded other greedy tokens than
    // the bf16 reference on the benchmark's random model (a near-tie), where ATen's matched it in every run.
    const std::optional<at::Tensor> bias32 = b.defined() ? std::optional<at::Tensor>(b) : std::nullopt;
    const at::Tensor y = int8 ? int8_prompt(x, weight, sc)
                         : at::linear(x.to(at::kFloat), fp32 ? weight : weight.to(at::kFloat), bias32);
    return y.to(input.scalar_type()).view(shape);
  }
  at::Tensor y = at::empty({x.size(0), n}, input.options());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* sp = int8 ? sc.data_ptr<float>() : nullptr;
  const bool bf16_out = input.scalar_type() == at::kBFloat16;
  if (int8) {
    const auto* w = weight.data_ptr<int8_t>();
    bf16_out ? run<int8_t, c10::BFloat16>(x, w, sp, bp, n, y) : run<int8_t, float>(x, w, sp, bp, n, y);
  } else if (fp32) {
    const auto* w = weight.data_ptr<float>();
    bf16_out ? run<float, c10::BFloat16>(x, w, sp, bp, n, y) : run<float, float>(x, w, sp, bp, n, y);
  } else {
    const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
    bf16_out ? run<uint16_t, c10::BFloat16>(x, w, sp, bp, n, y) : run<uint16_t, float>(x, w, sp, bp, n, y);
  }
  return y.view(shape);
}

}  // namespace

namespace idefics {

// decoder_layer.cpp's product in this extension: `packed` is the plain weight (bf16, float32 or int8).
at::Tensor linear(const at::Tensor& input, const at::Tensor& packed, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& bias, int64_t n, int64_t /*chunk*/) {
  TORCH_CHECK(packed.dim() == 2 && packed.size(0) == n, "idefics linear: a plain [", n, ", K] weight, got ",
              packed.sizes());
  return widening_linear(input, packed, bias, scale);
}

}  // namespace idefics

TORCH_LIBRARY_FRAGMENT(idefics, m) {
  m.def("widening_linear(Tensor input, Tensor weight, Tensor? bias, Tensor? scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(idefics, CPU, m) { m.impl("widening_linear", &widening_linear); }
