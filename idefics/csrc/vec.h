// float32 and bf16 tensors seen as 16-lane float32 vectors, for the ops that compute in float32
// (norm_rope.cpp, attention.cpp). bf16 values are the high halves of float32 ones; rounding to bf16 is to
// nearest even with NaN -> 0x7FC0, as c10::BFloat16, so results equal eager PyTorch's.
#pragma once

#include <ATen/ATen.h>

#include <immintrin.h>

#include <cstdint>

namespace idefics::vec {

inline __mmask16 first(int64_t count) {  // the first `count` of 16 lanes
  return static_cast<__mmask16>(count >= 16 ? 0xFFFF : (1u << count) - 1u);
}

inline __m512 round_to_bf16(__m512 v) {  // kept as float32
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
  static __m512 load(const float* p, int64_t n = 16) { return _mm512_maskz_loadu_ps(first(n), p); }
  static __m512 round(__m512 v) { return v; }
  static void store(float* p, __m512 v, int64_t n = 16) { _mm512_mask_storeu_ps(p, first(n), v); }
};
template <> struct Vec<uint16_t> {
  static __m512 load(const uint16_t* p, int64_t n = 16) {
    const __m256i h = _mm256_maskz_loadu_epi16(first(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static __m512 round(__m512 v) { return round_to_bf16(v); }
  static void store(uint16_t* p, __m512 v, int64_t n = 16) {
    const __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(round_to_bf16(v)), 16);
    _mm256_mask_storeu_epi16(p, first(n), _mm512_cvtepi32_epi16(bits));
  }
};

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
