// The "persistent" design of the fused AVME loop, for small batches (B up to a few hundred):
// weight-stationary persistent kernels, one cooperative launch for the K-step forward (or the
// decoder-only sampler) and one for backward through time.
//
// Design
// ------
// * The grid has one block per SM at most, all co-resident (cooperative launch); block c owns a
//   contiguous share of the encoder units, latent units, decoder units and pixels, and keeps the
//   weight rows of its units in shared memory for the whole launch (loaded once): all four gate
//   rows of its LSTM units, so the cell update is local. The step-invariant x and y columns of
//   the encoder (and y of the decoder) arrive hoisted in LoopParams::enc_static / dec_static.
//   Before the launch a packing kernel writes every block's weights in shared-memory order to
//   the workspace (once per launch: once per weight version in training); the kernel's start
//   copies its slice with 16-byte cp.async.
// * Blocks exchange activations through small feature-major buffers in global memory (L2), with
//   a grid-wide barrier (common/grid_sync.cuh) between dependent stages. Every stage streams ONE
//   activation matrix, in tiles, through shared memory and multiplies it by the stationary rows:
//   the rows that consume the same activation are merged into one stage, so each activation is
//   read once per step by each block.
//     forward, step t:  E  r_t      -> encoder gates (+ carried recurrent parts) -> h_enc_t
//                       Q  h_enc_t  -> mu, logvar, z_t; and W_hh(enc) h_enc_t for step t+1
//                       D  z_t      -> decoder gates (+ carried W_hh(dec) h_dec_{t-1}) -> h_dec_t
//                       W  h_dec_t  -> s_t, r_{t+1}; and W_hdec h_dec_t, W_hh(dec) h_dec_t for t+1
//     backward, step t: B1 dL/ds_t  -> dh_dec_t (+ carried parts) -> decoder gate gradients
//                       B2 d_gates_dec_t -> d[mu, logvar]_t and dL/deps_t; and W_hh(dec)^T
//                          part of dh_dec_{t-1}
//                       B3 d[mu, logvar]_t -> dh_enc_t (+ carried part) -> encoder gate gradients
//                       B4 d_gates_enc_t -> dL/ds_{t-1} (dr_t), and the W_hdec^T / W_hh(enc)^T
//                          parts of dh_dec_{t-1} / dh_enc_{t-1}
//   Grid barriers per launch (one after the start-up, none after the last stage): forward 4K,
//   sampler 2K, backward 4K - 1.
//   The number of blocks is the smallest that gives every stage the same rows per block as one
//   block per SM (at the paper's sizes 100 of the H100's 132: 4 units of 400 each).
// * The products go through one register-tile interface (common/tile_product.cuh): CUDA-core
//   FMA in the tensor dtype (fp32 or fp64; Config's default), or TF32 tensor cores for float
//   tensors (Config::math: 3xTF32 ~ float accuracy, or plain TF32), mma.sync m16n8k8 with the
//   batch as M and the weight rows as N. Each warp covers all the rows of a stage (up to 40 per
//   pass) for a slice of 32 or 64 batch columns over a share of the k rows (stage.cuh), so every
//   warp has the same work and each activation element is read once per block.
// * The backward writes exactly what BackwardParams asks (d_canvas, d_q, d_gates_enc,
//   d_gates_dec, grad_eps when given): the host computes the weight gradients with large GEMMs as
//   for the row-tile design.
// * No host synchronisation, no memset: the kernels initialise their workspace themselves; the
//   launch is cooperative (capturable in a CUDA graph); the workspace comes from the caching
//   allocator on `stream`.
//
// Limits: every block's weights must fit in shared memory (supports()); float64 tensors work
// only at sizes where twice the bytes fit (at the paper's sizes on an H100: the sampler only).
// Larger batches run in chunks of 32 * nbl columns (time grows with B; the per-block state moves
// to the workspace when it no longer fits next to the weights).
#pragma once

#include <cstdint>

#include "avme.h"
#include "persistent/plan.h"

namespace avme {
namespace persistent {

// What the launchers need to know about the device.
struct DeviceLimits {
  int num_sms = 0;          // multiprocessors (upper bound of the grid)
  int64_t smem_optin = 0;   // shared memory one block may opt in to (bytes)
};

// A resolved launch: its configuration and memory (for tests, tuning and reports).
struct LaunchInfo {
  Config config;
  int64_t smem_bytes = 0;       // dynamic shared memory per block
  int64_t workspace_bytes = 0;  // global workspace (allocated by the launcher)
  bool state_in_smem = false;   // per-block recurrent state in shared memory (else workspace)
  int grid_barriers = 0;        // grid-wide barriers of one launch
  StageSplit stages[kStages];   // the stages in the kernel's order (forward E, Q, D, W;
                                // backward B1..B4) and how a block's warps share them
};

// True when the design can run this problem on a device with `num_sms` SMs and `smem_optin`
// bytes of opt-in shared memory per block (the planned block's weights fit, and on a GPU the
// occupancy calculator confirms a block of that size fits on an SM). B == 0 is supported (no
// launch). Forward / sampler and backward have different weight slices: ask for each.
// `requested`: a configuration (e.g. Config::math = kMathTf32x3: tensor cores, which also need
// float tensors and an sm_80+ device; kMathFp32: 3xTF32 where it can run and fits, else FMA);
// 0 fields are chosen.
template <typename T>
bool supports(const LoopParams<T>& p, int num_sms, int64_t smem_optin,
              const Config& requested = Config{});
template <typename T>
bool supports(const BackwardParams<T>& p, int num_sms, int64_t smem_optin,
              const Config& requested = Config{});

// One launch on `stream` (the current stream of the tensors' device: its workspace is taken
// from the caching allocator on it). The caller has checked supports(); otherwise an error is
// raised. Outputs set to nullptr in the params are not written.
template <typename T>
void launch_forward(const LoopParams<T>& p, cudaStream_t stream);
template <typename T>
void launch_backward(const BackwardParams<T>& p, cudaStream_t stream);

// The same with explicit device limits and a requested configuration (0 fields: chosen).
template <typename T>
void launch_forward(const LoopParams<T>& p, const DeviceLimits& limits, const Config& requested,
                    cudaStream_t stream);
template <typename T>
void launch_backward(const BackwardParams<T>& p, const DeviceLimits& limits,
                     const Config& requested, cudaStream_t stream);

// The launch launch_forward / launch_backward would make (raises on an invalid request).
template <typename T>
LaunchInfo describe_forward(const LoopParams<T>& p, const DeviceLimits& limits,
                            const Config& requested);
template <typename T>
LaunchInfo describe_backward(const BackwardParams<T>& p, const DeviceLimits& limits,
                             const Config& requested);

}  // namespace persistent
}  // namespace avme
