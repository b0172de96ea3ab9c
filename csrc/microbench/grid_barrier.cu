// Microbenchmark of the grid-wide barrier the persistent design pays 4 times per step and
// direction: `torch.ops.avme_bench.grid_barrier_loop`, timed by bench/barrier.py.
//
// One cooperative launch of `blocks` blocks of `threads` threads runs `iterations` rounds of:
// thread 0 of every block writes one float, every block passes the barrier, every block reads
// the float its neighbour wrote (the smallest exchange through L2 the persistent stages do).
// Two barriers are compared:
//   "cooperative_groups": avme::grid_sync() (common/grid_sync.cuh), what the kernels use;
//   "flag":               a generation-counting barrier on two words of global memory (thread 0
//                         of each block arrives with an acq_rel fetch_add at device scope and
//                         polls the generation with acquire loads), the hand-made alternative.
// The time of a loop of N rounds minus that of 0 rounds, over N, is the cost of one round.
// Not part of the model's ops: a separate op namespace, CUDA only, no autograd, no fake kernel.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda/atomic>
#include <torch/library.h>

#include <string>

#include "common/cooperative_launch.h"
#include "common/grid_sync.cuh"

namespace avme {
namespace {

// Generation-counting grid barrier. counters[0]: arrivals in this round; counters[1]: the round.
// A block reads the round before it arrives; the round cannot advance before every block has
// arrived, so the value it waits to see change is the current one.
__device__ __forceinline__ void flag_barrier(unsigned* counters) {
  __syncthreads();
  if (threadIdx.x == 0) {
    cuda::atomic_ref<unsigned, cuda::thread_scope_device> arrived(counters[0]);
    cuda::atomic_ref<unsigned, cuda::thread_scope_device> round(counters[1]);
    const unsigned current = round.load(cuda::memory_order_relaxed);
    __threadfence();  // this block's earlier writes (made visible to thread 0 by __syncthreads)
    if (arrived.fetch_add(1u, cuda::memory_order_acq_rel) == gridDim.x - 1) {
      arrived.store(0u, cuda::memory_order_relaxed);
      round.store(current + 1u, cuda::memory_order_release);
    } else {
      while (round.load(cuda::memory_order_acquire) == current) {
      }
    }
    __threadfence();
  }
  __syncthreads();
}

// sink: 3 * gridDim.x floats: two alternating exchange buffers and one result per block.
template <bool kCooperativeGroups>
__global__ void barrier_loop_kernel(unsigned* counters, float* sink, int iterations) {
  const unsigned blocks = gridDim.x;
  float acc = 0.f;
  for (int i = 0; i < iterations; ++i) {
    float* exchange = sink + static_cast<size_t>(i & 1) * blocks;
    if (threadIdx.x == 0) exchange[blockIdx.x] = acc + static_cast<float>(i);
    if constexpr (kCooperativeGroups) {
      grid_sync();
    } else {
      flag_barrier(counters);
    }
    // a plain load (not __ldg): the value was written by another block during this launch
    acc += *reinterpret_cast<volatile float*>(&exchange[(blockIdx.x + 1) % blocks]);
  }
  if (threadIdx.x == 0) sink[2 * static_cast<size_t>(blocks) + blockIdx.x] = acc;
}

template <bool kCooperativeGroups>
void launch(int blocks, int threads, int iterations, unsigned* counters, float* sink, cudaStream_t stream) {
  auto kernel = barrier_loop_kernel<kCooperativeGroups>;
  static LaunchCache cache;  // one per kernel instantiation
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  TORCH_CHECK(fits_cooperatively(kernel, blocks, threads, 0, sms, &cache), "grid_barrier_loop: blocks=", blocks,
              " blocks of ", threads, " threads cannot all be resident on this device (", sms,
              " SMs); a cooperative launch needs every block resident");
  launch_cooperative(kernel, blocks, threads, 0, stream, counters, sink, iterations);
}

void grid_barrier_loop(at::Tensor& counters, at::Tensor& sink, int64_t blocks, int64_t threads,
                       int64_t iterations, c10::string_view barrier) {
  TORCH_CHECK(counters.is_cuda() && counters.scalar_type() == at::kInt && counters.numel() == 2 &&
                  counters.is_contiguous(),
              "grid_barrier_loop: counters must be a contiguous CUDA int32 tensor of 2 elements (zeros), got ",
              counters.scalar_type(), " of shape ", counters.sizes(), " on ", counters.device());
  TORCH_CHECK(blocks >= 1 && blocks <= (1 << 16), "grid_barrier_loop: blocks must be in [1, 65536], got ", blocks);
  TORCH_CHECK(threads >= 32 && threads <= 1024 && threads % 32 == 0,
              "grid_barrier_loop: threads must be a multiple of 32 in [32, 1024], got ", threads);
  TORCH_CHECK(iterations >= 0 && iterations <= (1 << 30), "grid_barrier_loop: iterations must be in [0, 2^30], got ",
              iterations);
  TORCH_CHECK(sink.is_cuda() && sink.scalar_type() == at::kFloat && sink.numel() == 3 * blocks &&
                  sink.is_contiguous() && sink.device() == counters.device(),
              "grid_barrier_loop: sink must be a contiguous float32 tensor of 3 * blocks = ", 3 * blocks,
              " elements on ", counters.device(), ", got ", sink.scalar_type(), " of shape ", sink.sizes(), " on ",
              sink.device());
  const std::string name(barrier);
  TORCH_CHECK(name == "cooperative_groups" || name == "flag",
              "grid_barrier_loop: barrier must be 'cooperative_groups' or 'flag', got '", name, "'");
  const c10::cuda::CUDAGuard guard(counters.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto* counter_words = reinterpret_cast<unsigned*>(counters.data_ptr<int32_t>());
  const int b = static_cast<int>(blocks), t = static_cast<int>(threads), n = static_cast<int>(iterations);
  if (name == "flag") {
    launch<false>(b, t, n, counter_words, sink.data_ptr<float>(), stream);
  } else {
    launch<true>(b, t, n, counter_words, sink.data_ptr<float>(), stream);
  }
}

}  // namespace
}  // namespace avme

TORCH_LIBRARY(avme_bench, m) {
  m.def("grid_barrier_loop(Tensor(a!) counters, Tensor(b!) sink, int blocks, int threads, int iterations, "
        "str barrier) -> ()");
}

TORCH_LIBRARY_IMPL(avme_bench, CUDA, m) { m.impl("grid_barrier_loop", &avme::grid_barrier_loop); }
