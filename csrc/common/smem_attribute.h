// Host helper shared by the kernel designs' launchers (CUDA builds only): opt a kernel in to more
// than 48 KiB of dynamic shared memory.
#pragma once

#include <atomic>
#include <cstddef>

#include <cuda_runtime_api.h>

#include <c10/cuda/CUDAException.h>

namespace avme {

constexpr int kMaxDevices = 64;

// Sets cudaFuncAttributeMaxDynamicSharedMemorySize of `kernel` to `bytes` when above 48 KiB.
// `configured` (one array per kernel instantiation, kMaxDevices entries) remembers the largest
// size set per device, so the attribute is set only when a launch needs more than before:
// after a warm-up no CUDA API call other than the launch is made (CUDA-graph capture friendly).
template <typename KernelT>
void set_smem(KernelT kernel, size_t bytes, std::atomic<size_t>* configured) {
  if (bytes <= 48 * 1024) return;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  std::atomic<size_t>* slot = (device >= 0 && device < kMaxDevices) ? &configured[device] : nullptr;
  if (slot != nullptr && slot->load() >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  if (slot != nullptr) {
    size_t prev = slot->load();
    while (prev < bytes && !slot->compare_exchange_weak(prev, bytes)) {
    }
  }
}

}  // namespace avme
