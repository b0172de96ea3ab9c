// Shared declarations of the avme fused CUDA kernels (csrc/rowtile/rowtile_kernels.cu) and the
// torch ops that launch them (csrc/avme_ops.cpp, which checks every argument before a launch).
//
// Layouts (all row-major, contiguous; K steps, B batch rows):
//   per-step tensors are (K, B, N): element (t, b, n) at (t * B + b) * N + n;
//   LSTM gate tensors hold 4H columns in nn.LSTMCell order [i | f | g | o].
// Every offset into a (K, B, N) or (B, N) tensor is computed in int64_t: B can be
// millions of rows (IWAE evaluation), so K * B * 4H overflows 32 bits.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef AVME_CPU_EMULATION
typedef struct CUstream_st* cudaStream_t;  // test-only CPU build (csrc/emulation/)
#else
#include <cuda_runtime_api.h>
#endif

namespace avme {

// Threads per block of every kernel (8 warps).
constexpr int kThreads = 256;
// Batch rows per block are a power of two <= kMaxRowsPerBlock (template argument).
constexpr int kMaxRowsPerBlock = 8;

// Arguments of the forward / sampling kernel (one launch runs all K steps).
template <typename T>
struct LoopParams {
  int64_t B = 0;  // batch rows
  int K = 0, D = 0, He = 0, Hd = 0, Z = 0;
  bool encoder = true;     // false: decoder-only sampler (z read from z_in)
  bool error_mode = false; // encoder input r_t = x - sigmoid(s_{t-1}) instead of s_{t-1}

  // Inputs.
  const T* x = nullptr;           // (B, D)                  [encoder]
  const T* eps = nullptr;         // (K, B, Z)               [encoder]
  const T* z_in = nullptr;        // (K, B, Z)               [sampler]
  const T* enc_static = nullptr;  // (B, 4He): x W_x^T + y W_y^T + b_ih + b_hh   [encoder]
  const T* enc_wT = nullptr;      // (D + Hd + He, 4He): [W_r^T; W_hdec^T; W_hh^T] [encoder]
  const T* q_wT = nullptr;        // (He, 2Z)                [encoder]
  const T* q_b = nullptr;         // (2Z)                    [encoder]
  const T* dec_static = nullptr;  // (B, 4Hd) y W_y^T + b, or (4Hd) b with dec_static_stride 0
  int64_t dec_static_stride = 0;  // row stride of dec_static (4Hd or 0)
  const T* dec_wT = nullptr;      // (Z + Hd, 4Hd): [W_z^T; W_hh^T]
  const T* write_wT = nullptr;    // (Hd, D)
  const T* write_b = nullptr;     // (D)
  // The same weights in their nn.LSTMCell / nn.Linear layouts, as BackwardParams holds them.
  // A design reads one of the two layouts: the rowtile and persistent designs the (in, out)
  // copies above, the stagewise design these (its GEMMs take them as transposed operands, so
  // the host makes no copy for it). The host fills the layout of the design it runs.
  int C = 0;                      // classes: the y columns of enc_w_ih and dec_w_ih
  const T* enc_w_ih = nullptr;    // (4He, 2D + Hd + C) columns [x, r, h_dec, y]  [encoder]
  const T* enc_w_hh = nullptr;    // (4He, He)                                    [encoder]
  const T* q_w = nullptr;         // (2Z, He)                                     [encoder]
  const T* dec_w_ih = nullptr;    // (4Hd, Z + C) columns [z, y]
  const T* dec_w_hh = nullptr;    // (4Hd, Hd)
  const T* write_w = nullptr;     // (D, Hd)

  // Outputs (nullptr = not written).
  T* canvas = nullptr;     // (B, D) final canvas s_K
  T* canvases = nullptr;   // (K, B, D) s_1..s_K
  T* mu = nullptr;         // (K, B, Z)   [encoder]
  T* logvar = nullptr;     // (K, B, Z)   [encoder]
  // State saved for the backward (all nullptr when not saving).
  T* h_enc = nullptr;      // (K, B, He)
  T* c_enc = nullptr;      // (K, B, He)
  T* gates_enc = nullptr;  // (K, B, 4He) activated gates [i f g o]
  T* z_out = nullptr;      // (K, B, Z)
  T* h_dec = nullptr;      // (K, B, Hd)
  T* c_dec = nullptr;      // (K, B, Hd)
  T* gates_dec = nullptr;  // (K, B, 4Hd) activated gates [i f g o]
};

// Arguments of the backward-through-time kernel.
template <typename T>
struct BackwardParams {
  int64_t B = 0;
  int K = 0, D = 0, He = 0, Hd = 0, Z = 0, C = 0;
  bool error_mode = false;

  // Incoming gradients (nullptr = zero).
  const T* grad_canvas = nullptr;    // (B, D)
  const T* grad_canvases = nullptr;  // (K, B, D)
  const T* grad_mu = nullptr;        // (K, B, Z)
  const T* grad_logvar = nullptr;    // (K, B, Z)

  // Saved by the forward.
  const T* eps = nullptr;        // (K, B, Z)
  const T* logvar = nullptr;     // (K, B, Z)
  const T* canvases = nullptr;   // (K, B, D)  (read in error mode only)
  const T* c_enc = nullptr;      // (K, B, He)
  const T* gates_enc = nullptr;  // (K, B, 4He)
  const T* c_dec = nullptr;      // (K, B, Hd)
  const T* gates_dec = nullptr;  // (K, B, 4Hd)

  // Weights in their nn.LSTMCell / nn.Linear layouts (these give coalesced reads here).
  const T* enc_w_ih = nullptr;  // (4He, 2D + Hd + C)
  const T* enc_w_hh = nullptr;  // (4He, He)
  const T* q_w = nullptr;       // (2Z, He)
  const T* dec_w_ih = nullptr;  // (4Hd, Z + C)
  const T* dec_w_hh = nullptr;  // (4Hd, Hd)
  const T* write_w = nullptr;   // (D, Hd)

  // Outputs: per-step gradients w.r.t. pre-activations / outputs of each layer.
  T* d_canvas = nullptr;     // (K, B, D)   dL/ds_t (total)
  T* d_q = nullptr;          // (K, B, 2Z)  [dL/dmu_t, dL/dlogvar_t] (total)
  T* d_gates_enc = nullptr;  // (K, B, 4He) dL/d(pre-activation gates)
  T* d_gates_dec = nullptr;  // (K, B, 4Hd)
  // Optional (nullptr = not written): dL/deps_t = dL/dz_t * exp(logvar_t / 2), from the dL/dz_t
  // the posterior stage computes anyway. Every design writes it.
  T* grad_eps = nullptr;     // (K, B, Z)
};

// LoopParams or BackwardParams with its sizes and encoder-input mode set, every pointer null.
template <typename Params>
Params params_with_sizes(int64_t B, int K, int D, int He, int Hd, int Z, bool error_mode) {
  Params p;
  p.B = B;
  p.K = K;
  p.D = D;
  p.He = He;
  p.Hd = Hd;
  p.Z = Z;
  p.error_mode = error_mode;
  return p;
}

// Shared-memory elements (of T) one batch row needs.
int64_t loop_smem_elems_per_row(int D, int He, int Hd, int Z, bool encoder, bool error_mode);
int64_t backward_smem_elems_per_row(int D, int He, int Hd, int Z);

// Rows per block for a batch of B rows given the per-row shared memory, the device's opt-in
// shared memory per block and its SM count. Returns 0 when not even one row fits.
int choose_rows_per_block(int64_t B, int64_t bytes_per_row, int64_t smem_limit, int num_sms);

// Launch on `stream`; rows_per_block in {1, 2, 4, 8}. Checked with C10_CUDA_KERNEL_LAUNCH_CHECK.
template <typename T>
void launch_loop(const LoopParams<T>& p, int rows_per_block, cudaStream_t stream);
template <typename T>
void launch_backward(const BackwardParams<T>& p, int rows_per_block, cudaStream_t stream);

}  // namespace avme
