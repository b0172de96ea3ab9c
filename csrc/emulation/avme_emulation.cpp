// Test-only CPU build of the avme ops (torch.ops.avme_emu.*): the real host code
// (csrc/avme_ops.cpp) and every design's kernels (csrc/rowtile/, csrc/persistent/,
// csrc/stagewise/) compiled as C++, with the kernels run by the thread-per-CUDA-thread emulator
// in cuda_emulation.h and the stagewise GEMMs by ATen on the CPU. Built on demand by
// tests/ops/backends.py (torch.utils.cpp_extension.load); never part of the package.
#define AVME_CPU_EMULATION 1
#include "../rowtile/rowtile_kernels.cu"
#include "../persistent/forward.cu"
#include "../persistent/backward.cu"
#include "../stagewise/pointwise_kernels.cu"
#include "../stagewise/host.cpp"
#include "../stagewise/forward.cpp"
#include "../stagewise/backward.cpp"
#include "../avme_ops.cpp"
#include "schedule_op.h"
#include "schedule_selftest.h"

// The emulated kernel launches so far (cuda_emulation.h), for the tests that count them per call;
// the emulator's schedule, and the kernels that check it (schedule_selftest.h).
TORCH_LIBRARY_FRAGMENT(avme_emu, m) {
  m.def("kernel_launches() -> int", [] { return avme::emu::launch_count.load(); });
  m.def("set_schedule(str schedule) -> ()", &avme::emu::set_schedule_op);
  m.def("schedule() -> str", &avme::emu::schedule_name);
  m.def("schedule_selftest(str barrier, bool with_barrier) -> Tensor", &avme::emu::selftest::run);
}
