// Persistent forward / sampler kernel of the fused AVME loop (design: persistent.h; stage
// mechanics: stage.cuh; layout: plan.h). One cooperative launch runs all K steps.
//
// Step t, with grid barriers (|) between dependent stages:
//   E  rows: encoder gates of the owned units, input r_t (D features)
//      gates = enc_static + W_r r_t + p_enc (W_hdec h_dec_{t-1} + W_hh h_enc_{t-1}, carried)
//      -> LSTM cell -> h_enc_t (workspace), saved h, c, activated gates                       |
//   Q  input h_enc_t: rows [mu, logvar] of the owned latents -> z_t = mu + exp(lv/2) eps_t,
//      and the owned encoder gates' W_hh rows: p_enc = W_hh h_enc_t (for step t+1)          |
//   D  input z_t: decoder gates = dec_static + W_z z_t + p_dec (W_hh(dec) h_dec_{t-1})
//      -> LSTM cell -> h_dec_t                                                               |
//   W  input h_dec_t: s_t = s_{t-1} + write_w h_dec_t + write_b for the owned pixels, then
//      r_{t+1} = s_t or x - sigmoid(s_t) (workspace); p_enc += W_hdec h_dec_t,
//      p_dec = W_hh(dec) h_dec_t (for step t+1)                                              |
// The sampler (p.encoder false) runs D and W only, z_t read from z_in (transposed to the
// feature-major workspace at the start).

#include "persistent/persistent.h"

#include "common/cell_math.cuh"
#include "common/grid_sync.cuh"
#include "persistent/launch.h"
#include "persistent/stage.cuh"

namespace avme {
namespace persistent {
namespace {

// One LSTM layer of the forward (encoder or decoder) as this block's stage sees it.
template <typename T>
struct LstmLayer {
  int H = 0;                    // units of the layer
  Range units;                  // the units this block owns
  const T* stat = nullptr;      // step-invariant gate pre-activations: row b at
  int64_t stat_stride = 0;      //   stat + b * stat_stride, gate g of unit j at [g * H + j]
  T* carried = nullptr;         // per-block state: recurrent gate parts, 4 rows per owned unit
  T* cells = nullptr;           // per-block state: cell state, a row per owned unit
  T* hT = nullptr;              // workspace: h, feature-major (H rows)
  T* h_out = nullptr;           // saved h (K, B, H), c (K, B, H) and activated gates (K, B, 4H);
  T* c_out = nullptr;           //   nullptr: not saved
  T* gates_out = nullptr;
};

// A stage whose rows are the four gate rows of each owned unit of an LSTM layer (E, D): gate
// pre-activations = stage sums + carried + step-invariant parts, through the cell; h to the
// workspace and, when asked, the state saved at step row t * B + b.
template <typename T, int NBL, int MATH>
__device__ void lstm_forward_stage(const StageContext<T>& ctx, const StageLayout& layout,
                                   const T* smem, const T* x, const LstmLayer<T>& layer,
                                   int64_t tB) {
  const RowBlock rows{0, layer.units.count, 4};
  const int64_t bp = ctx.bp;
  const int H = layer.H;
  run_stage<T, NBL, MATH>(ctx, layout, smem, rows_used(rows), x,
                          [&](int row0, int nrows, const PassSums<T>& sum, int64_t b0, int ncols) {
    for_units(units_in_pass(rows, row0, nrows), b0, ncols, [&](int u, int64_t b, int col) {
      const int j = layer.units.begin + u;
      const T* const stat = layer.stat + b * layer.stat_stride + j;
      T pre[4];
#pragma unroll
      for (int g = 0; g < 4; ++g)
        pre[g] = sum(4 * u - row0 + g, col) + layer.carried[(4 * u + g) * bp + b] + stat[g * H];
      T& cell = layer.cells[u * bp + b];
      T ig, fg, gg, og, c, h;
      lstm_cell_forward(pre[0], pre[1], pre[2], pre[3], cell, ig, fg, gg, og, c, h);
      cell = c;
      layer.hT[j * bp + b] = stage_operand<MATH>(h);
      if (layer.h_out != nullptr) {
        const int64_t row = tB + b;
        layer.h_out[row * H + j] = h;
        layer.c_out[row * H + j] = c;
        store_gates(layer.gates_out + row * 4 * H + j, H, ig, fg, gg, og);
      }
    });
  });
}

// The units block `cta` of `ctas` owns (the sampler: no encoder or latent units).
template <typename T>
__device__ OwnedUnits owned_units_of(const LoopParams<T>& p, int ctas, int cta) {
  return owned_units(p.encoder ? p.He : 0, p.encoder ? p.Z : 0, p.Hd, p.D, ctas, cta);
}

// The stationary weights of block `cta` of the grid (ForwardPlan's stages E, Q, D, W, stage i
// of stage_of), as value(k, r) = row r, input k of the stage (0 for padding rows and units the
// block does not own); launch.h packs them in shared-memory order before the launch.
template <typename T>
struct ForwardWeights {
  const LoopParams<T>& p;
  const ForwardPlan& plan;
  int stage;
  OwnedUnits own;

  __device__ ForwardWeights(const LoopParams<T>& p_, const ForwardPlan& plan_, int cta, int stage_)
      : p(p_), plan(plan_), stage(stage_), own(owned_units_of(p_, plan_.cfg.ctas, cta)) {}

  __device__ T operator()(int k, int r) const {
    const int64_t He = p.He, Hd = p.Hd, Z = p.Z, D = p.D;
    const Range &ue = own.enc, &uz = own.lat, &ud = own.dec, &up = own.pix;
    switch (stage) {
      case 0: {  // E: the four gate rows of each encoder unit, input r_t
        const int u = r >> 2, g = r & 3;
        return u < ue.count ? p.enc_wT[k * 4 * He + g * He + ue.begin + u] : T(0);
      }
      case 1: {  // Q: [mu, logvar] rows of each latent unit, then W_hh(enc) rows; input h_enc
        if (r < plan.q_he) {
          const int u = r >> 1, half = r & 1;
          return u < uz.count ? p.q_wT[k * 2 * Z + half * Z + uz.begin + u] : T(0);
        }
        const int u = (r - plan.q_he) >> 2, g = (r - plan.q_he) & 3;
        return u < ue.count ? p.enc_wT[(D + Hd + k) * 4 * He + g * He + ue.begin + u] : T(0);
      }
      case 2: {  // D: the four gate rows of each decoder unit, input z_t
        const int u = r >> 2, g = r & 3;
        return u < ud.count ? p.dec_wT[k * 4 * Hd + g * Hd + ud.begin + u] : T(0);
      }
      default: {  // W: pixel rows, then W_hdec (encoder) and W_hh(dec) gate rows; input h_dec
        if (r < plan.w_ehd) return r < up.count ? p.write_wT[k * D + up.begin + r] : T(0);
        if (r < plan.w_dhh) {
          const int u = (r - plan.w_ehd) >> 2, g = (r - plan.w_ehd) & 3;
          return u < ue.count ? p.enc_wT[(D + k) * 4 * He + g * He + ue.begin + u] : T(0);
        }
        const int u = (r - plan.w_dhh) >> 2, g = (r - plan.w_dhh) & 3;
        return u < ud.count ? p.dec_wT[(Z + k) * 4 * Hd + g * Hd + ud.begin + u] : T(0);
      }
    }
  }
};

template <typename T, int NBL, int MATH>
__global__ void __launch_bounds__(kMaxThreads, 1)
    forward_kernel(const LoopParams<T> p, const ForwardPlan plan, T* const ws) {
  AVME_DYNAMIC_SMEM(smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);
  const int G = static_cast<int>(gridDim.x);
  const int cta = static_cast<int>(blockIdx.x);
  const int D = p.D, He = p.He, Hd = p.Hd, Z = p.Z, K = p.K;
  const int64_t B = p.B, bp = plan.bp;
  const int64_t He4 = 4 * static_cast<int64_t>(He);
  const bool encoder = p.encoder;
  const OwnedUnits own = owned_units_of(p, G, cta);
  const Range ue = own.enc, uz = own.lat, ud = own.dec, up = own.pix;

  // Per-block state (rows of bp columns) and the shared feature-major workspace.
  T* const priv = block_state(plan, smem, ws);
  T* const p_enc = priv + plan.p_enc;
  T* const p_dec = priv + plan.p_dec;
  T* const c_enc = priv + plan.c_enc;
  T* const c_dec = priv + plan.c_dec;
  T* const s_own = priv + plan.s;
  T* const h_encT = ws + plan.ws_henc;
  T* const h_decT = ws + plan.ws_hdec;
  T* const zT = ws + plan.ws_z;
  T* const rT = ws + plan.ws_r;

  // ---- stationary weights: this block's packed slice (ForwardWeights), copied while the
  // state is initialised ------------------------------------------------------------------
  start_weight_copy(smem, ws + plan.ws_weights + cta * plan.weights_elems, plan.weights_elems);

  // ---- initial state: h, c, s = 0; r_1 = s_0 = 0 or x - sigmoid(0) -------------------------
  zero_fill(priv, plan.priv_elems);
  if (encoder) {
    for_units(Range{0, up.count}, 0, static_cast<int>(B), [&](int u, int64_t b, int) {
      const int d = up.begin + u;
      rT[d * bp + b] = stage_operand<MATH>(p.error_mode ? p.x[b * D + d] - dsigmoid(T(0)) : T(0));
    });
  } else {
    // z_in (K, B, Z) -> zT (K, Z, bp): block c takes rows t * B + b = c, c + G, ...
    for (int64_t tb = cta; tb < static_cast<int64_t>(K) * B; tb += G) {
      const int64_t t = tb / B, b = tb - t * B;
      for (int j = threadIdx.x; j < Z; j += blockDim.x)
        zT[(t * Z + j) * bp + b] = stage_operand<MATH>(p.z_in[tb * Z + j]);
    }
  }
  async_wait<0>();
  __syncthreads();  // the weights are in shared memory
  grid_sync();

  const StageContext<T> ctx{smem + plan.scratch, plan.scratch_elems, plan.cfg.kc, bp, B,
                             plan.nchunks};
  const LstmLayer<T> enc{.H = He, .units = ue, .stat = p.enc_static, .stat_stride = He4,
                         .carried = p_enc, .cells = c_enc, .hT = h_encT, .h_out = p.h_enc,
                         .c_out = p.c_enc, .gates_out = p.gates_enc};
  const LstmLayer<T> dec{.H = Hd, .units = ud, .stat = p.dec_static,
                         .stat_stride = p.dec_static_stride, .carried = p_dec, .cells = c_dec,
                         .hT = h_decT, .h_out = p.h_dec, .c_out = p.c_dec,
                         .gates_out = p.gates_dec};
  for (int t = 0; t < K; ++t) {
    const bool last = t + 1 == K;
    const int64_t tB = static_cast<int64_t>(t) * B;

    if (encoder) {
      // ---- E: encoder gates from r_t; LSTM cell ----------------------------------------------
      lstm_forward_stage<T, NBL, MATH>(ctx, plan.E, smem, rT, enc, tB);
      grid_sync();

      // ---- Q: posterior and z_t; W_hh(enc) h_enc_t for step t+1 -------------------------------
      const RowBlock q_rows{0, uz.count, 2};
      const RowBlock he_rows{plan.q_he, last ? 0 : 4 * ue.count, 1};
      run_stage<T, NBL, MATH>(ctx, plan.Q, smem, rows_used(q_rows, he_rows), h_encT,
                        [&](int row0, int nrows, const PassSums<T>& sum, int64_t b0, int ncols) {
        for_units(units_in_pass(q_rows, row0, nrows), b0, ncols, [&](int u, int64_t b, int col) {
          const int j = uz.begin + u;
          const int r = 2 * u - row0;
          const T mu = sum(r, col) + p.q_b[j];
          const T lv = sum(r + 1, col) + p.q_b[Z + j];
          const int64_t idx = (tB + b) * Z + j;
          const T z = reparam_sample(mu, lv, p.eps[idx]);
          zT[j * bp + b] = stage_operand<MATH>(z);
          p.mu[idx] = mu;
          p.logvar[idx] = lv;
          if (p.z_out != nullptr) p.z_out[idx] = z;
        });
        for_units(units_in_pass(he_rows, row0, nrows), b0, ncols, [&](int r, int64_t b, int col) {
          p_enc[r * bp + b] = sum(plan.q_he + r - row0, col);
        });
      });
      grid_sync();
    }

    // ---- D: decoder gates from z_t; LSTM cell -----------------------------------------------
    const T* const z_t = encoder ? zT : zT + static_cast<int64_t>(t) * Z * bp;
    lstm_forward_stage<T, NBL, MATH>(ctx, plan.D, smem, z_t, dec, tB);
    grid_sync();

    // ---- W: canvas and r_{t+1}; the h_dec_t parts of step t+1's gates -----------------------
    const RowBlock px_rows{0, up.count, 1};
    const RowBlock ehd_rows{plan.w_ehd, last ? 0 : 4 * ue.count, 1};
    const RowBlock dhh_rows{plan.w_dhh, last ? 0 : 4 * ud.count, 1};
    run_stage<T, NBL, MATH>(ctx, plan.W, smem, rows_used(px_rows, ehd_rows, dhh_rows), h_decT,
                      [&](int row0, int nrows, const PassSums<T>& sum, int64_t b0, int ncols) {
      for_units(units_in_pass(px_rows, row0, nrows), b0, ncols, [&](int u, int64_t b, int col) {
        const int d = up.begin + u;
        const T s = s_own[u * bp + b] + (sum(u - row0, col) + p.write_b[d]);
        s_own[u * bp + b] = s;
        if (p.canvases != nullptr) p.canvases[(tB + b) * D + d] = s;
        if (last && p.canvas != nullptr) p.canvas[b * D + d] = s;
        if (encoder && !last)
          rT[d * bp + b] = stage_operand<MATH>(p.error_mode ? p.x[b * D + d] - dsigmoid(s) : s);
      });
      for_units(units_in_pass(ehd_rows, row0, nrows), b0, ncols, [&](int r, int64_t b, int col) {
        p_enc[r * bp + b] += sum(plan.w_ehd + r - row0, col);
      });
      for_units(units_in_pass(dhh_rows, row0, nrows), b0, ncols, [&](int r, int64_t b, int col) {
        p_dec[r * bp + b] = sum(plan.w_dhh + r - row0, col);
      });
    });
    if (!last) grid_sync();
  }
}

// The forward / sampler for the shared launch flow (launch.h).
template <typename T>
struct ForwardDirection {
  using Params = LoopParams<T>;
  using Plan = ForwardPlan;
  using Scalar = T;
  using Kernel = void (*)(const LoopParams<T>, const ForwardPlan, T* const);
  using Weights = ForwardWeights<T>;
  template <int NBL, int MATH>
  static Kernel instance() {
    return forward_kernel<T, NBL, MATH>;
  }
  static const char* op(const Params& p) { return p.encoder ? "forward" : "sample"; }
  static Plan plan(const Dims& d, const Config& c, int64_t smem_limit) {
    return plan_forward(d, c, sizeof(T), smem_limit);
  }
  static int grid_barriers(const Params& p) { return (p.encoder ? 4 : 2) * p.K; }
};

}  // namespace

AVME_PERSISTENT_ENTRY_POINTS(LoopParams, ForwardDirection, launch_forward, describe_forward)

}  // namespace persistent
}  // namespace avme
