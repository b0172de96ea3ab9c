// Persistent backward-through-time kernel of the fused AVME loop (design: persistent.h; stage
// mechanics: stage.cuh; layout: plan.h). One cooperative launch runs all K steps backwards and
// writes BackwardParams' per-step gradients; the host turns them into weight gradients.
//
// A block owns decoder units, latent units, encoder units and pixels, and keeps the weight
// COLUMNS of its units (rows of W^T) in shared memory. Step t = K-1..0, grid barriers (|):
//   B1  input gs_t = dL/ds_t (D features): dh_dec_t = write_w^T gs_t + p_dec (carried from
//       step t+1: W_hdec^T dge_{t+1} + W_hh(dec)^T dgd_{t+1}) -> decoder cell backward
//       -> dgd_t (d_gates_dec and workspace)                                                 |
//   B2  input dgd_t (4Hd): dz = W_z^T dgd_t -> d[mu, logvar]_t (d_q and workspace); and
//       p_dec = W_hh(dec)^T dgd_t (for step t-1)                                              |
//   B3  input dq_t (2Z): dh_enc_t = q_w^T dq_t + p_enc (carried: W_hh(enc)^T dge_{t+1})
//       -> encoder cell backward -> dge_t (d_gates_enc and workspace)                        |
//   B4  input dge_t (4He): dr_t = W_r^T dge_t for the owned pixels: gs_{t-1} = gs_t + dr_t
//       (canvas) or gs_t - sigmoid'(s_{t-1}) dr_t (error; d_x_error += dr_t), plus
//       grad_canvases[t-1] -> d_canvas[t-1] and workspace; p_dec += W_hdec^T dge_t,
//       p_enc = W_hh(enc)^T dge_t (for step t-1)                                              |
// At t = 0, B2 computes dz only and B4 runs only for d_x_error (error mode).

#include "persistent/persistent.h"

#include <array>
#include <atomic>
#include <type_traits>

#include "common/cell_math.cuh"
#include "common/grid_sync.cuh"
#include "persistent/launch.h"
#include "persistent/stage.cuh"

namespace avme {
namespace persistent {
namespace {

// LSTM unit j's backward at step t for batch row b: dh reaches h_t, dc (per-block state) carries
// dc_t in and dc_{t-1} out; writes the gate pre-activation gradients to d_gates (K, B, 4H) and to
// the feature-major workspace dgT (4H rows of stride bp).
template <typename T>
__device__ __forceinline__ void lstm_unit_backward(T dh, T& dc, const T* gates, const T* cells,
                                                   T* d_gates, T* dgT, int H, int j, int t,
                                                   int64_t B, int64_t b, int64_t bp) {
  const int64_t row = static_cast<int64_t>(t) * B + b;
  const T* g = gates + row * 4 * H;
  const T c = cells[row * H + j];
  const T c_prev = t > 0 ? cells[(row - B) * H + j] : T(0);
  T di, df, dg, d_o, dc_prev;
  lstm_cell_backward(dh, dc, g[j], g[H + j], g[2 * H + j], g[3 * H + j], c, c_prev, di, df, dg,
                     d_o, dc_prev);
  dc = dc_prev;
  T* out = d_gates + row * 4 * H;
  out[j] = di;
  out[H + j] = df;
  out[2 * H + j] = dg;
  out[3 * H + j] = d_o;
  dgT[static_cast<int64_t>(j) * bp + b] = di;
  dgT[static_cast<int64_t>(H + j) * bp + b] = df;
  dgT[static_cast<int64_t>(2 * H + j) * bp + b] = dg;
  dgT[static_cast<int64_t>(3 * H + j) * bp + b] = d_o;
}

template <typename T, int NBL, int MATH>
__global__ void __launch_bounds__(kMaxThreads, 1)
    backward_kernel(const BackwardParams<T> p, const BackwardPlan plan, T* const ws) {
  AVME_DYNAMIC_SMEM(smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);
  const int G = static_cast<int>(gridDim.x);
  const int cta = static_cast<int>(blockIdx.x);
  const int D = p.D, He = p.He, Hd = p.Hd, Z = p.Z, K = p.K;
  const int64_t B = p.B, bp = plan.bp;
  const int64_t ldi = 2 * static_cast<int64_t>(D) + Hd + p.C;  // enc_w_ih row stride
  const int64_t ldz = static_cast<int64_t>(Z) + p.C;            // dec_w_ih row stride
  const Range ue = share(He, G, cta);
  const Range uz = share(Z, G, cta);
  const Range ud = share(Hd, G, cta);
  const Range up = share(D, G, cta);
  const bool dx_error = p.error_mode && p.d_x_error != nullptr;

  T* const priv = plan.priv_in_smem
                      ? smem + plan.priv_smem
                      : ws + plan.ws_priv + static_cast<int64_t>(cta) * plan.priv_elems;
  T* const dc_dec = priv + plan.dc_dec;
  T* const dc_enc = priv + plan.dc_enc;
  T* const p_dec = priv + plan.p_dec;
  T* const p_enc = priv + plan.p_enc;
  T* const gs_own = priv + plan.gs;
  T* const gsT = ws + plan.ws_gs;
  T* const dgdT = ws + plan.ws_dgd;
  T* const dqT = ws + plan.ws_dq;
  T* const dgeT = ws + plan.ws_dge;

  // ---- stationary weight columns: w[k * ld + r] -----------------------------------------------
  fill_stage(smem, plan.B1, [&](int k, int r) -> T {
    return r < ud.count ? p.write_w[static_cast<int64_t>(k) * Hd + ud.begin + r] : T(0);
  });
  fill_stage(smem, plan.B2, [&](int k, int r) -> T {
    if (r < plan.b2_dhh) return r < uz.count ? p.dec_w_ih[k * ldz + uz.begin + r] : T(0);
    const int u = r - plan.b2_dhh;
    return u < ud.count ? p.dec_w_hh[static_cast<int64_t>(k) * Hd + ud.begin + u] : T(0);
  });
  fill_stage(smem, plan.B3, [&](int k, int r) -> T {
    return r < ue.count ? p.q_w[static_cast<int64_t>(k) * He + ue.begin + r] : T(0);
  });
  fill_stage(smem, plan.B4, [&](int k, int r) -> T {
    if (r < plan.b4_ehd) return r < up.count ? p.enc_w_ih[k * ldi + D + up.begin + r] : T(0);
    if (r < plan.b4_ehh) {
      const int u = r - plan.b4_ehd;
      return u < ud.count ? p.enc_w_ih[k * ldi + 2 * D + ud.begin + u] : T(0);
    }
    const int u = r - plan.b4_ehh;
    return u < ue.count ? p.enc_w_hh[static_cast<int64_t>(k) * He + ue.begin + u] : T(0);
  });

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
    gsT[d * bp + b] = v;
  });
  grid_sync();

  const StageContext<T> ctx{smem + plan.scratch, plan.scratch_elems, plan.cfg.kc, bp, B,
                             plan.nchunks};
  for (int t = K - 1; t >= 0; --t) {
    const int64_t tB = static_cast<int64_t>(t) * B;

    // ---- B1: dh_dec_t -> decoder cell backward -> dgd_t ----------------------------------------
    const RowBlock dec_rows{0, ud.count, 1};
    run_stage<T, NBL, MATH>(ctx, plan.B1, smem, rows_used(dec_rows), gsT,
                      [&](int row0, int nrows, const PassSums<T>& sum, int64_t b0, int ncols) {
      for_units(units_in_pass(dec_rows, row0, nrows), b0, ncols, [&](int u, int64_t b, int col) {
        const T dh = sum(u - row0, col) + p_dec[u * bp + b];
        lstm_unit_backward(dh, dc_dec[u * bp + b], p.gates_dec, p.c_dec, p.d_gates_dec, dgdT, Hd,
                           ud.begin + u, t, B, b, bp);
      });
    });
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
        T* q = p.d_q + (tB + b) * 2 * Z;
        q[j] = dmu;
        q[Z + j] = dlv;
        dqT[j * bp + b] = dmu;
        dqT[(Z + j) * bp + b] = dlv;
      });
      for_units(units_in_pass(dhh_rows, row0, nrows), b0, ncols, [&](int u, int64_t b, int col) {
        p_dec[u * bp + b] = sum(plan.b2_dhh + u - row0, col);
      });
    });
    grid_sync();

    // ---- B3: dh_enc_t -> encoder cell backward -> dge_t ----------------------------------------
    const RowBlock enc_rows{0, ue.count, 1};
    run_stage<T, NBL, MATH>(ctx, plan.B3, smem, rows_used(enc_rows), dqT,
                      [&](int row0, int nrows, const PassSums<T>& sum, int64_t b0, int ncols) {
      for_units(units_in_pass(enc_rows, row0, nrows), b0, ncols, [&](int u, int64_t b, int col) {
        const T dh = sum(u - row0, col) + p_enc[u * bp + b];
        lstm_unit_backward(dh, dc_enc[u * bp + b], p.gates_enc, p.c_enc, p.d_gates_enc, dgeT, He,
                           ue.begin + u, t, B, b, bp);
      });
    });
    if (t == 0 && !dx_error) break;
    grid_sync();

    // ---- B4: dr_t -> gs_{t-1}; W_hdec^T and W_hh(enc)^T dge_t for step t-1 ----------------------
    const RowBlock px_rows{0, up.count, 1};
    const RowBlock ehd_rows{plan.b4_ehd, t > 0 ? ud.count : 0, 1};
    const RowBlock ehh_rows{plan.b4_ehh, t > 0 ? ue.count : 0, 1};
    run_stage<T, NBL, MATH>(ctx, plan.B4, smem, rows_used(px_rows, ehd_rows, ehh_rows), dgeT,
                      [&](int row0, int nrows, const PassSums<T>& sum, int64_t b0, int ncols) {
      for_units(units_in_pass(px_rows, row0, nrows), b0, ncols, [&](int u, int64_t b, int col) {
        const int d = up.begin + u;
        const T dr = sum(u - row0, col);
        if (dx_error) p.d_x_error[b * D + d] += dr;
        if (t == 0) return;
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
        gsT[d * bp + b] = g;
      });
      for_units(units_in_pass(ehd_rows, row0, nrows), b0, ncols, [&](int u, int64_t b, int col) {
        p_dec[u * bp + b] += sum(plan.b4_ehd + u - row0, col);
      });
      for_units(units_in_pass(ehh_rows, row0, nrows), b0, ncols, [&](int u, int64_t b, int col) {
        p_enc[u * bp + b] = sum(plan.b4_ehh + u - row0, col);
      });
    });
    if (t > 0) grid_sync();
  }
}

template <typename T>
using BackwardKernel = void (*)(const BackwardParams<T>, const BackwardPlan, T* const);

template <typename T, int MATH>
BackwardKernel<T> backward_kernel_for_math(int nbl) {
  switch (nbl) {
    case 1: return backward_kernel<T, 1, MATH>;
    case 2: return backward_kernel<T, 2, MATH>;
    default: return backward_kernel<T, 4, MATH>;
  }
}

// The instantiation of a configuration (tensor-core math exists for float only; resolve_config
// rejects it for double).
template <typename T>
BackwardKernel<T> backward_kernel_for(const Config& c) {
  if constexpr (std::is_same_v<T, float>) {
    if (c.math == kMathTf32x3) return backward_kernel_for_math<T, kMathTf32x3>(c.nbl);
    if (c.math == kMathTf32) return backward_kernel_for_math<T, kMathTf32>(c.nbl);
  }
  return backward_kernel_for_math<T, kMathFma>(c.nbl);
}

template <typename T>
BackwardPlan resolved_plan(const BackwardParams<T>& p, const DeviceLimits& limits,
                           const Config& requested) {
  const Dims d = detail::dims_of(p);
  detail::check_dims(d, "backward");
  TORCH_CHECK(p.C >= 0, "avme::persistent::backward: C must be >= 0, got ", p.C);
  const Config cfg =
      detail::resolve_config(d, limits, requested, sizeof(T), "backward", [&](const Config& c) {
        const BackwardPlan b = plan_backward(d, c, sizeof(T), limits.smem_optin);
        return std::array<int, 4>{b.B1.ld, b.B2.ld, b.B3.ld, b.B4.ld};
      });
  return plan_backward(d, cfg, sizeof(T), limits.smem_optin);
}

#ifndef AVME_CPU_EMULATION
// Launch cache of each instantiation (nbl x math).
template <typename T>
detail::LaunchCache* launch_cache(const Config& c) {
  static detail::LaunchCache caches[3][3];
  return &caches[c.nbl == 1 ? 0 : (c.nbl == 2 ? 1 : 2)][c.math];
}
#endif

}  // namespace

template <typename T>
LaunchInfo describe_backward(const BackwardParams<T>& p, const DeviceLimits& limits,
                             const Config& requested) {
  const BackwardPlan b = resolved_plan(p, limits, requested);
  LaunchInfo info;
  info.config = b.cfg;
  info.smem_bytes = b.smem_elems * static_cast<int64_t>(sizeof(T));
  info.workspace_bytes = b.ws_elems * static_cast<int64_t>(sizeof(T));
  info.state_in_smem = b.priv_in_smem;
  info.grid_barriers = 4 * p.K - 1 + ((p.error_mode && p.d_x_error != nullptr) ? 1 : 0);
  return info;
}

template <typename T>
bool supports(const BackwardParams<T>& p, int num_sms, int64_t smem_optin,
              const Config& requested) {
  if (num_sms < 1 || p.K < 1 || p.D < 1 || p.Hd < 1 || p.Z < 1 || p.He < 1 || p.C < 0 || p.B < 0)
    return false;
  if (requested.math != kMathFma && !std::is_same_v<T, float>) return false;
  if (p.B == 0) return true;
  const DeviceLimits limits{num_sms, smem_optin};
  const LaunchInfo info = describe_backward(p, limits, requested);
  if (info.smem_bytes > smem_optin) return false;
#ifdef AVME_CPU_EMULATION
  return true;
#else
  if (requested.math != kMathFma && !detail::device_has_tf32_mma()) return false;
  return detail::fits_cooperatively(backward_kernel_for<T>(info.config), info.config.ctas,
                                    info.config.threads, static_cast<size_t>(info.smem_bytes),
                                    num_sms, launch_cache<T>(info.config));
#endif
}

template <typename T>
bool supports(const BackwardParams<T>& p, int num_sms, int64_t smem_optin) {
  return supports(p, num_sms, smem_optin, Config{});
}

template <typename T>
void launch_backward(const BackwardParams<T>& p, const DeviceLimits& limits,
                     const Config& requested, cudaStream_t stream) {
  const BackwardPlan plan = resolved_plan(p, limits, requested);
  if (p.B == 0) return;
  const int64_t smem = plan.smem_elems * static_cast<int64_t>(sizeof(T));
  TORCH_CHECK(smem <= limits.smem_optin, "avme::persistent::backward: a block needs ", smem,
              " bytes of shared memory for the weights of its units, more than the ",
              limits.smem_optin, " bytes per block of this device (D=", p.D, ", He=", p.He,
              ", Hd=", p.Hd, ", Z=", p.Z, ", ", plan.cfg.ctas, " blocks, dtype size ", sizeof(T),
              "); supports() says so: use another design");
  detail::Workspace<T> ws(plan.ws_elems, stream);
  const int ctas = plan.cfg.ctas, threads = plan.cfg.threads;
#ifdef AVME_CPU_EMULATION
  (void)stream;
  emu::cooperative_launch(backward_kernel_for<T>(plan.cfg), ctas, threads,
                          static_cast<size_t>(smem), p, plan, ws.get());
#else
  const BackwardKernel<T> kernel = backward_kernel_for<T>(plan.cfg);
  TORCH_CHECK(plan.cfg.math == kMathFma || detail::device_has_tf32_mma(), "avme::persistent::",
              "backward", ": tensor-core math needs an sm_80+ device");
  TORCH_CHECK(detail::fits_cooperatively(kernel, ctas, threads, static_cast<size_t>(smem),
                                         limits.num_sms, launch_cache<T>(plan.cfg)),
              "avme::persistent::backward: ", ctas, " blocks of ", threads, " threads and ", smem,
              " bytes of shared memory cannot all be resident on this device (cooperative "
              "launch); supports() says so: use another design");
  detail::launch_cooperative(kernel, ctas, threads, static_cast<size_t>(smem), stream, p, plan,
                             ws.get());
#endif
}

template <typename T>
void launch_backward(const BackwardParams<T>& p, cudaStream_t stream) {
#ifdef AVME_CPU_EMULATION
  launch_backward(p, DeviceLimits{4, 232448}, Config{}, stream);
#else
  launch_backward(p, detail::current_device_limits(), Config{}, stream);
#endif
}

template bool supports<float>(const BackwardParams<float>&, int, int64_t);
template bool supports<float>(const BackwardParams<float>&, int, int64_t, const Config&);
template bool supports<double>(const BackwardParams<double>&, int, int64_t);
template bool supports<double>(const BackwardParams<double>&, int, int64_t, const Config&);
template void launch_backward<float>(const BackwardParams<float>&, cudaStream_t);
template void launch_backward<double>(const BackwardParams<double>&, cudaStream_t);
template void launch_backward<float>(const BackwardParams<float>&, const DeviceLimits&,
                                     const Config&, cudaStream_t);
template void launch_backward<double>(const BackwardParams<double>&, const DeviceLimits&,
                                      const Config&, cudaStream_t);
template LaunchInfo describe_backward<float>(const BackwardParams<float>&, const DeviceLimits&,
                                             const Config&);
template LaunchInfo describe_backward<double>(const BackwardParams<double>&, const DeviceLimits&,
                                              const Config&);

}  // namespace persistent
}  // namespace avme
