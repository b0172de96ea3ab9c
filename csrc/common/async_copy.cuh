// Asynchronous global -> shared memory copies of 16 bytes (cp.async, sm_80+), used to stream
// activation tiles into shared memory while the previous tile is multiplied.
//
//   copy_16_async(dst, src, valid_bytes)  copies valid_bytes (0..16) from src and zero-fills the
//                                         rest of the 16 destination bytes (src is not read
//                                         when valid_bytes == 0);
//   async_commit()                        closes the group of copies issued so far;
//   async_wait<N>()                       waits until at most N groups are still in flight.
// dst (shared) and src (global) must be 16-byte aligned. Each thread waits for its own copies
// only: a __syncthreads() after async_wait makes the tile visible to the whole block.
//
// Older architectures and the CPU emulator copy synchronously (same results).
#pragma once

#ifdef AVME_CPU_EMULATION
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "emulation/cuda_emulation.h"
#endif

namespace avme {

__device__ __forceinline__ void copy_16_async(void* dst_smem, const void* src_global,
                                              int valid_bytes) {
#if defined(AVME_CPU_EMULATION)
  // The hardware faults on a misaligned cp.async (or a src-size above 16); the emulator checks
  // the same (its shared memory and workspaces are 16-byte aligned like the GPU's).
  if (reinterpret_cast<std::uintptr_t>(dst_smem) % 16 != 0 ||
      reinterpret_cast<std::uintptr_t>(src_global) % 16 != 0 || valid_bytes < 0 ||
      valid_bytes > 16) {
    std::fprintf(stderr, "avme CUDA emulator: cp.async of 16 bytes with dst %p, src %p (must be "
                 "16-byte aligned), src-size %d (must be 0..16)\n", dst_smem, src_global,
                 valid_bytes);
    std::abort();
  }
  unsigned char* dst = static_cast<unsigned char*>(dst_smem);
  if (valid_bytes > 0) std::memcpy(dst, src_global, static_cast<size_t>(valid_bytes));
  std::memset(dst + valid_bytes, 0, static_cast<size_t>(16 - valid_bytes));
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(dst_smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src_global),
               "r"(valid_bytes)
               : "memory");
#else
  unsigned char* dst = static_cast<unsigned char*>(dst_smem);
  const unsigned char* src = static_cast<const unsigned char*>(src_global);
  for (int i = 0; i < 16; ++i) dst[i] = i < valid_bytes ? src[i] : 0;
#endif
}

__device__ __forceinline__ void async_commit() {
#if !defined(AVME_CPU_EMULATION) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void async_wait() {
#if !defined(AVME_CPU_EMULATION) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace avme
