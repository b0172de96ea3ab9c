// Host-side building blocks of the stagewise design (see host.h) and its two entry points,
// forward and backward (stagewise.h), whose step loops are in forward.cpp and backward.cpp.

#include "stagewise/host.h"

#include <algorithm>
#include <limits>

#include <c10/util/Exception.h>

#ifndef AVME_CPU_EMULATION
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace avme {
namespace stagewise {

GemmPrecision parse_gemm_precision(const std::string& name) {
  if (name == "fp32") return GemmPrecision::kFP32;
  if (name == "tf32") return GemmPrecision::kTF32;
  if (name == "bf16") return GemmPrecision::kBF16;
  TORCH_CHECK(false, "avme: precision must be one of 'fp32', 'tf32', 'bf16', got '", name, "'");
}

namespace detail {

CallContext make_context(at::ScalarType state_type, GemmPrecision precision) {
  TORCH_CHECK(state_type == at::kFloat || state_type == at::kDouble,
              "avme::stagewise: tensors must be float32 or float64, got ", state_type);
#ifdef AVME_CPU_EMULATION
  const at::Device device(at::kCPU);
#else
  const at::Device device(at::kCUDA, c10::cuda::current_device());
#endif
  const bool bf16 = precision == GemmPrecision::kBF16 && state_type == at::kFloat;
  return CallContext{device, state_type, bf16 ? at::kBFloat16 : state_type};
}

at::Tensor wrap(const void* data, at::IntArrayRef sizes, at::ScalarType dtype,
                const CallContext& ctx) {
  TORCH_CHECK(data != nullptr, "avme::stagewise: internal error: wrapping a null pointer");
  return at::for_blob(const_cast<void*>(data), sizes)
      .options(at::TensorOptions().dtype(dtype).device(ctx.device))
      .target_device(ctx.device)
      .make_tensor();
}

at::Tensor uninitialized(at::IntArrayRef sizes, const at::TensorOptions& opts) {
#ifdef AVME_CPU_EMULATION
  return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), opts);
#else
  return at::empty(sizes, opts);
#endif
}

StreamScope::StreamScope(cudaStream_t stream) {
#ifdef AVME_CPU_EMULATION
  (void)stream;
#else
  guard_.emplace(c10::cuda::getStreamFromExternal(stream, c10::cuda::current_device()));
#endif
}

ColumnLayout::ColumnLayout(std::initializer_list<int64_t> widths) : widths_(widths) {
  for (const int64_t w : widths_) {
    TORCH_CHECK(w > 0, "avme::stagewise: internal error: empty slot in a column layout");
    offsets_.push_back(total_);
    total_ += (w + kColumnAlign - 1) / kColumnAlign * kColumnAlign;
  }
}

void zero_padding(const at::Tensor& buffer, const ColumnLayout& layout) {
  for (size_t i = 0; i < layout.slots(); ++i) {
    const int64_t begin = layout.offset(i) + layout.width(i), end = layout.padded_end(i);
    if (end > begin) buffer.narrow(1, begin, end - begin).zero_();
  }
}

at::Tensor pack_columns(const std::vector<at::Tensor>& parts, const ColumnLayout& layout,
                        const at::TensorOptions& opts) {
  TORCH_CHECK(parts.size() == layout.slots(), "avme::stagewise: internal error: ", parts.size(),
              " weight parts for ", layout.slots(), " slots");
  const int64_t rows = parts.front().size(0);
  at::Tensor packed = at::empty({rows, layout.total()}, opts);
  for (size_t i = 0; i < parts.size(); ++i) {
    TORCH_CHECK(parts[i].dim() == 2 && parts[i].size(0) == rows &&
                    parts[i].size(1) == layout.width(i),
                "avme::stagewise: internal error: weight part ", i, " has shape ",
                parts[i].sizes());
    packed.narrow(1, layout.offset(i), layout.width(i)).copy_(parts[i]);
  }
  zero_padding(packed, layout);
  return packed;
}

at::Tensor as_operand(const at::Tensor& x, const CallContext& ctx) {
  return x.scalar_type() == ctx.operand_type ? x : x.to(ctx.operand_type);
}

}  // namespace detail

template <typename T>
void forward(const LoopParams<T>& p, GemmPrecision precision, cudaStream_t stream) {
  detail::run_call(p, precision, stream);
}

template <typename T>
void backward(const BackwardParams<T>& p, GemmPrecision precision, cudaStream_t stream) {
  detail::run_call(p, precision, stream);
}

template void forward<float>(const LoopParams<float>&, GemmPrecision, cudaStream_t);
template void forward<double>(const LoopParams<double>&, GemmPrecision, cudaStream_t);
template void backward<float>(const BackwardParams<float>&, GemmPrecision, cudaStream_t);
template void backward<double>(const BackwardParams<double>&, GemmPrecision, cudaStream_t);

}  // namespace stagewise
}  // namespace avme
