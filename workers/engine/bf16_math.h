// bf16 conversions and an exponential the compiler vectorizes, shared by the engine's CPU kernels
// (decode_attention.cpp, layer_ops.cpp).

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace llava_queue {

inline float bf16_to_float(uint16_t bf16) {
  uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// Round to nearest, ties to even, as torch converts fp32 to bf16; a NaN stays a NaN.
inline uint16_t float_to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// e^x in a form the compiler vectorizes (std::exp is a call per element): Cephes' expf, x = n ln2 + r with
// |r| <= ln2 / 2 and e^r by a degree-6 polynomial, within 2 ulp of e^x. Below -87 (e^x under 2^-125) it gives
// e^-87; from about 88.4 (where 2^n overflows) infinity, as e^x's fp32 value is from 88.73.
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 89.0f ? 89.0f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float power;
  std::memcpy(&power, &bits, sizeof power);
  return y * power;
}

}  // namespace llava_queue
