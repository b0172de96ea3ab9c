// Test-only: tensor access and params binding shared by the design harnesses (persistent_emulation.cpp,
// stagewise_emulation.cpp), which hand the tensors behind LoopParams / BackwardParams to a
// design's launchers on the CPU emulator.
#pragma once

#include <limits>
#include <optional>
#include <type_traits>

#include <ATen/ATen.h>

#include "avme.h"

namespace avme {
namespace emulation {

using OptTensor = std::optional<at::Tensor>;

// Checks one tensor behind a params pointer (dtype, CPU, contiguity, shape) and returns its data.
template <typename T>
T* data_of(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == c10::CppTypeToScalarType<T>::value, "emulator harness: ", name,
              " has dtype ", t.scalar_type(), ", expected ", c10::CppTypeToScalarType<T>::value);
  TORCH_CHECK(t.device().is_cpu(), "emulator harness: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), "emulator harness: ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == shape, "emulator harness: ", name, " must have shape ", shape, ", got ",
              t.sizes());
  return t.data_ptr<T>();
}

// An absent optional tensor is a null pointer (an output not written, an input not used).
template <typename T>
T* data_of(const OptTensor& t, const char* name, at::IntArrayRef shape) {
  return (t.has_value() && t->defined()) ? data_of<T>(*t, name, shape) : nullptr;
}

inline bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// An output allocated NaN-filled, so an element the kernels never write shows.
inline at::Tensor nan_tensor(at::IntArrayRef shape, const at::Tensor& like) {
  return at::full(shape, std::numeric_limits<double>::quiet_NaN(), like.options());
}

// The inputs of LoopParams (sizes already set in p), each checked against its layout in avme.h;
// an absent tensor is a null pointer (the encoder's inputs for the sampler, z_in for the encoder,
// the (in, out) weights for the stagewise design, which reads bind_nn_weights' instead).
// dec_static is (B, 4Hd) per row or (4Hd) shared by every row.
template <typename T>
void bind_loop_inputs(LoopParams<T>& p, const OptTensor& x, const OptTensor& eps, const OptTensor& z_in,
                      const OptTensor& enc_static, const OptTensor& enc_wT, const OptTensor& q_wT,
                      const OptTensor& q_b, const at::Tensor& dec_static, const OptTensor& dec_wT,
                      const OptTensor& write_wT, const at::Tensor& write_b) {
  const int64_t B = p.B, K = p.K, D = p.D, He = p.He, Hd = p.Hd, Z = p.Z;
  p.x = data_of<T>(x, "x", {B, D});
  p.eps = data_of<T>(eps, "eps", {K, B, Z});
  p.z_in = data_of<T>(z_in, "z_in", {K, B, Z});
  p.enc_static = data_of<T>(enc_static, "enc_static", {B, 4 * He});
  p.enc_wT = data_of<T>(enc_wT, "enc_wT", {D + Hd + He, 4 * He});
  p.q_wT = data_of<T>(q_wT, "q_wT", {He, 2 * Z});
  p.q_b = data_of<T>(q_b, "q_b", {2 * Z});
  const bool per_row = dec_static.dim() == 2;
  p.dec_static = per_row ? data_of<T>(dec_static, "dec_static", {B, 4 * Hd})
                         : data_of<T>(dec_static, "dec_static", {4 * Hd});
  p.dec_static_stride = per_row ? 4 * Hd : 0;
  p.dec_wT = data_of<T>(dec_wT, "dec_wT", {Z + Hd, 4 * Hd});
  p.write_wT = data_of<T>(write_wT, "write_wT", {Hd, D});
  p.write_b = data_of<T>(write_b, "write_b", {D});
}

// The weights in their nn.LSTMCell / nn.Linear layouts (LoopParams for the stagewise design, and
// BackwardParams; sizes and C already set in p), each checked against its layout; the encoder's
// are absent for the sampler.
template <typename Params>
void bind_nn_weights(Params& p, const OptTensor& enc_w_ih, const OptTensor& enc_w_hh,
                     const OptTensor& q_w, const at::Tensor& dec_w_ih, const at::Tensor& dec_w_hh,
                     const at::Tensor& write_w) {
  using T = std::remove_const_t<std::remove_pointer_t<decltype(p.write_w)>>;
  const int64_t D = p.D, He = p.He, Hd = p.Hd, Z = p.Z, C = p.C;
  p.enc_w_ih = data_of<T>(enc_w_ih, "enc_w_ih", {4 * He, 2 * D + Hd + C});
  p.enc_w_hh = data_of<T>(enc_w_hh, "enc_w_hh", {4 * He, He});
  p.q_w = data_of<T>(q_w, "q_w", {2 * Z, He});
  p.dec_w_ih = data_of<T>(dec_w_ih, "dec_w_ih", {4 * Hd, Z + C});
  p.dec_w_hh = data_of<T>(dec_w_hh, "dec_w_hh", {4 * Hd, Hd});
  p.write_w = data_of<T>(write_w, "write_w", {D, Hd});
}

// The inputs of BackwardParams (sizes and C already set in p), each checked against its layout.
template <typename T>
void bind_backward_inputs(BackwardParams<T>& p, const OptTensor& grad_canvas, const OptTensor& grad_canvases,
                          const OptTensor& grad_mu, const OptTensor& grad_logvar, const at::Tensor& eps,
                          const at::Tensor& logvar, const OptTensor& canvases, const at::Tensor& c_enc,
                          const at::Tensor& gates_enc, const at::Tensor& c_dec, const at::Tensor& gates_dec,
                          const at::Tensor& enc_w_ih, const at::Tensor& enc_w_hh, const at::Tensor& q_w,
                          const at::Tensor& dec_w_ih, const at::Tensor& dec_w_hh, const at::Tensor& write_w) {
  const int64_t B = p.B, K = p.K, D = p.D, He = p.He, Hd = p.Hd, Z = p.Z;
  p.grad_canvas = data_of<T>(grad_canvas, "grad_canvas", {B, D});
  p.grad_canvases = data_of<T>(grad_canvases, "grad_canvases", {K, B, D});
  p.grad_mu = data_of<T>(grad_mu, "grad_mu", {K, B, Z});
  p.grad_logvar = data_of<T>(grad_logvar, "grad_logvar", {K, B, Z});
  p.eps = data_of<T>(eps, "eps", {K, B, Z});
  p.logvar = data_of<T>(logvar, "logvar", {K, B, Z});
  p.canvases = data_of<T>(canvases, "canvases", {K, B, D});
  p.c_enc = data_of<T>(c_enc, "c_enc", {K, B, He});
  p.gates_enc = data_of<T>(gates_enc, "gates_enc", {K, B, 4 * He});
  p.c_dec = data_of<T>(c_dec, "c_dec", {K, B, Hd});
  p.gates_dec = data_of<T>(gates_dec, "gates_dec", {K, B, 4 * Hd});
  bind_nn_weights(p, enc_w_ih, enc_w_hh, q_w, dec_w_ih, dec_w_hh, write_w);
}

}  // namespace emulation
}  // namespace avme
