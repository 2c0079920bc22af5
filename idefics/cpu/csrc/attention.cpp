// Attention of one query per row (a decoding step) for CPU inference, reading a bf16 or float32 KV cache as it
// lies in memory.
//
// Why: the eager step converted this layer's whole cache to float32 (two passes over it) before
// `scaled_dot_product_attention`, whose bf16 kernel is 3-5x slower for one query; in a step the cache has gone
// cold (a step's weights streamed through the caches since the layer last read it), and reading it twice,
// strided by heads, cost ~7% of the step. Here keys and values are read once, position by position (the KV
// cache is position-major: [layers, B, max_len, kv_heads, d], so all heads of a position are contiguous).
//
// Arithmetic: float32 throughout, as the float32 SDPA path it replaces (bf16 inputs are exact in float32):
// s_j = (q . k_j) * scale (+ additive mask; boolean mask: hidden keys get weight 0), p_j = exp(s_j - max s),
// out = (sum_j p_j v_j) / (sum_j p_j), rounded once to the output dtype. The summation order differs from
// SDPA's, so results agree to float32 rounding (tests/cpu/test_cpu_attention.py), not bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops.h"
#include "vec.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

namespace vec = idefics::vec;
using vec::kLanes;
using vec::Vec;

// exp(x) for x <= 0 (scores minus their maximum), ~1 ulp: 2^n * e^r with |r| <= ln2/2 and a degree-7
// Taylor polynomial; 0 below -87.3 (where float32 leaves its normal range) and for -inf.
vec::F exp_nonpositive(vec::F x) {
  const vec::F n = vec::round_nearest(vec::mul(x, vec::set1(1.44269504088896341f)));
  vec::F r = vec::fnmadd(n, vec::set1(0.693359375f), x);
  r = vec::fnmadd(n, vec::set1(-2.12194440e-4f), r);
  vec::F p = vec::set1(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = vec::fmadd(p, r, vec::set1(c));
  return vec::zero_unless_at_least(x, -87.3f, vec::times_pow2(p, n));
}

// Keys or values of one batch row: the d values of position j, kv head g at base + j * pos + g * head.
template <typename T>
struct Rows {
  const T* base;
  int64_t pos, head;
  const T* at(int64_t j, int64_t g) const { return base + j * pos + g * head; }
  // Position j's rows of every kv head towards L1: the cache is cold in a decoding step (the step's weights have
  // streamed through the caches since this layer last read it), and the hardware prefetcher alone left the
  // passes at ~15-25 GB/s, against ~35-44 GB/s when the same rows are warm. 4 positions ahead: 6-12% faster cold
  // (paired, 200-1500 positions, 1-8 rows; 2 ahead about half of that, 8 the same).
  void prefetch(int64_t j, int64_t kv_heads, int64_t d) const {
    for (int64_t g = 0; g < kv_heads; g++)
      for (int64_t byte = 0; byte < d * static_cast<int64_t>(sizeof(T)); byte += 64)
        _mm_prefetch(reinterpret_cast<const char*>(at(j, g)) + byte, _MM_HINT_T0);
  }
};

constexpr int64_t kPrefetchPositions = 4;  // how far ahead the passes over positions fetch

// One batch row, the query heads of kv heads [g0, g1) (`group` query heads each): q and out point at the first
// of those heads, [heads, d] with heads = (g1 - g0) * group. Each head's arithmetic is the same whichever range
// it is computed in, so splitting a row's heads across threads changes no bit. `hidden` (boolean mask, true =
// not attended) or `add` (additive mask) has one value per position, or is null.
template <typename T>
void attend_row(const T* q, Rows<T> k, Rows<T> v, int64_t g0, int64_t g1, int64_t group, int64_t length,
                int64_t d, const bool* hidden, const float* add, float scale, T* out, std::vector<float>& scores,
                std::vector<float>& acc) {
  const int64_t heads = (g1 - g0) * group, vectors = d / kLanes;
  k.base += g0 * k.head;  // kv head g0 is this range's head 0
  v.base += g0 * v.head;
  const int64_t kv_heads = g1 - g0;
  scores.assign(static_cast<size_t>(heads * length), 0.0f);
  acc.assign(static_cast<size_t>(heads * d), 0.0f);
  std::vector<float> qf(static_cast<size_t>(heads * d));
  for (int64_t i = 0; i < heads * d; i += kLanes) Vec<float>::store(qf.data() + i, Vec<T>::load(q + i));
  const float minus_inf = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < length; j++) {  // scores, position by position
    if (j + kPrefetchPositions < length) k.prefetch(j + kPrefetchPositions, kv_heads, d);
    const bool off = hidden != nullptr && hidden[j];
    for (int64_t h = 0; h < heads; h++) {
      float s = minus_inf;
      if (!off) {
        const T* kj = k.at(j, h / group);
        vec::F sum = vec::zero();
        for (int64_t c = 0; c < vectors; c++)
          sum = vec::fmadd(Vec<float>::load(qf.data() + h * d + kLanes * c), Vec<T>::load(kj + kLanes * c), sum);
        s = vec::sum(sum) * scale;
        if (add != nullptr) s += add[j];
      }
      scores[h * length + j] = s;
    }
  }
  std::vector<float> total(static_cast<size_t>(heads));
  for (int64_t h = 0; h < heads; h++) {  // softmax numerators and their sum, per head
    float* s = scores.data() + h * length;
    float top = minus_inf;
    for (int64_t j = 0; j < length; j++) top = std::max(top, s[j]);
    vec::F sum = vec::zero();
    for (int64_t j = 0; j < length; j += kLanes) {  // the last vector's missing lanes: exp(-inf) = 0
      const vec::F p = exp_nonpositive(vec::sub(vec::load_or(s + j, length - j, minus_inf), vec::set1(top)));
      Vec<float>::store(s + j, p, length - j);
      sum = vec::add(sum, p);
    }
    total[h] = vec::sum(sum);
  }
  for (int64_t j = 0; j < length; j++) {  // weighted values, position by position
    if (j + kPrefetchPositions < length) v.prefetch(j + kPrefetchPositions, kv_heads, d);
    for (int64_t h = 0; h < heads; h++) {
      const float p = scores[h * length + j];
      if (p == 0.0f) continue;
      const T* vj = v.at(j, h / group);
      float* a = acc.data() + h * d;
      for (int64_t c = 0; c < vectors; c++)
        Vec<float>::store(a + kLanes * c, vec::fmadd(vec::set1(p), Vec<T>::load(vj + kLanes * c),
                                                     Vec<float>::load(a + kLanes * c)));
    }
  }
  for (int64_t h = 0; h < heads; h++)
    for (int64_t c = 0; c < d; c += kLanes)
      Vec<T>::store(out + h * d + c, vec::div(Vec<float>::load(acc.data() + h * d + c), vec::set1(total[h])));
}

}  // namespace

namespace idefics {

// q [B, H, 1, d]; k, v [B, G, L, d] with any strides but a contiguous last dim (views of the cache); mask
// [B or 1, 1, 1, L], boolean (true = visible) or additive float32, or none. Returns [B, H, 1, d] in q's dtype.
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask) {
  const auto t = query.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16, "idefics attention: float32 or bfloat16 only, got ", t);
  TORCH_CHECK(k.scalar_type() == t && v.scalar_type() == t && query.device().is_cpu() && k.device().is_cpu() &&
              v.device().is_cpu(), "idefics attention: q, k, v must be ", t, " CPU tensors");
  TORCH_CHECK(query.dim() == 4 && query.size(2) == 1 && k.dim() == 4 && v.sizes() == k.sizes(),
              "idefics attention: q [B, H, 1, d] and k, v [B, G, L, d], got ", query.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  const int64_t b = query.size(0), heads = query.size(1), d = query.size(3), kv = k.size(1), length = k.size(2);
  TORCH_CHECK(k.size(0) == b && k.size(3) == d && kv > 0 && heads % kv == 0 && d % 16 == 0 && k.stride(3) == 1 &&
              v.stride(3) == 1, "idefics attention: k, v [", b, ", G | ", heads, ", L, ", d,
              "] with a contiguous last dim and d a multiple of 16, got ", k.sizes());
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    m = mask->scalar_type() == at::kBool ? mask->logical_not() : mask->to(at::kFloat);
    TORCH_CHECK(m.dim() == 4 && (m.size(0) == b || m.size(0) == 1) && m.size(1) == 1 && m.size(2) == 1 &&
                m.size(3) == length, "idefics attention: mask must be [B or 1, 1, 1, ", length, "], got ", m.sizes());
    m = m.contiguous();
  }
  const at::Tensor q = query.contiguous();
  at::Tensor out = at::empty({b, heads, 1, d}, query.options());
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t group = heads / kv;  // query heads per kv head
  idefics::vec::for_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    auto ptr = [](const at::Tensor& x) { return reinterpret_cast<const T*>(x.data_ptr()); };
    // Tasks are (row, kv head): one row alone (batch 1) still runs on every thread.
    at::parallel_for(0, b * kv, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> scores, acc;
      for (int64_t t = t0; t < t1;) {
        const int64_t r = t / kv, g0 = t % kv, g1 = std::min(kv, g0 + (t1 - t));
        const int64_t mr = m.defined() && m.size(0) == b ? r : 0;
        const bool* hidden = m.defined() && m.scalar_type() == at::kBool ? m.data_ptr<bool>() + mr * length : nullptr;
        const float* add = m.defined() && m.scalar_type() == at::kFloat ? m.data_ptr<float>() + mr * length : nullptr;
        const Rows<T> kr{ptr(k) + r * k.stride(0), k.stride(2), k.stride(1)};
        const Rows<T> vr{ptr(v) + r * v.stride(0), v.stride(2), v.stride(1)};
        const int64_t first = (r * heads + g0 * group) * d;  // the range's first head in q and out
        attend_row<T>(ptr(q) + first, kr, vr, g0, g1, group, length, d, hidden, add, scale,
                      reinterpret_cast<T*>(out.data_ptr()) + first, scores, acc);
        t += g1 - g0;
      }
    });
  });
  return out;
}

}  // namespace idefics

TORCH_LIBRARY_FRAGMENT(idefics, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(idefics, CPU, m) {
  m.impl("decode_attention", idefics::decode_attention);
}
