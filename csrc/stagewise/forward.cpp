// Stagewise forward and sampler: the step loop of csrc/stagewise/stagewise.h.

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include "stagewise/host.h"

namespace avme {
namespace stagewise {
namespace {

// Persistent buffers and GEMM weights of one forward call (allocated before the loop).
template <typename T>
struct ForwardWorkspace {
  GemmWeights w;          // packed / cast weights, (out, in) layout: the GEMMs take w.*.t()
  Tensor e_in, d_in;      // (B, We), (B, Wd) operand type; padding columns zero
  Tensor gates;           // (B, 4 max(He, Hd)) GEMM output
  Tensor q;               // (B, 2Z) GEMM output
  Tensor delta;           // (B, D) write GEMM output
  Tensor c_enc, c_dec;    // (B, H) cell states when the caller does not save them
  Tensor canvas_state;    // (B, D) when the caller wants neither canvas nor canvases

  ForwardWorkspace(const LoopParams<T>& p, const CallContext& ctx) : w(p, p.encoder, ctx) {
    const int64_t B = p.B, D = p.D, He = p.He, Hd = p.Hd, Z = p.Z;
    // Every slot is written before a GEMM reads it (the step-0 GEMMs read only the slots that
    // step 0 writes): only the padding columns need a value.
    d_in = detail::uninitialized({B, w.dec_cols.total()}, ctx.operand());
    detail::zero_padding(d_in, w.dec_cols);
    gates = detail::uninitialized({B, 4 * std::max(He, Hd)}, ctx.state());
    delta = detail::uninitialized({B, D}, ctx.state());
    if (p.c_dec == nullptr) c_dec = detail::uninitialized({B, Hd}, ctx.state());
    if (p.canvas == nullptr && p.canvases == nullptr) {
      canvas_state = detail::uninitialized({B, D}, ctx.state());
    }
    if (!p.encoder) return;
    e_in = detail::uninitialized({B, w.enc_cols.total()}, ctx.operand());
    detail::zero_padding(e_in, w.enc_cols);
    q = detail::uninitialized({B, 2 * Z}, ctx.state());
    if (p.c_enc == nullptr) c_enc = detail::uninitialized({B, He}, ctx.state());
  }

  // (B, 4H) view of the gates buffer.
  Tensor gates_for(int64_t H, int64_t B) const {
    return gates.view({-1}).narrow(0, 0, B * 4 * H).view({B, 4 * H});
  }
};

// (prev, out) cell-state pointers of step t: through the saved (K, B, H) states when the caller
// saves them (no extra copy), else in place in a (B, H) buffer.
template <typename T>
std::pair<const T*, T*> cell_state(T* saved, const Tensor& buffer, int t, int64_t BH) {
  if (saved != nullptr) return {t > 0 ? saved + (t - 1) * BH : nullptr, saved + t * BH};
  T* own = buffer.data_ptr<T>();
  return {t > 0 ? own : nullptr, own};
}

// The forward LSTM cell of step t over B rows of H units: pre-activations from `gates` plus
// `bias` (row stride bias_ld), cell state through cell_state(), h and activated gates saved
// when the caller saves them (the h_out slots are the caller's).
template <typename T, typename A>
LstmForwardArgs<T, A> lstm_forward_args(int64_t B, int H, int t, const Tensor& gates,
                                        const T* bias, int64_t bias_ld, T* c_saved,
                                        const Tensor& c_buffer, T* h_saved, T* gates_saved) {
  LstmForwardArgs<T, A> a;
  a.B = B;
  a.H = H;
  a.pre = gates.data_ptr<T>();
  a.bias = bias;
  a.bias_ld = bias_ld;
  std::tie(a.c_prev, a.c_out) = cell_state(c_saved, c_buffer, t, B * H);
  a.h_saved = detail::step_slice(h_saved, t, B * H);
  a.gates_saved = detail::step_slice(gates_saved, t, B * 4 * H);
  return a;
}

}  // namespace

namespace detail {

template <typename T>
void check_params(const LoopParams<T>& p) {
  TORCH_CHECK(p.B >= 0 && p.K >= 1 && p.D > 0 && p.Hd > 0 && p.Z > 0 && p.C >= 0 &&
                  (!p.encoder || p.He > 0),
              "avme::stagewise::forward: bad sizes B=", p.B, " K=", p.K, " D=", p.D, " He=", p.He,
              " Hd=", p.Hd, " Z=", p.Z, " C=", p.C);
  if (p.B == 0) return;  // nothing is read or written
  auto need = [](const void* ptr, const char* name) {
    TORCH_CHECK(ptr != nullptr, "avme::stagewise::forward: LoopParams.", name, " is null");
  };
  need(p.dec_static, "dec_static");
  need(p.dec_w_ih, "dec_w_ih");
  need(p.dec_w_hh, "dec_w_hh");
  need(p.write_w, "write_w");
  need(p.write_b, "write_b");
  if (p.encoder) {
    need(p.x, "x");
    need(p.eps, "eps");
    need(p.enc_static, "enc_static");
    need(p.enc_w_ih, "enc_w_ih");
    need(p.enc_w_hh, "enc_w_hh");
    need(p.q_w, "q_w");
    need(p.q_b, "q_b");
  } else {
    need(p.z_in, "z_in");
  }
}

template <typename T, typename A>
void run_steps(const LoopParams<T>& p, const CallContext& ctx, cudaStream_t stream) {
  const int64_t B = p.B, D = p.D, He = p.He, Hd = p.Hd, Z = p.Z;
  const int K = p.K;
  ForwardWorkspace<T> ws(p, ctx);
  const GemmWeights& w = ws.w;
  const Tensor enc_gates = p.encoder ? ws.gates_for(He, B) : Tensor();
  const Tensor dec_gates = ws.gates_for(Hd, B);
  const Tensor d_in_h = ws.d_in.narrow(1, w.dec_cols.offset(1), Hd);
  const Tensor e_in_h = p.encoder ? ws.e_in.narrow(1, w.enc_cols.offset(2), He) : Tensor();
  const Tensor d_in_z = ws.d_in.narrow(1, w.dec_cols.offset(0), Z);
  T* const canvas_state = p.canvas != nullptr ? p.canvas
                          : ws.canvas_state.defined() ? ws.canvas_state.template data_ptr<T>()
                                                     : nullptr;

  CanvasArgs<T, A> canvas_args;  // fields common to every step
  canvas_args.B = B;
  canvas_args.D = p.D;
  canvas_args.error_mode = p.error_mode;
  canvas_args.x = p.x;

  if (p.encoder && p.error_mode) {
    // r_1 = x - sigmoid(s_0) = x - 1/2 (in canvas mode r_1 = s_0 = 0).
    CanvasArgs<T, A> a = canvas_args;
    a.r_out = slot<A>(ws.e_in, w.enc_cols.offset(0));
    launch(a, stream);
  }

  for (int t = 0; t < K; ++t) {
    // At t = 0 the recurrent inputs h_dec_0 and h_enc_0 are zero, and so is r_1 in canvas mode:
    // the step-0 GEMMs multiply only the other slots (the encoder's then none: its
    // pre-activations are enc_static alone).
    if (p.encoder) {
      const int64_t enc_cols = t > 0 ? w.enc_cols.total() : (p.error_mode ? D : 0);
      if (enc_cols > 0) {
        gemm_out(enc_gates, ws.e_in.narrow(1, 0, enc_cols), w.enc.narrow(1, 0, enc_cols).t());
      }
      auto enc = lstm_forward_args<T, A>(B, p.He, t, enc_gates, p.enc_static, 4 * He, p.c_enc,
                                         ws.c_enc, p.h_enc, p.gates_enc);
      if (enc_cols == 0) enc.pre = nullptr;
      enc.h_out[0] = slot<A>(ws.e_in, w.enc_cols.offset(2));
      launch(enc, stream);

      gemm_out(ws.q, e_in_h, w.q.t());
      ReparamArgs<T, A> rep;
      rep.B = B;
      rep.Z = p.Z;
      rep.q = ws.q.template data_ptr<T>();
      rep.q_b = p.q_b;
      rep.eps = p.eps + t * B * Z;
      rep.mu = detail::step_slice(p.mu, t, B * Z);
      rep.logvar = detail::step_slice(p.logvar, t, B * Z);
      rep.z_saved = detail::step_slice(p.z_out, t, B * Z);
      rep.z_out = slot<A>(ws.d_in, w.dec_cols.offset(0));
      launch(rep, stream);
    } else {
      d_in_z.copy_(detail::wrap(p.z_in + t * B * Z, {B, Z}, ctx.state_type, ctx));
    }

    const int64_t dec_cols = t > 0 ? w.dec_cols.total() : Z;
    gemm_out(dec_gates, ws.d_in.narrow(1, 0, dec_cols), w.dec.narrow(1, 0, dec_cols).t());
    auto dec = lstm_forward_args<T, A>(B, p.Hd, t, dec_gates, p.dec_static, p.dec_static_stride,
                                       p.c_dec, ws.c_dec, p.h_dec, p.gates_dec);
    dec.h_out[0] = slot<A>(ws.d_in, w.dec_cols.offset(1));
    if (p.encoder) dec.h_out[1] = slot<A>(ws.e_in, w.enc_cols.offset(1));
    launch(dec, stream);

    gemm_out(ws.delta, d_in_h, w.write.t());
    CanvasArgs<T, A> can = canvas_args;
    can.delta = ws.delta.template data_ptr<T>();
    can.bias = p.write_b;
    if (p.canvases != nullptr) {  // the state lives in canvases[t]
      can.s_prev = t > 0 ? p.canvases + (t - 1) * B * D : nullptr;
      can.s_out = p.canvases + t * B * D;
      can.s_out2 = t == K - 1 ? p.canvas : nullptr;
    } else {
      can.s_prev = t > 0 ? canvas_state : nullptr;
      can.s_out = canvas_state;
    }
    if (p.encoder && t < K - 1) can.r_out = slot<A>(ws.e_in, w.enc_cols.offset(0));
    launch(can, stream);
  }
}

AVME_SW_INSTANTIATE_STEPS(LoopParams)

}  // namespace detail
}  // namespace stagewise
}  // namespace avme
