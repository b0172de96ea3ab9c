// Host side shared by the persistent forward and backward launchers: configuration choice and
// checks, the workspace, the cooperative launch and the occupancy check, and the launch flow
// (describe / supports / launch) of a kernel direction (forward.cu, backward.cu):
//
//   struct Direction {          // e.g. the forward of float tensors
//     using Params = ...;       // LoopParams<T> or BackwardParams<T>
//     using Plan = ...;         // ForwardPlan or BackwardPlan (plan.h)
//     using Scalar = T;
//     using Kernel = void (*)(const Params, const Plan, T* const);
//     template <int NBL, int MATH> static Kernel instance();  // the kernel instantiation
//     static const char* op(const Params&);                    // name in messages
//     static Plan plan(const Dims&, const Config&, int64_t smem_limit);
//     static int grid_barriers(const Params&);
//     using Weights = ...;      // value(k, r) of the stationary weights of a block and stage:
//                               // Weights(params, plan, cta, stage)(k, r)
//   };
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include <c10/util/Exception.h>

#include "persistent/persistent.h"
#include "persistent/stage.cuh"

#ifdef AVME_CPU_EMULATION
#include "emulation/cuda_emulation.h"
#else
#include <cuda_runtime.h>

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>

#include "common/cooperative_launch.h"
#include "common/smem_attribute.h"
#endif

namespace avme {
namespace persistent {
namespace detail {

template <typename T>
Dims dims_of(const LoopParams<T>& p) {
  Dims d;
  d.B = p.B, d.K = p.K, d.D = p.D, d.He = p.encoder ? p.He : 0, d.Hd = p.Hd, d.Z = p.Z;
  d.encoder = p.encoder;
  return d;
}

template <typename T>
Dims dims_of(const BackwardParams<T>& p) {
  Dims d;
  d.B = p.B, d.K = p.K, d.D = p.D, d.He = p.He, d.Hd = p.Hd, d.Z = p.Z, d.C = p.C;
  return d;
}

// Largest batch of a launch (the start-up loops take the batch as an int column count).
constexpr int64_t kMaxBatch = std::numeric_limits<int>::max() / 2;

inline bool sizes_valid(const Dims& d) {
  return d.B >= 0 && d.K >= 1 && d.D >= 1 && d.Hd >= 1 && d.Z >= 1 && d.C >= 0 &&
         (!d.encoder || d.He >= 1);
}

inline void check_dims(const Dims& d, const char* op) {
  TORCH_CHECK(sizes_valid(d), "avme::persistent::", op,
              ": sizes must be positive (B >= 0, K >= 1, C >= 0), got B=", d.B, " K=", d.K,
              " D=", d.D, " He=", d.He, " Hd=", d.Hd, " Z=", d.Z, " C=", d.C);
  TORCH_CHECK(d.B <= kMaxBatch, "avme::persistent::", op, ": batch too large (", d.B, " rows)");
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
  const int nwarps = c.threads / 32;
  if (c.nbl == 0) c.nbl = d.B <= 32 ? 1 : (d.B <= 64 || nwarps < column_slices(4) ? 2 : 4);
  TORCH_CHECK(c.nbl == 1 || c.nbl == 2 || c.nbl == 4, "avme::persistent::", op,
              ": nbl (batch chunks of 32 * nbl columns) must be 1, 2 or 4, got ", c.nbl);
  TORCH_CHECK(nwarps >= column_slices(c.nbl), "avme::persistent::", op, ": nbl ", c.nbl,
              " splits a batch chunk into ", column_slices(c.nbl), " column slices of ",
              warp_cols(c.nbl), ", one per warp at least: threads must be >= ",
              32 * column_slices(c.nbl), ", got ", c.threads);
  if (c.kc == 0) c.kc = 4096 / (32 * c.nbl);  // tiles of 4096 elements (16 KiB of float)
  TORCH_CHECK(c.kc >= 1 && c.kc <= 4096, "avme::persistent::", op,
              ": kc (k rows per tile) must be in [1, 4096], got ", c.kc);
  TORCH_CHECK(c.kc % k_step(c.math) == 0, "avme::persistent::", op,
              ": kc (k rows per tile) must be a multiple of ", k_step(c.math),
              " for tensor-core math (k blocks of 8 rows), got ", c.kc);
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

// Device limits of the current device (the emulator: 4 SMs with an H100's shared memory).
inline DeviceLimits default_device_limits() {
#ifdef AVME_CPU_EMULATION
  return DeviceLimits{4, 232448};
#else
  return current_device_limits();
#endif
}

// ---- the weights, packed in shared-memory order -------------------------------------------------

// Every block's stationary weights in its shared-memory layout, `plan.weights_elems` elements per
// block from `packed` (the workspace), so that the kernel's start copies them with 16-byte
// cp.async (stage.cuh: start_weight_copy). Once per launch, i.e. once per weight version in
// training (a forward and a backward per optimizer step, each with its own layout).
template <bool kRoundTf32, typename Dir>
__device__ __forceinline__ void pack_block_stage(const typename Dir::Params& p,
                                                 const typename Dir::Plan& plan, int cta,
                                                 int stage, typename Dir::Scalar* packed,
                                                 int begin, int stride) {
  const StageLayout& layout = stage_of(plan, stage);
  if (layout.rows <= 0) return;
  const typename Dir::Weights value(p, plan, cta, stage);
  pack_stage<kRoundTf32>(layout, packed + cta * plan.weights_elems + layout.offset, begin,
                         stride, value);
}

#ifndef AVME_CPU_EMULATION
// Grid (x: parts of a stage, y: block, z: stage).
template <typename Dir, bool kRoundTf32>
__global__ void __launch_bounds__(256)
    pack_weights_kernel(const typename Dir::Params p, const typename Dir::Plan plan,
                        typename Dir::Scalar* const packed) {
  pack_block_stage<kRoundTf32, Dir>(p, plan, static_cast<int>(blockIdx.y),
                                    static_cast<int>(blockIdx.z), packed,
                                    static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x),
                                    static_cast<int>(gridDim.x * blockDim.x));
}
#endif

template <typename Dir>
void pack_weights(const typename Dir::Params& p, const typename Dir::Plan& plan,
                  typename Dir::Scalar* packed, cudaStream_t stream) {
  constexpr bool kFloat = std::is_same_v<typename Dir::Scalar, float>;
  const bool round = kFloat && plan.cfg.math == kMathTf32;
#ifdef AVME_CPU_EMULATION
  (void)stream;
  ++emu::launch_count;  // one kernel on a GPU (emulated here by a loop on the host)
  for (int cta = 0; cta < plan.cfg.ctas; ++cta)
    for (int stage = 0; stage < kStages; ++stage) {
      if (round) {
        pack_block_stage<kFloat, Dir>(p, plan, cta, stage, packed, 0, 1);
      } else {
        pack_block_stage<false, Dir>(p, plan, cta, stage, packed, 0, 1);
      }
    }
#else
  constexpr int kThreads = 256, kPerThread = 4;
  int64_t most = 0;
  for (int stage = 0; stage < kStages; ++stage)
    most = std::max(most, stage_of(plan, stage).rows > 0 ? stage_of(plan, stage).elems() : 0);
  if (most == 0) return;
  const dim3 grid(static_cast<unsigned>((most + kThreads * kPerThread - 1) / (kThreads * kPerThread)),
                  static_cast<unsigned>(plan.cfg.ctas), kStages);
  if (round) {
    pack_weights_kernel<Dir, kFloat><<<grid, kThreads, 0, stream>>>(p, plan, packed);
  } else {
    pack_weights_kernel<Dir, false><<<grid, kThreads, 0, stream>>>(p, plan, packed);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// ---- the launch flow of a direction (see the file comment) -------------------------------------

// The kernel instantiation of a configuration (tensor-core math exists for float only;
// resolve_config rejects it for double).
template <typename Dir, int MATH>
typename Dir::Kernel kernel_for_math(int nbl) {
  switch (nbl) {
    case 1: return Dir::template instance<1, MATH>();
    case 2: return Dir::template instance<2, MATH>();
    default: return Dir::template instance<4, MATH>();
  }
}

template <typename Dir>
typename Dir::Kernel kernel_for(const Config& c) {
  if constexpr (std::is_same_v<typename Dir::Scalar, float>) {
    if (c.math == kMathTf32x3) return kernel_for_math<Dir, kMathTf32x3>(c.nbl);
    if (c.math == kMathTf32) return kernel_for_math<Dir, kMathTf32>(c.nbl);
  }
  return kernel_for_math<Dir, kMathFma>(c.nbl);
}

#ifndef AVME_CPU_EMULATION
// Launch cache of each instantiation of a direction (nbl x math).
template <typename Dir>
LaunchCache* launch_cache(const Config& c) {
  static LaunchCache caches[3][3];
  return &caches[c.nbl == 1 ? 0 : (c.nbl == 2 ? 1 : 2)][c.math];
}
#endif

// Whether tensor-core math can run here (the CPU emulator emulates it).
inline bool has_tensor_cores() {
#ifdef AVME_CPU_EMULATION
  return true;
#else
  return device_has_tf32_mma();
#endif
}

// The plan of a launch: sizes checked, the configuration resolved (raises on a bad request).
// Math kMathFp32 (precision "fp32") becomes 3xTF32 for float tensors where the device has tensor
// cores and that plan fits the shared memory (its weights pad to 8 rows per stage where FMA's
// pad to 4), else FMA.
template <typename Dir>
typename Dir::Plan resolved_plan(const typename Dir::Params& p, const DeviceLimits& limits,
                                 const Config& requested) {
  using T = typename Dir::Scalar;
  const Dims d = dims_of(p);
  const char* op = Dir::op(p);
  check_dims(d, op);
  const auto plan_for = [&](const Config& request) {
    const Config cfg = resolve_config(
        d, limits, request, sizeof(T), op,
        [&](const Config& c) { return stage_rows(Dir::plan(d, c, limits.smem_optin)); });
    return Dir::plan(d, cfg, limits.smem_optin);
  };
  if (requested.math != kMathFp32) return plan_for(requested);
  Config request = requested;
  if (std::is_same_v<T, float> && has_tensor_cores() &&
      request.kc % k_step(kMathTf32x3) == 0) {
    request.math = kMathTf32x3;
    const typename Dir::Plan plan = plan_for(request);
    if (plan.smem_elems * static_cast<int64_t>(sizeof(T)) <= limits.smem_optin) return plan;
  }
  request.math = kMathFma;
  return plan_for(request);
}

template <typename Dir>
LaunchInfo describe(const typename Dir::Params& p, const DeviceLimits& limits,
                    const Config& requested) {
  const typename Dir::Plan plan = resolved_plan<Dir>(p, limits, requested);
  LaunchInfo info;
  info.config = plan.cfg;
  info.smem_bytes = plan.smem_elems * static_cast<int64_t>(sizeof(typename Dir::Scalar));
  info.workspace_bytes = plan.ws_elems * static_cast<int64_t>(sizeof(typename Dir::Scalar));
  info.state_in_smem = plan.priv_in_smem;
  info.grid_barriers = Dir::grid_barriers(p);
  for (int i = 0; i < kStages; ++i)
    info.stages[i] = split_of(stage_of(plan, i), plan.cfg, sizeof(typename Dir::Scalar));
  return info;
}

template <typename Dir>
bool supports(const typename Dir::Params& p, int num_sms, int64_t smem_optin,
              const Config& requested) {
  const Dims d = dims_of(p);
  if (num_sms < 1 || !sizes_valid(d) || d.B > kMaxBatch) return false;
  if (requested.math != kMathFma && requested.math != kMathFp32 &&
      !std::is_same_v<typename Dir::Scalar, float>)
    return false;
  if (d.B == 0) return true;
  const LaunchInfo info = describe<Dir>(p, DeviceLimits{num_sms, smem_optin}, requested);
  if (info.smem_bytes > smem_optin) return false;
#ifdef AVME_CPU_EMULATION
  return true;
#else
  if (info.config.math != kMathFma && !device_has_tf32_mma()) return false;
  return fits_cooperatively(kernel_for<Dir>(info.config), info.config.ctas, info.config.threads,
                            static_cast<size_t>(info.smem_bytes), num_sms,
                            launch_cache<Dir>(info.config));
#endif
}

// One cooperative launch on `stream` (outputs as the params ask; workspace from the caching
// allocator on `stream`); raises when the problem does not fit (supports() says so).
template <typename Dir>
void launch(const typename Dir::Params& p, const DeviceLimits& limits, const Config& requested,
            cudaStream_t stream) {
  using T = typename Dir::Scalar;
  const char* op = Dir::op(p);
  const typename Dir::Plan plan = resolved_plan<Dir>(p, limits, requested);
  if (p.B == 0) return;
  const int64_t smem = plan.smem_elems * static_cast<int64_t>(sizeof(T));
  TORCH_CHECK(smem <= limits.smem_optin, "avme::persistent::", op, ": a block needs ", smem,
              " bytes of shared memory for the weights of its units, more than the ",
              limits.smem_optin, " bytes per block of this device (D=", p.D, ", He=", p.He,
              ", Hd=", p.Hd, ", Z=", p.Z, ", ", plan.cfg.ctas, " blocks, dtype size ", sizeof(T),
              "); supports() says so: use another design");
  const typename Dir::Kernel kernel = kernel_for<Dir>(plan.cfg);
  const int ctas = plan.cfg.ctas, threads = plan.cfg.threads;
  Workspace<T> ws(plan.ws_elems, stream);
  pack_weights<Dir>(p, plan, ws.get() + plan.ws_weights, stream);
#ifdef AVME_CPU_EMULATION
  emu::cooperative_launch(kernel, ctas, threads, static_cast<size_t>(smem), p, plan, ws.get());
#else
  TORCH_CHECK(plan.cfg.math == kMathFma || device_has_tf32_mma(), "avme::persistent::", op,
              ": tensor-core math needs an sm_80+ device");
  TORCH_CHECK(fits_cooperatively(kernel, ctas, threads, static_cast<size_t>(smem),
                                 limits.num_sms, launch_cache<Dir>(plan.cfg)),
              "avme::persistent::", op, ": ", ctas, " blocks of ", threads, " threads and ", smem,
              " bytes of shared memory cannot all be resident on this device (cooperative "
              "launch); supports() says so: use another design");
  launch_cooperative(kernel, ctas, threads, static_cast<size_t>(smem), stream, p, plan, ws.get());
#endif
}

}  // namespace detail
}  // namespace persistent
}  // namespace avme

// The entry points of one direction (persistent.h), in namespace avme::persistent: each forwards
// to the launch flow above with Direction<T>, and is instantiated for float and double. E.g.
// AVME_PERSISTENT_ENTRY_POINTS(LoopParams, ForwardDirection, launch_forward, describe_forward).
#define AVME_PERSISTENT_ENTRY_POINTS(Params, Direction, launch_fn, describe_fn)                  \
  template <typename T>                                                                       \
  LaunchInfo describe_fn(const Params<T>& p, const DeviceLimits& limits,                      \
                         const Config& requested) {                                           \
    return detail::describe<Direction<T>>(p, limits, requested);                              \
  }                                                                                           \
  template <typename T>                                                                       \
  bool supports(const Params<T>& p, int num_sms, int64_t smem_optin, const Config& requested) { \
    return detail::supports<Direction<T>>(p, num_sms, smem_optin, requested);                 \
  }                                                                                           \
  template <typename T>                                                                       \
  void launch_fn(const Params<T>& p, const DeviceLimits& limits, const Config& requested,     \
                 cudaStream_t stream) {                                                       \
    detail::launch<Direction<T>>(p, limits, requested, stream);                               \
  }                                                                                           \
  template <typename T>                                                                       \
  void launch_fn(const Params<T>& p, cudaStream_t stream) {                                   \
    detail::launch<Direction<T>>(p, detail::default_device_limits(), Config{}, stream);       \
  }                                                                                           \
  AVME_PERSISTENT_INSTANTIATE(Params, launch_fn, describe_fn, float)                          \
  AVME_PERSISTENT_INSTANTIATE(Params, launch_fn, describe_fn, double)

#define AVME_PERSISTENT_INSTANTIATE(Params, launch_fn, describe_fn, T)                          \
  template bool supports<T>(const Params<T>&, int, int64_t, const Config&);                  \
  template void launch_fn<T>(const Params<T>&, cudaStream_t);                                \
  template void launch_fn<T>(const Params<T>&, const DeviceLimits&, const Config&,           \
                             cudaStream_t);                                                  \
  template LaunchInfo describe_fn<T>(const Params<T>&, const DeviceLimits&, const Config&);
