// The CPU's own float vector, for the kernels' loops: GCC compiles a vector wider than the
// CPU's registers through the stack, several times slower.
#pragma once

#include <cstring>

namespace strata::simd {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

}  // namespace strata::simd
