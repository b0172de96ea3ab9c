// Host-side: the cuBLAS float32 matmul mode for the lifetime of a guard, shared by the ops'
// host code (csrc/avme_ops.cpp) and the stagewise design's GEMMs.
#pragma once

#include <exception>
#include <optional>

#include <ATen/Context.h>
#include <c10/util/Exception.h>

namespace avme {

// allow_tf32 = false: TF32 off, whatever the global setting is: at::NoTF32Guard (thread-local),
// and, only where TF32 is on globally, the global setting turned off until the guard ends too
// (ATen's cuBLASLt paths read the global setting alone, not the thread-local guard).
// allow_tf32 = true: TF32 on (a process-global setting, restored when the guard ends; not
// thread-safe). bf16 products are not a cuBLAS mode: callers pass bf16 operands themselves.
// The constructor either completes or throws before changing anything; the destructor never
// throws (a failure to restore the global setting is reported as a warning).
class MatmulModeGuard {
 public:
  explicit MatmulModeGuard(bool allow_tf32) {
    auto& ctx = at::globalContext();
    if (!allow_tf32) no_tf32_.emplace();
    if (allow_tf32 == ctx.allowTF32CuBLAS()) return;  // the global setting already agrees
    const at::Float32MatmulPrecision legacy = ctx.float32MatmulPrecision();
    const at::Float32Precision current = ctx.float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL);
    ctx.setAllowTF32CuBLAS(allow_tf32);
    legacy_ = legacy;
    cuda_matmul_ = current;
    restore_ = true;
  }
  ~MatmulModeGuard() {
    if (!restore_) return;
    try {
      auto& ctx = at::globalContext();
      const char* name = legacy_ == at::Float32MatmulPrecision::HIGHEST ? "highest"
                         : legacy_ == at::Float32MatmulPrecision::HIGH  ? "high"
                                                                         : "medium";
      ctx.setFloat32MatmulPrecision(name);
      ctx.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, cuda_matmul_);
    } catch (const std::exception& e) {
      TORCH_WARN("avme: could not restore the float32 matmul precision after an op: ", e.what());
    }
  }
  MatmulModeGuard(const MatmulModeGuard&) = delete;
  MatmulModeGuard& operator=(const MatmulModeGuard&) = delete;

 private:
  std::optional<at::NoTF32Guard> no_tf32_;
  bool restore_ = false;
  at::Float32MatmulPrecision legacy_ = at::Float32MatmulPrecision::HIGHEST;
  at::Float32Precision cuda_matmul_ = at::Float32Precision::NONE;
};

}  // namespace avme
