// Grid-wide barrier for kernels started with a cooperative launch (every block co-resident).
//
// Choice: cooperative_groups' grid barrier (this_grid().sync()), not a barrier of our own on a
// global counter, because
//   * its counter lives in the per-launch workspace the driver hands to a cooperative launch
//     (cooperative_groups/details/driver_abi.h: grid_workspace): there is no counter of ours that
//     must be zero at the start of a launch, nothing to reset between launches (no host memset,
//     nothing for a CUDA graph to capture beyond the launch itself), and two launches in flight
//     on different streams cannot share one;
//   * on sm_70+ it is one `atom.add.release.gpu` per block to arrive and an `ld.acquire.gpu`
//     poll by one thread per block, between two __syncthreads (cooperative_groups/details/
//     sync.h): writes to global memory before the barrier are visible to every block after it,
//     which is what the stages exchanging activations through global memory / L2 need;
//   * a cooperative launch can be captured in a CUDA graph (cudaLaunchAttributeCooperative is
//     valid for graph kernel nodes), so the persistent kernels stay graph-capturable.
// A hand-made flag barrier may have lower latency (unmeasured here); every call site goes
// through grid_sync(), so one can replace it after measuring.
//
// The CPU emulator (csrc/emulation/) implements it as a barrier over every emulated thread.
#pragma once

#ifdef AVME_CPU_EMULATION
#include "emulation/cuda_emulation.h"
#else
#include <cooperative_groups.h>
#endif

namespace avme {

// Every thread of every block of the (cooperative) grid must call it; it returns when all
// have, with their earlier global and shared memory writes visible.
__device__ __forceinline__ void grid_sync() {
#ifdef AVME_CPU_EMULATION
  ::avme::emu::grid_sync();
#else
  cooperative_groups::this_grid().sync();
#endif
}

}  // namespace avme
