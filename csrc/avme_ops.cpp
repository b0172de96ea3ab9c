// torch ops of the fused AVME loop: torch.ops.avme.{forward, backward, sample}.
//
// The ops are registered with TORCH_LIBRARY (no pybind11): `import avme_ext._C` loads this
// library (see PyInit__C at the bottom), which runs the registrations. Autograd
// (forward -> backward) and the fake/meta kernels are registered in Python, in
// avme_ext/ops.py (torch.library.register_autograd / register_fake).
//
// Every tensor argument is checked (device, dtype, shape, contiguity) with a message that
// names the argument. Supported dtypes: float32 and float64 (all tensors the same dtype).

#ifndef AVME_CPU_EMULATION
#include <Python.h>
#endif

#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include "avme.h"

#ifdef AVME_CPU_EMULATION
// Test-only CPU build (csrc/emulation/): CPU tensors, kernels run by the emulator.
#define AVME_DEVICE_GUARD(t)
#define AVME_CURRENT_STREAM(t) (static_cast<cudaStream_t>(nullptr))
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define AVME_DEVICE_GUARD(t) const c10::cuda::CUDAGuard device_guard_((t).device())
#define AVME_CURRENT_STREAM(t) (c10::cuda::getCurrentCUDAStream((t).get_device()).stream())
#endif

namespace avme {
namespace {

using at::Tensor;

enum class Precision { FP32, TF32, BF16 };

Precision parse_precision(const std::string& s) {
  if (s == "fp32") return Precision::FP32;
  if (s == "tf32") return Precision::TF32;
  if (s == "bf16") return Precision::BF16;
  TORCH_CHECK(false, "avme: precision must be one of 'fp32', 'tf32', 'bf16', got '", s, "'");
}

bool parse_error_mode(const std::string& s) {
  if (s == "canvas") return false;
  if (s == "error") return true;
  TORCH_CHECK(false, "avme: encoder_input must be 'canvas' or 'error', got '", s, "'");
}

// Sets the cuBLAS float32 matmul mode for the duration of an op:
//   fp32: TF32 off (at::NoTF32Guard, thread-local), whatever the global setting is;
//   tf32: TF32 on (process-global setting, restored on exit; not thread-safe);
//   bf16: products are computed by mm_p on bfloat16 copies (fp32 accumulate and output).
class PrecisionGuard {
 public:
  explicit PrecisionGuard(Precision p) {
    if (p == Precision::TF32) {
      auto& ctx = at::globalContext();
      legacy_ = ctx.float32MatmulPrecision();
      new_ = ctx.float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL);
      ctx.setAllowTF32CuBLAS(true);
      restore_ = true;
    } else {
      no_tf32_.emplace();
    }
  }
  ~PrecisionGuard() {
    if (restore_) {
      auto& ctx = at::globalContext();
      const char* name = legacy_ == at::Float32MatmulPrecision::HIGHEST ? "highest"
                         : legacy_ == at::Float32MatmulPrecision::HIGH  ? "high"
                                                                         : "medium";
      ctx.setFloat32MatmulPrecision(name);
      ctx.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, new_);
    }
  }
  PrecisionGuard(const PrecisionGuard&) = delete;
  PrecisionGuard& operator=(const PrecisionGuard&) = delete;

 private:
  std::optional<at::NoTF32Guard> no_tf32_;
  bool restore_ = false;
  at::Float32MatmulPrecision legacy_ = at::Float32MatmulPrecision::HIGHEST;
  at::Float32Precision new_ = at::Float32Precision::NONE;
};

// a @ b with the requested precision (a, b may be strided views). float64: plain fp64 mm.
Tensor mm_p(const Tensor& a, const Tensor& b, Precision p) {
  if (p == Precision::BF16 && a.scalar_type() == at::kFloat) {
#ifdef AVME_CPU_EMULATION
    // aten::mm.dtype (bf16 inputs, fp32 output) exists on CUDA only.
    return at::mm(a.to(at::kBFloat16), b.to(at::kBFloat16)).to(at::kFloat);
#else
    return at::mm(a.to(at::kBFloat16), b.to(at::kBFloat16), at::kFloat);
#endif
  }
  return at::mm(a, b);
}

// ---------------------------------------------------------------------------------------
// Checks.
// ---------------------------------------------------------------------------------------
#ifdef AVME_CPU_EMULATION
constexpr bool kNeedCuda = false;
#else
constexpr bool kNeedCuda = true;
#endif

void check_reference(const Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda() || !kNeedCuda, "avme: ", name, " must be a CUDA tensor, got a tensor on ", x.device(),
              ". The fused ops run on CUDA only; on the CPU use avme_ext.reference "
              "(AVMECore(impl='ref')).");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "avme: ", name,
              " must be float32 or float64, got ", x.scalar_type());
}

void check_tensor(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name,
                  at::IntArrayRef shape) {
  TORCH_CHECK(t.defined(), "avme: ", name, " is undefined");
  TORCH_CHECK(t.is_cuda() || !kNeedCuda, "avme: ", name, " must be a CUDA tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "avme: ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; all tensors must be on the same device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "avme: ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(),
              "; all tensors must have the same dtype");
  TORCH_CHECK(t.sizes() == shape, "avme: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "avme: ", name,
              " must be contiguous (call .contiguous() on it first)");
}

void check_optional(const std::optional<Tensor>& t, const char* name, const Tensor& ref,
                    const char* ref_name, at::IntArrayRef shape) {
  if (t.has_value() && t->defined()) check_tensor(*t, name, ref, ref_name, shape);
}

const Tensor* opt_ptr(const std::optional<Tensor>& t) {
  return (t.has_value() && t->defined()) ? &*t : nullptr;
}

int checked_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= 1000000000LL, "avme: ", what, " = ", v, " is out of range");
  return static_cast<int>(v);
}

struct Dims {
  int64_t B;
  int K, D, He, Hd, Z, C;
};

// Sizes from the weights (as nn.LSTMCell / nn.Linear hold them), checking their shapes.
Dims weight_dims(const Tensor& ref, const char* ref_name, const Tensor& dec_w_ih,
                 const Tensor& dec_w_hh, const Tensor& dec_b, const Tensor& write_w,
                 const Tensor& write_b, int Z) {
  TORCH_CHECK(write_w.dim() == 2, "avme: write_w must be 2-D (D, Hd), got shape ", write_w.sizes());
  TORCH_CHECK(dec_w_hh.dim() == 2, "avme: dec_w_hh must be 2-D (4*Hd, Hd), got shape ",
              dec_w_hh.sizes());
  TORCH_CHECK(dec_w_ih.dim() == 2, "avme: dec_w_ih must be 2-D (4*Hd, Z + C), got shape ",
              dec_w_ih.sizes());
  Dims d{};
  d.D = checked_int(write_w.size(0), "D");
  d.Hd = checked_int(dec_w_hh.size(1), "Hd");
  d.Z = Z;
  TORCH_CHECK(d.D > 0 && d.Hd > 0 && d.Z > 0, "avme: D, Hd and Z must be positive");
  TORCH_CHECK(dec_w_ih.size(1) >= Z, "avme: dec_w_ih must have at least Z = ", Z,
              " columns ([z, y]), got shape ", dec_w_ih.sizes());
  d.C = checked_int(dec_w_ih.size(1) - Z, "C");
  check_tensor(write_w, "write_w", ref, ref_name, {d.D, d.Hd});
  check_tensor(write_b, "write_b", ref, ref_name, {d.D});
  check_tensor(dec_w_hh, "dec_w_hh", ref, ref_name, {4 * int64_t(d.Hd), d.Hd});
  check_tensor(dec_w_ih, "dec_w_ih", ref, ref_name, {4 * int64_t(d.Hd), int64_t(d.Z) + d.C});
  check_tensor(dec_b, "dec_b", ref, ref_name, {4 * int64_t(d.Hd)});
  return d;
}

void check_y(const std::optional<Tensor>& y, const Dims& d, const Tensor& ref, const char* ref_name) {
  if (d.C == 0) {
    TORCH_CHECK(!(y.has_value() && y->defined()),
                "avme: y must be None for an unconditional model (dec_w_ih has Z columns)");
  } else {
    TORCH_CHECK(y.has_value() && y->defined(), "avme: y (B, C=", d.C,
                ") is required: the model is conditional");
    check_tensor(*y, "y", ref, ref_name, {d.B, d.C});
  }
}

struct DeviceInfo {
  int64_t smem_optin;
  int num_sms;
};

DeviceInfo device_info(const Tensor& ref) {
#ifdef AVME_CPU_EMULATION
  // Emulated device: H100-like shared memory; SM count from AVME_EMU_SMS (default 4) so that
  // tests can steer the rows-per-block choice.
  (void)ref;
  const char* sms_env = std::getenv("AVME_EMU_SMS");
  const char* smem_env = std::getenv("AVME_EMU_SMEM");
  return {smem_env ? std::atoll(smem_env) : 232448, sms_env ? std::atoi(sms_env) : 4};
#else
  const int dev = ref.get_device();
  int smem = 0, sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return {smem, sms};
#endif
}

int plan_rows(const char* op, int64_t B, int64_t elems_per_row, size_t elem_size,
              const DeviceInfo& info, const Dims& d) {
  const int64_t bytes = elems_per_row * static_cast<int64_t>(elem_size);
  const int rt = choose_rows_per_block(B, bytes, info.smem_optin, info.num_sms);
  TORCH_CHECK(rt > 0, "avme::", op, ": one batch row needs ", bytes,
              " bytes of shared memory (D=", d.D, ", He=", d.He, ", Hd=", d.Hd, ", Z=", d.Z,
              ", dtype size ", elem_size, ") but this GPU allows at most ", info.smem_optin,
              " bytes per block. Use smaller sizes, float32, or the reference implementation "
              "(AVMECore(impl='ref')).");
  return rt;
}

// Outputs and workspaces the kernels fully overwrite. The test-only CPU emulation fills them
// with NaN so that any element a kernel fails to write shows up in the comparisons.
Tensor uninit(at::IntArrayRef shape, const at::TensorOptions& opts) {
#ifdef AVME_CPU_EMULATION
  return at::full(shape, std::numeric_limits<double>::quiet_NaN(), opts);
#else
  return at::empty(shape, opts);
#endif
}

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------
using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                 Tensor, Tensor, Tensor>;

ForwardResult avme_forward(const Tensor& x, const std::optional<Tensor>& y, const Tensor& eps,
                           const Tensor& enc_w_ih, const Tensor& enc_w_hh, const Tensor& enc_b,
                           const Tensor& q_w, const Tensor& q_b, const Tensor& dec_w_ih,
                           const Tensor& dec_w_hh, const Tensor& dec_b, const Tensor& write_w,
                           const Tensor& write_b, const std::string& encoder_input,
                           bool return_canvases, bool save_for_backward,
                           const std::string& precision) {
  const bool error_mode = parse_error_mode(encoder_input);
  const Precision prec = parse_precision(precision);
  check_reference(x, "x");
  TORCH_CHECK(x.dim() == 2, "avme: x must be 2-D (B, D), got shape ", x.sizes());
  TORCH_CHECK(eps.dim() == 3, "avme: eps must be 3-D (K, B, Z), got shape ", eps.sizes());
  TORCH_CHECK(eps.size(0) >= 1, "avme: eps must have K >= 1 steps, got shape ", eps.sizes());
  Dims d = weight_dims(x, "x", dec_w_ih, dec_w_hh, dec_b, write_w, write_b,
                       checked_int(eps.size(2), "Z"));
  d.B = x.size(0);
  d.K = checked_int(eps.size(0), "K");
  TORCH_CHECK(enc_w_hh.dim() == 2, "avme: enc_w_hh must be 2-D (4*He, He), got shape ",
              enc_w_hh.sizes());
  d.He = checked_int(enc_w_hh.size(1), "He");
  TORCH_CHECK(d.He > 0, "avme: He must be positive");
  check_tensor(x, "x", x, "x", {d.B, d.D});
  check_tensor(eps, "eps", x, "x", {d.K, d.B, d.Z});
  check_y(y, d, x, "x");
  const int64_t in_enc = 2 * int64_t(d.D) + d.Hd + d.C;
  check_tensor(enc_w_ih, "enc_w_ih", x, "x", {4 * int64_t(d.He), in_enc});
  check_tensor(enc_w_hh, "enc_w_hh", x, "x", {4 * int64_t(d.He), d.He});
  check_tensor(enc_b, "enc_b", x, "x", {4 * int64_t(d.He)});
  check_tensor(q_w, "q_w", x, "x", {2 * int64_t(d.Z), d.He});
  check_tensor(q_b, "q_b", x, "x", {2 * int64_t(d.Z)});

  AVME_DEVICE_GUARD(x);
  const int64_t B = d.B, K = d.K;
  const int64_t S = save_for_backward ? K : 0;
  const int64_t KC = (return_canvases || save_for_backward) ? K : 0;
  auto opts = x.options();
  Tensor canvas = uninit({B, d.D}, opts);
  Tensor mu = uninit({K, B, d.Z}, opts);
  Tensor logvar = uninit({K, B, d.Z}, opts);
  Tensor canvases = uninit({KC, B, d.D}, opts);
  Tensor h_enc = uninit({S, B, d.He}, opts);
  Tensor c_enc = uninit({S, B, d.He}, opts);
  Tensor gates_enc = uninit({S, B, 4 * int64_t(d.He)}, opts);
  Tensor z = uninit({S, B, d.Z}, opts);
  Tensor h_dec = uninit({S, B, d.Hd}, opts);
  Tensor c_dec = uninit({S, B, d.Hd}, opts);
  Tensor gates_dec = uninit({S, B, 4 * int64_t(d.Hd)}, opts);
  ForwardResult result{canvas, mu, logvar, canvases, h_enc, c_enc, gates_enc, z, h_dec, c_dec,
                       gates_dec};
  if (B == 0) return result;  // nothing to compute: empty outputs, no launch

  const DeviceInfo info = device_info(x);
  const int rt = plan_rows("forward",
                           B, loop_smem_elems_per_row(d.D, d.He, d.Hd, d.Z, true, error_mode),
                           x.element_size(), info, d);

  Tensor enc_static, dec_static, enc_wT, dec_wT, q_wT, write_wT;
  {
    PrecisionGuard pg(prec);
    // Step-invariant input products, once per call (not K times).
    enc_static = mm_p(x, enc_w_ih.slice(1, 0, d.D).t(), prec);
    enc_static.add_(enc_b);
    if (d.C > 0) {
      enc_static.add_(mm_p(*y, enc_w_ih.slice(1, in_enc - d.C, in_enc).t(), prec));
      dec_static = mm_p(*y, dec_w_ih.slice(1, d.Z, d.Z + d.C).t(), prec);
      dec_static.add_(dec_b);
    } else {
      dec_static = dec_b;
    }
  }
  enc_static = enc_static.contiguous();
  dec_static = dec_static.contiguous();
  // Recurrent weights in (in, out) layout for coalesced reads in the step kernel.
  enc_wT = at::cat({enc_w_ih.slice(1, d.D, 2 * int64_t(d.D) + d.Hd), enc_w_hh}, 1).t().contiguous();
  dec_wT = at::cat({dec_w_ih.slice(1, 0, d.Z), dec_w_hh}, 1).t().contiguous();
  q_wT = q_w.t().contiguous();
  write_wT = write_w.t().contiguous();

  const cudaStream_t stream = AVME_CURRENT_STREAM(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "avme_forward", [&] {
    LoopParams<scalar_t> p;
    p.B = B;
    p.K = d.K;
    p.D = d.D;
    p.He = d.He;
    p.Hd = d.Hd;
    p.Z = d.Z;
    p.encoder = true;
    p.error_mode = error_mode;
    p.x = x.data_ptr<scalar_t>();
    p.eps = eps.data_ptr<scalar_t>();
    p.enc_static = enc_static.data_ptr<scalar_t>();
    p.enc_wT = enc_wT.data_ptr<scalar_t>();
    p.q_wT = q_wT.data_ptr<scalar_t>();
    p.q_b = q_b.data_ptr<scalar_t>();
    p.dec_static = dec_static.data_ptr<scalar_t>();
    p.dec_static_stride = d.C > 0 ? 4 * int64_t(d.Hd) : 0;
    p.dec_wT = dec_wT.data_ptr<scalar_t>();
    p.write_wT = write_wT.data_ptr<scalar_t>();
    p.write_b = write_b.data_ptr<scalar_t>();
    p.canvas = canvas.data_ptr<scalar_t>();
    p.canvases = ptr_or_null<scalar_t>(canvases);
    p.mu = mu.data_ptr<scalar_t>();
    p.logvar = logvar.data_ptr<scalar_t>();
    if (save_for_backward) {
      p.h_enc = h_enc.data_ptr<scalar_t>();
      p.c_enc = c_enc.data_ptr<scalar_t>();
      p.gates_enc = gates_enc.data_ptr<scalar_t>();
      p.z_out = z.data_ptr<scalar_t>();
      p.h_dec = h_dec.data_ptr<scalar_t>();
      p.c_dec = c_dec.data_ptr<scalar_t>();
      p.gates_dec = gates_dec.data_ptr<scalar_t>();
    }
    launch_loop<scalar_t>(p, rt, stream);
  });
  return result;
}

// ---------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------
using BackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                  Tensor, Tensor, Tensor>;

BackwardResult avme_backward(
    const std::optional<Tensor>& grad_canvas, const std::optional<Tensor>& grad_mu,
    const std::optional<Tensor>& grad_logvar, const std::optional<Tensor>& grad_canvases,
    const Tensor& x, const std::optional<Tensor>& y, const Tensor& eps, const Tensor& logvar,
    const Tensor& canvases, const Tensor& h_enc, const Tensor& c_enc, const Tensor& gates_enc,
    const Tensor& z, const Tensor& h_dec, const Tensor& c_dec, const Tensor& gates_dec,
    const Tensor& enc_w_ih, const Tensor& enc_w_hh, const Tensor& q_w, const Tensor& dec_w_ih,
    const Tensor& dec_w_hh, const Tensor& write_w, const std::string& encoder_input,
    bool need_grad_x, const std::string& precision) {
  const bool error_mode = parse_error_mode(encoder_input);
  const Precision prec = parse_precision(precision);
  check_reference(x, "x");
  TORCH_CHECK(x.dim() == 2, "avme: x must be 2-D (B, D), got shape ", x.sizes());
  TORCH_CHECK(eps.dim() == 3 && eps.size(0) >= 1, "avme: eps must be (K >= 1, B, Z), got shape ",
              eps.sizes());
  TORCH_CHECK(enc_w_hh.dim() == 2, "avme: enc_w_hh must be 2-D (4*He, He), got shape ",
              enc_w_hh.sizes());
  TORCH_CHECK(write_w.dim() == 2 && dec_w_hh.dim() == 2 && dec_w_ih.dim() == 2,
              "avme: write_w, dec_w_hh and dec_w_ih must be 2-D");
  Dims d{};
  d.B = x.size(0);
  d.K = checked_int(eps.size(0), "K");
  d.Z = checked_int(eps.size(2), "Z");
  d.D = checked_int(write_w.size(0), "D");
  d.Hd = checked_int(dec_w_hh.size(1), "Hd");
  d.He = checked_int(enc_w_hh.size(1), "He");
  TORCH_CHECK(dec_w_ih.size(1) >= d.Z, "avme: dec_w_ih must have at least Z columns");
  d.C = checked_int(dec_w_ih.size(1) - d.Z, "C");
  const int64_t B = d.B, K = d.K, He4 = 4 * int64_t(d.He), Hd4 = 4 * int64_t(d.Hd);
  const int64_t in_enc = 2 * int64_t(d.D) + d.Hd + d.C;
  check_tensor(x, "x", x, "x", {B, d.D});
  check_y(y, d, x, "x");
  check_tensor(eps, "eps", x, "x", {K, B, d.Z});
  check_tensor(logvar, "logvar", x, "x", {K, B, d.Z});
  TORCH_CHECK(h_enc.dim() == 3 && h_enc.size(0) == K,
              "avme::backward: the forward did not save its state (it ran with "
              "save_for_backward=False, e.g. under torch.no_grad())");
  check_tensor(canvases, "canvases", x, "x", {K, B, d.D});
  check_tensor(h_enc, "h_enc", x, "x", {K, B, d.He});
  check_tensor(c_enc, "c_enc", x, "x", {K, B, d.He});
  check_tensor(gates_enc, "gates_enc", x, "x", {K, B, He4});
  check_tensor(z, "z", x, "x", {K, B, d.Z});
  check_tensor(h_dec, "h_dec", x, "x", {K, B, d.Hd});
  check_tensor(c_dec, "c_dec", x, "x", {K, B, d.Hd});
  check_tensor(gates_dec, "gates_dec", x, "x", {K, B, Hd4});
  check_tensor(enc_w_ih, "enc_w_ih", x, "x", {He4, in_enc});
  check_tensor(enc_w_hh, "enc_w_hh", x, "x", {He4, d.He});
  check_tensor(q_w, "q_w", x, "x", {2 * int64_t(d.Z), d.He});
  check_tensor(dec_w_ih, "dec_w_ih", x, "x", {Hd4, int64_t(d.Z) + d.C});
  check_tensor(dec_w_hh, "dec_w_hh", x, "x", {Hd4, d.Hd});
  check_tensor(write_w, "write_w", x, "x", {d.D, d.Hd});
  check_optional(grad_canvas, "grad_canvas", x, "x", {B, d.D});
  check_optional(grad_mu, "grad_mu", x, "x", {K, B, d.Z});
  check_optional(grad_logvar, "grad_logvar", x, "x", {K, B, d.Z});
  check_optional(grad_canvases, "grad_canvases", x, "x", {K, B, d.D});

  AVME_DEVICE_GUARD(x);
  auto opts = x.options();
  Tensor grad_x = need_grad_x ? at::zeros({B, d.D}, opts) : uninit({0, d.D}, opts);
  Tensor g_enc_w_ih = at::zeros({He4, in_enc}, opts);
  Tensor g_enc_w_hh = at::zeros({He4, d.He}, opts);
  Tensor g_enc_b = at::zeros({He4}, opts);
  Tensor g_q_w = at::zeros({2 * int64_t(d.Z), d.He}, opts);
  Tensor g_q_b = at::zeros({2 * int64_t(d.Z)}, opts);
  Tensor g_dec_w_ih = at::zeros({Hd4, int64_t(d.Z) + d.C}, opts);
  Tensor g_dec_w_hh = at::zeros({Hd4, d.Hd}, opts);
  Tensor g_dec_b = at::zeros({Hd4}, opts);
  Tensor g_write_w = at::zeros({d.D, d.Hd}, opts);
  Tensor g_write_b = at::zeros({d.D}, opts);
  BackwardResult result{grad_x,    g_enc_w_ih, g_enc_w_hh, g_enc_b,   g_q_w,    g_q_b,
                        g_dec_w_ih, g_dec_w_hh, g_dec_b,   g_write_w, g_write_b};
  if (B == 0) return result;

  const DeviceInfo info = device_info(x);
  const int rt = plan_rows("backward", B, backward_smem_elems_per_row(d.D, d.He, d.Hd, d.Z),
                           x.element_size(), info, d);

  // Per-step gradients written by the kernel (every element is written for rows < B).
  Tensor d_canvas = uninit({K, B, d.D}, opts);
  Tensor d_q = uninit({K, B, 2 * int64_t(d.Z)}, opts);
  Tensor d_ge = uninit({K, B, He4}, opts);
  Tensor d_gd = uninit({K, B, Hd4}, opts);
  Tensor d_x_error = (error_mode && need_grad_x) ? at::zeros({B, d.D}, opts) : Tensor();

  const cudaStream_t stream = AVME_CURRENT_STREAM(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "avme_backward", [&] {
    BackwardParams<scalar_t> p;
    p.B = B;
    p.K = d.K;
    p.D = d.D;
    p.He = d.He;
    p.Hd = d.Hd;
    p.Z = d.Z;
    p.C = d.C;
    p.error_mode = error_mode;
    auto opt = [](const std::optional<Tensor>& t) -> const scalar_t* {
      const Tensor* tp = opt_ptr(t);
      return tp ? tp->data_ptr<scalar_t>() : nullptr;
    };
    p.grad_canvas = opt(grad_canvas);
    p.grad_canvases = opt(grad_canvases);
    p.grad_mu = opt(grad_mu);
    p.grad_logvar = opt(grad_logvar);
    p.eps = eps.data_ptr<scalar_t>();
    p.logvar = logvar.data_ptr<scalar_t>();
    p.canvases = canvases.data_ptr<scalar_t>();
    p.c_enc = c_enc.data_ptr<scalar_t>();
    p.gates_enc = gates_enc.data_ptr<scalar_t>();
    p.c_dec = c_dec.data_ptr<scalar_t>();
    p.gates_dec = gates_dec.data_ptr<scalar_t>();
    p.enc_w_ih = enc_w_ih.data_ptr<scalar_t>();
    p.enc_w_hh = enc_w_hh.data_ptr<scalar_t>();
    p.q_w = q_w.data_ptr<scalar_t>();
    p.dec_w_ih = dec_w_ih.data_ptr<scalar_t>();
    p.dec_w_hh = dec_w_hh.data_ptr<scalar_t>();
    p.write_w = write_w.data_ptr<scalar_t>();
    p.d_canvas = d_canvas.data_ptr<scalar_t>();
    p.d_q = d_q.data_ptr<scalar_t>();
    p.d_gates_enc = d_ge.data_ptr<scalar_t>();
    p.d_gates_dec = d_gd.data_ptr<scalar_t>();
    p.d_x_error = d_x_error.defined() ? d_x_error.data_ptr<scalar_t>() : nullptr;
    launch_backward<scalar_t>(p, rt, stream);
  });

  // Weight gradients: large products over all K*B rows (cuBLAS through ATen).
  PrecisionGuard pg(prec);
  const int64_t M = K * B;
  const Tensor dS = d_canvas.view({M, d.D});
  const Tensor dQ = d_q.view({M, 2 * int64_t(d.Z)});
  const Tensor dGe = d_ge.view({M, He4});
  const Tensor dGd = d_gd.view({M, Hd4});
  const Tensor sum_ge = d_ge.sum(0);  // (B, 4He): x and y enter every step
  const Tensor sum_gd = d_gd.sum(0);  // (B, 4Hd)
  // Rows of steps 2..K and the states of steps 1..K-1 (the recurrent inputs; they are 0 at t=1).
  const int64_t M1 = (K - 1) * B;
  auto tail = [&](const Tensor& t, int64_t n) { return t.slice(0, 1, K).reshape({M1, n}); };
  auto head = [&](const Tensor& t, int64_t n) { return t.slice(0, 0, K - 1).reshape({M1, n}); };

  // write
  g_write_w.copy_(mm_p(dS.t(), h_dec.view({M, d.Hd}), prec));
  g_write_b.copy_(dS.sum(0));
  // posterior
  g_q_w.copy_(mm_p(dQ.t(), h_enc.view({M, d.He}), prec));
  g_q_b.copy_(dQ.sum(0));
  // decoder: input [z, y], recurrent h_dec
  g_dec_w_ih.slice(1, 0, d.Z).copy_(mm_p(dGd.t(), z.view({M, d.Z}), prec));
  if (d.C > 0) g_dec_w_ih.slice(1, d.Z, int64_t(d.Z) + d.C).copy_(mm_p(sum_gd.t(), *y, prec));
  if (K > 1) g_dec_w_hh.copy_(mm_p(tail(d_gd, Hd4).t(), head(h_dec, d.Hd), prec));
  g_dec_b.copy_(dGd.sum(0));
  // encoder: input [x, r, h_dec, y], recurrent h_enc
  g_enc_w_ih.slice(1, 0, d.D).copy_(mm_p(sum_ge.t(), x, prec));
  if (error_mode) {
    // r_t = x - sigmoid(s_{t-1}), s_0 = 0
    Tensor r = uninit({K, B, d.D}, opts);
    r.select(0, 0).copy_(x - 0.5);
    if (K > 1) {
      Tensor rest = r.slice(0, 1, K);
      at::sub_out(rest, x.unsqueeze(0), at::sigmoid(canvases.slice(0, 0, K - 1)));
    }
    g_enc_w_ih.slice(1, d.D, 2 * int64_t(d.D)).copy_(mm_p(dGe.t(), r.view({M, d.D}), prec));
  } else if (K > 1) {
    // r_t = s_{t-1}, s_0 = 0
    g_enc_w_ih.slice(1, d.D, 2 * int64_t(d.D)).copy_(mm_p(tail(d_ge, He4).t(), head(canvases, d.D), prec));
  }
  if (K > 1) {
    g_enc_w_ih.slice(1, 2 * int64_t(d.D), 2 * int64_t(d.D) + d.Hd)
        .copy_(mm_p(tail(d_ge, He4).t(), head(h_dec, d.Hd), prec));
    g_enc_w_hh.copy_(mm_p(tail(d_ge, He4).t(), head(h_enc, d.He), prec));
  }
  if (d.C > 0) g_enc_w_ih.slice(1, in_enc - d.C, in_enc).copy_(mm_p(sum_ge.t(), *y, prec));
  g_enc_b.copy_(dGe.sum(0));
  if (need_grad_x) {
    grad_x.copy_(mm_p(sum_ge, enc_w_ih.slice(1, 0, d.D), prec));
    if (error_mode) grad_x.add_(d_x_error);
  }
  return result;
}

// ---------------------------------------------------------------------------------------
// sample
// ---------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> avme_sample(const Tensor& z, const std::optional<Tensor>& y,
                                       const Tensor& dec_w_ih, const Tensor& dec_w_hh,
                                       const Tensor& dec_b, const Tensor& write_w,
                                       const Tensor& write_b, bool return_canvases,
                                       const std::string& precision) {
  const Precision prec = parse_precision(precision);
  check_reference(z, "z");
  TORCH_CHECK(z.dim() == 3 && z.size(0) >= 1, "avme: z must be 3-D (K >= 1, B, Z), got shape ",
              z.sizes());
  Dims d = weight_dims(z, "z", dec_w_ih, dec_w_hh, dec_b, write_w, write_b,
                       checked_int(z.size(2), "Z"));
  d.B = z.size(1);
  d.K = checked_int(z.size(0), "K");
  d.He = 0;
  check_tensor(z, "z", z, "z", {d.K, d.B, d.Z});
  check_y(y, d, z, "z");

  AVME_DEVICE_GUARD(z);
  const int64_t B = d.B, K = d.K;
  auto opts = z.options();
  Tensor canvas = uninit({B, d.D}, opts);
  Tensor canvases = uninit({return_canvases ? K : 0, B, d.D}, opts);
  if (B == 0) return {canvas, canvases};

  const DeviceInfo info = device_info(z);
  const int rt = plan_rows("sample", B, loop_smem_elems_per_row(d.D, 0, d.Hd, d.Z, false, false),
                           z.element_size(), info, d);
  Tensor dec_static;
  if (d.C > 0) {
    PrecisionGuard pg(prec);
    dec_static = mm_p(*y, dec_w_ih.slice(1, d.Z, int64_t(d.Z) + d.C).t(), prec);
    dec_static.add_(dec_b);
    dec_static = dec_static.contiguous();
  } else {
    dec_static = dec_b;
  }
  const Tensor dec_wT = at::cat({dec_w_ih.slice(1, 0, d.Z), dec_w_hh}, 1).t().contiguous();
  const Tensor write_wT = write_w.t().contiguous();

  const cudaStream_t stream = AVME_CURRENT_STREAM(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "avme_sample", [&] {
    LoopParams<scalar_t> p;
    p.B = B;
    p.K = d.K;
    p.D = d.D;
    p.He = 0;
    p.Hd = d.Hd;
    p.Z = d.Z;
    p.encoder = false;
    p.error_mode = false;
    p.z_in = z.data_ptr<scalar_t>();
    p.dec_static = dec_static.data_ptr<scalar_t>();
    p.dec_static_stride = d.C > 0 ? 4 * int64_t(d.Hd) : 0;
    p.dec_wT = dec_wT.data_ptr<scalar_t>();
    p.write_wT = write_wT.data_ptr<scalar_t>();
    p.write_b = write_b.data_ptr<scalar_t>();
    p.canvas = canvas.data_ptr<scalar_t>();
    p.canvases = ptr_or_null<scalar_t>(canvases);
    launch_loop<scalar_t>(p, rt, stream);
  });
  return {canvas, canvases};
}

}  // namespace
}  // namespace avme

namespace avme {
namespace {
constexpr const char* kForwardSchema =
    "forward(Tensor x, Tensor? y, Tensor eps, Tensor enc_w_ih, Tensor enc_w_hh, Tensor enc_b, "
    "Tensor q_w, Tensor q_b, Tensor dec_w_ih, Tensor dec_w_hh, Tensor dec_b, Tensor write_w, "
    "Tensor write_b, str encoder_input, bool return_canvases, bool save_for_backward, "
    "str precision) -> (Tensor canvas, Tensor mu, Tensor logvar, Tensor canvases, "
    "Tensor h_enc, Tensor c_enc, Tensor gates_enc, Tensor z, Tensor h_dec, Tensor c_dec, "
    "Tensor gates_dec)";
constexpr const char* kBackwardSchema =
    "backward(Tensor? grad_canvas, Tensor? grad_mu, Tensor? grad_logvar, "
    "Tensor? grad_canvases, Tensor x, Tensor? y, Tensor eps, Tensor logvar, Tensor canvases, "
    "Tensor h_enc, Tensor c_enc, Tensor gates_enc, Tensor z, Tensor h_dec, Tensor c_dec, "
    "Tensor gates_dec, Tensor enc_w_ih, Tensor enc_w_hh, Tensor q_w, Tensor dec_w_ih, "
    "Tensor dec_w_hh, Tensor write_w, str encoder_input, bool need_grad_x, str precision) -> "
    "(Tensor grad_x, Tensor grad_enc_w_ih, Tensor grad_enc_w_hh, Tensor grad_enc_b, "
    "Tensor grad_q_w, Tensor grad_q_b, Tensor grad_dec_w_ih, Tensor grad_dec_w_hh, "
    "Tensor grad_dec_b, Tensor grad_write_w, Tensor grad_write_b)";
constexpr const char* kSampleSchema =
    "sample(Tensor z, Tensor? y, Tensor dec_w_ih, Tensor dec_w_hh, Tensor dec_b, "
    "Tensor write_w, Tensor write_b, bool return_canvases, str precision) -> "
    "(Tensor canvas, Tensor canvases)";
}  // namespace
}  // namespace avme

#ifndef AVME_CPU_EMULATION
TORCH_LIBRARY(avme, m) {
  // Fake (meta) kernels and autograd live in this Python module.
  m.set_python_module("avme_ext.ops");
  m.def(avme::kForwardSchema);
  m.def(avme::kBackwardSchema);
  m.def(avme::kSampleSchema);
}

TORCH_LIBRARY_IMPL(avme, CUDA, m) {
  m.impl("forward", &avme::avme_forward);
  m.impl("backward", &avme::avme_backward);
  m.impl("sample", &avme::avme_sample);
}

// CPU tensors reach these kernels, whose first check raises a clear "must be a CUDA tensor"
// error (instead of the dispatcher's generic "could not run ... with arguments from the CPU
// backend").
TORCH_LIBRARY_IMPL(avme, CPU, m) {
  m.impl("forward", &avme::avme_forward);
  m.impl("backward", &avme::avme_backward);
  m.impl("sample", &avme::avme_sample);
}

// `import avme_ext._C` loads this shared library (running the registrations above) and
// gets an empty module; the ops are then reachable as torch.ops.avme.*. No pybind11.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "Fused CUDA kernels of the AVME loop; the ops are torch.ops.avme.*",  // doc
      -1,       // size of per-interpreter state
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
#else
// Test-only: the same ops on CPU tensors, run by the CPU emulator, as torch.ops.avme_emu.*.
TORCH_LIBRARY(avme_emu, m) {
  m.def(avme::kForwardSchema);
  m.def(avme::kBackwardSchema);
  m.def(avme::kSampleSchema);
}

TORCH_LIBRARY_IMPL(avme_emu, CPU, m) {
  m.impl("forward", &avme::avme_forward);
  m.impl("backward", &avme::avme_backward);
  m.impl("sample", &avme::avme_sample);
}
#endif
