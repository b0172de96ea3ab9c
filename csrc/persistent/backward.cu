// Persistent backward-through-time kernel of the fused AVME loop (design: persistent.h; stage
// mechanics: stage.cuh; layout: plan.h). One cooperative launch runs all K steps backwards and
// writes BackwardParams' per-step gradients; the host turns them into weight gradients.
//
// A block owns decoder units, latent units, encoder units and pixels, and keeps the weight
// COLUMNS of its units (rows of W^T) in shared memory. Step t = K-1..0, grid barriers (|):
//   B1  input gs_t = dL/ds_t (D features): dh_dec_t = write_w^T gs_t + p_dec (carried from
//       step t+1: W_hdec^T dge_{t+1} + W_hh(dec)^T dgd_{t+1}) -> decoder cell backward
//       -> dgd_t (d_gates_dec and workspace)                                                 |
//   B2  input dgd_t (4Hd): dz = W_z^T dgd_t -> d[mu, logvar]_t (d_q and workspace) and
//       dL/deps_t (grad_eps, when given); and
//       p_dec = W_hh(dec)^T dgd_t (for step t-1)                                              |
//   B3  input dq_t (2Z): dh_enc_t = q_w^T dq_t + p_enc (carried: W_hh(enc)^T dge_{t+1})
//       -> encoder cell backward -> dge_t (d_gates_enc and workspace)                        |
//   B4  input dge_t (4He): dr_t = W_r^T dge_t for the owned pixels: gs_{t-1} = gs_t + dr_t
//       (canvas) or gs_t - sigmoid'(s_{t-1}) dr_t (error), plus
//       grad_canvases[t-1] -> d_canvas[t-1] and workspace; p_dec += W_hdec^T dge_t,
//       p_enc = W_hh(enc)^T dge_t (for step t-1)                                              |
// At t = 0, B2 computes dz only and B4 does not run.

#include "persistent/persistent.h"

#include "common/cell_math.cuh"
#include "common/grid_sync.cuh"
#include "persistent/launch.h"
#include "persistent/stage.cuh"

namespace avme {
namespace persistent {
namespace {

// One LSTM layer of backward through time (decoder or encoder) as this block's stage sees it.
template <typename T>
struct LstmLayerGrad {
  int H = 0;                   // units of the layer
  Range units;                 // the units this block owns
  const T* carried = nullptr;  // per-block state: carried part of dh, a row per owned unit
  T* dc = nullptr;             // per-block state: carried cell gradient, a row per owned unit
  const T* gates = nullptr;    // saved activated gates (K, B, 4H) and cell states (K, B, H)
  const T* cells = nullptr;
  T* d_gates = nullptr;        // output: gate pre-activation gradients (K, B, 4H)
  T* dgT = nullptr;            // workspace: the same, feature-major (4H rows)
};

// A stage whose rows are the owned units of an LSTM layer (B1, B3): dh_t = stage sum + carried
// part, through the cell backward at step t (dc carries dc_t in and dc_{t-1} out); the gate
// gradients to d_gates and the workspace.
template <typename T, int NBL, int MATH>
__device__ void lstm_backward_stage(const StageContext<T>& ctx, const StageLayout& layout,
                                    const T* smem, const T* x, const LstmLayerGrad<T>& layer,
                                    int t) {
  const RowBlock rows{0, layer.units.count, 1};
  const int64_t B = ctx.B, bp = ctx.bp;
  const int H = layer.H;
  run_stage<T, NBL, MATH>(ctx, layout, smem, rows_used(rows), x,
                          [&](int row0, int nrows, const PassSums<T>& sum, int64_t b0, int ncols) {
    for_units(units_in_pass(rows, row0, nrows), b0, ncols, [&](int u, int64_t b, int col) {
      const int j = layer.units.begin + u;
      const T dh = sum(u - row0, col) + layer.carried[u * bp + b];
      const int64_t row = static_cast<int64_t>(t) * B + b;
      const T* const g = layer.gates + row * 4 * H;
      const T c = layer.cells[row * H + j];
      const T c_prev = t > 0 ? layer.cells[(row - B) * H + j] : T(0);
      T& dc = layer.dc[u * bp + b];
      T di, df, dg, d_o, dc_prev;
      lstm_cell_backward(dh, dc, g[j], g[H + j], g[2 * H + j], g[3 * H + j], c, c_prev, di, df,
                         dg, d_o, dc_prev);
      dc = dc_prev;
      store_gates(layer.d_gates + row * 4 * H + j, H, di, df, dg, d_o);
      store_gates(layer.dgT + static_cast<int64_t>(j) * bp + b, H * bp, stage_operand<MATH>(di),
                  stage_operand<MATH>(df), stage_operand<MATH>(dg), stage_operand<MATH>(d_o));
    });
  });
}

// The stationary weight columns of block `cta` of the grid (BackwardPlan's stages B1..B4, stage
// i of stage_of), as value(k, r) = row r, input k of the stage (0 for padding rows and units the
// block does not own); launch.h packs them in shared-memory order before the launch.
template <typename T>
struct BackwardWeights {
  const BackwardParams<T>& p;
  const BackwardPlan& plan;
  int stage;
  OwnedUnits own;

  __device__ BackwardWeights(const BackwardParams<T>& p_, const BackwardPlan& plan_, int cta,
                             int stage_)
      : p(p_), plan(plan_), stage(stage_),
        own(owned_units(p_.He, p_.Z, p_.Hd, p_.D, plan_.cfg.ctas, cta)) {}

  __device__ T operator()(int k, int r) const {
    const int64_t He = p.He, Hd = p.Hd, D = p.D;
    const Range &ue = own.enc, &uz = own.lat, &ud = own.dec, &up = own.pix;
    const int64_t ldi = 2 * D + Hd + p.C;  // enc_w_ih row stride
    const int64_t ldz = int64_t{p.Z} + p.C;  // dec_w_ih row stride
    switch (stage) {
      case 0:  // B1: write_w columns of the owned decoder units, input dL/ds_t
        return r < ud.count ? p.write_w[k * Hd + ud.begin + r] : T(0);
      case 1: {  // B2: W_z columns of the owned latents, then W_hh(dec) columns; input dgd_t
        if (r < plan.b2_dhh) return r < uz.count ? p.dec_w_ih[k * ldz + uz.begin + r] : T(0);
        const int u = r - plan.b2_dhh;
        return u < ud.count ? p.dec_w_hh[k * Hd + ud.begin + u] : T(0);
      }
      case 2:  // B3: q_w columns of the owned encoder units, input dq_t
        return r < ue.count ? p.q_w[k * He + ue.begin + r] : T(0);
      default: {  // B4: W_r columns of the owned pixels, W_hdec and W_hh(enc) columns; input dge_t
        if (r < plan.b4_ehd) return r < up.count ? p.enc_w_ih[k * ldi + D + up.begin + r] : T(0);
        if (r < plan.b4_ehh) {
          const int u = r - plan.b4_ehd;
          return u < ud.count ? p.enc_w_ih[k * ldi + 2 * D + ud.begin + u] : T(0);
        }
        const int u = r - plan.b4_ehh;
        return u < ue.count ? p.enc_w_hh[k * He + ue.begin + u] : T(0);
      }
    }
  }
};

template <typename T, int NBL, int MATH>
__global__ void __launch_bounds__(kMaxThreads, 1)
    backward_kernel(const BackwardParams<T> p, const BackwardPlan plan, T* const ws) {
  AVME_DYNAMIC_SMEM(smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);
  const int G = static_cast<int>(gridDim.x);
  const int cta = static_cast<int>(blockIdx.x);
  const int D = p.D, He = p.He, Hd = p.Hd, Z = p.Z, K = p.K;
  const int64_t B = p.B, bp = plan.bp;
  const OwnedUnits own = owned_units(He, Z, Hd, D, G, cta);
  const Range ue = own.enc, uz = own.lat, ud = own.dec, up = own.pix;

  T* const priv = block_state(plan, smem, ws);
  T* const dc_dec = priv + plan.dc_dec;
  T* const dc_enc = priv + plan.dc_enc;
  T* const p_dec = priv + plan.p_dec;
  T* const p_enc = priv + plan.p_enc;
  T* const gs_own = priv + plan.gs;
  T* const gsT = ws + plan.ws_gs;
  T* const dgdT = ws + plan.ws_dgd;
  T* const dqT = ws + plan.ws_dq;
  T* const dgeT = ws + plan.ws_dge;

  // ---- stationary weight columns: this block's packed slice (BackwardWeights), copied while
  // the state is initialised ----------------------------------------------------------------
  start_weight_copy(smem, ws + plan.ws_weights + cta * plan.weights_elems, plan.weights_elems);

  // ---- initial state: carried gradients 0; gs_{K-1} = grad_canvas + grad_canvases[K-1] -------
  zero_fill(priv, plan.priv_elems);
  __syncthreads();  // gs_own is written below by other threads than zero_fill's
  for_units(Range{0, up.count}, 0, static_cast<int>(B), [&](int u, int64_t b, int) {
    const int d = up.begin + u;
    const int64_t idx = ((K - 1) * B + b) * D + d;
    T v = p.grad_canvas != nullptr ? p.grad_canvas[b * D + d] : T(0);
    if (p.grad_canvases != nullptr) v += p.grad_canvases[idx];
    gs_own[u * bp + b] = v;
    p.d_canvas[idx] = v;
    gsT[d * bp + b] = stage_operand<MATH>(v);
  });
  async_wait<0>();
  __syncthreads();  // the weights are in shared memory
  grid_sync();

  const StageContext<T> ctx{smem + plan.scratch, plan.scratch_elems, plan.cfg.kc, bp, B,
                             plan.nchunks};
  const LstmLayerGrad<T> dec{.H = Hd, .units = ud, .carried = p_dec, .dc = dc_dec,
                             .gates = p.gates_dec, .cells = p.c_dec, .d_gates = p.d_gates_dec,
                             .dgT = dgdT};
  const LstmLayerGrad<T> enc{.H = He, .units = ue, .carried = p_enc, .dc = dc_enc,
                             .gates = p.gates_enc, .cells = p.c_enc, .d_gates = p.d_gates_enc,
                             .dgT = dgeT};
  for (int t = K - 1; t >= 0; --t) {
    const int64_t tB = static_cast<int64_t>(t) * B;

    // ---- B1: dh_dec_t -> decoder cell backward -> dgd_t ----------------------------------------
    lstm_backward_stage<T, NBL, MATH>(ctx, plan.B1, smem, gsT, dec, t);
    grid_sync();

    // ---- B2: d[mu, logvar]_t; W_hh(dec)^T dgd_t for step t-1 -----------------------------------
    const RowBlock z_rows{0, uz.count, 1};
    const RowBlock dhh_rows{plan.b2_dhh, t > 0 ? ud.count : 0, 1};
    run_stage<T, NBL, MATH>(ctx, plan.B2, smem, rows_used(z_rows, dhh_rows), dgdT,
                      [&](int row0, int nrows, const PassSums<T>& sum, int64_t b0, int ncols) {
      for_units(units_in_pass(z_rows, row0, nrows), b0, ncols, [&](int u, int64_t b, int col) {
        const int j = uz.begin + u;
        const int64_t idx = (tB + b) * Z + j;
        const T dz = sum(u - row0, col);
        T dmu = dz;
        T dlv = reparam_logvar_grad(dz, p.eps[idx], p.logvar[idx]);
        if (p.grad_mu != nullptr) dmu += p.grad_mu[idx];
        if (p.grad_logvar != nullptr) dlv += p.grad_logvar[idx];
        if (p.grad_eps != nullptr) p.grad_eps[idx] = reparam_eps_grad(dz, p.logvar[idx]);
        T* q = p.d_q + (tB + b) * 2 * Z;
        q[j] = dmu;
        q[Z + j] = dlv;
        dqT[j * bp + b] = stage_operand<MATH>(dmu);
        dqT[(Z + j) * bp + b] = stage_operand<MATH>(dlv);
      });
      for_units(units_in_pass(dhh_rows, row0, nrows), b0, ncols, [&](int u, int64_t b, int col) {
        p_dec[u * bp + b] = sum(plan.b2_dhh + u - row0, col);
      });
    });
    grid_sync();

    // ---- B3: dh_enc_t -> encoder cell backward -> dge_t ----------------------------------------
    lstm_backward_stage<T, NBL, MATH>(ctx, plan.B3, smem, dqT, enc, t);
    if (t == 0) break;
    grid_sync();

    // ---- B4: dr_t -> gs_{t-1}; W_hdec^T and W_hh(enc)^T dge_t for step t-1 ----------------------
    const RowBlock px_rows{0, up.count, 1};
    const RowBlock ehd_rows{plan.b4_ehd, ud.count, 1};
    const RowBlock ehh_rows{plan.b4_ehh, ue.count, 1};
    run_stage<T, NBL, MATH>(ctx, plan.B4, smem, rows_used(px_rows, ehd_rows, ehh_rows), dgeT,
                      [&](int row0, int nrows, const PassSums<T>& sum, int64_t b0, int ncols) {
      for_units(units_in_pass(px_rows, row0, nrows), b0, ncols, [&](int u, int64_t b, int col) {
        const int d = up.begin + u;
        const T dr = sum(u - row0, col);
        T g = gs_own[u * bp + b];
        if (p.error_mode) {
          const T sg = dsigmoid(p.canvases[(tB - B + b) * D + d]);
          g -= sg * (T(1) - sg) * dr;
        } else {
          g += dr;
        }
        const int64_t idx = (tB - B + b) * D + d;
        if (p.grad_canvases != nullptr) g += p.grad_canvases[idx];
        gs_own[u * bp + b] = g;
        p.d_canvas[idx] = g;
        gsT[d * bp + b] = stage_operand<MATH>(g);
      });
      for_units(units_in_pass(ehd_rows, row0, nrows), b0, ncols, [&](int u, int64_t b, int col) {
        p_dec[u * bp + b] += sum(plan.b4_ehd + u - row0, col);
      });
      for_units(units_in_pass(ehh_rows, row0, nrows), b0, ncols, [&](int u, int64_t b, int col) {
        p_enc[u * bp + b] = sum(plan.b4_ehh + u - row0, col);
      });
    });
    grid_sync();
  }
}

// Backward through time for the shared launch flow (launch.h).
template <typename T>
struct BackwardDirection {
  using Params = BackwardParams<T>;
  using Plan = BackwardPlan;
  using Scalar = T;
  using Kernel = void (*)(const BackwardParams<T>, const BackwardPlan, T* const);
  using Weights = BackwardWeights<T>;
  template <int NBL, int MATH>
  static Kernel instance() {
    return backward_kernel<T, NBL, MATH>;
  }
  static const char* op(const Params&) { return "backward"; }
  static Plan plan(const Dims& d, const Config& c, int64_t smem_limit) {
    return plan_backward(d, c, sizeof(T), smem_limit);
  }
  static int grid_barriers(const Params& p) {
    return 4 * p.K - 1;
  }
};

}  // namespace

AVME_PERSISTENT_ENTRY_POINTS(BackwardParams, BackwardDirection, launch_backward, describe_backward)

}  // namespace persistent
}  // namespace avme
