// Host-side: out = a @ b into a caller's matrix (beta = 0), shared by the ops' host code
// (csrc/avme_ops.cpp) and the stagewise design's GEMMs.
#pragma once

#include <ATen/ATen.h>

namespace avme {

// out = a @ b without a temporary on CUDA. `out` may be a strided view with unit column stride
// (a column block of a wider matrix: cuBLAS writes it in place); a and b may be strided or
// transposed views. out: float32 or float64; a, b: out's dtype, or bfloat16 (fp32 accumulation
// and output; on the CPU emulator, where aten::mm.dtype does not exist, the bf16 operands are
// multiplied in fp32).
inline void gemm_out(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b);
    return;
  }
#ifdef AVME_CPU_EMULATION
  at::mm_out(out, a.to(out.scalar_type()), b.to(out.scalar_type()));
#else
  at::mm_out(out, a, b, out.scalar_type());
#endif
}

}  // namespace avme
