// Test-only CPU build of the avme ops (torch.ops.avme_emu.*): the real host code
// (csrc/avme_ops.cpp) and the real kernels (csrc/rowtile/) compiled as C++, with the
// kernels run by the thread-per-CUDA-thread emulator in cuda_emulation.h. Built on demand by
// tests/ops/backends.py (torch.utils.cpp_extension.load); never part of the package.
#define AVME_CPU_EMULATION 1
#include "../rowtile/rowtile_kernels.cu"
#include "../avme_ops.cpp"
