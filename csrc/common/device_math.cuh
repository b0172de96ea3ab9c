// Scalar device math shared by every kernel design (float and double overloads), so each
// design's kernels and the CPU emulator use one definition of the activations.
#pragma once

#ifdef AVME_CPU_EMULATION
#include "emulation/cuda_emulation.h"
#endif

namespace avme {

__device__ __forceinline__ float dexp(float v) { return expf(v); }
__device__ __forceinline__ double dexp(double v) { return exp(v); }
__device__ __forceinline__ float dtanh(float v) { return tanhf(v); }
__device__ __forceinline__ double dtanh(double v) { return tanh(v); }
__device__ __forceinline__ float dfma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double dfma(double a, double b, double c) { return fma(a, b, c); }

template <typename T>
__device__ __forceinline__ T dsigmoid(T v) {
  return T(1) / (T(1) + dexp(-v));
}

}  // namespace avme
