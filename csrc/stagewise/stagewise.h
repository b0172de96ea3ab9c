// The "stagewise" design of the AVME K-step loop, for large batches (B >= ~1024): per step, one
// tensor-core GEMM per stage (cuBLAS through ATen), the element-wise work of each stage in one
// small custom kernel (csrc/stagewise/pointwise.h).
//
// Weights: the design reads the nn.LSTMCell / nn.Linear layouts of LoopParams and
// BackwardParams (not LoopParams' (in, out) copies, which the host then does not make) and
// prepares them once per call, the same way for both directions (host.h, GemmWeights): the
// encoder's [W_r | W_hd | W_hh] (4He, We) and the decoder's [W_z | W_hh] (4Hd, Wd) packed to the
// slot layouts of E_in / D_in below, q_w and write_w as they are. The forward multiplies by their
// transposes (views: cuBLAS takes transposed operands), the backward by the matrices.
//
// Forward, step t (8 launches: 4 GEMMs, 4 pointwise kernels; the sampler has no encoder
// stages and copies z_in[t] instead: 5 launches):
//   E_in = [r | h_dec | h_enc]  (B, We)  and  D_in = [z | h_dec]  (B, Wd)  are persistent
//   GEMM-operand buffers whose column slots the pointwise kernels fill in place.
//   1 GEMM  G  = E_in @ [W_r | W_hd | W_hh]^T                         (B, 4He)
//   2 cell  gates = G + enc_static; c_enc, h_enc -> E_in[h_enc]; save h, c, activated gates
//   3 GEMM  Q  = E_in[h_enc] @ q_w^T                                    (B, 2Z)
//   4 pw    mu, logvar = Q + q_b; z = mu + exp(logvar/2) eps -> D_in[z]; save mu, logvar, z
//   5 GEMM  G  = D_in @ [W_z | W_hh]^T                                  (B, 4Hd)
//   6 cell  gates = G + dec_static; c_dec, h_dec -> D_in[h_dec] and E_in[h_dec]; save
//   7 GEMM  W  = D_in[h_dec] @ write_w^T                                (B, D)
//   8 pw    s_t = s_{t-1} + W + write_b (-> canvases[t] / canvas);
//           r_{t+1} = s_t or x - sigmoid(s_t) -> E_in[r]
//   At t = 0 the recurrent inputs are zero: GEMM 5 multiplies only the z columns, GEMM 1 only
//   the r columns in error mode (r_1 = x - 1/2, written by one launch before the loop) and
//   does not run in canvas mode (r_1 = 0: the cell takes enc_static alone).
//   The x and y columns of the encoder input (and y of the decoder) are step-invariant: they
//   arrive hoisted in enc_static / dec_static (LoopParams). The canvas state lives in
//   canvases[t] when those are written (no extra copy), otherwise in canvas.
//
// Backward through time, step t = K-1..0 (8 launches), writing exactly BackwardParams' per-step
// gradients (the host turns them into weight gradients with large GEMMs):
//   1 pw    g = dL/ds_t = dL/ds_{t+1} + grad_canvases[t] + (dr_{t+1} or -sigmoid'(s_t) dr_{t+1})
//           -> d_canvas[t]
//   2 GEMM  dh_dec' = g @ write_w                                       (B, Hd)
//   3 cell  dh_dec = dh_dec' + [dh_dec slots of the step t+1 GEMMs 4 and 8]; LSTM cell backward
//           from the saved gates and c -> d_gates_dec[t]; dc_dec carried in place
//   4 GEMM  [dz | dh_dec''] = d_gates_dec[t] @ [W_z | W_hh(dec)]       (B, Wd)
//   5 pw    d_q[t] = [grad_mu + dz, grad_logvar + dz eps exp(logvar/2) / 2];
//           grad_eps[t] = dz exp(logvar/2) (when given)
//   6 GEMM  dh_enc' = d_q[t] @ q_w                                      (B, He)
//   7 cell  dh_enc = dh_enc' + [dh_enc slot of step t+1's GEMM 8]; -> d_gates_enc[t]
//   8 GEMM  [dr | dh_dec''' | dh_enc''] = d_gates_enc[t] @ [W_r | W_hd | W_hh]   (B, We)
//   GEMMs always overwrite (beta = 0); the pointwise kernels sum their sources. At t = 0 GEMM 4
//   computes only dz and GEMM 8 is skipped.
//
// The slots of E_in / D_in start at multiples of 8 columns (16-byte aligned rows for bf16 and
// fp32 operands); the packed weights hold zero columns at the padding, and so do the buffers.
//
// Every pointwise kernel walks its (B, N) index space feature-fastest (element (b, n) is thread
// b * N + n of a grid-stride loop): consecutive threads touch consecutive addresses of every
// (K, B, N) tensor and buffer row.
//
// Precision policy (GemmPrecision; only float32 tensors are affected, float64 always runs
// float64 GEMMs):
//   kFP32  cuBLAS float32 GEMMs with TF32 off (at::NoTF32Guard, thread-local), whatever the
//          global setting: matches the float64 reference to ~1e-5 relative.
//   kTF32  float32 GEMMs on TF32 tensor cores (the process-global cuBLAS TF32 flag is set for
//          the call and restored after it; not thread-safe, like torch.backends.cuda.matmul).
//   kBF16  GEMM operands in bfloat16, fp32 accumulation and fp32 GEMM outputs (aten::mm with
//          out_dtype=float32). Weights are packed / cast once per call. The pointwise kernels
//          compute in fp32 and write the GEMM-operand copies (E_in, D_in, and the backward's
//          g, d_gates, d_q) directly in bf16 (round to nearest even); everything the
//          recurrence carries (c, the canvas, dc) and every output stays fp32.
//   The pointwise math is always in the tensor dtype (no fast-math).
//
// No host synchronisation and no allocation inside the step loop (every buffer is allocated
// once per call, before it, by the caching allocator); every launch is on `stream` (ATen ops
// run on it through a stream guard): a call can be captured in a CUDA graph.
#pragma once

#include <string>

#include "avme.h"

namespace avme {
namespace stagewise {

enum class GemmPrecision { kFP32, kTF32, kBF16 };

// "fp32" | "tf32" | "bf16"; anything else raises an error naming the argument.
GemmPrecision parse_gemm_precision(const std::string& name);

// The K-step forward (p.encoder) or decoder-only sampler (!p.encoder), as LoopParams describes
// it (rowtile's launch_loop contract). The caller sets the CUDA device (device guard) of the
// tensors behind p; work is enqueued on `stream`. Outputs set to nullptr are not written.
template <typename T>
void forward(const LoopParams<T>& p, GemmPrecision precision, cudaStream_t stream);

// Backward through time: fills d_canvas, d_q, d_gates_enc, d_gates_dec (every element) and
// grad_eps (when not nullptr), as BackwardParams describes.
template <typename T>
void backward(const BackwardParams<T>& p, GemmPrecision precision, cudaStream_t stream);

}  // namespace stagewise
}  // namespace avme
