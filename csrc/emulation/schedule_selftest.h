// Test-only: two tiny kernels that show the emulator's serial schedules (cuda_emulation.h) turn a
// missing barrier into a wrong result every time. Each unit (a block of a cooperative grid, or a
// warp of a block) writes its number + 1, then, after the barrier when `with_barrier`, reads its
// neighbour's: unit u sees u + 2 (mod the units, + 1), and without the barrier the unit that runs
// first sees what was there before. Registered as
// `schedule_selftest(str barrier, bool with_barrier) -> Tensor` ("grid": 3 blocks of 64 threads,
// grid_sync; "block": one block of kThreads threads, __syncthreads).
#pragma once

#include <string>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "avme.h"
#include "emulation/cuda_emulation.h"

namespace avme {
namespace emu {
namespace selftest {

constexpr int kGridBlocks = 3;
constexpr int kGridThreads = 64;

inline void grid_kernel(float* written, float* seen, bool with_barrier) {
  const int b = static_cast<int>(blockIdx.x), t = static_cast<int>(threadIdx.x);
  if (t == 32) written[b] = static_cast<float>(b + 1);  // lane 0 of warp 1
  if (with_barrier) grid_sync();
  if (t == 0) seen[b] = written[(b + 1) % kGridBlocks];  // lane 0 of warp 0
}

struct BlockArgs {
  float* seen;
  bool with_barrier;
};

inline void block_kernel(const BlockArgs a) {
  float* const smem = reinterpret_cast<float*>(tls_smem);
  const int t = static_cast<int>(threadIdx.x), warps = kThreads / 32;
  if (t % 32 == 0) smem[t / 32] = static_cast<float>(t / 32 + 1);
  if (a.with_barrier) __syncthreads();
  if (t % 32 == 0) a.seen[t / 32] = smem[(t / 32 + 1) % warps];
}

inline at::Tensor run(const std::string& barrier, bool with_barrier) {
  if (barrier == "grid") {
    at::Tensor written = at::zeros({kGridBlocks}, at::kFloat);
    at::Tensor seen = at::zeros({kGridBlocks}, at::kFloat);
    cooperative_launch(grid_kernel, kGridBlocks, kGridThreads, 0, written.data_ptr<float>(),
                       seen.data_ptr<float>(), with_barrier);
    return seen;
  }
  TORCH_CHECK_VALUE(barrier == "block", "schedule_selftest: barrier must be 'grid' or 'block', got '",
                    barrier, "'");
  at::Tensor seen = at::zeros({kThreads / 32}, at::kFloat);
  launch(block_kernel, 1, (kThreads / 32) * sizeof(float), BlockArgs{seen.data_ptr<float>(), with_barrier});
  return seen;
}

}  // namespace selftest
}  // namespace emu
}  // namespace avme
