// Test-only CPU build of the stagewise design (torch.ops.avme_swemu.*): the real host code and
// pointwise kernels of csrc/stagewise/ compiled as C++, the kernels run by the thread-per-CUDA-
// thread emulator (cuda_emulation.h), the GEMMs by ATen on the CPU. The ops take exactly the
// tensors behind LoopParams / BackwardParams (the test prepares them as csrc/avme_ops.cpp does)
// and write into caller-provided outputs (None = nullptr = not written). Built on demand by
// tests/ops/test_stagewise_kernels.py (torch.utils.cpp_extension.load); never part of the package.
#define AVME_CPU_EMULATION 1
#include "emulation/harness.h"
#include "../stagewise/pointwise_kernels.cu"
#include "../stagewise/host.cpp"
#include "../stagewise/forward.cpp"
#include "../stagewise/backward.cpp"

#include <optional>
#include <string>

#include <ATen/Dispatch.h>
#include <torch/library.h>

namespace avme {
namespace stagewise {
namespace {

using at::Tensor;
using emulation::OptTensor;

using emulation::bind_backward_inputs;
using emulation::bind_loop_inputs;
using emulation::bind_nn_weights;
using emulation::data_of;
using emulation::nan_tensor;
using emulation::present;

void swemu_forward(const OptTensor& x, const OptTensor& eps, const OptTensor& z_in,
                   const OptTensor& enc_static, const OptTensor& enc_w_ih,
                   const OptTensor& enc_w_hh, const OptTensor& q_w, const OptTensor& q_b,
                   const Tensor& dec_static, const Tensor& dec_w_ih, const Tensor& dec_w_hh,
                   const Tensor& write_w, const Tensor& write_b, bool error_mode,
                   const std::string& precision, const OptTensor& canvas,
                   const OptTensor& canvases, const OptTensor& mu, const OptTensor& logvar,
                   const OptTensor& h_enc, const OptTensor& c_enc, const OptTensor& gates_enc,
                   const OptTensor& z, const OptTensor& h_dec, const OptTensor& c_dec,
                   const OptTensor& gates_dec) {
  const bool encoder = !present(z_in);
  const OptTensor& noise = encoder ? eps : z_in;
  TORCH_CHECK(present(noise) && noise->dim() == 3,
              "avme_swemu.forward: eps (encoder) or z_in (sampler) must be given as (K, B, Z)");
  TORCH_CHECK(write_w.dim() == 2 && dec_w_ih.dim() == 2,
              "avme_swemu.forward: write_w must be (D, Hd) and dec_w_ih (4Hd, Z + C)");
  const int64_t K = noise->size(0), B = noise->size(1), Z = noise->size(2);
  const int64_t D = write_w.size(0), Hd = write_w.size(1), C = dec_w_ih.size(1) - Z;
  // He from q_w (2Z, He) or enc_static (B, 4He); a missing one is then reported by the design.
  const int64_t He = !encoder             ? 0
                     : present(q_w)        ? q_w->size(1)
                     : present(enc_static) ? enc_static->size(1) / 4
                                           : 0;
  AT_DISPATCH_FLOATING_TYPES(dec_w_ih.scalar_type(), "avme_swemu_forward", [&] {
    using T = scalar_t;
    auto p = params_with_sizes<LoopParams<T>>(B, static_cast<int>(K), static_cast<int>(D),
                                              static_cast<int>(He), static_cast<int>(Hd),
                                              static_cast<int>(Z), error_mode);
    p.encoder = encoder;
    p.C = static_cast<int>(C);
    bind_loop_inputs(p, x, eps, z_in, enc_static, std::nullopt, std::nullopt, q_b, dec_static,
                     std::nullopt, std::nullopt, write_b);
    bind_nn_weights(p, enc_w_ih, enc_w_hh, q_w, dec_w_ih, dec_w_hh, write_w);
    p.canvas = data_of<T>(canvas, "canvas", {B, D});
    p.canvases = data_of<T>(canvases, "canvases", {K, B, D});
    p.mu = data_of<T>(mu, "mu", {K, B, Z});
    p.logvar = data_of<T>(logvar, "logvar", {K, B, Z});
    p.h_enc = data_of<T>(h_enc, "h_enc", {K, B, He});
    p.c_enc = data_of<T>(c_enc, "c_enc", {K, B, He});
    p.gates_enc = data_of<T>(gates_enc, "gates_enc", {K, B, 4 * He});
    p.z_out = data_of<T>(z, "z", {K, B, Z});
    p.h_dec = data_of<T>(h_dec, "h_dec", {K, B, Hd});
    p.c_dec = data_of<T>(c_dec, "c_dec", {K, B, Hd});
    p.gates_dec = data_of<T>(gates_dec, "gates_dec", {K, B, 4 * Hd});
    forward<T>(p, parse_gemm_precision(precision), nullptr);
  });
}

void swemu_backward(const OptTensor& grad_canvas, const OptTensor& grad_canvases,
                    const OptTensor& grad_mu, const OptTensor& grad_logvar, const Tensor& eps,
                    const Tensor& logvar, const OptTensor& canvases, const Tensor& c_enc,
                    const Tensor& gates_enc, const Tensor& c_dec, const Tensor& gates_dec,
                    const Tensor& enc_w_ih, const Tensor& enc_w_hh, const Tensor& q_w,
                    const Tensor& dec_w_ih, const Tensor& dec_w_hh, const Tensor& write_w,
                    bool error_mode, const std::string& precision, const Tensor& d_canvas,
                    const Tensor& d_q, const Tensor& d_gates_enc, const Tensor& d_gates_dec) {
  TORCH_CHECK(eps.dim() == 3 && write_w.dim() == 2 && enc_w_hh.dim() == 2 && dec_w_hh.dim() == 2 &&
                  dec_w_ih.dim() == 2,
              "avme_swemu.backward: eps must be (K, B, Z) and the weights 2-D");
  const int64_t K = eps.size(0), B = eps.size(1), Z = eps.size(2);
  const int64_t D = write_w.size(0), Hd = dec_w_hh.size(1), He = enc_w_hh.size(1);
  const int64_t C = dec_w_ih.size(1) - Z;
  AT_DISPATCH_FLOATING_TYPES(eps.scalar_type(), "avme_swemu_backward", [&] {
    using T = scalar_t;
    auto p = params_with_sizes<BackwardParams<T>>(B, static_cast<int>(K), static_cast<int>(D),
                                                  static_cast<int>(He), static_cast<int>(Hd),
                                                  static_cast<int>(Z), error_mode);
    p.C = static_cast<int>(C);
    bind_backward_inputs(p, grad_canvas, grad_canvases, grad_mu, grad_logvar, eps, logvar, canvases, c_enc,
                         gates_enc, c_dec, gates_dec, enc_w_ih, enc_w_hh, q_w, dec_w_ih, dec_w_hh, write_w);
    p.d_canvas = data_of<T>(d_canvas, "d_canvas", {K, B, D});
    p.d_q = data_of<T>(d_q, "d_q", {K, B, 2 * Z});
    p.d_gates_enc = data_of<T>(d_gates_enc, "d_gates_enc", {K, B, 4 * He});
    p.d_gates_dec = data_of<T>(d_gates_dec, "d_gates_dec", {K, B, 4 * Hd});
    backward<T>(p, parse_gemm_precision(precision), nullptr);
  });
}

}  // namespace
}  // namespace stagewise
}  // namespace avme

TORCH_LIBRARY(avme_swemu, m) {
  m.def(
      "forward(Tensor? x, Tensor? eps, Tensor? z_in, Tensor? enc_static, Tensor? enc_w_ih, "
      "Tensor? enc_w_hh, Tensor? q_w, Tensor? q_b, Tensor dec_static, Tensor dec_w_ih, "
      "Tensor dec_w_hh, Tensor write_w, Tensor write_b, bool error_mode, str precision, "
      "Tensor(a!)? canvas, "
      "Tensor(b!)? canvases, Tensor(c!)? mu, Tensor(d!)? logvar, Tensor(e!)? h_enc, "
      "Tensor(f!)? c_enc, Tensor(g!)? gates_enc, Tensor(h!)? z, Tensor(i!)? h_dec, "
      "Tensor(j!)? c_dec, Tensor(k!)? gates_dec) -> ()");
  m.def(
      "backward(Tensor? grad_canvas, Tensor? grad_canvases, Tensor? grad_mu, "
      "Tensor? grad_logvar, Tensor eps, Tensor logvar, Tensor? canvases, Tensor c_enc, "
      "Tensor gates_enc, Tensor c_dec, Tensor gates_dec, Tensor enc_w_ih, Tensor enc_w_hh, "
      "Tensor q_w, Tensor dec_w_ih, Tensor dec_w_hh, Tensor write_w, bool error_mode, "
      "str precision, Tensor(a!) d_canvas, Tensor(b!) d_q, Tensor(c!) d_gates_enc, "
      "Tensor(d!) d_gates_dec) -> ()");
}

TORCH_LIBRARY_FRAGMENT(avme_swemu, m) {
  m.def("kernel_launches() -> int", [] { return avme::emu::launch_count.load(); });
}

TORCH_LIBRARY_IMPL(avme_swemu, CPU, m) {
  m.impl("forward", &avme::stagewise::swemu_forward);
  m.impl("backward", &avme::stagewise::swemu_backward);
}
