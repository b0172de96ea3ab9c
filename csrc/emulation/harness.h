// Test-only: tensor access shared by the design harnesses (persistent_emulation.cpp,
// stagewise_emulation.cpp), which hand the tensors behind LoopParams / BackwardParams to a
// design's launchers on the CPU emulator.
#pragma once

#include <limits>
#include <optional>

#include <ATen/ATen.h>

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

}  // namespace emulation
}  // namespace avme
