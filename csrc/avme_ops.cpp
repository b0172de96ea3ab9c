// torch ops of the fused AVME loop: torch.ops.avme.{forward, backward, sample}.
//
// The ops are registered with TORCH_LIBRARY (no pybind11): `import avme_ext._C` loads this
// library (see PyInit__C at the bottom), which runs the registrations. Autograd
// (forward -> backward; backward -> a clear error for double backward) and the fake/meta
// kernels are registered in Python, in avme_ext/ops.py (torch.library.register_autograd /
// register_fake).
//
// Every op starts with one validation function (validate_forward / validate_backward /
// validate_sample) that checks every argument before any data pointer is read, any memory is
// allocated or the device is queried, in this order:
//   1. the string options (encoder_input, precision) and the flags;
//   2. every tensor argument: defined, on the device of the first one (a CUDA device; the CPU
//      in the test-only emulator build), float32 or float64, all the same dtype;
//   3. ranks, then the sizes (taken from the weights, as nn.LSTMCell / nn.Linear hold them)
//      and every tensor's full shape against them, then contiguity.
// Each message names the op, the argument and what was expected. Then, under a device guard on
// the first tensor's device, the op plans the call (plan_call): the chosen design, and the
// errors of a requested design that cannot run these sizes (the rowtile design's shared memory
// per row, the persistent design's fit); only then does it allocate and launch.

#ifndef AVME_CPU_EMULATION
#include <Python.h>
#endif

#include <cstdlib>
#include <exception>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "avme.h"
#include "common/matmul_mode.h"
#include "persistent/persistent.h"
#include "stagewise/stagewise.h"

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

constexpr const char* kForwardOp = "avme::forward";
constexpr const char* kBackwardOp = "avme::backward";
constexpr const char* kSampleOp = "avme::sample";

// ---------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------
enum class Precision { FP32, TF32, BF16 };

Precision parse_precision(const char* op, const std::string& s) {
  if (s == "fp32") return Precision::FP32;
  if (s == "tf32") return Precision::TF32;
  if (s == "bf16") return Precision::BF16;
  TORCH_CHECK(false, op, ": precision must be one of 'fp32', 'tf32', 'bf16', got '", s, "'");
}

// Kernel designs (csrc/README.md). kAuto: the host picks by batch size and what fits.
enum class Design { kAuto, kRowTile, kPersistent, kStagewise };

Design parse_design(const char* op, const std::string& s) {
  if (s == "auto") return Design::kAuto;
  if (s == "rowtile") return Design::kRowTile;
  if (s == "persistent") return Design::kPersistent;
  if (s == "stagewise") return Design::kStagewise;
  TORCH_CHECK(false, op, ": design must be one of 'auto', 'rowtile', 'persistent', 'stagewise', got '",
              s, "'");
}

stagewise::GemmPrecision gemm_precision(Precision p) {
  switch (p) {
    case Precision::TF32: return stagewise::GemmPrecision::kTF32;
    case Precision::BF16: return stagewise::GemmPrecision::kBF16;
    default: return stagewise::GemmPrecision::kFP32;
  }
}

bool parse_error_mode(const char* op, const std::string& s) {
  if (s == "canvas") return false;
  if (s == "error") return true;
  TORCH_CHECK(false, op, ": encoder_input must be 'canvas' or 'error', got '", s, "'");
}

// a @ b with the requested precision (a, b may be strided views). float64: plain fp64 mm.
// The operand of a product: in bf16 mode a float32 tensor's bf16 copy, else the tensor itself.
// A tensor that enters several products is converted once with this (a bf16 operand is kept).
Tensor as_operand(const Tensor& t, Precision p) {
  return (p == Precision::BF16 && t.scalar_type() == at::kFloat) ? t.to(at::kBFloat16) : t;
}

// a @ b with the requested precision (a, b may be strided views): in bf16 mode bf16 operands with
// fp32 accumulation and output; otherwise the tensors' own dtype (float64: plain fp64 mm).
Tensor mm_p(const Tensor& a, const Tensor& b, Precision p) {
  const Tensor a_op = as_operand(a, p);
  const Tensor b_op = as_operand(b, p);
  if (a_op.scalar_type() == at::kBFloat16) {
#ifdef AVME_CPU_EMULATION
    // aten::mm.dtype (bf16 inputs, fp32 output) exists on CUDA only.
    return at::mm(a_op, b_op).to(at::kFloat);
#else
    return at::mm(a_op, b_op, at::kFloat);
#endif
  }
  return at::mm(a, b);
}

// ---------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------
#ifdef AVME_CPU_EMULATION
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
constexpr const char* kDeviceWord = "a CPU tensor (the test-only CPU emulation of the kernels)";
#else
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
constexpr const char* kDeviceWord = "a CUDA tensor";
#endif

// Largest size of any model dimension (D, He, Hd, Z, C) and of K: the kernels index within a
// row in int (e.g. 2*D + Hd + C columns, 4*He gate columns); offsets across rows are int64.
constexpr int64_t kMaxSize = int64_t(1) << 24;

bool is_given(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// A tensor argument and its name; an optional argument that is absent has tensor == nullptr.
struct NamedTensor {
  NamedTensor(const Tensor& t, const char* n) : tensor(&t), name(n) {}
  NamedTensor(const std::optional<Tensor>& t, const char* n)
      : tensor(is_given(t) ? &*t : nullptr), name(n) {}
  const Tensor* tensor;
  const char* name;
};

// Checks the tensor arguments of one call of `op` against its first tensor argument `ref`.
// The constructor checks `ref` itself (defined, device type, dtype); the methods never read a
// tensor's data, only its metadata, and `ndim` must pass before `size` is read.
class ArgChecker {
 public:
  ArgChecker(const char* op, const Tensor& ref, const char* ref_name)
      : op_(op), ref_(ref), ref_name_(ref_name) {
    TORCH_CHECK(ref.defined(), op, ": ", ref_name, " is undefined; expected a tensor");
    TORCH_CHECK(ref.device().type() == kDeviceType, op, ": ", ref_name, " must be ", kDeviceWord,
                ", got a tensor on ", ref.device(),
                ". The fused ops run on CUDA only; on the CPU use avme_ext.reference "
                "(AVMECore(impl='ref')).");
    TORCH_CHECK(ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble, op, ": ",
                ref_name, " must be float32 or float64, got ", ref.scalar_type());
  }

  // Defined, on ref's device, with ref's dtype.
  void same_device_and_dtype(const Tensor& t, const char* name) const {
    TORCH_CHECK(t.defined(), op_, ": ", name, " is undefined; expected a tensor");
    TORCH_CHECK(t.device().type() == kDeviceType, op_, ": ", name, " must be ", kDeviceWord,
                ", got a tensor on ", t.device());
    TORCH_CHECK(t.device() == ref_.device(), op_, ": ", name, " is on ", t.device(), " but ",
                ref_name_, " is on ", ref_.device(), "; all tensors must be on the same device");
    TORCH_CHECK(t.scalar_type() == ref_.scalar_type(), op_, ": ", name, " has dtype ",
                t.scalar_type(), " but ", ref_name_, " has dtype ", ref_.scalar_type(),
                "; all tensors must have the same dtype (float32 or float64)");
  }
  void same_device_and_dtype(const std::optional<Tensor>& t, const char* name) const {
    if (is_given(t)) same_device_and_dtype(*t, name);
  }
  // The same for each argument of a list, in order.
  void same_device_and_dtype(std::initializer_list<NamedTensor> args) const {
    for (const NamedTensor& a : args) {
      if (a.tensor != nullptr) same_device_and_dtype(*a.tensor, a.name);
    }
  }

  void ndim(const Tensor& t, const char* name, int64_t n, const char* layout) const {
    TORCH_CHECK(t.dim() == n, op_, ": ", name, " must be ", n, "-D ", layout, ", got shape ",
                t.sizes());
  }

  // t.size(i) as a model size in [lo, kMaxSize] (`what` names it, e.g. "He").
  int size(const Tensor& t, const char* name, int64_t i, const char* what, int64_t lo) const {
    return in_range(t.size(i), what, lo, name, i);
  }
  int in_range(int64_t v, const char* what, int64_t lo, const char* name, int64_t i) const {
    TORCH_CHECK(v >= lo && v <= kMaxSize, op_, ": ", what, " = ", v, " (", name, ".shape[", i,
                "]) must be in [", lo, ", ", kMaxSize, "]");
    return static_cast<int>(v);
  }

  // Exactly this shape, and contiguous.
  void shape(const Tensor& t, const char* name, const char* layout, at::IntArrayRef expected) const {
    TORCH_CHECK(t.sizes() == expected, op_, ": ", name, " must have shape ", layout, " = ",
                expected, ", got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), op_, ": ", name,
                " must be contiguous (call .contiguous() on it first)");
  }
  void shape(const std::optional<Tensor>& t, const char* name, const char* layout,
             at::IntArrayRef expected) const {
    if (is_given(t)) shape(*t, name, layout, expected);
  }

  const char* op() const { return op_; }

 private:
  const char* op_;
  const Tensor& ref_;
  const char* ref_name_;
};

// Sizes of one call. B rows, K steps; D data, He/Hd encoder/decoder hidden, Z latent, C classes.
struct Dims {
  int64_t B = 0;
  int K = 0, D = 0, He = 0, Hd = 0, Z = 0, C = 0;
  int64_t enc_in() const { return 2 * int64_t(D) + Hd + C; }  // columns of enc_w_ih
  int64_t He4() const { return 4 * int64_t(He); }
  int64_t Hd4() const { return 4 * int64_t(Hd); }
  int64_t Z2() const { return 2 * int64_t(Z); }
};

// D, Hd and C from the decoder-side weights (d.Z must be set); checks their ranks first.
void decoder_dims(const ArgChecker& c, Dims& d, const Tensor& dec_w_ih, const Tensor& dec_w_hh,
                  const Tensor& write_w) {
  c.ndim(dec_w_ih, "dec_w_ih", 2, "(4*Hd, Z + C)");
  c.ndim(dec_w_hh, "dec_w_hh", 2, "(4*Hd, Hd)");
  c.ndim(write_w, "write_w", 2, "(D, Hd)");
  d.D = c.size(write_w, "write_w", 0, "D", 1);
  d.Hd = c.size(dec_w_hh, "dec_w_hh", 1, "Hd", 1);
  TORCH_CHECK(dec_w_ih.size(1) >= d.Z, c.op(), ": dec_w_ih must have Z + C >= Z = ", d.Z,
              " columns ([z, y]), got shape ", dec_w_ih.sizes());
  d.C = c.in_range(dec_w_ih.size(1) - d.Z, "C", 0, "dec_w_ih", 1);
}

// He and Z from the encoder-side weights; checks their ranks first.
void encoder_dims(const ArgChecker& c, Dims& d, const Tensor& enc_w_ih, const Tensor& enc_w_hh,
                  const Tensor& q_w) {
  c.ndim(enc_w_ih, "enc_w_ih", 2, "(4*He, 2*D + Hd + C)");
  c.ndim(enc_w_hh, "enc_w_hh", 2, "(4*He, He)");
  c.ndim(q_w, "q_w", 2, "(2*Z, He)");
  d.He = c.size(enc_w_hh, "enc_w_hh", 1, "He", 1);
  TORCH_CHECK(q_w.size(0) % 2 == 0, c.op(), ": q_w must have 2*Z rows ([mu; logvar]), got shape ",
              q_w.sizes());
  d.Z = c.in_range(q_w.size(0) / 2, "Z", 1, "q_w", 0);
}

void check_decoder_shapes(const ArgChecker& c, const Dims& d, const Tensor& dec_w_ih,
                          const Tensor& dec_w_hh, const Tensor& write_w) {
  c.shape(dec_w_ih, "dec_w_ih", "(4*Hd, Z + C)", {d.Hd4(), int64_t(d.Z) + d.C});
  c.shape(dec_w_hh, "dec_w_hh", "(4*Hd, Hd)", {d.Hd4(), d.Hd});
  c.shape(write_w, "write_w", "(D, Hd)", {d.D, d.Hd});
}

void check_encoder_shapes(const ArgChecker& c, const Dims& d, const Tensor& enc_w_ih,
                          const Tensor& enc_w_hh, const Tensor& q_w) {
  c.shape(enc_w_ih, "enc_w_ih", "(4*He, 2*D + Hd + C)", {d.He4(), d.enc_in()});
  c.shape(enc_w_hh, "enc_w_hh", "(4*He, He)", {d.He4(), d.He});
  c.shape(q_w, "q_w", "(2*Z, He)", {d.Z2(), d.He});
}

// y is given exactly when the model is conditional (C > 0), with shape (B, C).
void check_y(const ArgChecker& c, const std::optional<Tensor>& y, const Dims& d) {
  if (d.C == 0) {
    TORCH_CHECK(!is_given(y), c.op(), ": y must be None for an unconditional model "
                "(dec_w_ih has Z = ", d.Z, " columns, so C = 0), got a tensor of shape ",
                y->sizes());
  } else {
    TORCH_CHECK(is_given(y), c.op(), ": y (B, C) = [", d.B, ", ", d.C,
                "] is required: the model is conditional (dec_w_ih has Z + C = ", d.Z + d.C,
                " columns)");
    c.ndim(*y, "y", 2, "(B, C)");
    c.shape(*y, "y", "(B, C)", {d.B, d.C});
  }
}

// Sizes of a training call (forward or backward) from its weights, x and eps (ranks first).
Dims training_dims(const ArgChecker& c, const Tensor& x, const Tensor& eps, const Tensor& enc_w_ih,
                   const Tensor& enc_w_hh, const Tensor& q_w, const Tensor& dec_w_ih,
                   const Tensor& dec_w_hh, const Tensor& write_w) {
  Dims d;
  encoder_dims(c, d, enc_w_ih, enc_w_hh, q_w);
  decoder_dims(c, d, dec_w_ih, dec_w_hh, write_w);
  c.ndim(x, "x", 2, "(B, D)");
  c.ndim(eps, "eps", 3, "(K, B, Z)");
  d.B = x.size(0);
  d.K = c.size(eps, "eps", 0, "K", 1);
  return d;
}

// The full shapes of x, y and eps (a training call).
void check_training_inputs(const ArgChecker& c, const Dims& d, const Tensor& x,
                           const std::optional<Tensor>& y, const Tensor& eps) {
  c.shape(x, "x", "(B, D)", {d.B, d.D});
  check_y(c, y, d);
  c.shape(eps, "eps", "(K, B, Z)", {d.K, d.B, d.Z});
}

struct Validated {
  Dims d;
  Precision prec = Precision::FP32;
  bool error_mode = false;
  Design design = Design::kAuto;
};

Validated validate_forward(const Tensor& x, const std::optional<Tensor>& y, const Tensor& eps,
                           const Tensor& enc_w_ih, const Tensor& enc_w_hh, const Tensor& enc_b,
                           const Tensor& q_w, const Tensor& q_b, const Tensor& dec_w_ih,
                           const Tensor& dec_w_hh, const Tensor& dec_b, const Tensor& write_w,
                           const Tensor& write_b, const std::string& encoder_input,
                           const std::string& precision, const std::string& design) {
  Validated v;
  v.error_mode = parse_error_mode(kForwardOp, encoder_input);
  v.prec = parse_precision(kForwardOp, precision);
  v.design = parse_design(kForwardOp, design);
  const ArgChecker c(kForwardOp, x, "x");
  c.same_device_and_dtype({{y, "y"}, {eps, "eps"}, {enc_w_ih, "enc_w_ih"},
                           {enc_w_hh, "enc_w_hh"}, {enc_b, "enc_b"}, {q_w, "q_w"}, {q_b, "q_b"},
                           {dec_w_ih, "dec_w_ih"}, {dec_w_hh, "dec_w_hh"}, {dec_b, "dec_b"},
                           {write_w, "write_w"}, {write_b, "write_b"}});

  v.d = training_dims(c, x, eps, enc_w_ih, enc_w_hh, q_w, dec_w_ih, dec_w_hh, write_w);
  const Dims& d = v.d;
  check_training_inputs(c, d, x, y, eps);
  check_encoder_shapes(c, d, enc_w_ih, enc_w_hh, q_w);
  c.shape(enc_b, "enc_b", "(4*He)", {d.He4()});
  c.shape(q_b, "q_b", "(2*Z)", {d.Z2()});
  check_decoder_shapes(c, d, dec_w_ih, dec_w_hh, write_w);
  c.shape(dec_b, "dec_b", "(4*Hd)", {d.Hd4()});
  c.shape(write_b, "write_b", "(D)", {d.D});
  return v;
}

Validated validate_backward(
    const std::optional<Tensor>& grad_canvas, const std::optional<Tensor>& grad_mu,
    const std::optional<Tensor>& grad_logvar, const std::optional<Tensor>& grad_canvases,
    const Tensor& x, const std::optional<Tensor>& y, const Tensor& eps, const Tensor& logvar,
    const Tensor& canvases, const Tensor& h_enc, const Tensor& c_enc, const Tensor& gates_enc,
    const Tensor& z, const Tensor& h_dec, const Tensor& c_dec, const Tensor& gates_dec,
    const Tensor& enc_w_ih, const Tensor& enc_w_hh, const Tensor& q_w, const Tensor& dec_w_ih,
    const Tensor& dec_w_hh, const Tensor& write_w, const std::string& encoder_input,
    bool need_grad_y, const std::string& precision, const std::string& design) {
  Validated v;
  v.error_mode = parse_error_mode(kBackwardOp, encoder_input);
  v.prec = parse_precision(kBackwardOp, precision);
  v.design = parse_design(kBackwardOp, design);
  const ArgChecker c(kBackwardOp, x, "x");
  c.same_device_and_dtype({{grad_canvas, "grad_canvas"}, {grad_mu, "grad_mu"},
                           {grad_logvar, "grad_logvar"}, {grad_canvases, "grad_canvases"},
                           {y, "y"}, {eps, "eps"}, {logvar, "logvar"}, {canvases, "canvases"},
                           {h_enc, "h_enc"}, {c_enc, "c_enc"}, {gates_enc, "gates_enc"}, {z, "z"},
                           {h_dec, "h_dec"}, {c_dec, "c_dec"}, {gates_dec, "gates_dec"},
                           {enc_w_ih, "enc_w_ih"}, {enc_w_hh, "enc_w_hh"}, {q_w, "q_w"},
                           {dec_w_ih, "dec_w_ih"}, {dec_w_hh, "dec_w_hh"}, {write_w, "write_w"}});

  v.d = training_dims(c, x, eps, enc_w_ih, enc_w_hh, q_w, dec_w_ih, dec_w_hh, write_w);
  const Dims& d = v.d;
  TORCH_CHECK(!need_grad_y || d.C > 0, kBackwardOp, ": need_grad_y is true but the model is "
              "unconditional (C = 0, y is None)");
  check_training_inputs(c, d, x, y, eps);
  const int64_t K = d.K, B = d.B;
  c.shape(logvar, "logvar", "(K, B, Z)", {K, B, d.Z});
  c.ndim(h_enc, "h_enc", 3, "(K, B, He)");
  TORCH_CHECK(h_enc.size(0) != 0 || K == 0, kBackwardOp, ": the forward did not save its state "
              "(it ran with save_for_backward=False, e.g. under torch.no_grad()), so there is "
              "nothing to differentiate");
  c.shape(canvases, "canvases", "(K, B, D)", {K, B, d.D});
  c.shape(h_enc, "h_enc", "(K, B, He)", {K, B, d.He});
  c.shape(c_enc, "c_enc", "(K, B, He)", {K, B, d.He});
  c.shape(gates_enc, "gates_enc", "(K, B, 4*He)", {K, B, d.He4()});
  c.shape(z, "z", "(K, B, Z)", {K, B, d.Z});
  c.shape(h_dec, "h_dec", "(K, B, Hd)", {K, B, d.Hd});
  c.shape(c_dec, "c_dec", "(K, B, Hd)", {K, B, d.Hd});
  c.shape(gates_dec, "gates_dec", "(K, B, 4*Hd)", {K, B, d.Hd4()});
  check_encoder_shapes(c, d, enc_w_ih, enc_w_hh, q_w);
  check_decoder_shapes(c, d, dec_w_ih, dec_w_hh, write_w);
  c.shape(grad_canvas, "grad_canvas", "(B, D)", {B, d.D});
  c.shape(grad_mu, "grad_mu", "(K, B, Z)", {K, B, d.Z});
  c.shape(grad_logvar, "grad_logvar", "(K, B, Z)", {K, B, d.Z});
  c.shape(grad_canvases, "grad_canvases", "(K, B, D)", {K, B, d.D});
  return v;
}

Validated validate_sample(const Tensor& z, const std::optional<Tensor>& y, const Tensor& dec_w_ih,
                          const Tensor& dec_w_hh, const Tensor& dec_b, const Tensor& write_w,
                          const Tensor& write_b, const std::string& precision,
                          const std::string& design) {
  Validated v;
  v.prec = parse_precision(kSampleOp, precision);
  v.design = parse_design(kSampleOp, design);
  const ArgChecker c(kSampleOp, z, "z");
  c.same_device_and_dtype({{y, "y"}, {dec_w_ih, "dec_w_ih"}, {dec_w_hh, "dec_w_hh"},
                           {dec_b, "dec_b"}, {write_w, "write_w"}, {write_b, "write_b"}});

  Dims& d = v.d;
  c.ndim(z, "z", 3, "(K, B, Z)");
  d.K = c.size(z, "z", 0, "K", 1);
  d.B = z.size(1);
  d.Z = c.size(z, "z", 2, "Z", 1);
  decoder_dims(c, d, dec_w_ih, dec_w_hh, write_w);

  c.shape(z, "z", "(K, B, Z)", {d.K, d.B, d.Z});
  check_y(c, y, d);
  check_decoder_shapes(c, d, dec_w_ih, dec_w_hh, write_w);
  c.shape(dec_b, "dec_b", "(4*Hd)", {d.Hd4()});
  c.shape(write_b, "write_b", "(D)", {d.D});
  return v;
}

// ---------------------------------------------------------------------------------------
// Launch planning
// ---------------------------------------------------------------------------------------
struct DeviceInfo {
  int64_t smem_optin;
  int num_sms;
};

DeviceInfo device_info(const Tensor& ref) {
#ifdef AVME_CPU_EMULATION
  // Emulated device: H100-like shared memory; SM count from AVME_EMU_SMS (default 4) so that
  // tests can steer the rows-per-block choice, shared memory from AVME_EMU_SMEM.
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

// Rows per block of the rowtile design for a launch over d.B rows (0: one row's state does not
// fit in the device's shared memory). When the rowtile design is requested by name, a row
// that does not fit is a clear error (checked whatever B is, before anything is allocated).
int plan_rows(const char* op, const Dims& d, int64_t elems_per_row, const Tensor& ref,
              const DeviceInfo& info, Design requested) {
  const int64_t elem_size = static_cast<int64_t>(ref.element_size());
  const int64_t bytes = elems_per_row * elem_size;
  const int rt = choose_rows_per_block(d.B, bytes, info.smem_optin, info.num_sms);
  TORCH_CHECK(rt > 0 || requested != Design::kRowTile, op, ": the rowtile design needs ", bytes,
              " bytes of shared memory per batch row (D=", d.D, ", He=", d.He, ", Hd=", d.Hd,
              ", Z=", d.Z, ", dtype size ", elem_size, ") but this GPU allows at most ",
              info.smem_optin,
              " bytes per block. Use design 'stagewise' or 'auto', smaller sizes, float32, or the "
              "reference implementation (AVMECore(impl='ref')).");
  return rt;
}

// Largest batch the automatic choice gives to the persistent design (where it fits); larger
// batches go to the stagewise design. Not measured yet: the measured per-GPU crossover lives in
// avme_ext/dispatch.py, which passes a design by name once a benchmark has chosen one.
constexpr int64_t kPersistentMaxRows = 256;

// Tile math of the persistent design for a precision: float64 calls on CUDA-core FMA in double;
// fp32 on 3xTF32 tensor cores (about float32 accuracy: within twice FMA's errors at the paper's
// sizes, csrc/README.md) where the device has them, else FMA (persistent::fp32_math); tf32 and
// bf16 on TF32 tensor cores with fp32 accumulation (the design has no bf16 tile: bf16 calls get
// the more accurate TF32 products).
template <typename T>
persistent::Config persistent_config(Precision p) {
  persistent::Config cfg;
  if (std::is_same_v<T, float>)
    cfg.math = p == Precision::FP32 ? persistent::fp32_math() : persistent::kMathTf32;
  return cfg;
}

// The sizes and flags of LoopParams / BackwardParams, every pointer null (the caller sets them).
template <typename T>
LoopParams<T> loop_params(const Dims& d, bool encoder, bool error_mode) {
  const int He = encoder ? d.He : 0;
  auto p = params_with_sizes<LoopParams<T>>(d.B, d.K, d.D, He, d.Hd, d.Z, error_mode);
  p.encoder = encoder;
  return p;
}

template <typename T>
BackwardParams<T> backward_params(const Dims& d, bool error_mode) {
  auto p = params_with_sizes<BackwardParams<T>>(d.B, d.K, d.D, d.He, d.Hd, d.Z, error_mode);
  p.C = d.C;
  return p;
}

// The design that runs: the requested one (an error if it cannot run these sizes), or for
// kAuto the persistent design when it fits and B <= kPersistentMaxRows, else stagewise.
// `p` needs only its sizes and flags (persistent::supports reads no data).
template <typename T, typename Params>
Design resolve_design(const char* op, const Validated& v, const Params& p, const DeviceInfo& info) {
  const auto persistent_fits = [&] {
    return persistent::supports<T>(p, info.num_sms, info.smem_optin, persistent_config<T>(v.prec));
  };
  switch (v.design) {
    case Design::kRowTile:
    case Design::kStagewise:
      return v.design;
    case Design::kPersistent:
      TORCH_CHECK(persistent_fits(), op,
                  ": the persistent design cannot run these sizes on this device (its weight "
                  "slices do not fit in the shared memory of ", info.num_sms,
                  " blocks of at most ", info.smem_optin, " bytes each, or tensor-core tiles "
                  "were asked for on a device older than sm_80); use design 'stagewise' or 'auto'");
      return v.design;
    case Design::kAuto:
      break;
  }
  if (p.B <= kPersistentMaxRows && persistent_fits()) return Design::kPersistent;
  return Design::kStagewise;
}

// The three ops' loops.
enum class Loop { kForward, kSample, kBackward };

// How one call runs, decided before anything is allocated or launched.
struct CallPlan {
  DeviceInfo info;
  Design design = Design::kAuto;  // resolved: never kAuto
  int rowtile_rows = 0;           // rows per block of the rowtile design (0: does not fit)
};

// Plans a call of `loop` on the validated sizes: every error a design can raise about the sizes
// (rowtile shared memory, persistent fit) is raised here, before any allocation. Needs the
// caller's device guard: the persistent design's checks query the current device.
CallPlan plan_call(const char* op, Loop loop, const Validated& v, const Tensor& ref) {
  const Dims& d = v.d;
  CallPlan plan;
  plan.info = device_info(ref);
  const int64_t elems_per_row =
      loop == Loop::kBackward
          ? backward_smem_elems_per_row(d.D, d.He, d.Hd, d.Z)
          : loop_smem_elems_per_row(d.D, loop == Loop::kForward ? d.He : 0, d.Hd, d.Z,
                                    loop == Loop::kForward, v.error_mode);
  plan.rowtile_rows = plan_rows(op, d, elems_per_row, ref, plan.info, v.design);
  plan.design = AT_DISPATCH_FLOATING_TYPES(ref.scalar_type(), "avme_plan", [&] {
    if (loop == Loop::kBackward) {
      return resolve_design<scalar_t>(op, v, backward_params<scalar_t>(d, v.error_mode), plan.info);
    }
    return resolve_design<scalar_t>(
        op, v, loop_params<scalar_t>(d, loop == Loop::kForward, v.error_mode), plan.info);
  });
  return plan;
}

// Runs the planned design on `p`: the K-step loop (LoopParams: training forward or sampler) or
// backward through time (BackwardParams: the per-step gradients).
template <typename T, template <typename> class Params>
void run_design(const Validated& v, const CallPlan& plan, const Params<T>& p,
                cudaStream_t stream) {
  constexpr bool kLoop = std::is_same_v<Params<T>, LoopParams<T>>;
  const persistent::DeviceLimits limits{plan.info.num_sms, plan.info.smem_optin};
  switch (plan.design) {
    case Design::kPersistent:
      if constexpr (kLoop) {
        persistent::launch_forward<T>(p, limits, persistent_config<T>(v.prec), stream);
      } else {
        persistent::launch_backward<T>(p, limits, persistent_config<T>(v.prec), stream);
      }
      return;
    case Design::kStagewise:
      if constexpr (kLoop) {
        stagewise::forward<T>(p, gemm_precision(v.prec), stream);
      } else {
        stagewise::backward<T>(p, gemm_precision(v.prec), stream);
      }
      return;
    default:
      if constexpr (kLoop) {
        launch_loop<T>(p, plan.rowtile_rows, stream);
      } else {
        launch_backward<T>(p, plan.rowtile_rows, stream);
      }
      return;
  }
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
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

template <typename T>
const T* ptr_or_null(const std::optional<Tensor>& t) {
  return is_given(t) && t->numel() > 0 ? t->data_ptr<T>() : nullptr;
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
                           const std::string& precision, const std::string& design) {
  const Validated v = validate_forward(x, y, eps, enc_w_ih, enc_w_hh, enc_b, q_w, q_b, dec_w_ih,
                                       dec_w_hh, dec_b, write_w, write_b, encoder_input,
                                       precision, design);
  const Dims& d = v.d;
  AVME_DEVICE_GUARD(x);
  const CallPlan plan = plan_call(kForwardOp, Loop::kForward, v, x);

  const int64_t B = d.B, K = d.K;
  const int64_t S = save_for_backward ? K : 0;
  const int64_t KC = (return_canvases || save_for_backward) ? K : 0;
  const auto opts = x.options();
  Tensor canvas = uninit({B, d.D}, opts);
  Tensor mu = uninit({K, B, d.Z}, opts);
  Tensor logvar = uninit({K, B, d.Z}, opts);
  Tensor canvases = uninit({KC, B, d.D}, opts);
  Tensor h_enc = uninit({S, B, d.He}, opts);
  Tensor c_enc = uninit({S, B, d.He}, opts);
  Tensor gates_enc = uninit({S, B, d.He4()}, opts);
  Tensor z = uninit({S, B, d.Z}, opts);
  Tensor h_dec = uninit({S, B, d.Hd}, opts);
  Tensor c_dec = uninit({S, B, d.Hd}, opts);
  Tensor gates_dec = uninit({S, B, d.Hd4()}, opts);
  ForwardResult result{canvas, mu, logvar, canvases, h_enc, c_enc, gates_enc, z, h_dec, c_dec,
                       gates_dec};
  if (B == 0) return result;  // nothing to compute: empty outputs, no launch

  const int64_t in_enc = d.enc_in();
  Tensor enc_static, dec_static;
  {
    const MatmulModeGuard matmul_mode(v.prec == Precision::TF32);
    // Step-invariant input products, once per call (not K times).
    enc_static = mm_p(x, enc_w_ih.slice(1, 0, d.D).t(), v.prec);
    enc_static.add_(enc_b);
    if (d.C > 0) {
      enc_static.add_(mm_p(*y, enc_w_ih.slice(1, in_enc - d.C, in_enc).t(), v.prec));
      dec_static = mm_p(*y, dec_w_ih.slice(1, d.Z, int64_t(d.Z) + d.C).t(), v.prec);
      dec_static.add_(dec_b);
    } else {
      dec_static = dec_b;
    }
  }
  enc_static = enc_static.contiguous();
  dec_static = dec_static.contiguous();
  // Recurrent weights in (in, out) layout for coalesced reads in the step kernel.
  const Tensor enc_wT =
      at::cat({enc_w_ih.slice(1, d.D, 2 * int64_t(d.D) + d.Hd), enc_w_hh}, 1).t().contiguous();
  const Tensor dec_wT = at::cat({dec_w_ih.slice(1, 0, d.Z), dec_w_hh}, 1).t().contiguous();
  const Tensor q_wT = q_w.t().contiguous();
  const Tensor write_wT = write_w.t().contiguous();

  const cudaStream_t stream = AVME_CURRENT_STREAM(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "avme_forward", [&] {
    LoopParams<scalar_t> p = loop_params<scalar_t>(d, true, v.error_mode);
    p.x = x.data_ptr<scalar_t>();
    p.eps = eps.data_ptr<scalar_t>();
    p.enc_static = enc_static.data_ptr<scalar_t>();
    p.enc_wT = enc_wT.data_ptr<scalar_t>();
    p.q_wT = q_wT.data_ptr<scalar_t>();
    p.q_b = q_b.data_ptr<scalar_t>();
    p.dec_static = dec_static.data_ptr<scalar_t>();
    p.dec_static_stride = d.C > 0 ? d.Hd4() : 0;
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
    run_design(v, plan, p, stream);
  });
  return result;
}

// ---------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------
// grad_x, grad_y, grad_eps, then the 10 weight/bias gradients.
using BackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                  Tensor, Tensor, Tensor, Tensor, Tensor>;

BackwardResult avme_backward(
    const std::optional<Tensor>& grad_canvas, const std::optional<Tensor>& grad_mu,
    const std::optional<Tensor>& grad_logvar, const std::optional<Tensor>& grad_canvases,
    const Tensor& x, const std::optional<Tensor>& y, const Tensor& eps, const Tensor& logvar,
    const Tensor& canvases, const Tensor& h_enc, const Tensor& c_enc, const Tensor& gates_enc,
    const Tensor& z, const Tensor& h_dec, const Tensor& c_dec, const Tensor& gates_dec,
    const Tensor& enc_w_ih, const Tensor& enc_w_hh, const Tensor& q_w, const Tensor& dec_w_ih,
    const Tensor& dec_w_hh, const Tensor& write_w, const std::string& encoder_input,
    bool need_grad_x, bool need_grad_y, bool need_grad_eps, const std::string& precision,
    const std::string& design) {
  const Validated v = validate_backward(
      grad_canvas, grad_mu, grad_logvar, grad_canvases, x, y, eps, logvar, canvases, h_enc,
      c_enc, gates_enc, z, h_dec, c_dec, gates_dec, enc_w_ih, enc_w_hh, q_w, dec_w_ih, dec_w_hh,
      write_w, encoder_input, need_grad_y, precision, design);
  const Dims& d = v.d;
  const Precision prec = v.prec;
  AVME_DEVICE_GUARD(x);
  const CallPlan plan = plan_call(kBackwardOp, Loop::kBackward, v, x);

  const int64_t B = d.B, K = d.K, He4 = d.He4(), Hd4 = d.Hd4(), in_enc = d.enc_in();
  const auto opts = x.options();
  // Gradients nobody asked for are empty (first dimension 0).
  Tensor grad_x = at::zeros({need_grad_x ? B : 0, d.D}, opts);
  Tensor grad_y = at::zeros({need_grad_y ? B : 0, d.C}, opts);
  Tensor grad_eps = at::zeros({need_grad_eps ? K : 0, B, d.Z}, opts);
  Tensor g_enc_w_ih = at::zeros({He4, in_enc}, opts);
  Tensor g_enc_w_hh = at::zeros({He4, d.He}, opts);
  Tensor g_enc_b = at::zeros({He4}, opts);
  Tensor g_q_w = at::zeros({d.Z2(), d.He}, opts);
  Tensor g_q_b = at::zeros({d.Z2()}, opts);
  Tensor g_dec_w_ih = at::zeros({Hd4, int64_t(d.Z) + d.C}, opts);
  Tensor g_dec_w_hh = at::zeros({Hd4, d.Hd}, opts);
  Tensor g_dec_b = at::zeros({Hd4}, opts);
  Tensor g_write_w = at::zeros({d.D, d.Hd}, opts);
  Tensor g_write_b = at::zeros({d.D}, opts);
  BackwardResult result{grad_x,     grad_y,     grad_eps, g_enc_w_ih, g_enc_w_hh,
                        g_enc_b,    g_q_w,      g_q_b,    g_dec_w_ih, g_dec_w_hh,
                        g_dec_b,    g_write_w,  g_write_b};
  if (B == 0) return result;

  // Per-step gradients written by the kernel (every element is written for rows < B).
  Tensor d_canvas = uninit({K, B, d.D}, opts);
  Tensor d_q = uninit({K, B, d.Z2()}, opts);
  Tensor d_ge = uninit({K, B, He4}, opts);
  Tensor d_gd = uninit({K, B, Hd4}, opts);
  Tensor d_x_error = (v.error_mode && need_grad_x) ? at::zeros({B, d.D}, opts) : Tensor();

  const cudaStream_t stream = AVME_CURRENT_STREAM(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "avme_backward", [&] {
    BackwardParams<scalar_t> p = backward_params<scalar_t>(d, v.error_mode);
    p.grad_canvas = ptr_or_null<scalar_t>(grad_canvas);
    p.grad_canvases = ptr_or_null<scalar_t>(grad_canvases);
    p.grad_mu = ptr_or_null<scalar_t>(grad_mu);
    p.grad_logvar = ptr_or_null<scalar_t>(grad_logvar);
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
    p.d_x_error = ptr_or_null<scalar_t>(d_x_error);
    run_design(v, plan, p, stream);
  });

  // Weight gradients: large products over all K*B rows (cuBLAS through ATen).
  const MatmulModeGuard matmul_mode(prec == Precision::TF32);
  const int64_t M = K * B;
  const Tensor dS = d_canvas.view({M, d.D});
  const Tensor dQ = d_q.view({M, d.Z2()});
  const Tensor dGe = d_ge.view({M, He4});
  const Tensor dGd = d_gd.view({M, Hd4});
  // Each of these enters several products: in bf16 mode convert it once.
  const Tensor ge_op = as_operand(d_ge, prec), gd_op = as_operand(d_gd, prec);
  const Tensor h_enc_op = as_operand(h_enc, prec), h_dec_op = as_operand(h_dec, prec);
  const Tensor sum_ge = d_ge.sum(0);  // (B, 4He): x and y enter every step
  const Tensor sum_gd = d_gd.sum(0);  // (B, 4Hd): y enters every step
  // Rows of steps 2..K and the states of steps 1..K-1 (the recurrent inputs; they are 0 at t=1).
  const int64_t M1 = (K - 1) * B;
  auto tail = [&](const Tensor& t, int64_t n) { return t.slice(0, 1, K).reshape({M1, n}); };
  auto head = [&](const Tensor& t, int64_t n) { return t.slice(0, 0, K - 1).reshape({M1, n}); };
  // Column blocks of the input weights: encoder [x, r, h_dec, y], decoder [z, y].
  const Tensor w_enc_x = enc_w_ih.slice(1, 0, d.D);
  const Tensor w_enc_y = enc_w_ih.slice(1, in_enc - d.C, in_enc);
  const Tensor w_dec_z = dec_w_ih.slice(1, 0, d.Z);
  const Tensor w_dec_y = dec_w_ih.slice(1, d.Z, int64_t(d.Z) + d.C);

  // write
  g_write_w.copy_(mm_p(dS.t(), h_dec_op.view({M, d.Hd}), prec));
  g_write_b.copy_(dS.sum(0));
  // posterior
  g_q_w.copy_(mm_p(dQ.t(), h_enc_op.view({M, d.He}), prec));
  g_q_b.copy_(dQ.sum(0));
  // decoder: input [z, y], recurrent h_dec
  g_dec_w_ih.slice(1, 0, d.Z).copy_(mm_p(gd_op.view({M, Hd4}).t(), z.view({M, d.Z}), prec));
  if (d.C > 0) g_dec_w_ih.slice(1, d.Z, int64_t(d.Z) + d.C).copy_(mm_p(sum_gd.t(), *y, prec));
  if (K > 1) g_dec_w_hh.copy_(mm_p(tail(gd_op, Hd4).t(), head(h_dec_op, d.Hd), prec));
  g_dec_b.copy_(dGd.sum(0));
  // encoder: input [x, r, h_dec, y], recurrent h_enc
  g_enc_w_ih.slice(1, 0, d.D).copy_(mm_p(sum_ge.t(), x, prec));
  if (v.error_mode) {
    // r_t = x - sigmoid(s_{t-1}), s_0 = 0
    Tensor r = uninit({K, B, d.D}, opts);
    r.select(0, 0).copy_(x - 0.5);
    if (K > 1) {
      Tensor rest = r.slice(0, 1, K);
      at::sub_out(rest, x.unsqueeze(0), at::sigmoid(canvases.slice(0, 0, K - 1)));
    }
    g_enc_w_ih.slice(1, d.D, 2 * int64_t(d.D)).copy_(mm_p(ge_op.view({M, He4}).t(), r.view({M, d.D}), prec));
  } else if (K > 1) {
    // r_t = s_{t-1}, s_0 = 0
    g_enc_w_ih.slice(1, d.D, 2 * int64_t(d.D))
        .copy_(mm_p(tail(ge_op, He4).t(), head(canvases, d.D), prec));
  }
  if (K > 1) {
    g_enc_w_ih.slice(1, 2 * int64_t(d.D), 2 * int64_t(d.D) + d.Hd)
        .copy_(mm_p(tail(ge_op, He4).t(), head(h_dec_op, d.Hd), prec));
    g_enc_w_hh.copy_(mm_p(tail(ge_op, He4).t(), head(h_enc_op, d.He), prec));
  }
  if (d.C > 0) g_enc_w_ih.slice(1, in_enc - d.C, in_enc).copy_(mm_p(sum_ge.t(), *y, prec));
  g_enc_b.copy_(dGe.sum(0));

  // Inputs. x and y enter every step's encoder (and y the decoder) through their column
  // blocks of the input weights.
  if (need_grad_x) {
    grad_x.copy_(mm_p(sum_ge, w_enc_x, prec));
    if (v.error_mode) grad_x.add_(d_x_error);
  }
  if (need_grad_y) {
    grad_y.copy_(mm_p(sum_ge, w_enc_y, prec));
    grad_y.add_(mm_p(sum_gd, w_dec_y, prec));
  }
  if (need_grad_eps) {
    // z_t = mu_t + exp(logvar_t / 2) * eps_t feeds only step t's decoder gates, so
    // dL/dz_t = dL/d(decoder gates)_t @ W_z. (The same as total dL/dmu_t - grad_mu_t, without
    // the cancellation of that difference.)
    const Tensor dz = mm_p(gd_op.view({M, Hd4}), w_dec_z, prec).view({K, B, d.Z});
    at::mul_out(grad_eps, dz, at::exp(logvar * 0.5));
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
                                       const std::string& precision, const std::string& design) {
  const Validated v =
      validate_sample(z, y, dec_w_ih, dec_w_hh, dec_b, write_w, write_b, precision, design);
  const Dims& d = v.d;
  AVME_DEVICE_GUARD(z);
  const CallPlan plan = plan_call(kSampleOp, Loop::kSample, v, z);

  const int64_t B = d.B, K = d.K;
  const auto opts = z.options();
  Tensor canvas = uninit({B, d.D}, opts);
  Tensor canvases = uninit({return_canvases ? K : 0, B, d.D}, opts);
  if (B == 0) return {canvas, canvases};

  Tensor dec_static;
  if (d.C > 0) {
    const MatmulModeGuard matmul_mode(v.prec == Precision::TF32);
    dec_static = mm_p(*y, dec_w_ih.slice(1, d.Z, int64_t(d.Z) + d.C).t(), v.prec);
    dec_static.add_(dec_b);
    dec_static = dec_static.contiguous();
  } else {
    dec_static = dec_b;
  }
  const Tensor dec_wT = at::cat({dec_w_ih.slice(1, 0, d.Z), dec_w_hh}, 1).t().contiguous();
  const Tensor write_wT = write_w.t().contiguous();

  const cudaStream_t stream = AVME_CURRENT_STREAM(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "avme_sample", [&] {
    LoopParams<scalar_t> p = loop_params<scalar_t>(d, false, false);
    p.z_in = z.data_ptr<scalar_t>();
    p.dec_static = dec_static.data_ptr<scalar_t>();
    p.dec_static_stride = d.C > 0 ? d.Hd4() : 0;
    p.dec_wT = dec_wT.data_ptr<scalar_t>();
    p.write_wT = write_wT.data_ptr<scalar_t>();
    p.write_b = write_b.data_ptr<scalar_t>();
    p.canvas = canvas.data_ptr<scalar_t>();
    p.canvases = ptr_or_null<scalar_t>(canvases);
    run_design(v, plan, p, stream);
  });
  return {canvas, canvases};
}

constexpr const char* kForwardSchema =
    "forward(Tensor x, Tensor? y, Tensor eps, Tensor enc_w_ih, Tensor enc_w_hh, Tensor enc_b, "
    "Tensor q_w, Tensor q_b, Tensor dec_w_ih, Tensor dec_w_hh, Tensor dec_b, Tensor write_w, "
    "Tensor write_b, str encoder_input, bool return_canvases, bool save_for_backward, "
    "str precision, str design) -> (Tensor canvas, Tensor mu, Tensor logvar, Tensor canvases, "
    "Tensor h_enc, Tensor c_enc, Tensor gates_enc, Tensor z, Tensor h_dec, Tensor c_dec, "
    "Tensor gates_dec)";
constexpr const char* kBackwardSchema =
    "backward(Tensor? grad_canvas, Tensor? grad_mu, Tensor? grad_logvar, "
    "Tensor? grad_canvases, Tensor x, Tensor? y, Tensor eps, Tensor logvar, Tensor canvases, "
    "Tensor h_enc, Tensor c_enc, Tensor gates_enc, Tensor z, Tensor h_dec, Tensor c_dec, "
    "Tensor gates_dec, Tensor enc_w_ih, Tensor enc_w_hh, Tensor q_w, Tensor dec_w_ih, "
    "Tensor dec_w_hh, Tensor write_w, str encoder_input, bool need_grad_x, bool need_grad_y, "
    "bool need_grad_eps, str precision, str design) -> (Tensor grad_x, Tensor grad_y, "
    "Tensor grad_eps, "
    "Tensor grad_enc_w_ih, Tensor grad_enc_w_hh, Tensor grad_enc_b, Tensor grad_q_w, "
    "Tensor grad_q_b, Tensor grad_dec_w_ih, Tensor grad_dec_w_hh, Tensor grad_dec_b, "
    "Tensor grad_write_w, Tensor grad_write_b)";
constexpr const char* kSampleSchema =
    "sample(Tensor z, Tensor? y, Tensor dec_w_ih, Tensor dec_w_hh, Tensor dec_b, "
    "Tensor write_w, Tensor write_b, bool return_canvases, str precision, str design) -> "
    "(Tensor canvas, Tensor canvases)";

// The three schemas, and their kernels (the same functions for every dispatch key used).
void define_ops(torch::Library& m) {
  m.def(kForwardSchema);
  m.def(kBackwardSchema);
  m.def(kSampleSchema);
}

void implement_ops(torch::Library& m) {
  m.impl("forward", &avme_forward);
  m.impl("backward", &avme_backward);
  m.impl("sample", &avme_sample);
}

}  // namespace
}  // namespace avme

#ifndef AVME_CPU_EMULATION
TORCH_LIBRARY(avme, m) {
  // Fake (meta) kernels and autograd live in this Python module.
  m.set_python_module("avme_ext.ops");
  avme::define_ops(m);
}

TORCH_LIBRARY_IMPL(avme, CUDA, m) { avme::implement_ops(m); }

// CPU tensors reach these kernels, whose first check raises a clear "must be a CUDA tensor"
// error (instead of the dispatcher's generic "could not run ... with arguments from the CPU
// backend").
TORCH_LIBRARY_IMPL(avme, CPU, m) { avme::implement_ops(m); }

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
TORCH_LIBRARY(avme_emu, m) { avme::define_ops(m); }

TORCH_LIBRARY_IMPL(avme_emu, CPU, m) { avme::implement_ops(m); }
#endif
