// RMSNorm and rotary embeddings (written into the KV cache) for CPU inference: each one op instead of the
// 6-12 small ATen ops of the eager code, with the same bits.
//
// Why: a decoding step runs ~40 norms and ~16 rotations on single rows; in eager PyTorch each is a chain of
// tiny kernels (x.float(), pow, sum, div, add, rsqrt, mul, cast, mul; view, flip, mul, mul, add, two cache
// copies) whose dispatch costs far more than the arithmetic. Together they were ~15% of a step.
//
// Arithmetic: the exact operations of the eager code in the same order, so results are bit-identical to it
// (tests/cpu/test_cpu_norm_rope.py compares them on random data, every shape class):
// * rms_norm: x in float32, s = sum(x*x) summed in the order of ATen's CPU sum kernel (8-lane vectors, four
//   interleaved accumulators, cascade levels: `aten_row_sum`), var = s / D, r = 1 / sqrt(var + eps),
//   y = x * r; for a bf16 weight y is rounded to bf16 and multiplied by the weight in float32, then rounded.
// * rotary: out = x * cos + swap(x) * signed_sin with every product and the sum rounded to the tensor's dtype
//   (bf16 rounding is round-to-nearest-even, as c10::BFloat16). Compiled with -ffp-contract=off: no FMA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops.h"
#include "vec.h"

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <algorithm>

namespace {

namespace vec = idefics::vec;
using vec::kLanes;
using vec::Vec;

int64_t ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  int64_t bits = 0;
  for (uint64_t v = static_cast<uint64_t>(x) - 1; v != 0; v >>= 1) bits++;
  return bits;
}

// The sum of n contiguous floats in the order of ATen's CPU sum kernel (SumKernel.cpp, vectorized_inner_sum;
// registered without an AVX-512 variant, so it runs its AVX2 code: 8-float vectors). The row is read as vectors,
// vector i going to accumulator i % 4 of a cascade that adds each `step` of them into the next level (so only sums
// of similar size meet); the four are then added, the leftover vectors go to the first, the tail elements are
// summed in order from zero and the 8 lanes are added to that, in order.
float aten_row_sum(const float* x, int64_t n) {
  constexpr int64_t kLevels = 4, kIlp = 4, kLanes = 8;
  const int64_t vectors = n / kLanes, rows = vectors / kIlp;
  const int64_t power = std::max<int64_t>(4, ceil_log2(rows) / kLevels), step = int64_t{1} << power;
  const int64_t mask = step - 1;
  __m256 acc[kLevels][kIlp];
  for (auto& level : acc)
    for (auto& a : level) a = _mm256_setzero_ps();
  auto load = [&](int64_t v) { return _mm256_loadu_ps(x + kLanes * v); };
  int64_t i = 0;
  while (i + step <= rows) {
    for (int64_t j = 0; j < step; j++, i++)
      for (int64_t r = 0; r < kIlp; r++) acc[0][r] = _mm256_add_ps(acc[0][r], load(i * kIlp + r));
    for (int64_t level = 1; level < kLevels; level++) {
      for (int64_t r = 0; r < kIlp; r++) {
        acc[level][r] = _mm256_add_ps(acc[level][r], acc[level - 1][r]);
        acc[level - 1][r] = _mm256_setzero_ps();
      }
      if ((i & (mask << (level * power))) != 0) break;
    }
  }
  for (; i < rows; i++)
    for (int64_t r = 0; r < kIlp; r++) acc[0][r] = _mm256_add_ps(acc[0][r], load(i * kIlp + r));
  for (int64_t level = 1; level < kLevels; level++)
    for (int64_t r = 0; r < kIlp; r++) acc[0][r] = _mm256_add_ps(acc[0][r], acc[level][r]);
  __m256 total = acc[0][0];
  for (int64_t v = rows * kIlp; v < vectors; v++) total = _mm256_add_ps(total, load(v));
  for (int64_t r = 1; r < kIlp; r++) total = _mm256_add_ps(total, acc[0][r]);
  float sum = 0.0f;
  for (int64_t e = vectors * kLanes; e < n; e++) sum += x[e];
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, total);
  for (float lane : lanes) sum += lane;
  return sum;
}

template <typename X, typename W>
void rms_norm_rows(const X* x, const W* w, W* out, int64_t rows, int64_t d, double eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> sq(d + kLanes);
    for (int64_t r = r0; r < r1; r++) {
      const X* xr = x + r * d;
      for (int64_t i = 0; i < d; i += kLanes) {
        const vec::F v = Vec<X>::load(xr + i, d - i);
        vec::storeu(sq.data() + i, vec::mul(v, v));
      }
      const float var = aten_row_sum(sq.data(), d) / static_cast<float>(d);
      const vec::F inv = vec::set1(1.0f / std::sqrt(var + static_cast<float>(eps)));
      for (int64_t i = 0; i < d; i += kLanes) {
        // a half-precision weight: y is cast to it first (RMSNorm.forward), then weight * y in that precision
        const vec::F y = Vec<W>::round(vec::mul(Vec<X>::load(xr + i, d - i), inv));
        Vec<W>::store(out + r * d + i, vec::mul(Vec<W>::load(w + i, d - i), y), d - i);
      }
    }
  });
}

template <typename T>
void rotate(const T* x, const T* cos, const T* sin, int64_t d, T* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0, n = 0; i < d; i += n) {
    n = std::min<int64_t>(kLanes, (i < half ? half : d) - i);  // no vector straddles the two halves
    const vec::F swapped = Vec<T>::load(x + (i < half ? i + half : i - half), n);
    const vec::F a = Vec<T>::round(vec::mul(Vec<T>::load(x + i, n), Vec<T>::load(cos + i, n)));
    const vec::F b = Vec<T>::round(vec::mul(swapped, Vec<T>::load(sin + i, n)));
    Vec<T>::store(out + i, vec::add(a, b), n);
  }
}

}  // namespace

namespace idefics {

at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps) {
  const auto xt = input.scalar_type(), wt = weight.scalar_type();
  auto ok = [](at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; };
  TORCH_CHECK(input.device().is_cpu() && ok(xt) && ok(wt), "idefics rms_norm: float32 or bfloat16 CPU tensors only, "
              "got ", xt, " input and ", wt, " weight on ", input.device());
  const int64_t d = input.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.numel() == d, "idefics rms_norm: weight of shape ", weight.sizes(),
              " for ", d, " features");
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty(input.sizes(), input.options().dtype(wt));  // float32 weight: a float32 result
  const int64_t rows = d == 0 ? 0 : x.numel() / d;
  idefics::vec::for_dtype(xt, [&](auto x_tag) {
    idefics::vec::for_dtype(wt, [&](auto w_tag) {
      using X = decltype(x_tag);
      using W = decltype(w_tag);
      rms_norm_rows<X, W>(reinterpret_cast<const X*>(x.data_ptr()), reinterpret_cast<const W*>(w.data_ptr()),
                          reinterpret_cast<W*>(out.data_ptr()), rows, d, eps);
    });
  });
  return out;
}

// q, k, v: [B, T, heads * d] (last dim contiguous; views into one fused projection are fine); cos, sin:
// [B, T, d]; keys, values: the cache [layers, B, max_len, kv_heads, d]. Writes rotated k and plain v to
// positions start..start+T of `layer` and returns rotated q as [B, heads, T, d].
at::Tensor rotary_into_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                             const at::Tensor& sin, at::Tensor& keys, at::Tensor& values, int64_t layer,
                             int64_t start) {
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16, "idefics rotary: float32 or bfloat16 only, got ", t);
  for (const at::Tensor* other : std::initializer_list<const at::Tensor*>{&k, &v, &cos, &sin, &keys, &values})
    TORCH_CHECK(other->scalar_type() == t && other->device().is_cpu(), "idefics rotary: every tensor must be ", t,
                " on the CPU, got ", other->scalar_type(), " on ", other->device());
  TORCH_CHECK(keys.dim() == 5 && keys.is_contiguous() && values.sizes() == keys.sizes() && values.is_contiguous(),
              "idefics rotary: the cache must be contiguous [layers, B, max_len, kv_heads, d]");
  const int64_t b = q.size(0), n = q.size(1), d = keys.size(4), heads = q.size(2) / d, kv = keys.size(3);
  TORCH_CHECK(layer >= 0 && layer < keys.size(0) && keys.size(1) == b && start >= 0 && start + n <= keys.size(2),
              "idefics rotary: positions ", start, "..", start + n, " of layer ", layer, " do not fit the cache of "
              "shape ", keys.sizes());
  TORCH_CHECK(q.size(2) == heads * d && k.size(2) == kv * d && v.size(2) == kv * d && q.stride(2) == 1 &&
              k.stride(2) == 1 && v.stride(2) == 1, "idefics rotary: q, k, v must be [B, T, heads * ", d, "]");
  const at::Tensor c = cos.reshape({b, n, d}).contiguous(), s = sin.reshape({b, n, d}).contiguous();
  at::Tensor out = at::empty({b, heads, n, d}, q.options());
  const int64_t cap = keys.size(2);
  idefics::vec::for_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    auto ptr = [](const at::Tensor& x) { return reinterpret_cast<T*>(x.data_ptr()); };
    T *qp = ptr(q), *kp = ptr(k), *vp = ptr(v), *cp = ptr(c), *sp = ptr(s), *op = ptr(out);
    T* kc = ptr(keys) + layer * b * kv * cap * d;
    T* vc = ptr(values) + layer * b * kv * cap * d;
    at::parallel_for(0, b * n, 8, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; p++) {
        const int64_t row = p / n, pos = p % n;
        const T *cs = cp + p * d, *sn = sp + p * d;
        for (int64_t h = 0; h < heads; h++)
          rotate(qp + row * q.stride(0) + pos * q.stride(1) + h * d, cs, sn, d, op + ((row * heads + h) * n + pos) * d);
        for (int64_t h = 0; h < kv; h++) {
          const int64_t slot = ((row * cap + start + pos) * kv + h) * d;
          rotate(kp + row * k.stride(0) + pos * k.stride(1) + h * d, cs, sn, d, kc + slot);
          std::memcpy(vc + slot, vp + row * v.stride(0) + pos * v.stride(1) + h * d, d * sizeof(T));
        }
      }
    });
  });
  return out;
}

}  // namespace idefics

TORCH_LIBRARY_FRAGMENT(idefics, m) {
  m.def("rms_norm(Tensor input, Tensor weight, float eps) -> Tensor");
  m.def("rotary_into_cache(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) keys, "
        "Tensor(b!) values, int layer, int start) -> Tensor");
}

TORCH_LIBRARY_IMPL(idefics, CPU, m) {
  m.impl("rms_norm", idefics::rms_norm);
  m.impl("rotary_into_cache", idefics::rotary_into_cache);
}
