// Scalar per-unit math of the model's cells, shared by every kernel design (float and double):
// the LSTM cell forward and backward (nn.LSTMCell, gate order i, f, g, o), the store of a unit's
// four gate values, and the reparameterised sample z = mu + exp(logvar / 2) * eps with its
// logvar and eps gradients.
#pragma once

#include <cstdint>

#include "common/device_math.cuh"

namespace avme {

// LSTM cell forward from the four gate pre-activations and the previous cell state:
// activated gates (ig, fg, gg, og), new cell state c and hidden state h.
template <typename T>
__device__ __forceinline__ void lstm_cell_forward(T pre_i, T pre_f, T pre_g, T pre_o, T c_prev,
                                                  T& ig, T& fg, T& gg, T& og, T& c, T& h) {
  ig = dsigmoid(pre_i);
  fg = dsigmoid(pre_f);
  gg = dtanh(pre_g);
  og = dsigmoid(pre_o);
  c = fg * c_prev + ig * gg;
  h = og * dtanh(c);
}

// LSTM cell backward. dh: gradient reaching h_t; dc_carry: gradient reaching c_t from step t+1;
// ig..og: the saved activated gates; c, c_prev: c_t and c_{t-1}. Outputs the gradients of the
// four gate pre-activations and dc_prev, the gradient carried to c_{t-1}.
template <typename T>
__device__ __forceinline__ void lstm_cell_backward(T dh, T dc_carry, T ig, T fg, T gg, T og, T c,
                                                   T c_prev, T& di, T& df, T& dg, T& d_o,
                                                   T& dc_prev) {
  const T tc = dtanh(c);
  const T dc = dh * og * (T(1) - tc * tc) + dc_carry;
  di = dc * gg * ig * (T(1) - ig);
  df = dc * c_prev * fg * (T(1) - fg);
  dg = dc * ig * (T(1) - gg * gg);
  d_o = dh * tc * og * (T(1) - og);
  dc_prev = dc * fg;
}

// Stores one LSTM unit's four per-gate values (activations or gradients, gate order i, f, g, o)
// at at[0], at[gate_stride], at[2 gate_stride], at[3 gate_stride]: for unit j of a row of 4H
// gate columns, at = row + j and gate_stride = H; for a feature-major (4H, bp) array, at =
// array + j * bp + b and gate_stride = H * bp.
template <typename T>
__device__ __forceinline__ void store_gates(T* at, int64_t gate_stride, T i, T f, T g, T o) {
  at[0] = i;
  at[gate_stride] = f;
  at[2 * gate_stride] = g;
  at[3 * gate_stride] = o;
}

// z = mu + exp(logvar / 2) * eps.
template <typename T>
__device__ __forceinline__ T reparam_sample(T mu, T logvar, T eps) {
  return mu + dexp(T(0.5) * logvar) * eps;
}

// The part of dL/dlogvar that flows through z: dz * eps * exp(logvar / 2) / 2.
template <typename T>
__device__ __forceinline__ T reparam_logvar_grad(T dz, T eps, T logvar) {
  return dz * eps * T(0.5) * dexp(T(0.5) * logvar);
}

// dL/deps = dz * exp(logvar / 2).
template <typename T>
__device__ __forceinline__ T reparam_eps_grad(T dz, T logvar) {
  return dz * dexp(T(0.5) * logvar);
}

}  // namespace avme
