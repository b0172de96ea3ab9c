// Pointwise kernels of the "stagewise" design (csrc/stagewise/stagewise.h): the element-wise
// work between the per-stage GEMMs, one launch per stage and step.
//
// Every kernel is elementwise over a (B, N) index space, N = Args::width() (one thread per
// element, grid-stride loop) and reads/writes plain row-major matrices. A matrix may be a
// column slot of a wider buffer (a Slot: element (b, n) at data[b * ld + n]); that is how the
// GEMM-operand buffers E_in = [r | h_dec | h_enc] and D_in = [z | h_dec] are filled in place.
//
// Type parameters: T is the state/output type (float or double): every value is computed in T.
// A is the type of the GEMM-operand copies the kernels write (T, or c10::BFloat16 when the GEMMs
// take bfloat16 operands); a T value v is stored there as A(v) (round to nearest even for bf16).
// A nullptr (or a Slot with data == nullptr) input reads as zero; a nullptr output is not written.
#pragma once

#include <cstdint>

#include "avme.h"

namespace avme {
namespace stagewise {

// Column slot of a row-major buffer: element (b, n) at data[b * ld + n].
template <typename U>
struct Slot {
  U* data = nullptr;
  int64_t ld = 0;
};

// Forward LSTM cell (nn.LSTMCell, gates [i | f | g | o]):
//   pre-activation = pre + bias;  c = f * c_prev + i * g;  h = o * tanh(c).
template <typename T, typename A>
struct LstmForwardArgs {
  int64_t B = 0;
  int H = 0;
  const T* pre = nullptr;    // (B, 4H) GEMM output, contiguous; nullptr: zero (no GEMM ran)
  const T* bias = nullptr;   // (B, 4H) rows, row stride bias_ld (0: one row for every b)
  int64_t bias_ld = 0;
  const T* c_prev = nullptr; // (B, H); nullptr: zero (first step)
  T* c_out = nullptr;        // (B, H); may be c_prev (in place)
  Slot<A> h_out[2];          // GEMM-operand copies of h (E_in / D_in slots)
  T* h_saved = nullptr;      // (B, H)
  T* gates_saved = nullptr;  // (B, 4H) activated gates
  int64_t width() const { return H; }
};

// Posterior sample: mu = q[:, :Z] + q_b[:Z], logvar = q[:, Z:] + q_b[Z:],
// z = mu + exp(logvar / 2) * eps.
template <typename T, typename A>
struct ReparamArgs {
  int64_t B = 0;
  int Z = 0;
  const T* q = nullptr;    // (B, 2Z) GEMM output, contiguous
  const T* q_b = nullptr;  // (2Z)
  const T* eps = nullptr;  // (B, Z)
  T* mu = nullptr;         // (B, Z)
  T* logvar = nullptr;     // (B, Z)
  T* z_saved = nullptr;    // (B, Z)
  Slot<A> z_out;           // D_in's z slot
  int64_t width() const { return Z; }
};

// Canvas update and next encoder input: s = s_prev + delta + bias;
// r = s ("canvas") or x - sigmoid(s) ("error").
template <typename T, typename A>
struct CanvasArgs {
  int64_t B = 0;
  int D = 0;
  const T* s_prev = nullptr;  // (B, D)
  const T* delta = nullptr;   // (B, D) write GEMM output
  const T* bias = nullptr;    // (D)
  T* s_out = nullptr;         // (B, D); may be s_prev (in place)
  T* s_out2 = nullptr;        // (B, D) second copy (the final canvas)
  bool error_mode = false;
  const T* x = nullptr;       // (B, D), error mode
  Slot<A> r_out;              // E_in's r slot
  int64_t width() const { return D; }
};

// Gradient of the canvas s_t: g = g_next + grad_extra + (canvas: dr; error: -sigmoid'(s) dr),
// where dr = dL/dr_{t+1} (r_{t+1} = s_t or x - sigmoid(s_t)).
template <typename T, typename A>
struct CanvasGradArgs {
  int64_t B = 0;
  int D = 0;
  const T* g_next = nullptr;      // (B, D) dL/ds_{t+1} total (or the final canvas' gradient)
  const T* grad_extra = nullptr;  // (B, D) gradient of the output canvases[t]
  Slot<const T> dr;               // (B, D) slot of the encoder's input-gradient GEMM output
  bool error_mode = false;
  const T* s = nullptr;           // (B, D) s_t (error mode with dr)
  T* g_out = nullptr;             // (B, D)
  Slot<A> g_copy;                 // GEMM-operand copy of g
  int64_t width() const { return D; }
};

// Backward LSTM cell from the saved activated gates and cell states:
//   dh = sum of dh_in slots; dc = dh o (1 - tanh^2 c) + dc_carry; gate pre-activation
//   gradients [di | df | dg | do]; dc_carry <- dc * f (the carry into step t-1).
template <typename T, typename A>
struct LstmBackwardArgs {
  int64_t B = 0;
  int H = 0;
  Slot<const T> dh_in[3];     // summed into dh
  const T* gates = nullptr;   // (B, 4H) activated gates of this step
  const T* c = nullptr;       // (B, H) cell state of this step
  const T* c_prev = nullptr;  // (B, H) previous cell state; nullptr: zero (first step)
  T* dc_carry = nullptr;      // (B, H) in: dL/dc_t from step t+1; out: dL/dc_{t-1}
  T* d_gates = nullptr;       // (B, 4H)
  Slot<A> d_gates_copy;       // GEMM-operand copy of d_gates
  int64_t width() const { return H; }
};

// Reparameterisation backward: d_q = [grad_mu + dz, grad_logvar + dz * eps * exp(logvar/2) / 2],
// and grad_eps = dz * exp(logvar/2).
template <typename T, typename A>
struct ReparamBackwardArgs {
  int64_t B = 0;
  int Z = 0;
  Slot<const T> dz;                // (B, Z) slot of the decoder's input-gradient GEMM output
  const T* eps = nullptr;          // (B, Z)
  const T* logvar = nullptr;       // (B, Z)
  const T* grad_mu = nullptr;      // (B, Z)
  const T* grad_logvar = nullptr;  // (B, Z)
  T* d_q = nullptr;                // (B, 2Z)
  Slot<A> d_q_copy;                // GEMM-operand copy of d_q
  T* grad_eps = nullptr;           // (B, Z) dL/deps
  int64_t width() const { return Z; }
};

// Launches the pointwise kernel of `args` (any of the argument structs above) over its
// (B, width()) index space on `stream`: no allocation, no synchronisation (CUDA-graph
// capturable). Instantiated for (T, A) = (float, float), (float, c10::BFloat16), (double, double).
template <typename Args>
void launch(const Args& args, cudaStream_t stream);

}  // namespace stagewise
}  // namespace avme
