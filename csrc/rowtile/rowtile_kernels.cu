// The "rowtile" design of the fused AVME K-step loop: forward (+ sampler) and backward through
// time, one block per tile of batch rows.
//
// Design
// ------
// * One launch runs all K steps. Block b owns RT consecutive batch rows (RT in {1,2,4,8},
//   chosen on the host so that there are about as many blocks as SMs when B is small and the
//   rows' state fits in shared memory). Rows are independent, so blocks never synchronise
//   with each other: no grid-wide barrier, no cooperative launch, CUDA-graph safe.
// * The rows' recurrent state (h and c of both LSTMs, the canvas, z, and in "error" mode the
//   encoder input r_t) lives in shared memory for the whole loop. Weights (about 5M values
//   at the paper's sizes) are read from global memory through L1/L2 every step.
// * Every matrix product inside the loop has the form out[r][n] = sum_k A[r][k] * W[k][n]
//   with A a (RT x k) tile in shared memory and W in global memory. Thread n of the block
//   owns output column n for all RT rows (RT accumulators in registers, times the G gate
//   columns it owns); it reads W[k][n] (coalesced across the warp, each weight reused RT
//   times) and A[r][k] (one shared-memory broadcast per warp). For the forward the host
//   passes the weights transposed ((in, out) layout) so reads are coalesced; the backward
//   multiplies by W^T and therefore reads the weights in their native nn.Linear layout.
// * A thread owning LSTM unit j computes all four gate columns (j, H+j, 2H+j, 3H+j) of
//   unit j, so the cell update needs no extra pass: c is updated in place (only its owner
//   touches it) and h is double-buffered (other threads still read the old h).
// * The step-invariant products (x W_x^T + y W_y^T + biases, y W_dy^T) are computed once
//   by cuBLAS (ATen) before the launch, and the weight gradients are large ATen matmuls
//   over all K*B rows of the per-step gradients the backward kernel writes (as cuDNN does
//   for RNNs). The precision option (TF32/BF16) applies to those cuBLAS products; the step
//   kernels compute in the tensor dtype (fp32 or fp64) with fp32/fp64 accumulation.
// * Padding rows of the last block (row >= B) run the same arithmetic on zero inputs; every
//   global read for them is guarded (reads 0) and nothing is written for them, so the
//   inner loops carry no per-row predicates.
// This favours simple, clearly-correct code over peak throughput (no tensor cores in the
// step kernels; per-step cuBLAS calls would be faster for very large B).

#include "avme.h"

#include <atomic>
#include <type_traits>

#ifdef AVME_CPU_EMULATION
// Test-only build: the same kernel source compiled as C++, one OS thread per CUDA thread
// (csrc/emulation/). Lets the kernels' logic be checked against the reference without a GPU.
#include "emulation/cuda_emulation.h"
#else
#include <c10/cuda/CUDAException.h>

#include "common/smem_attribute.h"
#define AVME_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif
#include <c10/util/Exception.h>

#include "common/cell_math.cuh"

namespace avme {
namespace {

// Shared-memory elements per batch row; must match the layouts in the kernels below.
__host__ __device__ inline int64_t loop_elems_hd(int D, int He, int Hd, int Z, bool encoder,
                                                 bool error_mode) {
  int64_t n = static_cast<int64_t>(D) + 3 * static_cast<int64_t>(Hd) + Z;  // canvas, h_dec x2, c_dec, z
  if (encoder) {
    n += 3 * static_cast<int64_t>(He);  // h_enc x2, c_enc
    if (error_mode) n += D;             // r
  }
  return n;
}

__host__ __device__ inline int64_t backward_elems_hd(int D, int He, int Hd, int Z) {
  // gs, dh_e, dc_e, dh_d, dc_d, dge, dgd, dq
  return static_cast<int64_t>(D) + 6 * static_cast<int64_t>(He) + 6 * static_cast<int64_t>(Hd) +
         2 * static_cast<int64_t>(Z);
}

// acc[g][r] += sum_{k < kdim} A[r * lda + k] * W[k * ldw + col + g * gstride]
// A: shared memory (RT rows), W: global read-only memory.
template <typename T, int RT, int G>
__device__ __forceinline__ void accumulate(T (&acc)[G][RT], const T* A, int lda, int kdim,
                                           const T* __restrict__ W, int64_t ldw, int64_t col,
                                           int64_t gstride) {
  const T* w = W + col;
#pragma unroll 4
  for (int k = 0; k < kdim; ++k) {
    T wv[G];
#pragma unroll
    for (int g = 0; g < G; ++g) wv[g] = __ldg(w + g * gstride);
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      const T a = A[r * lda + k];
#pragma unroll
      for (int g = 0; g < G; ++g) acc[g][r] = dfma(a, wv[g], acc[g][r]);
    }
    w += ldw;
  }
}

// acc[g][r] = the step-invariant pre-activation of gate g of LSTM unit j for the tile's row r:
// static_ (B, 4H) rows with row stride ld (0: one row for every batch row); 0 for padding rows.
template <typename T, int RT>
__device__ __forceinline__ void load_static_gates(T (&acc)[4][RT], const T* __restrict__ static_,
                                                  int64_t ld, int H, int j, int64_t row0,
                                                  int64_t B) {
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const int64_t row = row0 + r;
#pragma unroll
    for (int g = 0; g < 4; ++g) acc[g][r] = row < B ? static_[row * ld + g * H + j] : T(0);
  }
}

// Exchanges the current and next buffers of a double-buffered state (block-uniform pointers).
template <typename T>
__device__ __forceinline__ void swap_buffers(T*& cur, T*& nxt) {
  T* const tmp = cur;
  cur = nxt;
  nxt = tmp;
}

// Forward of LSTM unit j for the tile's RT rows: acc holds the pre-activations of its four gates
// (i, f, g, o). Updates c (RT x H, shared) in place, writes h to h_next (RT x H, shared) and, when
// saving for the backward (h_saved != nullptr), h, c and the activated gates of real rows to
// (K, B, H) / (K, B, 4H) at step offset tB.
template <typename T, int RT>
__device__ __forceinline__ void lstm_unit_forward_tile(const T (&acc)[4][RT], T* c_s, T* h_next,
                                                       T* __restrict__ h_saved,
                                                       T* __restrict__ c_saved,
                                                       T* __restrict__ gates_saved, int H, int j,
                                                       int64_t row0, int64_t B, int64_t tB) {
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    T ig, fg, gg, og, c, h;
    lstm_cell_forward(acc[0][r], acc[1][r], acc[2][r], acc[3][r], c_s[r * H + j], ig, fg, gg, og,
                      c, h);
    c_s[r * H + j] = c;
    h_next[r * H + j] = h;
    const int64_t row = row0 + r;
    if (row < B && h_saved != nullptr) {
      const int64_t base = tB + row;
      h_saved[base * H + j] = h;
      c_saved[base * H + j] = c;
      store_gates(gates_saved + base * 4 * H + j, H, ig, fg, gg, og);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Forward / sampler. Shared memory per row (elements of T):
//   canvas[D] | h_dec[2][Hd] | c_dec[Hd] | z[Z] | (encoder) h_enc[2][He] | c_enc[He]
//   | (error mode) r[D]
// ---------------------------------------------------------------------------------------
template <typename T, int RT>
__global__ void __launch_bounds__(kThreads) avme_loop_kernel(const LoopParams<T> p) {
  AVME_DYNAMIC_SMEM(smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);

  const int D = p.D, He = p.He, Hd = p.Hd, Z = p.Z, K = p.K;
  const int64_t B = p.B;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * RT;
  const int tid = threadIdx.x;

  T* const canvas = smem;
  T* hd_cur = canvas + RT * D;
  T* hd_nxt = hd_cur + RT * Hd;
  T* const c_dec = hd_nxt + RT * Hd;
  T* const z_s = c_dec + RT * Hd;
  T* he_cur = z_s + RT * Z;  // encoder buffers exist only when p.encoder
  T* he_nxt = he_cur + RT * He;
  T* const c_enc = he_nxt + RT * He;
  T* const r_s = c_enc + RT * He;  // exists only in error mode

  const int64_t total = static_cast<int64_t>(RT) *
                        loop_elems_hd(D, He, Hd, Z, p.encoder, p.error_mode);
  for (int64_t i = tid; i < total; i += kThreads) smem[i] = T(0);
  __syncthreads();

  for (int t = 0; t < K; ++t) {
    const int64_t tB = static_cast<int64_t>(t) * B;

    if (p.encoder) {
      // ---- encoder input r_t -------------------------------------------------------------
      const T* r_in = canvas;
      if (p.error_mode) {
        for (int i = tid; i < RT * D; i += kThreads) {
          const int r = i / D, d = i - r * D;
          const int64_t row = row0 + r;
          const T xv = row < B ? p.x[row * D + d] : T(0);
          r_s[i] = xv - dsigmoid(canvas[i]);
        }
        __syncthreads();
        r_in = r_s;
      }

      // ---- encoder LSTM: gates = static + r W_r^T + h_dec W_hd^T + h_enc W_hh^T ------------
      for (int j = tid; j < He; j += kThreads) {
        T acc[4][RT];
        load_static_gates<T, RT>(acc, p.enc_static, 4 * static_cast<int64_t>(He), He, j, row0, B);
        const int64_t ld = 4 * static_cast<int64_t>(He);
        accumulate<T, RT, 4>(acc, r_in, D, D, p.enc_wT, ld, j, He);
        accumulate<T, RT, 4>(acc, hd_cur, Hd, Hd, p.enc_wT + D * ld, ld, j, He);
        accumulate<T, RT, 4>(acc, he_cur, He, He, p.enc_wT + (D + Hd) * ld, ld, j, He);
        lstm_unit_forward_tile<T, RT>(acc, c_enc, he_nxt, p.h_enc, p.c_enc, p.gates_enc, He, j, row0,
                                      B, tB);
      }
      __syncthreads();
      swap_buffers(he_cur, he_nxt);

      // ---- posterior: [mu, logvar] = h_enc q_w^T + q_b; z = mu + exp(logvar/2) eps ---------
      for (int j = tid; j < Z; j += kThreads) {
        T acc[2][RT];
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          acc[0][r] = p.q_b[j];
          acc[1][r] = p.q_b[Z + j];
        }
        accumulate<T, RT, 2>(acc, he_cur, He, He, p.q_wT, 2 * static_cast<int64_t>(Z), j, Z);
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          const int64_t row = row0 + r;
          T zv = T(0);
          if (row < B) {
            const int64_t idx = (tB + row) * Z + j;
            const T m = acc[0][r];
            const T lv = acc[1][r];
            zv = reparam_sample(m, lv, p.eps[idx]);
            p.mu[idx] = m;
            p.logvar[idx] = lv;
            if (p.z_out != nullptr) p.z_out[idx] = zv;
          }
          z_s[r * Z + j] = zv;
        }
      }
    } else {
      // ---- sampler: z_t is an input -------------------------------------------------------
      for (int i = tid; i < RT * Z; i += kThreads) {
        const int r = i / Z, j = i - r * Z;
        const int64_t row = row0 + r;
        z_s[i] = row < B ? p.z_in[(tB + row) * Z + j] : T(0);
      }
    }
    __syncthreads();

    // ---- decoder LSTM: gates = static + z W_z^T + h_dec W_hh^T ------------------------------
    for (int j = tid; j < Hd; j += kThreads) {
      T acc[4][RT];
      load_static_gates<T, RT>(acc, p.dec_static, p.dec_static_stride, Hd, j, row0, B);
      const int64_t ld = 4 * static_cast<int64_t>(Hd);
      accumulate<T, RT, 4>(acc, z_s, Z, Z, p.dec_wT, ld, j, Hd);
      accumulate<T, RT, 4>(acc, hd_cur, Hd, Hd, p.dec_wT + Z * ld, ld, j, Hd);
      lstm_unit_forward_tile<T, RT>(acc, c_dec, hd_nxt, p.h_dec, p.c_dec, p.gates_dec, Hd, j, row0, B,
                                    tB);
    }
    __syncthreads();
    swap_buffers(hd_cur, hd_nxt);

    // ---- write: s_t = s_{t-1} + (h_dec write_w^T + write_b) ---------------------------------
    for (int d = tid; d < D; d += kThreads) {
      T acc[1][RT];
#pragma unroll
      for (int r = 0; r < RT; ++r) acc[0][r] = p.write_b[d];
      accumulate<T, RT, 1>(acc, hd_cur, Hd, Hd, p.write_wT, D, d, 0);
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        const T s = canvas[r * D + d] + acc[0][r];
        canvas[r * D + d] = s;
        const int64_t row = row0 + r;
        if (row < B) {
          if (p.canvases != nullptr) p.canvases[(tB + row) * D + d] = s;
          if (t == K - 1) p.canvas[row * D + d] = s;
        }
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------
// Backward through time. Shared memory per row (elements of T):
//   gs[D] | dh_e[He] | dc_e[He] | dh_d[Hd] | dc_d[Hd] | dge[4He] | dgd[4Hd] | dq[2Z]
// gs: dL/ds_t; dh_*, dc_*: gradients carried from step t+1 into step t;
// dge, dgd, dq: this step's gradients w.r.t. gate pre-activations and [mu, logvar].
// (The scalar LSTM cell backward, lstm_cell_backward, is in common/cell_math.cuh.)
// ---------------------------------------------------------------------------------------

// Backward of LSTM unit j for the tile's RT rows at step t. dh[r] is the gradient reaching h_t;
// dc (RT x H, shared) carries dc_t in and dc_{t-1} out. Reads the saved activated gates
// (K, B, 4H) and cell states (K, B, H); writes the gate pre-activation gradients to dgates_s
// (RT x 4H, shared) for the rest of the step and, for real rows, to d_gates (K, B, 4H).
template <typename T, int RT>
__device__ __forceinline__ void lstm_unit_backward_tile(const T (&dh)[RT], T* dc, T* dgates_s,
                                                        const T* __restrict__ gates,
                                                        const T* __restrict__ cells,
                                                        T* __restrict__ d_gates, int H, int j,
                                                        int64_t row0, int64_t B, int64_t tB,
                                                        int t) {
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const int64_t row = row0 + r;
    T ig = T(0), fg = T(0), gg = T(0), og = T(0), c = T(0), c_prev = T(0);
    if (row < B) {
      const int64_t base = tB + row;
      const T* gp = gates + base * 4 * H;
      ig = gp[j];
      fg = gp[H + j];
      gg = gp[2 * H + j];
      og = gp[3 * H + j];
      c = cells[base * H + j];
      if (t > 0) c_prev = cells[(base - B) * H + j];
    }
    T di, df, dg, d_o, dc_prev;
    lstm_cell_backward(dh[r], dc[r * H + j], ig, fg, gg, og, c, c_prev, di, df, dg, d_o, dc_prev);
    dc[r * H + j] = dc_prev;
    store_gates(dgates_s + r * 4 * H + j, H, di, df, dg, d_o);
    if (row < B) store_gates(d_gates + (tB + row) * 4 * H + j, H, di, df, dg, d_o);
  }
}

// Backward of one LSTM for the tile at step t: for each unit j, dh = dh_carry (RT x H, shared)
// + in (RT x kdim, shared) W (kdim, H; column j), then lstm_unit_backward_tile.
template <typename T, int RT>
__device__ __forceinline__ void lstm_backward_stage(const T* dh_carry, const T* in, int kdim,
                                                    const T* __restrict__ W, T* dc, T* dgates_s,
                                                    const T* __restrict__ gates,
                                                    const T* __restrict__ cells,
                                                    T* __restrict__ d_gates, int H, int64_t row0,
                                                    int64_t B, int64_t tB, int t) {
  for (int j = static_cast<int>(threadIdx.x); j < H; j += kThreads) {
    T acc[1][RT];
#pragma unroll
    for (int r = 0; r < RT; ++r) acc[0][r] = dh_carry[r * H + j];
    accumulate<T, RT, 1>(acc, in, kdim, kdim, W, H, j, 0);
    lstm_unit_backward_tile<T, RT>(acc[0], dc, dgates_s, gates, cells, d_gates, H, j, row0, B, tB,
                                   t);
  }
}

template <typename T, int RT>
__global__ void __launch_bounds__(kThreads) avme_backward_kernel(const BackwardParams<T> p) {
  AVME_DYNAMIC_SMEM(smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);

  const int D = p.D, He = p.He, Hd = p.Hd, Z = p.Z, K = p.K;
  const int64_t B = p.B;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * RT;
  const int tid = threadIdx.x;
  const int64_t ldi = 2 * static_cast<int64_t>(D) + Hd + p.C;  // enc_w_ih row stride

  T* const gs = smem;
  T* const dh_e = gs + RT * D;
  T* const dc_e = dh_e + RT * He;
  T* const dh_d = dc_e + RT * He;
  T* const dc_d = dh_d + RT * Hd;
  T* const dge = dc_d + RT * Hd;
  T* const dgd = dge + RT * 4 * He;
  T* const dq = dgd + RT * 4 * Hd;

  const int64_t total = static_cast<int64_t>(RT) * backward_elems_hd(D, He, Hd, Z);
  for (int64_t i = tid; i < total; i += kThreads) smem[i] = T(0);
  __syncthreads();
  if (p.grad_canvas != nullptr) {
    for (int i = tid; i < RT * D; i += kThreads) {
      const int r = i / D, d = i - r * D;
      const int64_t row = row0 + r;
      if (row < B) gs[i] = p.grad_canvas[row * D + d];
    }
  }
  __syncthreads();

  for (int t = K - 1; t >= 0; --t) {
    const int64_t tB = static_cast<int64_t>(t) * B;

    // ---- S0: dL/ds_t = carried + gradient of the output canvases[t]; save it --------------
    for (int i = tid; i < RT * D; i += kThreads) {
      const int r = i / D, d = i - r * D;
      const int64_t row = row0 + r;
      if (row < B) {
        const int64_t idx = (tB + row) * D + d;
        T v = gs[i];
        if (p.grad_canvases != nullptr) v += p.grad_canvases[idx];
        gs[i] = v;
        p.d_canvas[idx] = v;
      }
    }
    __syncthreads();

    // ---- S1: decoder. dh_dec_t = carried + gs write_w; LSTM cell backward -----------------
    lstm_backward_stage<T, RT>(dh_d, gs, D, p.write_w, dc_d, dgd, p.gates_dec, p.c_dec,
                               p.d_gates_dec, Hd, row0, B, tB, t);
    __syncthreads();

    // ---- S2: posterior. dz = dgd W_z; dmu = g_mu + dz; dlogvar = g_lv + dz eps exp(lv/2)/2 -
    for (int j = tid; j < Z; j += kThreads) {
      T acc[1][RT];
#pragma unroll
      for (int r = 0; r < RT; ++r) acc[0][r] = T(0);
      accumulate<T, RT, 1>(acc, dgd, 4 * Hd, 4 * Hd, p.dec_w_ih, Z + p.C, j, 0);
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        const int64_t row = row0 + r;
        T dmu = T(0), dlv = T(0);
        if (row < B) {
          const int64_t idx = (tB + row) * Z + j;
          const T dz = acc[0][r];
          dmu = dz;
          dlv = reparam_logvar_grad(dz, p.eps[idx], p.logvar[idx]);
          if (p.grad_eps != nullptr) p.grad_eps[idx] = reparam_eps_grad(dz, p.logvar[idx]);
          if (p.grad_mu != nullptr) dmu += p.grad_mu[idx];
          if (p.grad_logvar != nullptr) dlv += p.grad_logvar[idx];
          T* qp = p.d_q + (tB + row) * 2 * Z;
          qp[j] = dmu;
          qp[Z + j] = dlv;
        }
        dq[r * 2 * Z + j] = dmu;
        dq[r * 2 * Z + Z + j] = dlv;
      }
    }
    __syncthreads();

    // ---- S3: encoder. dh_enc_t = carried + dq q_w; LSTM cell backward ---------------------
    lstm_backward_stage<T, RT>(dh_e, dq, 2 * Z, p.q_w, dc_e, dge, p.gates_enc, p.c_enc,
                               p.d_gates_enc, He, row0, B, tB, t);
    __syncthreads();

    // ---- S4: gradients carried into step t-1 -------------------------------------------------
    // dh_enc_{t-1} = dge W_hh(enc)
    for (int j = tid; j < He; j += kThreads) {
      T acc[1][RT];
#pragma unroll
      for (int r = 0; r < RT; ++r) acc[0][r] = T(0);
      accumulate<T, RT, 1>(acc, dge, 4 * He, 4 * He, p.enc_w_hh, He, j, 0);
#pragma unroll
      for (int r = 0; r < RT; ++r) dh_e[r * He + j] = acc[0][r];
    }
    // dh_dec_{t-1} = dge W_hdec (encoder input) + dgd W_hh(dec)
    for (int j = tid; j < Hd; j += kThreads) {
      T acc[1][RT];
#pragma unroll
      for (int r = 0; r < RT; ++r) acc[0][r] = T(0);
      accumulate<T, RT, 1>(acc, dge, 4 * He, 4 * He, p.enc_w_ih + 2 * static_cast<int64_t>(D), ldi,
                           j, 0);
      accumulate<T, RT, 1>(acc, dgd, 4 * Hd, 4 * Hd, p.dec_w_hh, Hd, j, 0);
#pragma unroll
      for (int r = 0; r < RT; ++r) dh_d[r * Hd + j] = acc[0][r];
    }
    // dr_t = dge W_r; r_t = s_{t-1} (canvas) or x - sigmoid(s_{t-1}) (error); none at t = 0
    for (int d = tid; t > 0 && d < D; d += kThreads) {
      T acc[1][RT];
#pragma unroll
      for (int r = 0; r < RT; ++r) acc[0][r] = T(0);
      accumulate<T, RT, 1>(acc, dge, 4 * He, 4 * He, p.enc_w_ih + D, ldi, d, 0);
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        const int64_t row = row0 + r;
        if (row >= B) continue;
        const T dr = acc[0][r];
        if (p.error_mode) {
          const T sg = dsigmoid(p.canvases[(tB - B + row) * D + d]);
          gs[r * D + d] -= sg * (T(1) - sg) * dr;
        } else {
          gs[r * D + d] += dr;
        }
      }
    }
    __syncthreads();
  }
}

}  // namespace

int64_t loop_smem_elems_per_row(int D, int He, int Hd, int Z, bool encoder, bool error_mode) {
  return loop_elems_hd(D, He, Hd, Z, encoder, error_mode);
}

int64_t backward_smem_elems_per_row(int D, int He, int Hd, int Z) {
  return backward_elems_hd(D, He, Hd, Z);
}

int choose_rows_per_block(int64_t B, int64_t bytes_per_row, int64_t smem_limit, int num_sms) {
  if (bytes_per_row <= 0 || bytes_per_row > smem_limit) return 0;
  const int64_t fit = smem_limit / bytes_per_row;
  // Enough rows per block that the grid is about one wave when B is large, but at least one
  // block per SM while B allows it (small batches: one row per block).
  const int64_t sms = num_sms > 0 ? num_sms : 1;
  const int64_t want = (B + sms - 1) / sms;
  int rt = 1;
  while (rt < kMaxRowsPerBlock && rt < want && 2 * rt <= fit) rt *= 2;
  return rt;
}

namespace {

// Calls f(std::integral_constant<int, RT>{}) for rows_per_block = RT in {1, 2, 4, 8}.
template <typename F>
void with_rows_per_block(int rows_per_block, F&& f) {
  switch (rows_per_block) {
    case 1: f(std::integral_constant<int, 1>{}); return;
    case 2: f(std::integral_constant<int, 2>{}); return;
    case 4: f(std::integral_constant<int, 4>{}); return;
    case 8: f(std::integral_constant<int, 8>{}); return;
    default: TORCH_CHECK(false, "avme: internal error: rows_per_block=", rows_per_block);
  }
}

// One launch of `kernel` on `stream`: a block per RT batch rows, RT * elems_per_row elements of
// T of dynamic shared memory (checked with C10_CUDA_KERNEL_LAUNCH_CHECK; run by the emulator in
// the CPU build).
template <typename T, int RT, typename Params>
void launch_tiles(void (*kernel)(Params), int64_t elems_per_row, const Params& p,
                  cudaStream_t stream) {
  const size_t smem = sizeof(T) * RT * static_cast<size_t>(elems_per_row);
  const int64_t blocks = (p.B + RT - 1) / RT;
#ifdef AVME_CPU_EMULATION
  (void)stream;
  emu::launch(kernel, blocks, smem, p);
#else
  TORCH_CHECK(blocks <= 2147483647LL, "avme: batch too large for one launch (", p.B, " rows)");
  static std::atomic<size_t> configured[kMaxDevices] = {};  // one per kernel instantiation
  set_smem(kernel, smem, configured);
  kernel<<<static_cast<unsigned int>(blocks), kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace

template <typename T>
void launch_loop(const LoopParams<T>& p, int rows_per_block, cudaStream_t stream) {
  if (p.B <= 0) return;
  const int64_t elems = loop_elems_hd(p.D, p.He, p.Hd, p.Z, p.encoder, p.error_mode);
  with_rows_per_block(rows_per_block, [&](auto rt) {
    launch_tiles<T, rt.value>(avme_loop_kernel<T, rt.value>, elems, p, stream);
  });
}

template <typename T>
void launch_backward(const BackwardParams<T>& p, int rows_per_block, cudaStream_t stream) {
  if (p.B <= 0) return;
  const int64_t elems = backward_elems_hd(p.D, p.He, p.Hd, p.Z);
  with_rows_per_block(rows_per_block, [&](auto rt) {
    launch_tiles<T, rt.value>(avme_backward_kernel<T, rt.value>, elems, p, stream);
  });
}

template void launch_loop<float>(const LoopParams<float>&, int, cudaStream_t);
template void launch_loop<double>(const LoopParams<double>&, int, cudaStream_t);
template void launch_backward<float>(const BackwardParams<float>&, int, cudaStream_t);
template void launch_backward<double>(const BackwardParams<double>&, int, cudaStream_t);

}  // namespace avme
