// Storage dtypes that cross the binding, and exact conversions to/from float32.
//
// Codes (shared by _C and _cuda; opcm_ext/ops.py maps torch dtypes to them):
//   0 = float32, 1 = float16 (IEEE binary16), 2 = bfloat16.
// float -> half / bfloat16 round to nearest, ties to even; overflow gives +-Inf;
// NaN stays NaN (a quiet NaN, as torch produces: 0x7E00|sign for half, 0x7FC0 for
// bfloat16). Subnormal halves are converted exactly both ways. The half routines are
// the branch-free FP16 library algorithms that c10::Half uses, so results match
// torch's `.to(torch.float16)` / `.float()` bit for bit. They rely on IEEE float
// arithmetic in the default rounding mode: never compile them with -ffast-math.
// (The CUDA kernels load and store 16-bit values with the hardware conversions of
// common/device.cuh, which round the same way.)
#pragma once

#include <cstdint>
#include <cstring>

#include "common/check.h"

#if defined(__CUDACC__)
#define OPCM_HD __host__ __device__ __forceinline__
#else
#define OPCM_HD inline
#endif

namespace opcm {

// Plain (unscoped) so that the codes compare with the ints that cross the binding.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline bool valid_dtype(int code) { return code >= kFloat32 && code <= kBFloat16; }
inline int dtype_size(int code) { return code == kFloat32 ? 4 : 2; }
inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

// 16-bit storage types: plain bit containers, converted explicitly.
struct half_t { std::uint16_t bits; };
struct bf16_t { std::uint16_t bits; };

OPCM_HD float bits_to_float(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}
OPCM_HD std::uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

OPCM_HD float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t w = static_cast<std::uint32_t>(h) << 16;
  const std::uint32_t sign = w & UINT32_C(0x80000000);
  const std::uint32_t two_w = w + w;
  const std::uint32_t exp_offset = UINT32_C(0xE0) << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized_value = bits_to_float((two_w >> 4) + exp_offset) * exp_scale;
  const std::uint32_t magic_mask = UINT32_C(126) << 23;
  const float magic_bias = 0.5f;
  const float denormalized_value = bits_to_float((two_w >> 17) | magic_mask) - magic_bias;
  const std::uint32_t denormalized_cutoff = UINT32_C(1) << 27;
  const std::uint32_t result =
      sign | (two_w < denormalized_cutoff ? float_to_bits(denormalized_value) : float_to_bits(normalized_value));
  return bits_to_float(result);
}

OPCM_HD std::uint16_t float_to_half_bits(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  const std::uint32_t w = float_to_bits(f);
  const float abs_f = bits_to_float(w & UINT32_C(0x7FFFFFFF));
  float base = (abs_f * scale_to_inf) * scale_to_zero;
  const std::uint32_t shl1_w = w + w;
  const std::uint32_t sign = w & UINT32_C(0x80000000);
  std::uint32_t bias = shl1_w & UINT32_C(0xFF000000);
  if (bias < UINT32_C(0x71000000)) bias = UINT32_C(0x71000000);
  base = bits_to_float((bias >> 1) + UINT32_C(0x07800000)) + base;
  const std::uint32_t bits = float_to_bits(base);
  const std::uint32_t exp_bits = (bits >> 13) & UINT32_C(0x00007C00);
  const std::uint32_t mantissa_bits = bits & UINT32_C(0x00000FFF);
  const std::uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<std::uint16_t>((sign >> 16) | (shl1_w > UINT32_C(0xFF000000) ? UINT16_C(0x7E00) : nonsign));
}

OPCM_HD float bf16_bits_to_float(std::uint16_t b) { return bits_to_float(static_cast<std::uint32_t>(b) << 16); }

OPCM_HD std::uint16_t float_to_bf16_bits(float f) {
  const std::uint32_t u = float_to_bits(f);
  if ((u & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000)) return UINT16_C(0x7FC0);  // NaN
  const std::uint32_t rounding_bias = ((u >> 16) & 1u) + UINT32_C(0x7FFF);
  return static_cast<std::uint16_t>((u + rounding_bias) >> 16);
}

// Uniform load/store used by the templated kernels.
OPCM_HD float to_float(float x) { return x; }
OPCM_HD float to_float(half_t x) { return half_bits_to_float(x.bits); }
OPCM_HD float to_float(bf16_t x) { return bf16_bits_to_float(x.bits); }

template <typename T> OPCM_HD T from_float(float x);
template <> OPCM_HD float from_float<float>(float x) { return x; }
template <> OPCM_HD half_t from_float<half_t>(float x) { return half_t{float_to_half_bits(x)}; }
template <> OPCM_HD bf16_t from_float<bf16_t>(float x) { return bf16_t{float_to_bf16_bits(x)}; }

}  // namespace opcm

// Runs the body with `scalar_t` bound to the storage type of dtype `code`
// (float, opcm::half_t or opcm::bf16_t). The caller has validated the code.
#define OPCM_DISPATCH_DTYPE(code, scalar_t, ...)          \
  [&] {                                                   \
    switch (static_cast<::opcm::DType>(code)) {           \
      case ::opcm::DType::kFloat16: {                     \
        using scalar_t = ::opcm::half_t;                  \
        return __VA_ARGS__();                             \
      }                                                   \
      case ::opcm::DType::kBFloat16: {                    \
        using scalar_t = ::opcm::bf16_t;                  \
        return __VA_ARGS__();                             \
      }                                                   \
      default: {                                          \
        using scalar_t = float;                           \
        return __VA_ARGS__();                             \
      }                                                   \
    }                                                     \
  }()

#define OPCM_CHECK_DTYPE(code, fn, arg)                                                      \
  OPCM_CHECK_ARG(::opcm::valid_dtype(code), fn, arg,                                         \
                 "must be a dtype code 0 (float32), 1 (float16) or 2 (bfloat16); got ", (code))
