// float32 and bf16 tensors seen as float32 vectors, for the ops that compute in float32 (norm_rope.cpp,
// attention.cpp). The width is the build's: 16 lanes in the main extension (compiled for AVX-512), 8 in the AVX2
// one (compiled for AVX2 + FMA, csrc/avx2.cpp: the same ops on CPUs without AVX-512). The ops' results do not
// depend on it where they are bit-identical to eager PyTorch (element-wise work; sums follow ATen's own order),
// and only by float32 rounding where they are not (attention's dot products). bf16 values are the high halves of
// float32 ones; rounding to bf16 is to nearest even with NaN -> 0x7FC0, as c10::BFloat16, so results equal eager
// PyTorch's.
#pragma once

#include <ATen/ATen.h>

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace idefics::vec {

#if defined(__AVX512F__)

using F = __m512;
constexpr int64_t kLanes = 16;

inline __mmask16 first(int64_t count) {  // the first `count` of 16 lanes
  return static_cast<__mmask16>(count >= 16 ? 0xFFFF : (1u << count) - 1u);
}
inline F zero() { return _mm512_setzero_ps(); }
inline F set1(float v) { return _mm512_set1_ps(v); }
inline F add(F a, F b) { return _mm512_add_ps(a, b); }
inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
inline F div(F a, F b) { return _mm512_div_ps(a, b); }
inline F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }    // a * b + c, one rounding
inline F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b, one rounding
inline float sum(F v) { return _mm512_reduce_add_ps(v); }
inline void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
inline F load_or(const float* p, int64_t n, float fill) {  // the first n of 16, `fill` in the others
  return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), first(n), p);
}
inline F round_nearest(F v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline F times_pow2(F v, F n) { return _mm512_scalef_ps(v, n); }  // v * 2^n, n integral
inline F zero_unless_at_least(F x, float limit, F v) {           // v where x >= limit, else 0 (NaN: 0)
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(limit), _CMP_GE_OQ), v);
}

inline F round_to_bf16(F v) {  // kept as float32
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  return _mm512_castsi512_ps(r);
}

// 16 elements (masked: the first n) of T = float or uint16_t (bf16 bits) as float32, and back with T's rounding.
template <typename T> struct Vec;
template <> struct Vec<float> {
  static F load(const float* p, int64_t n = 16) { return _mm512_maskz_loadu_ps(first(n), p); }
  static F round(F v) { return v; }
  static void store(float* p, F v, int64_t n = 16) { _mm512_mask_storeu_ps(p, first(n), v); }
};
template <> struct Vec<uint16_t> {
  static F load(const uint16_t* p, int64_t n = 16) {
    const __m256i h = _mm256_maskz_loadu_epi16(first(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static F round(F v) { return round_to_bf16(v); }
  static void store(uint16_t* p, F v, int64_t n = 16) {
    const __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(round_to_bf16(v)), 16);
    _mm256_mask_storeu_epi16(p, first(n), _mm512_cvtepi32_epi16(bits));
  }
};

#else  // AVX2 + FMA: 8 lanes; AVX2 has masked loads and stores of 32-bit lanes only

using F = __m256;
constexpr int64_t kLanes = 8;

inline __m256i first(int64_t count) {  // the first `count` of 8 lanes all ones
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count < 8 ? count : 8)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline F zero() { return _mm256_setzero_ps(); }
inline F set1(float v) { return _mm256_set1_ps(v); }
inline F add(F a, F b) { return _mm256_add_ps(a, b); }
inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
inline F div(F a, F b) { return _mm256_div_ps(a, b); }
inline F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
inline F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
inline float sum(F v) {  // a fixed tree: halves, then pairs
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
inline void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
inline F load_or(const float* p, int64_t n, float fill) {
  if (n >= 8) return _mm256_loadu_ps(p);
  const __m256i m = first(n);
  return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}
inline F round_nearest(F v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline F times_pow2(F v, F n) {  // v * 2^n for integral n in [-126, 127] (2^n built from its exponent bits)
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(v, _mm256_castsi256_ps(e));
}
inline F zero_unless_at_least(F x, float limit, F v) {
  return _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(limit), _CMP_GE_OQ), v);
}

inline F round_to_bf16(F v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  r = _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), nan);
}

template <typename T> struct Vec;
template <> struct Vec<float> {
  static F load(const float* p, int64_t n = 8) { return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first(n)); }
  static F round(F v) { return v; }
  static void store(float* p, F v, int64_t n = 8) {
    if (n >= 8) {
      _mm256_storeu_ps(p, v);
    } else {
      _mm256_maskstore_ps(p, first(n), v);
    }
  }
};
template <> struct Vec<uint16_t> {
  static F load(const uint16_t* p, int64_t n = 8) {
    __m128i h;
    if (n >= 8) {
      h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {  // never reads past the n elements
      alignas(16) uint16_t part[8] = {};
      std::memcpy(part, p, static_cast<size_t>(n) * sizeof(uint16_t));
      h = _mm_load_si128(reinterpret_cast<const __m128i*>(part));
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static F round(F v) { return round_to_bf16(v); }
  static void store(uint16_t* p, F v, int64_t n = 8) {
    const __m256i bits = _mm256_srli_epi32(_mm256_castps_si256(round_to_bf16(v)), 16);
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
    if (n >= 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    } else {
      alignas(16) uint16_t part[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(part), h);
      std::memcpy(p, part, static_cast<size_t>(n) * sizeof(uint16_t));
    }
  }
};

#endif

// fn(T{}) with T the element type of a float32 (float) or bf16 (uint16_t) tensor; callers check the dtype.
template <typename Fn>
void for_dtype(at::ScalarType t, Fn&& fn) {
  if (t == at::kFloat) {
    fn(float{});
  } else {
    fn(uint16_t{});
  }
}

}  // namespace idefics::vec
