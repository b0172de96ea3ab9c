// Stagewise backward through time: the reverse step loop of csrc/stagewise/stagewise.h.

#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include "stagewise/host.h"

namespace avme {
namespace stagewise {
namespace {

// GEMM-operand copy of a per-step gradient: bf16 buffer written by the pointwise kernel, or the
// (B, N) step slice of the fp32 output itself.
template <typename T, typename A>
struct OperandCopy {
  Tensor buffer;  // (B, N) operand type, only when the operands are cast

  OperandCopy(int64_t B, int64_t N, const CallContext& ctx) {
    if (ctx.casts_operands()) buffer = detail::uninitialized({B, N}, ctx.operand());
  }
  Slot<A> target() const { return buffer.defined() ? slot<A>(buffer, 0) : Slot<A>{}; }
  Tensor operand(const T* step_output, int64_t B, int64_t N, const CallContext& ctx) const {
    return buffer.defined() ? buffer : detail::wrap(step_output, {B, N}, ctx.state_type, ctx);
  }
};

// Persistent buffers and GEMM weights of one backward call (allocated before the loop).
template <typename T, typename A>
struct BackwardWorkspace {
  GemmWeights w;          // packed / cast weights, (out, in) layout
  Tensor enc_in_grad;     // (B, We) = d_gates_enc[t] @ w.enc: [dr | dh_dec | dh_enc]
  Tensor dec_in_grad;     // (B, Wd) = d_gates_dec[t] @ w.dec: [dz | dh_dec]
  Tensor dh_dec_write;    // (B, Hd) = d_canvas[t] @ w.write
  Tensor dh_enc_q;        // (B, He) = d_q[t] @ w.q
  Tensor dc_enc, dc_dec;  // (B, H) carried cell gradients, start at zero
  OperandCopy<T, A> g, dgd, dq, dge;

  BackwardWorkspace(const BackwardParams<T>& p, const CallContext& ctx)
      : w(p, true, ctx),
        g(p.B, p.D, ctx),
        dgd(p.B, 4 * int64_t(p.Hd), ctx),
        dq(p.B, 2 * int64_t(p.Z), ctx),
        dge(p.B, 4 * int64_t(p.He), ctx) {
    const int64_t B = p.B, He = p.He, Hd = p.Hd;
    enc_in_grad = detail::uninitialized({B, w.enc_cols.total()}, ctx.state());
    dec_in_grad = detail::uninitialized({B, w.dec_cols.total()}, ctx.state());
    dh_dec_write = detail::uninitialized({B, Hd}, ctx.state());
    dh_enc_q = detail::uninitialized({B, He}, ctx.state());
    dc_enc = at::zeros({B, He}, ctx.state());
    dc_dec = at::zeros({B, Hd}, ctx.state());
  }
};
// The backward LSTM cell of step t over B rows of H units, from the saved activated gates and
// cell states (K, B, 4H) / (K, B, H); dc carried in place in `dc_carry`; the dh_in slots are
// the caller's.
template <typename T, typename A>
LstmBackwardArgs<T, A> lstm_backward_args(int64_t B, int H, int t, const T* gates, const T* c,
                                          const Tensor& dc_carry, T* d_gates,
                                          Slot<A> d_gates_copy) {
  LstmBackwardArgs<T, A> a;
  a.B = B;
  a.H = H;
  a.gates = gates + t * B * 4 * H;
  a.c = c + t * B * H;
  a.c_prev = t > 0 ? c + (t - 1) * B * H : nullptr;
  a.dc_carry = dc_carry.data_ptr<T>();
  a.d_gates = d_gates;
  a.d_gates_copy = d_gates_copy;
  return a;
}

}  // namespace

namespace detail {

template <typename T>
void check_params(const BackwardParams<T>& p) {
  TORCH_CHECK(p.B >= 0 && p.K >= 1 && p.D > 0 && p.He > 0 && p.Hd > 0 && p.Z > 0 && p.C >= 0,
              "avme::stagewise::backward: bad sizes B=", p.B, " K=", p.K, " D=", p.D, " He=", p.He,
              " Hd=", p.Hd, " Z=", p.Z, " C=", p.C);
  if (p.B == 0) return;  // nothing is read or written
  auto need = [](const void* ptr, const char* name) {
    TORCH_CHECK(ptr != nullptr, "avme::stagewise::backward: BackwardParams.", name, " is null");
  };
  need(p.eps, "eps");
  need(p.logvar, "logvar");
  if (p.error_mode) need(p.canvases, "canvases");
  need(p.c_enc, "c_enc");
  need(p.gates_enc, "gates_enc");
  need(p.c_dec, "c_dec");
  need(p.gates_dec, "gates_dec");
  need(p.enc_w_ih, "enc_w_ih");
  need(p.enc_w_hh, "enc_w_hh");
  need(p.q_w, "q_w");
  need(p.dec_w_ih, "dec_w_ih");
  need(p.dec_w_hh, "dec_w_hh");
  need(p.write_w, "write_w");
  need(p.d_canvas, "d_canvas");
  need(p.d_q, "d_q");
  need(p.d_gates_enc, "d_gates_enc");
  need(p.d_gates_dec, "d_gates_dec");
}

template <typename T, typename A>
void run_steps(const BackwardParams<T>& p, const CallContext& ctx, cudaStream_t stream) {
  const int64_t B = p.B, D = p.D, He = p.He, Hd = p.Hd, Z = p.Z;
  const int K = p.K;
  BackwardWorkspace<T, A> ws(p, ctx);
  const GemmWeights& w = ws.w;
  const int64_t enc_r = w.enc_cols.offset(0), enc_hd = w.enc_cols.offset(1),
                enc_he = w.enc_cols.offset(2);
  const int64_t dec_z = w.dec_cols.offset(0), dec_hd = w.dec_cols.offset(1);

  for (int t = K - 1; t >= 0; --t) {
    const bool last = t == K - 1;  // nothing carried in from step t+1 yet
    T* const d_canvas = p.d_canvas + t * B * D;
    T* const d_gates_dec = p.d_gates_dec + t * B * 4 * Hd;
    T* const d_q = p.d_q + t * B * 2 * Z;
    T* const d_gates_enc = p.d_gates_enc + t * B * 4 * He;

    // dL/ds_t.
    CanvasGradArgs<T, A> cg;
    cg.B = B;
    cg.D = p.D;
    cg.g_next = last ? p.grad_canvas : p.d_canvas + (t + 1) * B * D;
    cg.grad_extra = detail::step_slice(p.grad_canvases, t, B * D);
    if (!last) cg.dr = slot<const T>(ws.enc_in_grad, enc_r);
    cg.error_mode = p.error_mode;
    cg.s = p.error_mode ? p.canvases + t * B * D : nullptr;
    cg.g_out = d_canvas;
    cg.g_copy = ws.g.target();
    launch(cg, stream);

    // Decoder: dh_dec_t = d_canvas[t] write_w + the step t+1 carries.
    gemm_out(ws.dh_dec_write, ws.g.operand(d_canvas, B, D, ctx), w.write);
    auto dec = lstm_backward_args<T, A>(B, p.Hd, t, p.gates_dec, p.c_dec, ws.dc_dec, d_gates_dec,
                                        ws.dgd.target());
    dec.dh_in[0] = slot<const T>(ws.dh_dec_write, 0);
    if (!last) {
      dec.dh_in[1] = slot<const T>(ws.enc_in_grad, enc_hd);
      dec.dh_in[2] = slot<const T>(ws.dec_in_grad, dec_hd);
    }
    launch(dec, stream);

    // Posterior: [dz | dh_dec carry] = d_gates_dec[t] [W_z | W_hh] (no carry needed at t = 0).
    const int64_t dec_cols = t > 0 ? w.dec_cols.total() : Z;
    gemm_out(ws.dec_in_grad.narrow(1, 0, dec_cols), ws.dgd.operand(d_gates_dec, B, 4 * Hd, ctx),
             w.dec.narrow(1, 0, dec_cols));
    ReparamBackwardArgs<T, A> rb;
    rb.B = B;
    rb.Z = p.Z;
    rb.dz = slot<const T>(ws.dec_in_grad, dec_z);
    rb.eps = p.eps + t * B * Z;
    rb.logvar = p.logvar + t * B * Z;
    rb.grad_mu = detail::step_slice(p.grad_mu, t, B * Z);
    rb.grad_logvar = detail::step_slice(p.grad_logvar, t, B * Z);
    rb.d_q = d_q;
    rb.d_q_copy = ws.dq.target();
    rb.grad_eps = detail::step_slice(p.grad_eps, t, B * Z);
    launch(rb, stream);

    // Encoder: dh_enc_t = d_q[t] q_w + the step t+1 carry.
    gemm_out(ws.dh_enc_q, ws.dq.operand(d_q, B, 2 * Z, ctx), w.q);
    auto enc = lstm_backward_args<T, A>(B, p.He, t, p.gates_enc, p.c_enc, ws.dc_enc, d_gates_enc,
                                        ws.dge.target());
    enc.dh_in[0] = slot<const T>(ws.dh_enc_q, 0);
    if (!last) enc.dh_in[1] = slot<const T>(ws.enc_in_grad, enc_he);
    launch(enc, stream);

    // Carries into step t-1: [dr_t | dh_dec | dh_enc] = d_gates_enc[t] [W_r | W_hd | W_hh] (none
    // at t = 0).
    if (t > 0) {
      const int64_t enc_cols = w.enc_cols.total();
      gemm_out(ws.enc_in_grad.narrow(1, 0, enc_cols), ws.dge.operand(d_gates_enc, B, 4 * He, ctx),
               w.enc.narrow(1, 0, enc_cols));
    }
  }
}

AVME_SW_INSTANTIATE_STEPS(BackwardParams)

}  // namespace detail
}  // namespace stagewise
}  // namespace avme
