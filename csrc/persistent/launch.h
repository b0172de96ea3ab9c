// Host side shared by the persistent forward and backward launchers: configuration choice and
// checks, the workspace, the cooperative launch and the occupancy check.
#pragma once

#include <atomic>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include <c10/util/Exception.h>

#include "persistent/persistent.h"

#ifdef AVME_CPU_EMULATION
#include "emulation/cuda_emulation.h"
#else
#include <cuda_runtime.h>

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>

#include "common/smem_attribute.h"
#endif

namespace avme {
namespace persistent {
namespace detail {

template <typename T>
Dims dims_of(const LoopParams<T>& p) {
  return Dims{p.B, p.K, p.D, p.encoder ? p.He : 0, p.Hd, p.Z, p.encoder};
}

template <typename T>
Dims dims_of(const BackwardParams<T>& p) {
  return Dims{p.B, p.K, p.D, p.He, p.Hd, p.Z, true};
}

inline void check_dims(const Dims& d, const char* op) {
  TORCH_CHECK(d.B >= 0 && d.K >= 1 && d.D >= 1 && d.Hd >= 1 && d.Z >= 1 &&
                  (!d.encoder || d.He >= 1),
              "avme::persistent::", op, ": sizes must be positive (B >= 0, K >= 1), got B=", d.B,
              " K=", d.K, " D=", d.D, " He=", d.He, " Hd=", d.Hd, " Z=", d.Z);
  TORCH_CHECK(d.B <= std::numeric_limits<int>::max() / 2, "avme::persistent::", op,
              ": batch too large (", d.B, " rows)");
}

// The configuration of a launch: requested fields (non-zero) are checked and kept, the others
// chosen. ctas: the fewest blocks that give every stage the same padded rows per block as one
// block per SM (same time per stage, less L2 traffic and cheaper barriers); `stage_rows(cfg)`
// returns the stages' padded row counts for a configuration.
template <typename StageRows>
Config resolve_config(const Dims& d, const DeviceLimits& limits, const Config& requested,
                      size_t elem_size, const char* op, StageRows&& stage_rows) {
  TORCH_CHECK(limits.num_sms >= 1, "avme::persistent::", op, ": num_sms must be >= 1, got ",
              limits.num_sms);
  Config c = requested;
  TORCH_CHECK(c.math == kMathFma || c.math == kMathTf32x3 || c.math == kMathTf32,
              "avme::persistent::", op, ": math must be ", kMathFma, " (FMA), ", kMathTf32x3,
              " (3xTF32) or ", kMathTf32, " (TF32), got ", c.math);
  TORCH_CHECK(c.math == kMathFma || elem_size == sizeof(float), "avme::persistent::", op,
              ": tensor-core math (", c.math, ") takes float32 tensors");
  if (c.threads == 0) c.threads = kMaxThreads;
  TORCH_CHECK(c.threads >= 32 && c.threads <= kMaxThreads && c.threads % 32 == 0,
              "avme::persistent::", op, ": threads must be a multiple of 32 in [32, ",
              kMaxThreads, "], got ", c.threads);
  if (c.nbl == 0) c.nbl = d.B <= 32 ? 1 : (d.B <= 64 ? 2 : 4);
  TORCH_CHECK(c.nbl == 1 || c.nbl == 2 || c.nbl == 4, "avme::persistent::", op,
              ": nbl (batch columns per lane) must be 1, 2 or 4, got ", c.nbl);
  if (c.kc == 0) c.kc = 4096 / (32 * c.nbl);  // tiles of 4096 elements (16 KiB of float)
  TORCH_CHECK(c.kc >= 1 && c.kc <= 4096, "avme::persistent::", op,
              ": kc (k rows per tile) must be in [1, 4096], got ", c.kc);
  int widest = d.D > d.Hd ? d.D : d.Hd;
  if (d.encoder) widest = widest > d.He ? widest : d.He;
  widest = widest > d.Z ? widest : d.Z;
  const int gmax = limits.num_sms < widest ? limits.num_sms : widest;
  if (c.ctas == 0) {
    Config probe = c;
    probe.ctas = gmax;
    const auto target = stage_rows(probe);
    for (int g = 1; g <= gmax; ++g) {
      probe.ctas = g;
      if (stage_rows(probe) == target) break;
    }
    c.ctas = probe.ctas;
  }
  TORCH_CHECK(c.ctas >= 1 && c.ctas <= limits.num_sms, "avme::persistent::", op,
              ": ctas must be in [1, num_sms = ", limits.num_sms, "], got ", c.ctas);
  return c;
}

#ifdef AVME_CPU_EMULATION
// Workspace of the emulated launch: NaN-filled, so that reading an element the kernel did not
// initialise shows up in the results.
template <typename T>
class Workspace {
 public:
  Workspace(int64_t elems, cudaStream_t)
      : data_(static_cast<size_t>(elems > 0 ? elems : 1), std::numeric_limits<T>::quiet_NaN()) {}
  T* get() { return data_.data(); }

 private:
  std::vector<T> data_;
};
#else
// Workspace from the caching allocator, on `stream`: freed (for reuse by later work on the same
// stream, ordered after the kernel) when the launcher returns.
template <typename T>
class Workspace {
 public:
  Workspace(int64_t elems, cudaStream_t stream)
      : ptr_(c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(
            static_cast<size_t>(elems > 0 ? elems : 1) * sizeof(T), stream)) {}
  ~Workspace() { c10::cuda::CUDACachingAllocator::raw_delete(ptr_); }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  T* get() { return static_cast<T*>(ptr_); }

 private:
  void* ptr_;
};

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

// Tensor-core math needs sm_80+ (mma.sync TF32, cp.async).
inline bool device_has_tf32_mma() {
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
}

inline DeviceLimits current_device_limits() {
  int device = 0, smem = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return DeviceLimits{sms, smem};
}
#endif

}  // namespace detail
}  // namespace persistent
}  // namespace avme
