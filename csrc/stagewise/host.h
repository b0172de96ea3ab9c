// Host-side building blocks of the stagewise forward and backward (csrc/stagewise/stagewise.h):
// the call's device/dtypes/stream, raw-pointer views, the GEMM wrapper and its precision guard,
// and the slot layout of the GEMM-operand buffers with the matching packed weights.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/util/BFloat16.h>

#include "common/gemm_out.h"
#include "common/matmul_mode.h"
#include "stagewise/pointwise.h"
#include "stagewise/stagewise.h"

#ifndef AVME_CPU_EMULATION
#include <c10/cuda/CUDAGuard.h>
#endif

namespace avme {
namespace stagewise {
namespace detail {

// Device, dtypes and stream of one forward or backward call.
struct CallContext {
  at::Device device;
  at::ScalarType state_type;    // T: states, outputs, GEMM outputs
  at::ScalarType operand_type;  // A: GEMM operands (T, or bfloat16 for kBF16 with float32)

  at::TensorOptions state() const { return at::TensorOptions().dtype(state_type).device(device); }
  at::TensorOptions operand() const {
    return at::TensorOptions().dtype(operand_type).device(device);
  }
  bool casts_operands() const { return operand_type != state_type; }
};

// The current device (set by the caller's device guard), T and the operand type.
CallContext make_context(at::ScalarType state_type, GemmPrecision precision);

// Non-owning tensor over caller memory on the call's device (no pointer-attribute query).
at::Tensor wrap(const void* data, at::IntArrayRef sizes, at::ScalarType dtype,
                const CallContext& ctx);

// A workspace whose every element a GEMM or kernel writes before anything reads it: uninitialised
// on CUDA (recycled caching-allocator memory); NaN-filled on the CPU emulator, so that a read
// before the first write shows up in the comparisons there as it would on a GPU.
at::Tensor uninitialized(at::IntArrayRef sizes, const at::TensorOptions& opts);

// `x` as the operand type: a no-op view when it already is, else a cast copy (once per call).
at::Tensor as_operand(const at::Tensor& x, const CallContext& ctx);

// Makes ATen enqueue its work on `stream` for its lifetime (CUDA builds; nothing on the emulator).
class StreamScope {
 public:
  explicit StreamScope(cudaStream_t stream);

 private:
#ifndef AVME_CPU_EMULATION
  std::optional<c10::cuda::CUDAStreamGuard> guard_;
#endif
};

// Columns of a GEMM-operand buffer made of consecutive slots, each starting at a multiple of
// kColumnAlign; the padding columns must read zero (zero_padding, pack_columns).
class ColumnLayout {
 public:
  static constexpr int64_t kColumnAlign = 8;
  ColumnLayout(std::initializer_list<int64_t> widths);
  size_t slots() const { return widths_.size(); }
  int64_t offset(size_t slot) const { return offsets_.at(slot); }
  int64_t width(size_t slot) const { return widths_.at(slot); }
  // First column after slot `slot`'s padding (the next slot's offset, or total()).
  int64_t padded_end(size_t slot) const {
    return slot + 1 < offsets_.size() ? offsets_[slot + 1] : total_;
  }
  int64_t total() const { return total_; }

 private:
  std::vector<int64_t> widths_, offsets_;
  int64_t total_ = 0;
};

// Zeroes the padding columns of `buffer` (rows of layout.total() columns) between and after
// the layout's slots; the slots themselves are left as they are.
void zero_padding(const at::Tensor& buffer, const ColumnLayout& layout);

// The (out, in) weights `parts` side by side in one (out, layout.total()) matrix of `opts`' dtype:
// part i in the columns of the layout's slot i, zero in the padding columns.
at::Tensor pack_columns(const std::vector<at::Tensor>& parts, const ColumnLayout& layout,
                        const at::TensorOptions& opts);

// The weights of one call as its GEMMs take them, prepared once per call from the
// nn.LSTMCell / nn.Linear layouts (LoopParams and BackwardParams hold the same fields) and read
// by both directions: the encoder's [W_r | W_hdec | W_hh] (4He, We) and the decoder's
// [W_z | W_hh] (4Hd, Wd) packed to the slot layouts of E_in / D_in (copies of contiguous row
// segments, zero only in the padding columns); q_w (2Z, He) and write_w (D, Hd) as they are
// (no copy; one cast for bf16 operands). The forward multiplies by their transposes (views,
// which cuBLAS takes as transposed operands), the backward by the matrices themselves.
struct GemmWeights {
  ColumnLayout enc_cols;  // E_in = [r | h_dec | h_enc]
  ColumnLayout dec_cols;  // D_in = [z | h_dec]
  at::Tensor enc, q;      // encoder only (undefined for the sampler)
  at::Tensor dec, write;

  template <typename Params>
  GemmWeights(const Params& p, bool encoder, const CallContext& ctx)
      : enc_cols({p.D, p.Hd, std::max(p.He, 1)}), dec_cols({p.Z, p.Hd}) {
    const int64_t D = p.D, He = p.He, Hd = p.Hd, Z = p.Z, C = p.C;
    const auto st = ctx.state_type;
    const at::Tensor dec_w_ih = wrap(p.dec_w_ih, {4 * Hd, Z + C}, st, ctx);
    dec = pack_columns({dec_w_ih.narrow(1, 0, Z), wrap(p.dec_w_hh, {4 * Hd, Hd}, st, ctx)},
                       dec_cols, ctx.operand());
    write = as_operand(wrap(p.write_w, {D, Hd}, st, ctx), ctx);
    if (!encoder) return;
    const at::Tensor enc_w_ih = wrap(p.enc_w_ih, {4 * He, 2 * D + Hd + C}, st, ctx);
    enc = pack_columns({enc_w_ih.narrow(1, D, D), enc_w_ih.narrow(1, 2 * D, Hd),
                        wrap(p.enc_w_hh, {4 * He, He}, st, ctx)},
                       enc_cols, ctx.operand());
    q = as_operand(wrap(p.q_w, {2 * Z, He}, st, ctx), ctx);
  }
};

// Typed slot of a row-major buffer at column `col`.
template <typename U>
Slot<U> slot(const at::Tensor& buffer, int64_t col) {
  return Slot<U>{buffer.data_ptr<std::remove_const_t<U>>() + col, buffer.stride(0)};
}

// Step t's slice of a (K, B, N) tensor (per_step = B * N elements), or nullptr.
template <typename T>
T* step_slice(T* base, int t, int64_t per_step) {
  return base != nullptr ? base + t * per_step : nullptr;
}

// The checks and the step loop of each direction (forward.cpp: LoopParams, the forward and
// the sampler; backward.cpp: BackwardParams). check_params raises on bad sizes or a missing
// pointer; run_steps runs the K steps with A the GEMM-operand type.
template <typename T>
void check_params(const LoopParams<T>& p);
template <typename T>
void check_params(const BackwardParams<T>& p);
template <typename T, typename A>
void run_steps(const LoopParams<T>& p, const CallContext& ctx, cudaStream_t stream);
template <typename T, typename A>
void run_steps(const BackwardParams<T>& p, const CallContext& ctx, cudaStream_t stream);

// Explicit instantiations, inside namespace detail, of one direction's check_params and
// run_steps (forward.cpp: LoopParams, backward.cpp: BackwardParams) for every (T, A) of run_call.
#define AVME_SW_INSTANTIATE_STEPS(Params)                                                     \
  template void check_params<float>(const Params<float>&);                                   \
  template void check_params<double>(const Params<double>&);                                 \
  template void run_steps<float, float>(const Params<float>&, const CallContext&, cudaStream_t); \
  template void run_steps<float, c10::BFloat16>(const Params<float>&, const CallContext&,     \
                                                cudaStream_t);                                \
  template void run_steps<double, double>(const Params<double>&, const CallContext&, cudaStream_t);

// One call of either direction: checks `p`, then (B > 0) runs run_steps<T, A> inside the
// call's scope (its CallContext, the caller's stream for ATen, the matmul mode of
// `precision`), with A = c10::BFloat16 when float tensors have their GEMM operands cast to
// bf16, else T.
template <typename T, template <typename> class Params>
void run_call(const Params<T>& p, GemmPrecision precision, cudaStream_t stream) {
  check_params(p);
  if (p.B == 0) return;
  const CallContext ctx = make_context(c10::CppTypeToScalarType<T>::value, precision);
  const StreamScope stream_scope(stream);
  const MatmulModeGuard matmul_mode(precision == GemmPrecision::kTF32);
  if constexpr (std::is_same_v<T, float>) {
    if (ctx.casts_operands()) {
      run_steps<T, c10::BFloat16>(p, ctx, stream);
      return;
    }
  }
  run_steps<T, T>(p, ctx, stream);
}

}  // namespace detail

// The names the step loops (forward.cpp, backward.cpp) use unqualified.
using at::Tensor;
using detail::CallContext;
using detail::ColumnLayout;
using detail::GemmWeights;
using detail::slot;

}  // namespace stagewise
}  // namespace avme
