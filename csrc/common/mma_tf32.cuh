// TF32 tensor-core primitives (sm_80+): float -> tf32 rounding, the big + small split of 3xTF32,
// and the warp-wide mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32. Fragment layouts (PTX
// ISA), g = lane / 4, t = lane % 4, as (row, col):
//   A 16x8: a0 (g, t)  a1 (g + 8, t)  a2 (g, t + 4)  a3 (g + 8, t + 4)
//   B 8x8:  b0 (t, g)  b1 (t + 4, g)
//   C, D 16x8: c0 (g, 2t)  c1 (g, 2t + 1)  c2 (g + 8, 2t)  c3 (g + 8, 2t + 1)
// The CPU emulator implements the mma by exchanging the 32 lanes' registers and rebuilding the
// matrices from these layouts (csrc/emulation/cuda_emulation.h).
#pragma once

#include <cstdint>

#ifdef AVME_CPU_EMULATION
#include "emulation/cuda_emulation.h"
#endif

namespace avme {

// cvt.rna.tf32.f32: round to nearest (ties away from zero), as an fp32 bit pattern.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#ifdef AVME_CPU_EMULATION
  return emu::tf32_rna(x);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#else
  uint32_t u = __float_as_uint(x);
  if ((u & 0x7f800000u) != 0x7f800000u) u += 0x1000u;
  return u & 0xffffe000u;
#endif
}

__device__ __forceinline__ float tf32_value(uint32_t bits) {
#ifdef AVME_CPU_EMULATION
  return emu::bits_to_float(bits);
#else
  return __uint_as_float(bits);
#endif
}

// x = big + small + O(2^-22 |x|), both tf32 (3xTF32: the product a b is taken as
// a_big b_big + a_big b_small + a_small b_big).
__device__ __forceinline__ void split_tf32(float x, uint32_t& big, uint32_t& small) {
  big = to_tf32(x);
  small = to_tf32(x - tf32_value(big));
}

// d += A B (one warp; every lane passes its fragments, see the layouts above).
__device__ __forceinline__ void mma_tf32_m16n8k8(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2]) {
#ifdef AVME_CPU_EMULATION
  emu::mma_m16n8k8_tf32(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // the launchers select tensor-core tiles on sm_80+ builds only
#endif
}

// The 3xTF32 term d += a b ~ a_small b_big + a_big b_small + a_big b_big (small products first),
// three mma.sync (one exchange among the lanes in the CPU emulator).
__device__ __forceinline__ void mma_tf32x3_m16n8k8(float (&d)[4], const uint32_t (&a_big)[4],
                                                   const uint32_t (&a_small)[4],
                                                   const uint32_t (&b_big)[2],
                                                   const uint32_t (&b_small)[2]) {
#ifdef AVME_CPU_EMULATION
  emu::mma_m16n8k8_tf32x3(d, a_big, a_small, b_big, b_small);
#else
  mma_tf32_m16n8k8(d, a_small, b_big);
  mma_tf32_m16n8k8(d, a_big, b_small);
  mma_tf32_m16n8k8(d, a_big, b_big);
#endif
}

}  // namespace avme
