// Host helpers (CUDA builds only) for kernels that pass grid barriers (common/grid_sync.cuh):
// the co-residency check and the cooperative launch. Used by the persistent design and the
// barrier microbenchmark.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <utility>

#include <cuda_runtime_api.h>

#include <c10/cuda/CUDAException.h>

#include "common/smem_attribute.h"

namespace avme {

// Per kernel instantiation and device: the shared-memory opt-in already set, and the last
// (shared memory, threads) the occupancy calculator accepted. After a warm-up call a launch makes
// no CUDA API call besides the launch itself (CUDA-graph capture friendly).
struct LaunchCache {
  std::atomic<size_t> smem[kMaxDevices] = {};
  std::atomic<int64_t> fits[kMaxDevices] = {};
};

// Whether `ctas` blocks of this kernel, block size and shared memory are co-resident on a
// device of `num_sms` SMs (the occupancy calculator; sets the shared-memory opt-in first).
template <typename Kernel>
bool fits_cooperatively(Kernel kernel, int ctas, int threads, size_t smem, int num_sms,
                        LaunchCache* cache) {
  set_smem(kernel, smem, cache->smem);
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const int64_t key = (static_cast<int64_t>(smem) << 16) | threads;
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && ctas <= num_sms && cache->fits[device].load() == key) return true;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  const bool fits = per_sm >= 1 && static_cast<int64_t>(per_sm) * num_sms >= ctas;
  if (fits && cached && ctas <= num_sms) cache->fits[device].store(key);
  return fits;
}

// Cooperative launch of kernel<<<ctas, threads, smem, stream>>>(args...) (capturable in a CUDA
// graph; fails instead of deadlocking when the blocks cannot all be resident).
template <typename... KernelArgs, typename... Args>
void launch_cooperative(void (*kernel)(KernelArgs...), int ctas, int threads, size_t smem,
                        cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(ctas));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeCooperative;
  attribute[0].val.cooperative = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace avme
