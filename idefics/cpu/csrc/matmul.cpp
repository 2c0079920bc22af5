// y = x W^T (+ b) for CPU inference on AVX-512 (BF16): one kernel for decoding and prefill, weights in panels.
//
// Why a hand-written kernel: decoding one token is a matrix-vector product per layer, bound by how fast the
// weights stream from memory. oneDNN's prepacked kernels read them at ~60-80% of the memory's streaming rate;
// this one reads a layout made for it front to back and gets close to it, and it matches oneDNN on
// prefill-sized products, so the model keeps one copy of each weight.
//
// Layout: [ceil(N/64)][ceil(K/P)][64][P]. Panel p holds output features 64p..64p+63; inside it, for every group
// of P input features, the 64 features' P weights side by side. N is padded with zero rows, K with zero columns
// (x and the output are never padded).
// * bf16 weights, P = 2 ("pairs"): one `vdpbf16ps` takes a broadcast pair of x and 16 features' pairs and adds
//   both products into 16 float32 sums, so a panel is read strictly in order with no horizontal reduction.
// * int8 weights (weight-only quantization, `quantize.Int8Linear`), P = 2, one byte each: for several rows of x
//   each chunk of a panel is widened to bf16 in a scratch buffer that stays in L2 (int8 values are exact in
//   bf16) and the bf16 tiles run on it; for one row the weights go to float32 and meet x in FMAs. Each output
//   is multiplied by its float32 scale before the bias.
// * float32 weights, P = 1: one FMA per 16 features and input feature.
//
// Arithmetic (bf16): products of bf16 are exact in float32. Each chunk of `chunk` input features is summed in
// float32 in input-feature order, starting from zero, and the chunk sums are added in order; then the bias is
// added in float32 and the result rounded to bf16 once (round to nearest even). With the chunk oneDNN uses for
// the shape (`kernels.onednn_chunk`) every output equals oneDNN's bit for bit, so the model gives what the
// reference (transformers, whose bf16 matmuls run on oneDNN) gives. float32 sums in input-feature order.
// Where the CPU has AMX, bf16 weights (and int8 ones for several rows) go to amx.cpp instead: oneDNN uses the
// tiles there, and so must we, for its speed and its order of the sums.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops.h"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kBlockN = 64;  // output features per panel: 4 zmm accumulators per row of x
constexpr int kMaxRows = 6;      // rows of x per tile: 6 x 4 accumulators + 4 weight registers < 32 zmm

int64_t panels(int64_t n) { return (n + kBlockN - 1) / kBlockN; }
int64_t groups(int64_t k, int64_t per) { return (k + per - 1) / per; }
int64_t group_size(at::ScalarType t) { return t == at::kFloat ? 1 : 2; }

// Where a tile's sums go once its chunk is done: added to `partial` (or stored there, for the first chunk), and
// after the last chunk scaled, biased and written to the valid columns of the output.
struct Epilogue {
  float* partial;
  bool first, last;
  const float* scale;  // per output, or nullptr
  const float* bias;   // per output, or nullptr
  const __mmask16* masks;

  // 16 sums for columns 16j..16j+15 of one row.
  __m512 finish(__m512 v, int j, int64_t row) const {
    float* sum = partial + row * kBlockN + 16 * j;
    if (!first) v = _mm512_add_ps(_mm512_loadu_ps(sum), v);
    if (!last) {
      _mm512_storeu_ps(sum, v);
      return v;
    }
    if (scale != nullptr) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(masks[j], scale + 16 * j));
    if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[j], bias + 16 * j));
    return v;
  }
  void store(__m512 v, int j, int64_t row, uint16_t* out) const {
    v = finish(v, j, row);
    if (last) _mm256_mask_storeu_epi16(out + 16 * j, masks[j], (__m256i)_mm512_cvtneps_pbh(v));
  }
  void store(__m512 v, int j, int64_t row, float* out) const {
    v = finish(v, j, row);
    if (last) _mm512_mask_storeu_ps(out + 16 * j, masks[j], v);
  }
};

inline int32_t load32(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// bf16: `Rows` rows of x times one panel over input pairs [p0, p1); `w` holds the weights of pair p0 on. A pair
// (2p, 2p+1) of x is one 32-bit lane (low half = 2p); an odd last feature pairs with zero.
template <int Rows>
void tile_bf16(const uint16_t* x, int64_t k, const uint16_t* w, int64_t p0, int64_t p1, const Epilogue& e,
               uint16_t* out, int64_t ldo) {
  __m512 acc[Rows][4];
  for (int r = 0; r < Rows; r++)
    for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
  auto step = [&](auto pair) __attribute__((always_inline)) {  // pair(r): row r's lane for this step
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 32);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 64);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + 96);
    if (Rows <= 2) _mm_prefetch(reinterpret_cast<const char*>(w + 4096), _MM_HINT_T0);  // streaming: run ahead
    for (int r = 0; r < Rows; r++) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair(r));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, w3);
    }
    w += kBlockN * 2;
  };
  const int64_t whole = std::min(p1, k / 2);  // pairs with both features inside x: no branch in the hot loop
  for (int64_t p = p0; p < whole; p++) step([&](int r) { return load32(x + r * k + 2 * p); });
  if (whole < p1) step([&](int r) { return static_cast<int32_t>(x[r * k + k - 1]); });  // odd k: last feature
  for (int r = 0; r < Rows; r++)
    for (int j = 0; j < 4; j++) e.store(acc[r][j], j, r, out + r * ldo);
}

// float32: `Rows` rows of x times one panel over input features [k0, k1); `w` holds the weights of k0 on.
template <int Rows>
void tile_f32(const float* x, int64_t k, const float* w, int64_t k0, int64_t k1, const Epilogue& e, float* out,
              int64_t ldo) {
  __m512 acc[Rows][4];
  for (int r = 0; r < Rows; r++)
    for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
  for (int64_t c = k0; c < k1; c++, w += kBlockN) {
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
    const __m512 w2 = _mm512_loadu_ps(w + 32), w3 = _mm512_loadu_ps(w + 48);
    if (Rows <= 2) _mm_prefetch(reinterpret_cast<const char*>(w + 2048), _MM_HINT_T0);
    for (int r = 0; r < Rows; r++) {
      const __m512 a = _mm512_set1_ps(x[r * k + c]);
      acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(a, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(a, w3, acc[r][3]);
    }
  }
  for (int r = 0; r < Rows; r++)
    for (int j = 0; j < 4; j++) e.store(acc[r][j], j, r, out + r * ldo);
}

// int8, one row of x (decoding): widening to bf16 costs more than the product at one row, so the weights go to
// float32 (one conversion per 16) and meet x's float32 pair broadcast to every lane pair; lane 2i sums the even
// input features of output i, lane 2i+1 the odd ones, added at the end. `xf` is x in float32, padded to pairs.
void row_int8(const float* xf, const int8_t* w, int64_t p0, int64_t p1, const Epilogue& e, uint16_t* out) {
  __m512 acc[8];
  for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_ps();
  for (int64_t p = p0; p < p1; p++, w += kBlockN * 2) {
    // Both cache lines of the step, 8 KiB ahead: the conversions keep the core busy enough that the hardware
    // prefetcher alone (or one line 2 KiB ahead) left the read at ~70% of the streaming rate; this gets ~98%.
    _mm_prefetch(reinterpret_cast<const char*>(w + 8192), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + 8192 + 64), _MM_HINT_T0);
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
  for (int j = 0; j < 4; j++) e.store(_mm512_load_ps(sums + 16 * j), j, 0, out);
}

template <typename Fn>
void by_rows(int64_t r0, int64_t r1, Fn&& fn) {  // fn(start row, rows) over tiles of at most kMaxRows rows
  for (int64_t r = r0; r < r1; r += kMaxRows) fn(r, static_cast<int>(std::min<int64_t>(kMaxRows, r1 - r)));
}

template <typename T, int... R>
constexpr auto tile_table(std::integer_sequence<int, R...>) {
  if constexpr (std::is_same_v<T, float>) {
    return std::array<decltype(&tile_f32<1>), sizeof...(R)>{tile_f32<R + 1>...};
  } else {
    return std::array<decltype(&tile_bf16<1>), sizeof...(R)>{tile_bf16<R + 1>...};
  }
}
const auto kTilesBf16 = tile_table<uint16_t>(std::make_integer_sequence<int, kMaxRows>{});
const auto kTilesF32 = tile_table<float>(std::make_integer_sequence<int, kMaxRows>{});

void check_weight(const at::Tensor& w) {
  const auto t = w.scalar_type();
  TORCH_CHECK(w.device().is_cpu() && (t == at::kBFloat16 || t == at::kChar || t == at::kFloat) && w.dim() == 2,
              "cpu matmul: weight must be a 2-D bfloat16, int8 or float32 CPU tensor, got ", t, " of shape ",
              w.sizes(), " on ", w.device());
}

template <typename T>
void pack_into(const T* src, int64_t n, int64_t k, int64_t per, T* dst) {
  const int64_t kg = groups(k, per);
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; row++) {
      T* base = dst + (row / kBlockN) * kg * kBlockN * per + (row % kBlockN) * per;
      for (int64_t c = 0; c < k; c++) base[(c / per) * kBlockN * per + (c % per)] = src[row * k + c];
    }
  });
}

// Per-output float32 values (scale or bias), or an undefined tensor.
at::Tensor per_output(const std::optional<at::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->numel() == n, "cpu matmul: ", what, " has ", t->numel(), " values for ", n, " outputs");
  return t->to(at::kFloat).contiguous();
}

}  // namespace

namespace idefics {

// `count` pair-rows of an int8 panel (128 bytes each) widened to bf16, in the same order.
void widen_int8(const int8_t* src, int64_t count, uint16_t* dst) {
  for (int64_t i = 0; i < count * kBlockN * 2; i += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(src + i + 2048), _MM_HINT_T0);
    const __m128i* s = reinterpret_cast<const __m128i*>(src + i);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(s)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(s + 1)));
    _mm512_storeu_si512(dst + i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

at::Tensor pack(const at::Tensor& weight) {
  check_weight(weight);
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1), per = group_size(w.scalar_type());
  at::Tensor out = at::zeros({panels(n), groups(k, per), kBlockN, per}, w.options());
  if (w.scalar_type() == at::kChar) {
    pack_into(w.data_ptr<int8_t>(), n, k, per, out.data_ptr<int8_t>());
  } else if (w.scalar_type() == at::kFloat) {
    pack_into(w.data_ptr<float>(), n, k, per, out.data_ptr<float>());
  } else {
    pack_into(reinterpret_cast<const uint16_t*>(w.data_ptr()), n, k, per, reinterpret_cast<uint16_t*>(out.data_ptr()));
  }
  return out;
}

bool holds(const at::Tensor& packed, int64_t n, int64_t k) {
  const int64_t per = group_size(packed.scalar_type());
  return packed.dim() == 4 && packed.size(0) == panels(n) && packed.size(1) == groups(k, per) &&
         packed.size(2) == kBlockN && packed.size(3) == per;
}

at::Tensor unpack(const at::Tensor& packed, int64_t n, int64_t k) {
  TORCH_CHECK(holds(packed, n, k), "cpu matmul: packed weight of shape ", packed.sizes(), " does not hold a ", n,
              " x ", k, " weight");
  return packed.permute({0, 2, 1, 3}).reshape({packed.size(0) * kBlockN, packed.size(1) * packed.size(3)})
      .narrow(0, 0, n).narrow(1, 0, k).contiguous();
}

// Input features summed apart before the partial sums are added. bf16 (and int8, on the bf16 tiles): oneDNN's K
// block on AVX-512 BF16 without AMX, as measured: 512 for one row or K <= 1024, else 1024; summing the same way
// makes every output bit-identical to oneDNN's (tests/cpu/test_cpu_kernels.py sweeps the shapes). float32: 128,
// as accurate as oneDNN's and MKL's GEMMs (one running sum over 11008 features erred ~10x more), at no cost.
int64_t default_chunk(at::ScalarType weight, int64_t rows, int64_t k) {
  if (weight == at::kFloat) return 128;
  return rows == 1 || k <= 1024 ? 512 : 1024;
}

at::Tensor linear(const at::Tensor& input, const at::Tensor& packed, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& bias, int64_t n, int64_t chunk) {
  const auto wt = packed.scalar_type();
  const bool f32 = wt == at::kFloat, int8 = wt == at::kChar;
  const auto xt = f32 ? at::kFloat : at::kBFloat16;
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == xt, "cpu matmul: input must be ",
              f32 ? "float32" : "bfloat16", " on the CPU for ", wt, " weights, got ", input.scalar_type(), " on ",
              input.device());
  const int64_t k = input.size(-1), per = group_size(wt);
  if (chunk <= 0) chunk = default_chunk(wt, k == 0 ? 0 : input.numel() / k, k);
  TORCH_CHECK(holds(packed, n, k), "cpu matmul: input has ", k, " features but the packed weight of shape ",
              packed.sizes(), " is not one of ", n, " outputs x ", k, " inputs");
  TORCH_CHECK(chunk > 0 && chunk % per == 0, "cpu matmul: chunk must be a multiple of ", per, ", got ",
              chunk);
  const at::Tensor scale_f = per_output(scale, n, "scale"), bias_f = per_output(bias, n, "bias");
  TORCH_CHECK(int8 == scale_f.defined(), "cpu matmul: int8 weights need a scale per output (and others none)");
  const at::Tensor x = input.reshape({-1, k}).contiguous();
  const int64_t m = x.size(0), np = panels(n), kg = groups(k, per), step = chunk / per;
  std::vector<int64_t> sizes(input.sizes().begin(), input.sizes().end());
  sizes.back() = n;
  if (!f32 && !(int8 && m == 1) && m > 0 && n > 0 && amx_usable())  // one int8 row: float32 FMAs (`row_int8`)
    return amx_linear(x, packed, scale_f.defined() ? scale_f.data_ptr<float>() : nullptr,
                      bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, n).view(sizes);
  at::Tensor out = at::empty(sizes, input.options());
  if (m == 0 || n == 0) return out;
  const char* ws = reinterpret_cast<const char*>(packed.data_ptr());
  const int64_t panel_bytes = kg * kBlockN * per * packed.element_size();
  const float* ss = scale_f.defined() ? scale_f.data_ptr<float>() : nullptr;
  const float* bs = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const bool int8_row = int8 && m == 1;
  std::vector<float> xf(int8_row ? static_cast<size_t>(kg) * 2 : 0, 0.0f);  // x in float32 for the int8 row
  for (int64_t c = 0; c < k && int8_row; c++) {
    const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(x.data_ptr())[c]) << 16;
    std::memcpy(&xf[c], &bits, sizeof bits);
  }
  // Tasks are (group of rows, panel), group-major (as in amx.cpp): a thread keeps one group of x in L2 while the
  // panels pass; with all of a long prompt's rows per panel, x was read from memory again for every panel.
  const int64_t wanted = std::max<int64_t>(1, (m * k * x.element_size() + kRowGroupBytes - 1) / kRowGroupBytes);
  const int64_t group_rows = (m + wanted - 1) / wanted, groups = (m + group_rows - 1) / group_rows;  // none empty
  at::parallel_for(0, groups * np, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> partial(static_cast<size_t>(group_rows) * kBlockN);  // chunk sums of one panel, per row
    std::vector<uint16_t> widened(int8 && !int8_row ? static_cast<size_t>(step) * kBlockN * 2 : 0);
    for (int64_t t = t0; t < t1; t++) {
      const int64_t b = t % np, r0 = t / np * group_rows, r1 = std::min(m, r0 + group_rows);
      const int64_t valid = std::min(kBlockN, n - b * kBlockN);
      __mmask16 masks[4];  // valid columns of the panel's last 16-wide groups
      for (int j = 0; j < 4; j++) {
        const int64_t cols = std::clamp<int64_t>(valid - 16 * j, 0, 16);
        masks[j] = static_cast<__mmask16>((1u << cols) - 1u);
      }
      const char* panel = ws + b * panel_bytes;
      for (int64_t g0 = 0; g0 < kg; g0 += step) {
        const int64_t g1 = std::min(kg, g0 + step), offset = g0 * kBlockN * per;
        const Epilogue base{partial.data(), g0 == 0, g1 == kg, ss == nullptr ? nullptr : ss + b * kBlockN,
                            bs == nullptr ? nullptr : bs + b * kBlockN, masks};
        if (f32) {
          const float* w = reinterpret_cast<const float*>(panel) + offset;
          float* o = out.data_ptr<float>() + b * kBlockN;
          by_rows(r0, r1, [&](int64_t r, int rows) {
            Epilogue e = base;
            e.partial += (r - r0) * kBlockN;
            kTilesF32[rows - 1](x.data_ptr<float>() + r * k, k, w, g0, g1, e, o + r * n, n);
          });
          continue;
        }
        uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr()) + b * kBlockN;
        if (int8_row) {
          row_int8(xf.data(), reinterpret_cast<const int8_t*>(panel) + offset, g0, g1, base, o);
          continue;
        }
        const uint16_t* w = reinterpret_cast<const uint16_t*>(panel) + offset;
        if (int8) {
          widen_int8(reinterpret_cast<const int8_t*>(panel) + offset, g1 - g0, widened.data());
          w = widened.data();
        }
        const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr());
        by_rows(r0, r1, [&](int64_t r, int rows) {
          Epilogue e = base;
          e.partial += (r - r0) * kBlockN;
          kTilesBf16[rows - 1](xs + r * k, k, w, g0, g1, e, o + r * n, n);
        });
      }
    }
  });
  return out;
}

// How many threads `at::parallel_for` runs `tasks` tasks on here: torch's thread count when the build has OpenMP,
// 1 when it was compiled without it (the pragma in ATen's inlined header is then dropped). `setup.sh` prints it.
int64_t parallel_threads(int64_t tasks) {
  std::vector<char> seen(static_cast<size_t>(std::max(1, at::get_num_threads())), 0);
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    const int id = at::get_thread_num();
    if (id >= 0 && id < static_cast<int>(seen.size())) seen[id] = 1;
  });
  return std::count(seen.begin(), seen.end(), 1);
}

}  // namespace idefics

TORCH_LIBRARY(idefics, m) {
  m.def("pack(Tensor weight) -> Tensor");
  m.def("unpack(Tensor packed, int n, int k) -> Tensor");
  m.def("linear(Tensor input, Tensor packed, Tensor? scale, Tensor? bias, int n, int chunk) -> Tensor");
  m.def("parallel_threads(int tasks) -> int", &idefics::parallel_threads);  // no tensors: one kernel for all
  m.def("amx_usable() -> bool", &idefics::amx_usable);
}

TORCH_LIBRARY_IMPL(idefics, CPU, m) {
  m.impl("pack", idefics::pack);
  m.impl("unpack", idefics::unpack);
  m.impl("linear", idefics::linear);
}
