// Host helper (CUDA builds only): a cooperative launch, for kernels that pass grid barriers
// (common/grid_sync.cuh). Used by the persistent design and the barrier microbenchmark.
#pragma once

#include <cstddef>
#include <utility>

#include <cuda_runtime_api.h>

#include <c10/cuda/CUDAException.h>

namespace avme {

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
