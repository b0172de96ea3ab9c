// Test-only CPU emulation of the few CUDA features the avme kernels use, so that
// csrc/avme_kernels.cu can be compiled as C++ and run without a GPU (tests/test_ops_build.py).
//
// Each CUDA thread of a block is one OS thread; __syncthreads() is a std::barrier over the
// block's threads; dynamic shared memory is one buffer per block; blocks run one after
// another. This checks the kernels' arithmetic, indexing and barrier placement for the
// sizes tested (a missing barrier can show up as a wrong result, but is not guaranteed to:
// run compute-sanitizer --tool racecheck on a GPU for that).
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __ldg(ptr) (*(ptr))
#define AVME_DYNAMIC_SMEM(name) unsigned char* name = ::avme::emu::tls_smem
#define __syncthreads() ::avme::emu::tls_barrier->arrive_and_wait()

namespace avme {
namespace emu {

struct Dim3 {
  unsigned int x = 0, y = 0, z = 0;
};

inline thread_local unsigned char* tls_smem = nullptr;
inline thread_local std::barrier<>* tls_barrier = nullptr;
inline thread_local Dim3 tls_thread_idx;
inline thread_local Dim3 tls_block_idx;

// Run kernel(params) over `blocks` blocks of kThreads threads each, sequentially by block.
template <typename Kernel, typename Params>
void launch(Kernel kernel, int64_t blocks, size_t smem_bytes, const Params& params) {
  std::vector<double> smem((smem_bytes + sizeof(double) - 1) / sizeof(double) + 1);
  for (int64_t b = 0; b < blocks; ++b) {
    // Garbage-fill shared memory: the kernels must initialise what they read.
    std::memset(smem.data(), 0x7f, smem.size() * sizeof(double));
    std::barrier<> barrier(kThreads);
    std::vector<std::thread> threads;
    threads.reserve(kThreads);
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        tls_smem = reinterpret_cast<unsigned char*>(smem.data());
        tls_barrier = &barrier;
        tls_thread_idx.x = static_cast<unsigned int>(t);
        tls_block_idx.x = static_cast<unsigned int>(b);
        kernel(params);
      });
    }
    for (auto& th : threads) th.join();
  }
}

}  // namespace emu
}  // namespace avme

#define threadIdx (::avme::emu::tls_thread_idx)
#define blockIdx (::avme::emu::tls_block_idx)
