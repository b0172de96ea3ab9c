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
// error of a design forced by name that cannot run these sizes, with its reason (the rowtile
// design's shared memory per row, the persistent design's weight slices); only then does it
// allocate and launch. The host's own choice ("auto", or "auto:<design>": that design where it
// can run) is always a design that can: the stagewise design runs every size.
//
// Host work per call, besides the design's loop: the forward hoists the step-invariant input
// products (one GEMM each, the bias as its addend) and, for the rowtile and persistent designs
// only, lays out their (in, out) weight copies (the stagewise design reads the nn layouts); the
// backward writes every weight gradient with one product each, in place into its output or a
// column block of it (the encoder's r, h_dec and recurrent blocks share one product), takes the
// LSTM bias gradients from the per-row sums that x and y need anyway, and gets dL/deps from the
// design and dL/dx through the error image from one product.

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
#include "common/gemm_out.h"
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

// The `design` argument of the ops: a design by name (forced: a clear error where it cannot run
// the call), "auto" (the host's choice), or "auto:<name>" (that design where it can run the call,
// else the host's choice: how avme_ext asks for the design a benchmark measured fastest, since
// a size or device the benchmark did not cover may not fit it).
struct DesignRequest {
  Design forced = Design::kAuto;     // kAuto: not forced
  Design preferred = Design::kAuto;  // with forced == kAuto: tried before the host's choice
};

std::optional<Design> named_design(const std::string& s) {
  if (s == "rowtile") return Design::kRowTile;
  if (s == "persistent") return Design::kPersistent;
  if (s == "stagewise") return Design::kStagewise;
  return std::nullopt;
}

DesignRequest parse_design(const char* op, const std::string& s) {
  constexpr const char* kPrefer = "auto:";
  if (s == "auto") return {};
  if (const auto d = named_design(s)) return {*d, Design::kAuto};
  if (s.rfind(kPrefer, 0) == 0) {
    if (const auto d = named_design(s.substr(std::char_traits<char>::length(kPrefer)))) {
      return {Design::kAuto, *d};
    }
  }
  TORCH_CHECK(false, op, ": design must be one of 'auto', 'rowtile', 'persistent', 'stagewise', "
              "or 'auto:' followed by one of the three named designs, got '", s, "'");
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

// The operand of a product: in bf16 mode a float32 tensor's bf16 copy, else the tensor itself.
// A tensor that enters several products is converted once with this (a bf16 operand is kept).
Tensor as_operand(const Tensor& t, Precision p) {
  return (p == Precision::BF16 && t.scalar_type() == at::kFloat) ? t.to(at::kBFloat16) : t;
}

// The products below, with the requested precision: in bf16 mode bf16 operands with fp32
// accumulation and output; otherwise the tensors' own dtype (float64: plain fp64 products).
// a and b may be strided or transposed views.

// out = a @ b into `out` (a column block of a wider matrix allowed; no temporary on CUDA).
void mm_into(const Tensor& out, const Tensor& a, const Tensor& b, Precision p) {
  gemm_out(out, as_operand(a, p), as_operand(b, p));
}

// out += a @ b.
void add_mm_into(Tensor& out, const Tensor& a, const Tensor& b, Precision p) {
  const Tensor a_op = as_operand(a, p), b_op = as_operand(b, p);
  if (a_op.scalar_type() == out.scalar_type()) {
    out.addmm_(a_op, b_op);
    return;
  }
  Tensor product = at::empty_like(out);  // bf16 operands: no accumulating GEMM into fp32 here
  gemm_out(product, a_op, b_op);
  out.add_(product);
}

// bias + a @ b (bias (N) added to every row): one GEMM with the bias as its addend.
Tensor affine(const Tensor& bias, const Tensor& a, const Tensor& b, Precision p) {
  const Tensor a_op = as_operand(a, p), b_op = as_operand(b, p);
  if (a_op.scalar_type() == bias.scalar_type()) return at::addmm(bias, a_op, b_op);
  Tensor out = at::empty({a.size(0), b.size(1)}, bias.options());
  gemm_out(out, a_op, b_op);
  out.add_(bias);
  return out;
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
  DesignRequest design;
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

// Largest batch the automatic choice gives to the persistent design (where it fits); larger
// batches go to the stagewise design. Not measured yet: the measured per-GPU crossover lives in
// avme_ext/dispatch.py, which passes a design by name once a benchmark has chosen one.
constexpr int64_t kPersistentMaxRows = 256;

// Tile math of the persistent design for a precision: float64 calls on CUDA-core FMA in double;
// fp32 on 3xTF32 tensor cores (about float32 accuracy: within twice FMA's errors at the paper's
// sizes, csrc/README.md) where the device has them and its weights fit, else FMA
// (persistent::kMathFp32); tf32 and bf16 on TF32 tensor cores with fp32 accumulation (the
// design has no bf16 tile: bf16 calls get the more accurate TF32 products).
template <typename T>
persistent::Config persistent_config(Precision p) {
  persistent::Config cfg;
  if (std::is_same_v<T, float>)
    cfg.math = p == Precision::FP32 ? persistent::kMathFp32 : persistent::kMathTf32;
  return cfg;
}

// The sizes and flags of LoopParams / BackwardParams, every pointer null (the caller sets them).
template <typename T>
LoopParams<T> loop_params(const Dims& d, bool encoder, bool error_mode) {
  const int He = encoder ? d.He : 0;
  auto p = params_with_sizes<LoopParams<T>>(d.B, d.K, d.D, He, d.Hd, d.Z, error_mode);
  p.encoder = encoder;
  p.C = d.C;
  return p;
}

template <typename T>
BackwardParams<T> backward_params(const Dims& d, bool error_mode) {
  auto p = params_with_sizes<BackwardParams<T>>(d.B, d.K, d.D, d.He, d.Hd, d.Z, error_mode);
  p.C = d.C;
  return p;
}

// The three ops' loops.
enum class Loop { kForward, kSample, kBackward };

// Shared-memory bytes of one batch row of the rowtile design (its state lives there).
int64_t rowtile_bytes_per_row(Loop loop, const Validated& v, int64_t elem_size) {
  const Dims& d = v.d;
  const int64_t elems = loop == Loop::kBackward
                            ? backward_smem_elems_per_row(d.D, d.He, d.Hd, d.Z)
                            : loop_smem_elems_per_row(d.D, loop == Loop::kForward ? d.He : 0,
                                                      d.Hd, d.Z, loop == Loop::kForward,
                                                      v.error_mode);
  return elems * elem_size;
}

std::string sizes_text(const Dims& d, int64_t elem_size) {
  return c10::str("D=", d.D, ", He=", d.He, ", Hd=", d.Hd, ", Z=", d.Z, ", C=", d.C,
                  ", dtype size ", elem_size);
}

// Why the rowtile design cannot run `loop` on this device ("" when it can): one batch row's
// state must fit in a block's shared memory, whatever B is.
std::string rowtile_refusal(Loop loop, const Validated& v, int64_t elem_size,
                            const DeviceInfo& info) {
  const int64_t bytes = rowtile_bytes_per_row(loop, v, elem_size);
  if (bytes <= info.smem_optin) return "";
  return c10::str("the rowtile design needs ", bytes, " bytes of shared memory per batch row (",
                  sizes_text(v.d, elem_size), ") but this GPU allows at most ", info.smem_optin,
                  " bytes per block. Use design 'stagewise' or 'auto', smaller sizes, float32, "
                  "or the reference implementation (AVMECore(impl='ref')).");
}

// Why the persistent design cannot run `p` (LoopParams or BackwardParams, sizes and flags only)
// on this device ("" when it can): each block's weight slices must fit in its shared memory.
template <typename T, typename Params>
std::string persistent_refusal(const Params& p, const Validated& v, const DeviceInfo& info) {
  const persistent::Config cfg = persistent_config<T>(v.prec);
  if (persistent::supports<T>(p, info.num_sms, info.smem_optin, cfg)) return "";
  std::string why = c10::str(
      "a planned block of its size does not fit on a multiprocessor for a cooperative launch, or "
      "tensor-core tiles were asked for on a device older than sm_80");
  try {
    const persistent::DeviceLimits limits{info.num_sms, info.smem_optin};
    persistent::LaunchInfo launch;
    if constexpr (std::is_same_v<Params, LoopParams<T>>) {
      launch = persistent::describe_forward<T>(p, limits, cfg);
    } else {
      launch = persistent::describe_backward<T>(p, limits, cfg);
    }
    if (launch.smem_bytes > info.smem_optin) {
      why = c10::str("each of its ", launch.config.ctas, " blocks would need ", launch.smem_bytes,
                     " bytes of shared memory for its weight slices and tiles, and this device "
                     "allows at most ", info.smem_optin, " per block");
    }
  } catch (const c10::Error& e) {
    why = e.what_without_backtrace();
  }
  return c10::str("the persistent design cannot run these sizes on this device (",
                  sizes_text(v.d, static_cast<int64_t>(sizeof(T))), "): ", why,
                  "; use design 'stagewise' or 'auto'");
}

// Why `design` cannot run `loop` of the call `v` on this device, or "" when it can. The
// stagewise design runs every size (its GEMMs and element-wise kernels have no size limit).
std::string refusal(Design design, Loop loop, const Validated& v, const Tensor& ref,
                    const DeviceInfo& info) {
  switch (design) {
    case Design::kRowTile:
      return rowtile_refusal(loop, v, static_cast<int64_t>(ref.element_size()), info);
    case Design::kPersistent:
      return AT_DISPATCH_FLOATING_TYPES(ref.scalar_type(), "avme_plan", [&] {
        if (loop == Loop::kBackward) {
          return persistent_refusal<scalar_t>(backward_params<scalar_t>(v.d, v.error_mode), v,
                                              info);
        }
        return persistent_refusal<scalar_t>(
            loop_params<scalar_t>(v.d, loop == Loop::kForward, v.error_mode), v, info);
      });
    default:
      return "";
  }
}

// How one call runs, decided before anything is allocated or launched.
struct CallPlan {
  DeviceInfo info;
  Design design = Design::kAuto;  // resolved: never kAuto
  int rowtile_rows = 0;           // rows per block of the rowtile design (when it runs)
};

// Plans a call of `loop` on the validated sizes, before any allocation: a forced design that
// cannot run them is a clear error; a preferred one ("auto:<name>") runs where it can; the
// host's choice is the persistent design when it can run and B <= kPersistentMaxRows, else the
// stagewise design (which runs every size). Needs the caller's device guard: the persistent
// design's checks query the current device.
CallPlan plan_call(const char* op, Loop loop, const Validated& v, const Tensor& ref) {
  CallPlan plan;
  plan.info = device_info(ref);
  const auto why_not = [&](Design design) { return refusal(design, loop, v, ref, plan.info); };
  const DesignRequest& request = v.design;
  if (request.forced != Design::kAuto) {
    const std::string why = why_not(request.forced);
    TORCH_CHECK(why.empty(), op, ": ", why);
    plan.design = request.forced;
  } else if (request.preferred != Design::kAuto && why_not(request.preferred).empty()) {
    plan.design = request.preferred;
  } else if (v.d.B <= kPersistentMaxRows && why_not(Design::kPersistent).empty()) {
    plan.design = Design::kPersistent;
  } else {
    plan.design = Design::kStagewise;
  }
  if (plan.design == Design::kRowTile) {
    plan.rowtile_rows = choose_rows_per_block(
        v.d.B, rowtile_bytes_per_row(loop, v, static_cast<int64_t>(ref.element_size())),
        plan.info.smem_optin, plan.info.num_sms);
  }
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

// [a | b]^T for two (out, in_a) / (out, in_b) weights: one contiguous (in_a + in_b, out) matrix,
// written by two transposing copies.
Tensor stacked_transpose(const Tensor& a, const Tensor& b) {
  Tensor t = at::empty({a.size(1) + b.size(1), a.size(0)}, a.options());
  t.narrow(0, 0, a.size(1)).copy_(a.t());
  t.narrow(0, a.size(1), b.size(1)).copy_(b.t());
  return t;
}

// The weights of a loop call (the training forward, or the sampler without the encoder's) in
// the layout the planned design reads (avme.h, LoopParams): the stagewise design takes the
// nn.LSTMCell / nn.Linear layouts as they are (no copy); the rowtile and persistent designs read
// (in, out) copies, made here once per call.
struct LoopWeights {
  Tensor enc_w_ih, enc_w_hh, q_w, dec_w_ih, dec_w_hh, write_w;  // nn layouts
  Tensor enc_wT, q_wT, dec_wT, write_wT;                        // (in, out) copies, or undefined

  LoopWeights(Design design, const Dims& d, const Tensor& dec_ih, const Tensor& dec_hh,
              const Tensor& write, const Tensor& enc_ih = Tensor(),
              const Tensor& enc_hh = Tensor(), const Tensor& q = Tensor())
      : enc_w_ih(enc_ih), enc_w_hh(enc_hh), q_w(q), dec_w_ih(dec_ih), dec_w_hh(dec_hh),
        write_w(write) {
    if (design == Design::kStagewise) return;
    dec_wT = stacked_transpose(dec_w_ih.slice(1, 0, d.Z), dec_w_hh);
    write_wT = write_w.t().contiguous();
    if (!enc_w_ih.defined()) return;
    enc_wT = stacked_transpose(enc_w_ih.slice(1, d.D, 2 * int64_t(d.D) + d.Hd), enc_w_hh);
    q_wT = q_w.t().contiguous();
  }

  template <typename T>
  void fill(LoopParams<T>& p) const {
    p.dec_w_ih = dec_w_ih.data_ptr<T>();
    p.dec_w_hh = dec_w_hh.data_ptr<T>();
    p.write_w = write_w.data_ptr<T>();
    p.dec_wT = ptr_or_null<T>(dec_wT);
    p.write_wT = ptr_or_null<T>(write_wT);
    if (!enc_w_ih.defined()) return;
    p.enc_w_ih = enc_w_ih.data_ptr<T>();
    p.enc_w_hh = enc_w_hh.data_ptr<T>();
    p.q_w = q_w.data_ptr<T>();
    p.enc_wT = ptr_or_null<T>(enc_wT);
    p.q_wT = ptr_or_null<T>(q_wT);
  }
};

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
    // Step-invariant input products, once per call (not K times), each bias the addend of its
    // GEMM.
    enc_static = affine(enc_b, x, enc_w_ih.slice(1, 0, d.D).t(), v.prec);
    if (d.C > 0) {
      add_mm_into(enc_static, *y, enc_w_ih.slice(1, in_enc - d.C, in_enc).t(), v.prec);
      dec_static = affine(dec_b, *y, dec_w_ih.slice(1, d.Z, int64_t(d.Z) + d.C).t(), v.prec);
    } else {
      dec_static = dec_b;
    }
  }
  const LoopWeights weights(plan.design, d, dec_w_ih, dec_w_hh, write_w, enc_w_ih, enc_w_hh, q_w);

  const cudaStream_t stream = AVME_CURRENT_STREAM(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "avme_forward", [&] {
    LoopParams<scalar_t> p = loop_params<scalar_t>(d, true, v.error_mode);
    p.x = x.data_ptr<scalar_t>();
    p.eps = eps.data_ptr<scalar_t>();
    p.enc_static = enc_static.data_ptr<scalar_t>();
    p.q_b = q_b.data_ptr<scalar_t>();
    p.dec_static = dec_static.data_ptr<scalar_t>();
    p.dec_static_stride = d.C > 0 ? d.Hd4() : 0;
    p.write_b = write_b.data_ptr<scalar_t>();
    weights.fill(p);
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
// The encoder's step inputs [r_t | h_dec_{t-1} | h_enc_{t-1}] (B rows each) of the steps whose
// inputs are not all zero, side by side in one (steps, B, D + Hd + He) operand of the products
// (bf16 in bf16 mode): canvas mode r_t = s_{t-1}, steps 2..K (every input of step 1 is zero);
// error mode r_t = x - sigmoid(s_{t-1}) computed straight into its columns, steps 1..K, with
// h_dec_0 = h_enc_0 = 0.
Tensor encoder_step_inputs(const Tensor& x, const Tensor& canvases, const Tensor& h_dec,
                           const Tensor& h_enc, bool error_mode, Precision p) {
  const int64_t K = canvases.size(0), B = canvases.size(1), D = canvases.size(2);
  const int64_t Hd = h_dec.size(2), He = h_enc.size(2);
  const int64_t first = error_mode ? 0 : 1;  // first step with an input
  const auto type = p == Precision::BF16 && x.scalar_type() == at::kFloat ? at::kBFloat16
                                                                           : x.scalar_type();
  Tensor in = at::empty({K - first, B, D + Hd + He}, x.options().dtype(type));
  if (K == first) return in;
  // rows of step t >= 1: the states of step t - 1
  Tensor later = in.slice(0, 1 - first);
  later.narrow(2, D, Hd).copy_(h_dec.slice(0, 0, K - 1));
  later.narrow(2, D + Hd, He).copy_(h_enc.slice(0, 0, K - 1));
  Tensor r = in.narrow(2, 0, D);
  if (!error_mode) {
    r.copy_(canvases.slice(0, 0, K - 1));
    return in;
  }
  in.select(0, 0).narrow(1, D, Hd + He).zero_();
  // r = x - sigmoid(s_prev) with s_prev = 0 at the first step; the sigmoid goes through the
  // state dtype (a bf16 operand is rounded once, after the subtraction).
  Tensor sig = type == x.scalar_type() ? r : at::empty({K, B, D}, x.options());
  sig.select(0, 0).fill_(0.5);
  if (K > 1) {
    Tensor later_sig = sig.slice(0, 1);
    at::sigmoid_out(later_sig, canvases.slice(0, 0, K - 1));
  }
  at::sub_out(r, x, sig);
  return in;
}

// dL/d[W_r | W_hdec] (the r and h_dec column blocks of enc_w_ih, `g_r_hdec`) and dL/dW_hh of
// the encoder (`g_hh`) as ONE product d_gates_enc^T [r | h_dec_prev | h_enc_prev] over the steps
// of encoder_step_inputs (N = D + Hd + He), whose column blocks are then copied out.
void encoder_step_input_grads(const Tensor& g_r_hdec, const Tensor& g_hh, const Tensor& ge_op,
                              const Tensor& x, const Tensor& canvases, const Tensor& h_dec,
                              const Tensor& h_enc, bool error_mode, Precision p) {
  const Tensor in = encoder_step_inputs(x, canvases, h_dec, h_enc, error_mode, p);
  const int64_t steps = in.size(0), K = ge_op.size(0), B = ge_op.size(1);
  const int64_t width = in.size(2), He4 = ge_op.size(2), He = g_hh.size(1);
  if (steps == 0) {  // K = 1 in canvas mode: every input is zero
    g_r_hdec.zero_();
    g_hh.zero_();
    return;
  }
  Tensor g = at::empty({He4, width}, g_hh.options());
  mm_into(g, ge_op.slice(0, K - steps).reshape({steps * B, He4}).t(),
          in.view({steps * B, width}), p);
  g_r_hdec.copy_(g.narrow(1, 0, width - He));
  g_hh.copy_(g.narrow(1, width - He, He));
}

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
  // Gradients nobody asked for are empty (first dimension 0). Every other output is written
  // whole below (by a product, a sum, a kernel or an explicit zero).
  Tensor grad_x = uninit({need_grad_x ? B : 0, d.D}, opts);
  Tensor grad_y = uninit({need_grad_y ? B : 0, d.C}, opts);
  Tensor grad_eps = uninit({need_grad_eps ? K : 0, B, d.Z}, opts);
  Tensor g_enc_w_ih = uninit({He4, in_enc}, opts);
  Tensor g_enc_w_hh = uninit({He4, d.He}, opts);
  Tensor g_enc_b = uninit({He4}, opts);
  Tensor g_q_w = uninit({d.Z2(), d.He}, opts);
  Tensor g_q_b = uninit({d.Z2()}, opts);
  Tensor g_dec_w_ih = uninit({Hd4, int64_t(d.Z) + d.C}, opts);
  Tensor g_dec_w_hh = uninit({Hd4, d.Hd}, opts);
  Tensor g_dec_b = uninit({Hd4}, opts);
  Tensor g_write_w = uninit({d.D, d.Hd}, opts);
  Tensor g_write_b = uninit({d.D}, opts);
  BackwardResult result{grad_x,     grad_y,     grad_eps, g_enc_w_ih, g_enc_w_hh,
                        g_enc_b,    g_q_w,      g_q_b,    g_dec_w_ih, g_dec_w_hh,
                        g_dec_b,    g_write_w,  g_write_b};
  if (B == 0) {  // no rows: every gradient is zero
    for (Tensor* t : {&grad_x, &grad_y, &grad_eps, &g_enc_w_ih, &g_enc_w_hh, &g_enc_b, &g_q_w,
                      &g_q_b, &g_dec_w_ih, &g_dec_w_hh, &g_dec_b, &g_write_w, &g_write_b}) {
      t->zero_();
    }
    return result;
  }

  // Per-step gradients written by the kernel (every element is written for rows < B), and
  // dL/deps where the design writes it (from the dL/dz_t it computes anyway).
  Tensor d_canvas = uninit({K, B, d.D}, opts);
  Tensor d_q = uninit({K, B, d.Z2()}, opts);
  Tensor d_ge = uninit({K, B, He4}, opts);
  Tensor d_gd = uninit({K, B, Hd4}, opts);

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
    // dL/dx through the error image is sum_t dL/dr_t = (sum_t d_gates_enc_t) W_r: one product
    // below, not K accumulations in the kernels.
    p.grad_eps = need_grad_eps ? grad_eps.data_ptr<scalar_t>() : nullptr;
    run_design(v, plan, p, stream);
  });

  // Weight gradients: large products over all K*B rows (cuBLAS through ATen), each written in
  // place into its output or a column block of it.
  const MatmulModeGuard matmul_mode(prec == Precision::TF32);
  const int64_t M = K * B;
  const Tensor dS = d_canvas.view({M, d.D});
  const Tensor dQ = d_q.view({M, d.Z2()});
  // Each of these enters several products: in bf16 mode convert it once.
  const Tensor ge_op = as_operand(d_ge, prec), gd_op = as_operand(d_gd, prec);
  const Tensor h_enc_op = as_operand(h_enc, prec), h_dec_op = as_operand(h_dec, prec);
  // x and y enter every step: their products take the gate gradients summed over the K steps
  // (B rows), and the LSTM biases take these sums summed over the rows (no second reduction of
  // the K*B rows).
  const Tensor sum_ge = d_ge.sum(0);                            // (B, 4He)
  const Tensor sum_gd = d.C > 0 ? d_gd.sum(0) : Tensor();       // (B, 4Hd): y's products
  // Column blocks of the input weights: encoder [x, r, h_dec, y], decoder [z, y].
  const Tensor w_enc_x = enc_w_ih.slice(1, 0, d.D);
  const Tensor w_enc_r = enc_w_ih.slice(1, d.D, 2 * int64_t(d.D));
  const Tensor w_enc_y = enc_w_ih.slice(1, in_enc - d.C, in_enc);
  const Tensor w_dec_y = dec_w_ih.slice(1, d.Z, int64_t(d.Z) + d.C);

  // write
  mm_into(g_write_w, dS.t(), h_dec_op.view({M, d.Hd}), prec);
  at::sum_out(g_write_b, dS, 0);
  // posterior
  mm_into(g_q_w, dQ.t(), h_enc_op.view({M, d.He}), prec);
  at::sum_out(g_q_b, dQ, 0);
  // decoder: input [z, y], recurrent h_dec (zero at t = 1: steps 2..K against states 1..K-1)
  mm_into(g_dec_w_ih.slice(1, 0, d.Z), gd_op.view({M, Hd4}).t(), z.view({M, d.Z}), prec);
  if (d.C > 0) {
    mm_into(g_dec_w_ih.slice(1, d.Z, int64_t(d.Z) + d.C), sum_gd.t(), *y, prec);
    at::sum_out(g_dec_b, sum_gd, 0);
  } else {
    at::sum_out(g_dec_b, d_gd, {0, 1});
  }
  if (K > 1) {
    const int64_t M1 = (K - 1) * B;
    mm_into(g_dec_w_hh, gd_op.slice(0, 1, K).reshape({M1, Hd4}).t(),
            h_dec_op.slice(0, 0, K - 1).reshape({M1, d.Hd}), prec);
  } else {
    g_dec_w_hh.zero_();
  }
  // encoder: input [x, r, h_dec, y], recurrent h_enc
  mm_into(g_enc_w_ih.slice(1, 0, d.D), sum_ge.t(), x, prec);
  if (d.C > 0) mm_into(g_enc_w_ih.slice(1, in_enc - d.C, in_enc), sum_ge.t(), *y, prec);
  at::sum_out(g_enc_b, sum_ge, 0);
  encoder_step_input_grads(g_enc_w_ih.slice(1, d.D, 2 * int64_t(d.D) + d.Hd), g_enc_w_hh, ge_op,
                           x, canvases, h_dec, h_enc, v.error_mode, prec);

  // Inputs. x and y enter every step's encoder (and y the decoder) through their column
  // blocks of the input weights; in error mode x also enters every r_t = x - sigmoid(s_{t-1}).
  if (need_grad_x) {
    mm_into(grad_x, sum_ge, w_enc_x, prec);
    if (v.error_mode) add_mm_into(grad_x, sum_ge, w_enc_r, prec);
  }
  if (need_grad_y) {
    mm_into(grad_y, sum_ge, w_enc_y, prec);
    add_mm_into(grad_y, sum_gd, w_dec_y, prec);
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

  Tensor dec_static = dec_b;
  if (d.C > 0) {
    const MatmulModeGuard matmul_mode(v.prec == Precision::TF32);
    dec_static = affine(dec_b, *y, dec_w_ih.slice(1, d.Z, int64_t(d.Z) + d.C).t(), v.prec);
  }
  const LoopWeights weights(plan.design, d, dec_w_ih, dec_w_hh, write_w);

  const cudaStream_t stream = AVME_CURRENT_STREAM(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "avme_sample", [&] {
    LoopParams<scalar_t> p = loop_params<scalar_t>(d, false, false);
    p.z_in = z.data_ptr<scalar_t>();
    p.dec_static = dec_static.data_ptr<scalar_t>();
    p.dec_static_stride = d.C > 0 ? d.Hd4() : 0;
    p.write_b = write_b.data_ptr<scalar_t>();
    weights.fill(p);
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
