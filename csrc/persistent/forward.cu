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

// Saves an LSTM unit's h, c and activated gates at row `row` of (K, B, H) / (K, B, 4H).
template <typename T>
__device__ __forceinline__ void save_lstm(T* h_out, T* c_out, T* gates_out, int H, int64_t row,
                                          int j, T h, T c, T ig, T fg, T gg, T og) {
  h_out[row * H + j] = h;
  c_out[row * H + j] = c;
  T* g = gates_out + row * 4 * H;
  g[j] = ig;
  g[H + j] = fg;
  g[2 * H + j] = gg;
  g[3 * H + j] = og;
}

template <typename T, int NBL, int MATH>
__global__ void __launch_bounds__(kMaxThreads, 1)
    forward_kernel(const LoopParams<T> p, const ForwardPlan plan, T* const ws) {
  AVME_DYNAMIC_SMEM(smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);
  const int G = static_cast<int>(gridDim.x);
  const int cta = static_cast<int>(blockIdx.x);
  const int D = p.D, He = p.He, Hd = p.Hd, Z = p.Z, K = p.K;
  const int64_t B = p.B, bp = plan.bp;
  const int64_t He4 = 4 * static_cast<int64_t>(He), Hd4 = 4 * static_cast<int64_t>(Hd);
  const bool encoder = p.encoder;
  const Range ue = encoder ? share(He, G, cta) : Range{};
  const Range uz = encoder ? share(Z, G, cta) : Range{};
  const Range ud = share(Hd, G, cta);
  const Range up = share(D, G, cta);

  // Per-block state (rows of bp columns) and the shared feature-major workspace.
  T* const priv = plan.priv_in_smem
                      ? smem + plan.priv_smem
                      : ws + plan.ws_priv + static_cast<int64_t>(cta) * plan.priv_elems;
  T* const p_enc = priv + plan.p_enc;
  T* const p_dec = priv + plan.p_dec;
  T* const c_enc = priv + plan.c_enc;
  T* const c_dec = priv + plan.c_dec;
  T* const s_own = priv + plan.s;
  T* const h_encT = ws + plan.ws_henc;
  T* const h_decT = ws + plan.ws_hdec;
  T* const zT = ws + plan.ws_z;
  T* const rT = ws + plan.ws_r;

  // ---- stationary weights: row r of a stage at w[k * ld + r] ------------------------------
  if (encoder) {
    fill_stage(smem, plan.E, [&](int k, int r) -> T {
      const int u = r >> 2, g = r & 3;
      return u < ue.count ? p.enc_wT[k * He4 + g * He + ue.begin + u] : T(0);
    });
    fill_stage(smem, plan.Q, [&](int k, int r) -> T {
      if (r < plan.q_he) {
        const int u = r >> 1, half = r & 1;
        return u < uz.count ? p.q_wT[k * 2 * static_cast<int64_t>(Z) + half * Z + uz.begin + u]
                            : T(0);
      }
      const int u = (r - plan.q_he) >> 2, g = (r - plan.q_he) & 3;
      return u < ue.count ? p.enc_wT[(D + Hd + k) * He4 + g * He + ue.begin + u] : T(0);
    });
  }
  fill_stage(smem, plan.D, [&](int k, int r) -> T {
    const int u = r >> 2, g = r & 3;
    return u < ud.count ? p.dec_wT[k * Hd4 + g * Hd + ud.begin + u] : T(0);
  });
  fill_stage(smem, plan.W, [&](int k, int r) -> T {
    if (r < plan.w_ehd)
      return r < up.count ? p.write_wT[static_cast<int64_t>(k) * D + up.begin + r] : T(0);
    if (r < plan.w_dhh) {
      const int u = (r - plan.w_ehd) >> 2, g = (r - plan.w_ehd) & 3;
      return u < ue.count ? p.enc_wT[(D + k) * He4 + g * He + ue.begin + u] : T(0);
    }
    const int u = (r - plan.w_dhh) >> 2, g = (r - plan.w_dhh) & 3;
    return u < ud.count ? p.dec_wT[(Z + k) * Hd4 + g * Hd + ud.begin + u] : T(0);
  });

  // ---- initial state: h, c, s = 0; r_1 = s_0 = 0 or x - sigmoid(0) -------------------------
  zero_fill(priv, plan.priv_elems);
  if (encoder) {
    for_units(Range{0, up.count}, 0, static_cast<int>(B), [&](int u, int64_t b, int) {
      const int d = up.begin + u;
      rT[d * bp + b] = p.error_mode ? p.x[b * D + d] - dsigmoid(T(0)) : T(0);
    });
  } else {
    // z_in (K, B, Z) -> zT (K, Z, bp), spread over the whole grid.
    const int64_t total = static_cast<int64_t>(K) * B * Z;
    const int64_t stride = static_cast<int64_t>(G) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(cta) * blockDim.x + threadIdx.x; i < total; i += stride) {
      const int64_t tb = i / Z;
      const int j = static_cast<int>(i - tb * Z);
      const int64_t t = tb / B, b = tb - t * B;
      zT[(t * Z + j) * bp + b] = p.z_in[i];
    }
  }
  grid_sync();

  const StageContext<T> ctx{smem + plan.scratch, plan.scratch_elems, plan.cfg.kc, bp, B,
                             plan.nchunks};
  for (int t = 0; t < K; ++t) {
    const bool last = t + 1 == K;
    const int64_t tB = static_cast<int64_t>(t) * B;

    if (encoder) {
      // ---- E: encoder gates from r_t; LSTM cell ----------------------------------------------
      const RowBlock enc_rows{0, ue.count, 4};
      run_stage<T, NBL, MATH>(ctx, plan.E, smem, rows_used(enc_rows), rT,
                        [&](int row0, int nrows, const PassSums<T>& sum, int64_t b0, int ncols) {
        for_units(units_in_pass(enc_rows, row0, nrows), b0, ncols, [&](int u, int64_t b, int col) {
          const int j = ue.begin + u;
          const int r = 4 * u - row0;
          T pre[4];
#pragma unroll
          for (int g = 0; g < 4; ++g)
            pre[g] = sum(r + g, col) + p_enc[(4 * u + g) * bp + b] +
                     p.enc_static[b * He4 + g * He + j];
          T ig, fg, gg, og, c, h;
          lstm_cell_forward(pre[0], pre[1], pre[2], pre[3], c_enc[u * bp + b], ig, fg, gg, og, c,
                            h);
          c_enc[u * bp + b] = c;
          h_encT[j * bp + b] = h;
          if (p.h_enc != nullptr)
            save_lstm(p.h_enc, p.c_enc, p.gates_enc, He, tB + b, j, h, c, ig, fg, gg, og);
        });
      });
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
          zT[j * bp + b] = z;
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
    const RowBlock dec_rows{0, ud.count, 4};
    const T* const z_t = encoder ? zT : zT + static_cast<int64_t>(t) * Z * bp;
    run_stage<T, NBL, MATH>(ctx, plan.D, smem, rows_used(dec_rows), z_t,
                      [&](int row0, int nrows, const PassSums<T>& sum, int64_t b0, int ncols) {
      for_units(units_in_pass(dec_rows, row0, nrows), b0, ncols, [&](int u, int64_t b, int col) {
        const int j = ud.begin + u;
        const int r = 4 * u - row0;
        T pre[4];
#pragma unroll
        for (int g = 0; g < 4; ++g)
          pre[g] = sum(r + g, col) + p_dec[(4 * u + g) * bp + b] +
                   p.dec_static[b * p.dec_static_stride + g * Hd + j];
        T ig, fg, gg, og, c, h;
        lstm_cell_forward(pre[0], pre[1], pre[2], pre[3], c_dec[u * bp + b], ig, fg, gg, og, c, h);
        c_dec[u * bp + b] = c;
        h_decT[j * bp + b] = h;
        if (p.h_dec != nullptr)
          save_lstm(p.h_dec, p.c_dec, p.gates_dec, Hd, tB + b, j, h, c, ig, fg, gg, og);
      });
    });
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
        if (encoder && !last) rT[d * bp + b] = p.error_mode ? p.x[b * D + d] - dsigmoid(s) : s;
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

template <typename T>
using ForwardKernel = void (*)(const LoopParams<T>, const ForwardPlan, T* const);

template <typename T, int MATH>
ForwardKernel<T> forward_kernel_for_math(int nbl) {
  switch (nbl) {
    case 1: return forward_kernel<T, 1, MATH>;
    case 2: return forward_kernel<T, 2, MATH>;
    default: return forward_kernel<T, 4, MATH>;
  }
}

// The instantiation of a configuration (tensor-core math exists for float only; resolve_config
// rejects it for double).
template <typename T>
ForwardKernel<T> forward_kernel_for(const Config& c) {
  if constexpr (std::is_same_v<T, float>) {
    if (c.math == kMathTf32x3) return forward_kernel_for_math<T, kMathTf32x3>(c.nbl);
    if (c.math == kMathTf32) return forward_kernel_for_math<T, kMathTf32>(c.nbl);
  }
  return forward_kernel_for_math<T, kMathFma>(c.nbl);
}

template <typename T>
ForwardPlan resolved_plan(const LoopParams<T>& p, const DeviceLimits& limits,
                          const Config& requested) {
  const Dims d = detail::dims_of(p);
  detail::check_dims(d, p.encoder ? "forward" : "sample");
  const Config cfg = detail::resolve_config(
      d, limits, requested, sizeof(T), p.encoder ? "forward" : "sample", [&](const Config& c) {
        const ForwardPlan f = plan_forward(d, c, sizeof(T), limits.smem_optin);
        return std::array<int, 4>{f.E.ld, f.Q.ld, f.D.ld, f.W.ld};
      });
  return plan_forward(d, cfg, sizeof(T), limits.smem_optin);
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
LaunchInfo describe_forward(const LoopParams<T>& p, const DeviceLimits& limits,
                            const Config& requested) {
  const ForwardPlan f = resolved_plan(p, limits, requested);
  LaunchInfo info;
  info.config = f.cfg;
  info.smem_bytes = f.smem_elems * static_cast<int64_t>(sizeof(T));
  info.workspace_bytes = f.ws_elems * static_cast<int64_t>(sizeof(T));
  info.state_in_smem = f.priv_in_smem;
  info.grid_barriers = (p.encoder ? 4 : 2) * p.K;
  return info;
}

template <typename T>
bool supports(const LoopParams<T>& p, int num_sms, int64_t smem_optin,
              const Config& requested) {
  if (num_sms < 1 || p.K < 1 || p.D < 1 || p.Hd < 1 || p.Z < 1 || (p.encoder && p.He < 1) ||
      p.B < 0)
    return false;
  if (requested.math != kMathFma && !std::is_same_v<T, float>) return false;
  if (p.B == 0) return true;
  const DeviceLimits limits{num_sms, smem_optin};
  const LaunchInfo info = describe_forward(p, limits, requested);
  if (info.smem_bytes > smem_optin) return false;
#ifdef AVME_CPU_EMULATION
  return true;
#else
  if (requested.math != kMathFma && !detail::device_has_tf32_mma()) return false;
  return detail::fits_cooperatively(forward_kernel_for<T>(info.config), info.config.ctas,
                                    info.config.threads, static_cast<size_t>(info.smem_bytes),
                                    num_sms, launch_cache<T>(info.config));
#endif
}

template <typename T>
bool supports(const LoopParams<T>& p, int num_sms, int64_t smem_optin) {
  return supports(p, num_sms, smem_optin, Config{});
}

template <typename T>
void launch_forward(const LoopParams<T>& p, const DeviceLimits& limits, const Config& requested,
                    cudaStream_t stream) {
  const char* op = p.encoder ? "forward" : "sample";
  const ForwardPlan plan = resolved_plan(p, limits, requested);
  if (p.B == 0) return;
  const int64_t smem = plan.smem_elems * static_cast<int64_t>(sizeof(T));
  TORCH_CHECK(smem <= limits.smem_optin, "avme::persistent::", op, ": a block needs ", smem,
              " bytes of shared memory for the weights of its units, more than the ",
              limits.smem_optin, " bytes per block of this device (D=", p.D, ", He=", p.He,
              ", Hd=", p.Hd, ", Z=", p.Z, ", ", plan.cfg.ctas, " blocks, dtype size ", sizeof(T),
              "); supports() says so: use another design");
  detail::Workspace<T> ws(plan.ws_elems, stream);
  const int ctas = plan.cfg.ctas, threads = plan.cfg.threads;
#ifdef AVME_CPU_EMULATION
  (void)stream;
  emu::cooperative_launch(forward_kernel_for<T>(plan.cfg), ctas, threads,
                          static_cast<size_t>(smem), p, plan, ws.get());
#else
  const ForwardKernel<T> kernel = forward_kernel_for<T>(plan.cfg);
  TORCH_CHECK(plan.cfg.math == kMathFma || detail::device_has_tf32_mma(), "avme::persistent::",
              op, ": tensor-core math needs an sm_80+ device");
  TORCH_CHECK(detail::fits_cooperatively(kernel, ctas, threads, static_cast<size_t>(smem),
                                         limits.num_sms, launch_cache<T>(plan.cfg)),
              "avme::persistent::", op, ": ", ctas, " blocks of ", threads, " threads and ", smem,
              " bytes of shared memory cannot all be resident on this device (cooperative "
              "launch); supports() says so: use another design");
  detail::launch_cooperative(kernel, ctas, threads, static_cast<size_t>(smem), stream, p, plan,
                             ws.get());
#endif
}

template <typename T>
void launch_forward(const LoopParams<T>& p, cudaStream_t stream) {
#ifdef AVME_CPU_EMULATION
  launch_forward(p, DeviceLimits{4, 232448}, Config{}, stream);
#else
  launch_forward(p, detail::current_device_limits(), Config{}, stream);
#endif
}

template bool supports<float>(const LoopParams<float>&, int, int64_t);
template bool supports<float>(const LoopParams<float>&, int, int64_t, const Config&);
template bool supports<double>(const LoopParams<double>&, int, int64_t);
template bool supports<double>(const LoopParams<double>&, int, int64_t, const Config&);
template void launch_forward<float>(const LoopParams<float>&, cudaStream_t);
template void launch_forward<double>(const LoopParams<double>&, cudaStream_t);
template void launch_forward<float>(const LoopParams<float>&, const DeviceLimits&, const Config&,
                                    cudaStream_t);
template void launch_forward<double>(const LoopParams<double>&, const DeviceLimits&,
                                     const Config&, cudaStream_t);
template LaunchInfo describe_forward<float>(const LoopParams<float>&, const DeviceLimits&,
                                            const Config&);
template LaunchInfo describe_forward<double>(const LoopParams<double>&, const DeviceLimits&,
                                             const Config&);

}  // namespace persistent
}  // namespace avme
