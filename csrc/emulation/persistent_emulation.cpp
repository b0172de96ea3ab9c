// Test-only CPU build of the persistent design (torch.ops.avme_pemu.*): csrc/persistent/'s
// kernels and launchers compiled as C++, each launch a cooperative grid of the CUDA emulator
// (cuda_emulation.h: all blocks' threads at once, grid_sync a barrier over all of them). The
// ops take exactly the tensors behind LoopParams / BackwardParams (the test prepares them as
// csrc/avme_ops.cpp does), allocate the outputs NaN-filled, and take the launch configuration
// [ctas, threads, nbl, kc(, math)] (0 = chosen; math: persistent::kMath*) and device limits
// [num_sms, smem_optin]; `describe` and `stages` report the launch the launcher would make.
// Built on demand
// by tests/ops/test_persistent_kernels.py (torch.utils.cpp_extension.load); never part of the
// package.
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#define AVME_CPU_EMULATION 1
#include "emulation/harness.h"
#include "../persistent/backward.cu"
#include "../persistent/forward.cu"

namespace avme {
namespace persistent {
namespace {

using at::Tensor;
using emulation::OptTensor;

using emulation::bind_backward_inputs;
using emulation::bind_loop_inputs;
using emulation::data_of;
using emulation::nan_tensor;
using emulation::present;

Config config_of(at::IntArrayRef c) {
  TORCH_CHECK(c.size() == 4 || c.size() == 5,
              "avme_pemu: config must be [ctas, threads, nbl, kc] or [ctas, threads, nbl, kc, "
              "math]");
  Config config{static_cast<int>(c[0]), static_cast<int>(c[1]), static_cast<int>(c[2]),
                static_cast<int>(c[3])};
  if (c.size() == 5) config.math = static_cast<int>(c[4]);
  return config;
}

DeviceLimits limits_of(at::IntArrayRef l) {
  TORCH_CHECK(l.size() == 2, "avme_pemu: limits must be [num_sms, smem_optin]");
  return DeviceLimits{static_cast<int>(l[0]), l[1]};
}

int as_int(int64_t v) { return static_cast<int>(v); }

// LoopParams / BackwardParams with the sizes of the op's int64 arguments (avme.h's params_with_sizes).
template <typename Params>
Params sized(int64_t B, int64_t K, int64_t D, int64_t He, int64_t Hd, int64_t Z, bool error_mode = false) {
  return params_with_sizes<Params>(B, as_int(K), as_int(D), as_int(He), as_int(Hd), as_int(Z), error_mode);
}

// LoopParams of the forward (encoder) or the sampler from the prepared tensors; outputs NaN.
std::vector<Tensor> pemu_loop(const OptTensor& x, const OptTensor& eps, const OptTensor& z_in,
                              const OptTensor& enc_static, const OptTensor& enc_wT,
                              const OptTensor& q_wT, const OptTensor& q_b,
                              const Tensor& dec_static, const Tensor& dec_wT,
                              const Tensor& write_wT, const Tensor& write_b, bool error_mode,
                              bool return_canvases, bool save, at::IntArrayRef config,
                              at::IntArrayRef limits) {
  const bool encoder = !(z_in.has_value() && z_in->defined());
  const Tensor& noise = encoder ? *eps : *z_in;
  TORCH_CHECK(noise.dim() == 3, "avme_pemu: eps / z must be (K, B, Z)");
  TORCH_CHECK(write_wT.dim() == 2, "avme_pemu: write_wT must be (Hd, D)");
  const int64_t K = noise.size(0), B = noise.size(1), Z = noise.size(2);
  const int64_t Hd = write_wT.size(0), D = write_wT.size(1);
  const int64_t He = encoder ? q_wT->size(0) : 0;
  const int64_t S = save ? K : 0;
  const Tensor& like = write_wT;
  std::vector<Tensor> out = {
      nan_tensor({B, D}, like),                          // canvas
      nan_tensor({encoder ? K : 0, B, Z}, like),         // mu
      nan_tensor({encoder ? K : 0, B, Z}, like),         // logvar
      nan_tensor({return_canvases ? K : 0, B, D}, like), // canvases
      nan_tensor({S, B, He}, like),                      // h_enc
      nan_tensor({S, B, He}, like),                      // c_enc
      nan_tensor({S, B, 4 * He}, like),                  // gates_enc
      nan_tensor({S, B, Z}, like),                       // z
      nan_tensor({S, B, Hd}, like),                      // h_dec
      nan_tensor({S, B, Hd}, like),                      // c_dec
      nan_tensor({S, B, 4 * Hd}, like),                  // gates_dec
  };
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "avme_pemu_loop", [&] {
    using T = scalar_t;
    auto p = sized<LoopParams<T>>(B, K, D, He, Hd, Z, error_mode);
    p.encoder = encoder;
    bind_loop_inputs(p, x, eps, z_in, enc_static, enc_wT, q_wT, q_b, dec_static, dec_wT, write_wT, write_b);
    p.canvas = out[0].data_ptr<T>();
    if (encoder) {
      p.mu = out[1].data_ptr<T>();
      p.logvar = out[2].data_ptr<T>();
    }
    if (return_canvases) p.canvases = out[3].data_ptr<T>();
    if (save && encoder) {
      p.h_enc = out[4].data_ptr<T>();
      p.c_enc = out[5].data_ptr<T>();
      p.gates_enc = out[6].data_ptr<T>();
      p.z_out = out[7].data_ptr<T>();
    }
    if (save) {
      p.h_dec = out[8].data_ptr<T>();
      p.c_dec = out[9].data_ptr<T>();
      p.gates_dec = out[10].data_ptr<T>();
    }
    launch_forward<T>(p, limits_of(limits), config_of(config), nullptr);
  });
  return out;
}

std::vector<Tensor> pemu_forward(const Tensor& x, const Tensor& eps, const Tensor& enc_static,
                                 const Tensor& enc_wT, const Tensor& q_wT, const Tensor& q_b,
                                 const Tensor& dec_static, const Tensor& dec_wT,
                                 const Tensor& write_wT, const Tensor& write_b, bool error_mode,
                                 bool return_canvases, bool save, at::IntArrayRef config,
                                 at::IntArrayRef limits) {
  return pemu_loop(x, eps, std::nullopt, enc_static, enc_wT, q_wT, q_b, dec_static, dec_wT,
                   write_wT, write_b, error_mode, return_canvases, save, config, limits);
}

std::vector<Tensor> pemu_sample(const Tensor& z, const Tensor& dec_static, const Tensor& dec_wT,
                                const Tensor& write_wT, const Tensor& write_b,
                                bool return_canvases, at::IntArrayRef config,
                                at::IntArrayRef limits) {
  std::vector<Tensor> out =
      pemu_loop(std::nullopt, std::nullopt, z, std::nullopt, std::nullopt, std::nullopt,
                std::nullopt, dec_static, dec_wT, write_wT, write_b, false, return_canvases,
                false, config, limits);
  return {out[0], out[3]};
}

// BackwardParams from the saved forward state and the weights in their module layouts; returns
// (d_canvas, d_q, d_gates_enc, d_gates_dec).
std::vector<Tensor> pemu_backward(const OptTensor& grad_canvas, const OptTensor& grad_canvases,
                                  const OptTensor& grad_mu, const OptTensor& grad_logvar,
                                  const Tensor& eps, const Tensor& logvar, const Tensor& canvases,
                                  const Tensor& c_enc, const Tensor& gates_enc,
                                  const Tensor& c_dec, const Tensor& gates_dec,
                                  const Tensor& enc_w_ih, const Tensor& enc_w_hh,
                                  const Tensor& q_w, const Tensor& dec_w_ih,
                                  const Tensor& dec_w_hh, const Tensor& write_w, bool error_mode,
                                  at::IntArrayRef config, at::IntArrayRef limits) {
  TORCH_CHECK(eps.dim() == 3 && enc_w_hh.dim() == 2 && write_w.dim() == 2 && dec_w_hh.dim() == 2 &&
                  dec_w_ih.dim() == 2,
              "avme_pemu.backward: eps must be (K, B, Z) and the weights 2-D");
  const int64_t K = eps.size(0), B = eps.size(1), Z = eps.size(2);
  const int64_t He = enc_w_hh.size(1), Hd = dec_w_hh.size(1), D = write_w.size(0);
  const int64_t C = dec_w_ih.size(1) - Z;
  const Tensor& like = write_w;
  std::vector<Tensor> out = {
      nan_tensor({K, B, D}, like), nan_tensor({K, B, 2 * Z}, like),
      nan_tensor({K, B, 4 * He}, like), nan_tensor({K, B, 4 * Hd}, like),
  };
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "avme_pemu_backward", [&] {
    using T = scalar_t;
    auto p = sized<BackwardParams<T>>(B, K, D, He, Hd, Z, error_mode);
    p.C = as_int(C);
    bind_backward_inputs(p, grad_canvas, grad_canvases, grad_mu, grad_logvar, eps, logvar, canvases, c_enc,
                         gates_enc, c_dec, gates_dec, enc_w_ih, enc_w_hh, q_w, dec_w_ih, dec_w_hh, write_w);
    p.d_canvas = out[0].data_ptr<T>();
    p.d_q = out[1].data_ptr<T>();
    p.d_gates_enc = out[2].data_ptr<T>();
    p.d_gates_dec = out[3].data_ptr<T>();
    launch_backward<T>(p, limits_of(limits), config_of(config), nullptr);
  });
  return out;
}

// The launch describe_forward / describe_backward gives. kind: "forward", "sample" or "backward".
template <typename T>
LaunchInfo launch_info(const std::string& kind, int64_t B, int64_t K, int64_t D, int64_t He,
                       int64_t Hd, int64_t Z, int64_t C, bool error_mode,
                       const DeviceLimits& limits, const Config& config) {
  if (kind == "backward") {
    auto p = sized<BackwardParams<T>>(B, K, D, He, Hd, Z, error_mode);
    p.C = as_int(C);
    return describe_backward(p, limits, config);
  }
  TORCH_CHECK(kind == "forward" || kind == "sample", "avme_pemu.describe: kind must be "
              "'forward', 'sample' or 'backward', got '", kind, "'");
  auto p = sized<LoopParams<T>>(B, K, D, He, Hd, Z, error_mode);
  p.encoder = kind == "forward";
  return describe_forward(p, limits, config);
}

LaunchInfo pemu_launch_info(const std::string& kind, int64_t B, int64_t K, int64_t D, int64_t He,
                            int64_t Hd, int64_t Z, int64_t C, bool error_mode, bool fp64,
                            at::IntArrayRef config, at::IntArrayRef limits) {
  return fp64 ? launch_info<double>(kind, B, K, D, He, Hd, Z, C, error_mode, limits_of(limits),
                                    config_of(config))
              : launch_info<float>(kind, B, K, D, He, Hd, Z, C, error_mode, limits_of(limits),
                                   config_of(config));
}

// Launch description without running: [ctas, threads, nbl, kc, smem_bytes, workspace_bytes,
// state_in_smem, grid_barriers, math].
std::vector<int64_t> pemu_describe(const std::string& kind, int64_t B, int64_t K, int64_t D,
                                   int64_t He, int64_t Hd, int64_t Z, int64_t C, bool error_mode,
                                   bool fp64, at::IntArrayRef config, at::IntArrayRef limits) {
  const LaunchInfo info =
      pemu_launch_info(kind, B, K, D, He, Hd, Z, C, error_mode, fp64, config, limits);
  return {info.config.ctas, info.config.threads, info.config.nbl, info.config.kc,
          info.smem_bytes, info.workspace_bytes, info.state_in_smem ? 1 : 0, info.grid_barriers,
          info.config.math};
}

// The stages of that launch, kStages rows of [k, rows, ld, passes, slices, splits, busy_warps]
// (persistent::StageSplit).
std::vector<int64_t> pemu_stages(const std::string& kind, int64_t B, int64_t K, int64_t D,
                                 int64_t He, int64_t Hd, int64_t Z, int64_t C, bool fp64,
                                 at::IntArrayRef config, at::IntArrayRef limits) {
  const LaunchInfo info =
      pemu_launch_info(kind, B, K, D, He, Hd, Z, C, false, fp64, config, limits);
  std::vector<int64_t> out;
  for (const StageSplit& s : info.stages)
    out.insert(out.end(), {s.k, s.rows, s.ld, s.passes, s.slices, s.splits, s.busy_warps});
  return out;
}

template <typename T>
bool supports_as(const std::string& kind, int64_t B, int64_t K, int64_t D, int64_t He,
                 int64_t Hd, int64_t Z, int64_t num_sms, int64_t smem_optin, int64_t math) {
  Config config;
  config.math = as_int(math);
  if (kind == "backward") {
    return supports(sized<BackwardParams<T>>(B, K, D, He, Hd, Z), as_int(num_sms), smem_optin, config);
  }
  auto p = sized<LoopParams<T>>(B, K, D, He, Hd, Z);
  p.encoder = kind == "forward";
  return supports(p, as_int(num_sms), smem_optin, config);
}

bool pemu_supports(const std::string& kind, int64_t B, int64_t K, int64_t D, int64_t He,
                   int64_t Hd, int64_t Z, bool fp64, int64_t num_sms, int64_t smem_optin,
                   int64_t math) {
  return fp64 ? supports_as<double>(kind, B, K, D, He, Hd, Z, num_sms, smem_optin, math)
              : supports_as<float>(kind, B, K, D, He, Hd, Z, num_sms, smem_optin, math);
}

}  // namespace
}  // namespace persistent
}  // namespace avme

TORCH_LIBRARY(avme_pemu, m) {
  m.def(
      "forward(Tensor x, Tensor eps, Tensor enc_static, Tensor enc_wT, Tensor q_wT, Tensor q_b, "
      "Tensor dec_static, Tensor dec_wT, Tensor write_wT, Tensor write_b, bool error_mode, "
      "bool return_canvases, bool save, int[] config, int[] limits) -> Tensor[]");
  m.def(
      "sample(Tensor z, Tensor dec_static, Tensor dec_wT, Tensor write_wT, Tensor write_b, "
      "bool return_canvases, int[] config, int[] limits) -> Tensor[]");
  m.def(
      "backward(Tensor? grad_canvas, Tensor? grad_canvases, Tensor? grad_mu, "
      "Tensor? grad_logvar, Tensor eps, Tensor logvar, Tensor canvases, Tensor c_enc, "
      "Tensor gates_enc, Tensor c_dec, Tensor gates_dec, Tensor enc_w_ih, Tensor enc_w_hh, "
      "Tensor q_w, Tensor dec_w_ih, Tensor dec_w_hh, Tensor write_w, bool error_mode, "
      "int[] config, int[] limits) -> Tensor[]");
  m.def(
      "describe(str kind, int B, int K, int D, int He, int Hd, int Z, int C, bool error_mode, "
      "bool fp64, int[] config, int[] limits) -> int[]",
      &avme::persistent::pemu_describe);
  m.def(
      "stages(str kind, int B, int K, int D, int He, int Hd, int Z, int C, bool fp64, int[] config, "
      "int[] limits) -> int[]",
      &avme::persistent::pemu_stages);
  m.def(
      "supports(str kind, int B, int K, int D, int He, int Hd, int Z, bool fp64, int num_sms, "
      "int smem_optin, int math=0) -> bool",
      &avme::persistent::pemu_supports);
}

TORCH_LIBRARY_IMPL(avme_pemu, CPU, m) {
  m.impl("forward", &avme::persistent::pemu_forward);
  m.impl("sample", &avme::persistent::pemu_sample);
  m.impl("backward", &avme::persistent::pemu_backward);
}
