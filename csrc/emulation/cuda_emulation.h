// Test-only CPU emulation of the few CUDA features the avme kernels use, so that
// csrc/avme_kernels.cu can be compiled as C++ and run without a GPU (tests/test_ops_build.py).
//
// Each CUDA thread of a block is one OS thread; __syncthreads() is a std::barrier over the
// block's threads; dynamic shared memory is one buffer per block. Two launches:
//   launch():             blocks of kThreads threads run one after another (in descending
//                         order under the "reverse" schedule);
//   cooperative_launch(): a cooperative grid (cudaLaunchCooperativeKernel): the threads of ALL
//                         blocks run at the same time, any block size (blockDim / gridDim are
//                         set), and grid_sync() is a barrier over every thread of the grid.
//                         Warp-collective instructions are emulated there by an exchange among
//                         the warp's 32 threads: mma_m16n8k8_tf32() (mma.sync.aligned.m16n8k8
//                         .row.col.f32.tf32.tf32.f32) gathers every lane's fragment registers,
//                         rebuilds A, B and C from the PTX ISA's fragment layouts and hands each
//                         lane its part of D, so a kernel's fragment indexing is checked
//                         (mma_m16n8k8_tf32x3: the three mma of a 3xTF32 term in one exchange).
// This checks the kernels' arithmetic, indexing and barrier placement for the sizes tested. A
// barrier that some thread never reaches (a divergent or missing grid_sync) aborts the process
// after kBarrierTimeout instead of hanging.
//
// Schedules (set_schedule): with all threads running at once ("concurrent", the default) a
// missing barrier shows up as a wrong result only when the OS happens to interleave the threads
// badly. The serial schedules make it deterministic: one warp at a time runs, from one barrier to
// the next, blocks in ascending ("forward") or descending ("reverse") order between grid
// barriers and, inside a block, warps in the same order between __syncthreads(). A legal
// interleaving on a GPU, so a correct kernel gives the same results; but a read of data that
// another warp or block writes in the same barrier interval (a missing __syncthreads() or
// grid_sync()) sees the old value in one of the two orders, whichever side runs first. It does
// not see races within a warp, or memory-ordering faults of the hardware (compute-sanitizer
// --tool racecheck on a GPU does).
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __ldg(ptr) (*(ptr))
#define AVME_DYNAMIC_SMEM(name) unsigned char* name = ::avme::emu::tls_smem
#define __syncthreads() ::avme::emu::sync_block()

namespace avme {
namespace emu {

struct Dim3 {
  unsigned int x = 0, y = 0, z = 0;
};

// A barrier over `count` threads that aborts the process (with a message) when a phase does
// not complete within kBarrierTimeout: some thread skipped it, so the kernel would hang on a GPU.
class TimedBarrier {
 public:
  static constexpr std::chrono::seconds kBarrierTimeout{300};

  TimedBarrier(int count, const char* what) : count_(count), what_(what) {}

  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const std::uint64_t phase = phase_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++phase_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, kBarrierTimeout, [&] { return phase_ != phase; })) {
      std::fprintf(stderr,
                   "avme CUDA emulator: a %s barrier timed out (%d of %d threads arrived): a "
                   "barrier is missing or not reached by every thread\n",
                   what_, arrived_, count_);
      std::abort();
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_;
  int arrived_ = 0;
  std::uint64_t phase_ = 0;
  const char* what_;
};

// Which order the emulated threads run in (set_schedule; see the top of this file).
enum class Schedule : int { kConcurrent = 0, kForward = 1, kReverse = 2 };
inline std::atomic<int> schedule_setting{static_cast<int>(Schedule::kConcurrent)};

// Sets the schedule of the launches that start after it (tests: one process-wide setting).
inline void set_schedule(Schedule s) { schedule_setting.store(static_cast<int>(s)); }
inline Schedule current_schedule() { return static_cast<Schedule>(schedule_setting.load()); }

// The serial schedules: one warp of one block runs at a time. A warp runs until all its lanes
// reach a barrier (or return), then hands the turn on: to the next warp of its block in the
// block's warp order; after the last warp, for a __syncthreads() back to the first warp of the
// same block (the block barrier is complete), for a grid_sync() or the kernel's end to the next
// block, and after the last block back to the first (the grid barrier is complete). Lanes or
// warps that reach different barriers in one interval (a divergent barrier, which hangs or is
// undefined on a GPU) abort the process with a message, as does a turn that never comes.
class SerialScheduler {
 public:
  enum class Stop { kBlock, kGrid, kEnd };

  SerialScheduler(int blocks, int threads, bool reverse)
      : blocks_(blocks),
        threads_(threads),
        warps_((threads + 31) / 32),
        reverse_(reverse),
        warp_pos_(static_cast<size_t>(blocks), 0),
        block_stop_(static_cast<size_t>(blocks)),
        lanes_arrived_(static_cast<size_t>(blocks) * warps_, 0),
        warp_stop_(static_cast<size_t>(blocks) * warps_),
        handoffs_(static_cast<size_t>(blocks) * warps_, 0),
        wake_(static_cast<size_t>(blocks) * warps_) {}

  // The calling thread's first turn (before the kernel body).
  void begin(int block, int thread) {
    std::unique_lock<std::mutex> lock(mutex_);
    wait_turn(lock, block, thread / 32, kBeginning);
  }

  // The calling thread reaches a barrier (or the end of the kernel, kEnd: it does not wait).
  void stop(int block, int thread, Stop what) {
    const int warp = thread / 32;
    const size_t u = unit(block, warp);
    std::unique_lock<std::mutex> lock(mutex_);
    if (lanes_arrived_[u] == 0) {
      warp_stop_[u] = what;
    } else if (warp_stop_[u] != what) {
      fail("lanes of one warp reach different barriers");
    }
    const std::uint64_t seen = handoffs_[u];
    if (++lanes_arrived_[u] == lanes_in(warp)) {
      lanes_arrived_[u] = 0;
      hand_on(block, what);
      ++handoffs_[u];
      wake_[u].notify_all();
    }
    if (what != Stop::kEnd) wait_turn(lock, block, warp, seen);
  }

 private:
  size_t unit(int block, int warp) const {
    return static_cast<size_t>(block) * static_cast<size_t>(warps_) + static_cast<size_t>(warp);
  }
  int lanes_in(int warp) const { return std::min(32, threads_ - 32 * warp); }
  int ordered(int pos, int count) const { return reverse_ ? count - 1 - pos : pos; }
  bool has_turn(int block, int warp) const {
    return ordered(block_pos_, blocks_) == block && ordered(warp_pos_[block], warps_) == warp;
  }

  [[noreturn]] static void fail(const char* why) {
    std::fprintf(stderr, "avme CUDA emulator (serial schedule): %s\n", why);
    std::abort();
  }

  // The running warp of `block` has stopped at `what`: the next warp, block or interval runs.
  void hand_on(int block, Stop what) {
    const size_t b = static_cast<size_t>(block);
    if (warp_pos_[b] == 0) {  // the block's first warp to stop in this interval
      block_stop_[b] = what;
    } else if (block_stop_[b] != what) {
      fail("warps of one block reach different barriers");
    }
    if (++warp_pos_[b] < warps_) {
      notify_turn();
      return;
    }
    warp_pos_[b] = 0;
    if (what == Stop::kBlock) {  // __syncthreads() complete: the block's first warp again
      notify_turn();
      return;
    }
    if (++block_pos_ == blocks_) block_pos_ = 0;  // grid_sync() complete: the first block again
    notify_turn();
  }

  void notify_turn() {
    const int block = ordered(block_pos_, blocks_);
    wake_[unit(block, ordered(warp_pos_[static_cast<size_t>(block)], warps_))].notify_all();
  }

  // Waits until the warp's stop counted as `seen` (kBeginning: none, the kernel's start) is
  // handed on and the warp has the turn.
  void wait_turn(std::unique_lock<std::mutex>& lock, int block, int warp, std::uint64_t seen) {
    const size_t u = unit(block, warp);
    const bool ok = wake_[u].wait_for(lock, TimedBarrier::kBarrierTimeout, [&] {
      return (seen == kBeginning || handoffs_[u] != seen) && has_turn(block, warp);
    });
    if (!ok) fail("a warp's turn never came: a barrier is missing or not reached by every thread");
  }

  std::mutex mutex_;
  const int blocks_, threads_, warps_;
  const bool reverse_;
  static constexpr std::uint64_t kBeginning = ~std::uint64_t{0};
  int block_pos_ = 0;                        // position of the running block in the block order
  std::vector<int> warp_pos_;                // per block: position of its running warp (= its
                                             // warps stopped in this interval)
  std::vector<Stop> block_stop_;             // per block: the barrier of this interval
  std::vector<int> lanes_arrived_;           // per warp: its lanes stopped so far
  std::vector<Stop> warp_stop_;              // per warp: the barrier its lanes stop at
  std::vector<std::uint64_t> handoffs_;      // per warp: its completed stops
  std::deque<std::condition_variable> wake_;  // per warp
};

// What the 32 threads of one emulated warp share for warp-collective instructions: each lane
// deposits its fragment registers in a slot, the last lane to arrive at the warp's barrier
// computes every lane's result (the barrier's completion step), and each lane reads its own.
// Two slots, used alternately: a lane can be at most one instruction ahead of the slowest, so
// one barrier per instruction suffices.
struct WarpExchange {
  struct Slot {
    int passes = 1;               // 1: D = A B + C; 3: the three products of 3xTF32
    std::uint32_t a[32][2][4];    // [lane][big, small][register]
    std::uint32_t b[32][2][2];
    float d[32][4];               // C in, D out
  };
  struct Complete {
    WarpExchange* warp;
    void operator()() noexcept { warp->compute(); }
  };

  Slot slots[2];
  int computing = 0;  // the slot the next completion computes
  std::barrier<Complete> barrier{32, Complete{this}};

  void compute() noexcept;
};

inline thread_local unsigned char* tls_smem = nullptr;
inline thread_local std::barrier<>* tls_barrier = nullptr;
inline thread_local TimedBarrier* tls_grid_barrier = nullptr;
inline thread_local WarpExchange* tls_warp = nullptr;
inline thread_local Dim3 tls_thread_idx;
inline thread_local Dim3 tls_block_idx;
inline thread_local Dim3 tls_block_dim;
inline thread_local Dim3 tls_grid_dim;
inline thread_local std::uint64_t tls_warp_instructions = 0;  // this lane's collective count
inline thread_local SerialScheduler* tls_sched = nullptr;  // a serial schedule's, else null
inline thread_local int tls_sched_block = 0;  // the calling thread's block in tls_sched's numbering

// __syncthreads(): the calling thread's block barrier.
inline void sync_block() {
  if (tls_sched != nullptr) {
    tls_sched->stop(tls_sched_block, static_cast<int>(tls_thread_idx.x),
                    SerialScheduler::Stop::kBlock);
  } else {
    tls_barrier->arrive_and_wait();
  }
}

// Grid-wide barrier of a cooperative launch (cooperative_groups::this_grid().sync()).
inline void grid_sync() {
  if (tls_grid_barrier == nullptr) {
    std::fprintf(stderr, "avme CUDA emulator: grid_sync() outside a cooperative launch\n");
    std::abort();
  }
  if (tls_sched != nullptr) {
    tls_sched->stop(tls_sched_block, static_cast<int>(tls_thread_idx.x),
                    SerialScheduler::Stop::kGrid);
  } else {
    tls_grid_barrier->arrive_and_wait();
  }
}

// Runs one emulated thread's body (the kernel) under the serial scheduler `sched`, where it is
// block `block` (or directly when `sched` is null): waits for the first turn, and hands the
// turn on at the end.
template <typename Body>
void run_thread(SerialScheduler* sched, int block, int thread, Body&& body) {
  tls_sched = sched;
  tls_sched_block = block;
  if (sched != nullptr) sched->begin(block, thread);
  body();
  if (sched != nullptr) sched->stop(block, thread, SerialScheduler::Stop::kEnd);
  tls_sched = nullptr;
}

// float -> tf32 (cvt.rna.tf32.f32: round to nearest, ties away from zero; 10 mantissa bits),
// returned as the fp32 bit pattern with the 13 low bits zero.
inline std::uint32_t tf32_rna(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7f800000u) != 0x7f800000u) u += 0x1000u;  // finite: add half a tf32 ulp
  return u & 0xffffe000u;
}

inline float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// One warp's mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 on the matrices rebuilt from the
// 32 lanes' fragment registers. Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k8",
// .tf32), g = lane / 4, t = lane % 4:
//   a0 (g, t)  a1 (g + 8, t)  a2 (g, t + 4)  a3 (g + 8, t + 4)      [row, col of A, 16 x 8]
//   b0 (t, g)  b1 (t + 4, g)                                       [row, col of B, 8 x 8]
//   c0 (g, 2t) c1 (g, 2t + 1) c2 (g + 8, 2t) c3 (g + 8, 2t + 1)    [row, col of C/D, 16 x 8]
// The products are exact and accumulated in float, k ascending, onto c (the hardware's
// internal order and rounding may differ slightly). `ai`, `bi`: big (0) or small (1) parts.
inline void mma_slot(WarpExchange::Slot& s, int ai, int bi) {
  auto A = [&](int m, int k) {
    return bits_to_float(s.a[(m % 8) * 4 + k % 4][ai][(m >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0)]);
  };
  auto B = [&](int k, int n) { return bits_to_float(s.b[n * 4 + k % 4][bi][k >= 4 ? 1 : 0]); };
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int q = 0; q < 4; ++q) {
      const int m = g + (q >= 2 ? 8 : 0), n = 2 * t + (q & 1);
      float acc = s.d[lane][q];
      for (int k = 0; k < 8; ++k)
        acc = static_cast<float>(static_cast<double>(A(m, k)) * B(k, n) + acc);
      s.d[lane][q] = acc;
    }
  }
}

inline void WarpExchange::compute() noexcept {
  Slot& s = slots[computing];
  if (s.passes == 3) {  // 3xTF32 in the kernels' order: a_small b_big, a_big b_small, a_big b_big
    mma_slot(s, 1, 0);
    mma_slot(s, 0, 1);
  }
  mma_slot(s, 0, 0);
  computing ^= 1;
}

// d += A B (passes 1: a, b = the big parts) or, for 3xTF32 (passes 3), the three products
// d += A_small B_big; d += A_big B_small; d += A_big B_big, each rounded to float as three
// separate instructions would be: one exchange among the warp's lanes.
inline void warp_mma_tf32(float (&d)[4], const std::uint32_t (&a_big)[4],
                          const std::uint32_t (&a_small)[4], const std::uint32_t (&b_big)[2],
                          const std::uint32_t (&b_small)[2], int passes) {
  if (tls_warp == nullptr) {
    std::fprintf(stderr, "avme CUDA emulator: mma outside a cooperative launch\n");
    std::abort();
  }
  WarpExchange& w = *tls_warp;
  WarpExchange::Slot& s = w.slots[tls_warp_instructions++ & 1];
  const int lane = static_cast<int>(tls_thread_idx.x % 32);
  s.passes = passes;  // (every lane writes the same value)
  for (int i = 0; i < 4; ++i) {
    s.a[lane][0][i] = a_big[i];
    s.a[lane][1][i] = a_small[i];
    s.d[lane][i] = d[i];
  }
  for (int i = 0; i < 2; ++i) {
    s.b[lane][0][i] = b_big[i];
    s.b[lane][1][i] = b_small[i];
  }
  w.barrier.arrive_and_wait();  // the last lane to arrive computes every lane's D
  for (int i = 0; i < 4; ++i) d[i] = s.d[lane][i];
}

// d += A B for one warp (mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, A 16x8, B 8x8).
inline void mma_m16n8k8_tf32(float (&d)[4], const std::uint32_t (&a)[4],
                             const std::uint32_t (&b)[2]) {
  warp_mma_tf32(d, a, a, b, b, 1);
}

// The three mma of a 3xTF32 term, in this order: d += a_small b_big; d += a_big b_small;
// d += a_big b_big.
inline void mma_m16n8k8_tf32x3(float (&d)[4], const std::uint32_t (&a_big)[4],
                               const std::uint32_t (&a_small)[4], const std::uint32_t (&b_big)[2],
                               const std::uint32_t (&b_small)[2]) {
  warp_mma_tf32(d, a_big, a_small, b_big, b_small, 3);
}

// Kernel launches of either kind so far in this process (the tests count them per call).
inline std::atomic<int64_t> launch_count{0};

// Run kernel(params) over `blocks` blocks of kThreads threads each, sequentially by block.
template <typename Kernel, typename Params>
void launch(Kernel kernel, int64_t blocks, size_t smem_bytes, const Params& params) {
  ++launch_count;
  const Schedule order = current_schedule();
  std::vector<double> smem((smem_bytes + sizeof(double) - 1) / sizeof(double) + 1);
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t b = order == Schedule::kReverse ? blocks - 1 - i : i;
    // Garbage-fill shared memory: the kernels must initialise what they read.
    std::memset(smem.data(), 0x7f, smem.size() * sizeof(double));
    std::barrier<> barrier(kThreads);
    std::optional<SerialScheduler> sched;  // the block's warps one at a time
    if (order != Schedule::kConcurrent) sched.emplace(1, kThreads, order == Schedule::kReverse);
    std::vector<std::thread> threads;
    threads.reserve(kThreads);
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        tls_smem = reinterpret_cast<unsigned char*>(smem.data());
        tls_barrier = &barrier;
        tls_thread_idx.x = static_cast<unsigned int>(t);
        tls_block_idx.x = static_cast<unsigned int>(b);
        tls_block_dim = Dim3{static_cast<unsigned int>(kThreads), 1, 1};
        tls_grid_dim = Dim3{static_cast<unsigned int>(blocks), 1, 1};
        run_thread(sched ? &*sched : nullptr, 0, t, [&] { kernel(params); });  // its block 0
      });
    }
    for (auto& th : threads) th.join();
  }
}

// Run kernel(args...) as a cooperative grid of `blocks` blocks of `threads` threads: every
// thread of every block is started at once (as the GPU guarantees for a cooperative launch, so
// grid_sync() cannot deadlock), each block with its own garbage-filled shared memory.
template <typename Kernel, typename... Args>
void cooperative_launch(Kernel kernel, int blocks, int threads, size_t smem_bytes,
                        const Args&... args) {
  ++launch_count;
  const size_t words = (smem_bytes + sizeof(double) - 1) / sizeof(double) + 1;
  std::vector<std::vector<double>> smem(static_cast<size_t>(blocks));
  std::deque<std::barrier<>> block_barriers;  // not movable: a deque keeps them in place
  for (int b = 0; b < blocks; ++b) {
    smem[b].resize(words);
    std::memset(smem[b].data(), 0x7f, words * sizeof(double));  // kernels initialise what they read
    block_barriers.emplace_back(threads);
  }
  TimedBarrier grid_barrier(blocks * threads, "grid");
  const Schedule order = current_schedule();
  std::optional<SerialScheduler> sched;
  if (order != Schedule::kConcurrent) sched.emplace(blocks, threads, order == Schedule::kReverse);
  std::deque<WarpExchange> warps(static_cast<size_t>(blocks) * ((threads + 31) / 32));
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(blocks) * threads);
  for (int b = 0; b < blocks; ++b) {
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, b, t] {
        tls_smem = reinterpret_cast<unsigned char*>(smem[b].data());
        tls_barrier = &block_barriers[b];
        tls_grid_barrier = &grid_barrier;
        tls_warp = &warps[static_cast<size_t>(b) * ((threads + 31) / 32) + t / 32];
        tls_thread_idx = Dim3{static_cast<unsigned int>(t), 0, 0};
        tls_block_idx = Dim3{static_cast<unsigned int>(b), 0, 0};
        tls_block_dim = Dim3{static_cast<unsigned int>(threads), 1, 1};
        tls_grid_dim = Dim3{static_cast<unsigned int>(blocks), 1, 1};
        run_thread(sched ? &*sched : nullptr, b, t, [&] { kernel(args...); });
        tls_grid_barrier = nullptr;
        tls_warp = nullptr;
      });
    }
  }
  for (auto& th : pool) th.join();
}

}  // namespace emu
}  // namespace avme

#define threadIdx (::avme::emu::tls_thread_idx)
#define blockIdx (::avme::emu::tls_block_idx)
#define blockDim (::avme::emu::tls_block_dim)
#define gridDim (::avme::emu::tls_grid_dim)
