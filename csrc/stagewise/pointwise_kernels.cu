// Pointwise kernels of the "stagewise" design; their contracts are in pointwise.h.
//
// One kernel template, one thread per element of a (B, N) index space, grid-stride loop (the
// grid is capped, the stride is passed in: the CPU emulator has no gridDim); the element
// function of each stage is chosen by its argument type. Each kernel is memory-bound; every
// element is read and written by exactly one thread, so outputs may alias inputs element-wise
// (c_out == c_prev, s_out == s_prev, dc_carry in place).

#include "stagewise/pointwise.h"

#include <algorithm>

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#ifdef AVME_CPU_EMULATION
#include "emulation/cuda_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#endif

#include "common/cell_math.cuh"

namespace avme {
namespace stagewise {
namespace {

// Kernel arguments plus the grid stride (total threads of the launch) and the row width N of
// the (B, N) index space (Args::width(), a host function, evaluated at the launch).
template <typename Args>
struct Grid {
  Args a;
  int64_t stride = 0;
  int64_t width = 0;
};

__device__ __forceinline__ int64_t first_index() {
  return static_cast<int64_t>(blockIdx.x) * kThreads + static_cast<int64_t>(threadIdx.x);
}

template <typename T>
__device__ __forceinline__ T read_or_zero(const T* p, int64_t i) {
  return p != nullptr ? p[i] : T(0);
}

template <typename T>
__device__ __forceinline__ T read_or_zero(const Slot<const T>& s, int64_t b, int64_t n) {
  return s.data != nullptr ? s.data[b * s.ld + n] : T(0);
}

template <typename A, typename T>
__device__ __forceinline__ void store(const Slot<A>& s, int64_t b, int64_t n, T v) {
  if (s.data != nullptr) s.data[b * s.ld + n] = static_cast<A>(v);
}

template <typename T>
__device__ __forceinline__ void store(T* p, int64_t i, T v) {
  if (p != nullptr) p[i] = v;
}

using ::avme::store_gates;  // common/cell_math.cuh

// store_gates of LSTM unit j into row b of a GEMM-operand slot (not written when it is absent).
template <typename A, typename T>
__device__ __forceinline__ void store_gates(const Slot<A>& s, int64_t b, int64_t H, int64_t j, T i,
                                            T f, T g, T o) {
  if (s.data != nullptr) store_gates<A>(s.data + b * s.ld + j, H, A(i), A(f), A(g), A(o));
}

// ---------------------------------------------------------------------------------------
// The element (b, j) of each kernel; i = b * width + j.
// ---------------------------------------------------------------------------------------
// Forward
template <typename T, typename A>
__device__ __forceinline__ void element(const LstmForwardArgs<T, A>& p, int64_t i, int64_t b,
                                        int64_t j) {
  const int64_t H = p.H;
  const T* pre = p.pre != nullptr ? p.pre + b * 4 * H : nullptr;
  const T* bias = p.bias + b * p.bias_ld;
  T ig, fg, gg, og, c, h;
  lstm_cell_forward(read_or_zero(pre, j) + bias[j], read_or_zero(pre, H + j) + bias[H + j],
                    read_or_zero(pre, 2 * H + j) + bias[2 * H + j],
                    read_or_zero(pre, 3 * H + j) + bias[3 * H + j], read_or_zero(p.c_prev, i), ig,
                    fg, gg, og, c, h);
  p.c_out[i] = c;
  store(p.h_out[0], b, j, h);
  store(p.h_out[1], b, j, h);
  store(p.h_saved, i, h);
  if (p.gates_saved != nullptr) store_gates(p.gates_saved + b * 4 * H + j, H, ig, fg, gg, og);
}

template <typename T, typename A>
__device__ __forceinline__ void element(const ReparamArgs<T, A>& p, int64_t i, int64_t b,
                                        int64_t j) {
  const int64_t Z = p.Z;
  const T m = p.q[b * 2 * Z + j] + p.q_b[j];
  const T lv = p.q[b * 2 * Z + Z + j] + p.q_b[Z + j];
  const T z = reparam_sample(m, lv, p.eps[i]);
  store(p.mu, i, m);
  store(p.logvar, i, lv);
  store(p.z_saved, i, z);
  store(p.z_out, b, j, z);
}

template <typename T, typename A>
__device__ __forceinline__ void element(const CanvasArgs<T, A>& p, int64_t i, int64_t b,
                                        int64_t d) {
  T s = read_or_zero(p.s_prev, i) + read_or_zero(p.delta, i);
  if (p.bias != nullptr) s += p.bias[d];
  store(p.s_out, i, s);
  store(p.s_out2, i, s);
  // x is read only where r is written (the sampler and the last step have no next input).
  if (p.r_out.data != nullptr) store(p.r_out, b, d, p.error_mode ? p.x[i] - dsigmoid(s) : s);
}

// Backward
template <typename T, typename A>
__device__ __forceinline__ void element(const CanvasGradArgs<T, A>& p, int64_t i, int64_t b,
                                        int64_t d) {
  T v = read_or_zero(p.g_next, i) + read_or_zero(p.grad_extra, i);
  if (p.dr.data != nullptr) {
    const T dr = read_or_zero(p.dr, b, d);
    if (p.error_mode) {
      const T sg = dsigmoid(p.s[i]);
      v -= sg * (T(1) - sg) * dr;
    } else {
      v += dr;
    }
  }
  store(p.g_out, i, v);
  store(p.g_copy, b, d, v);
}

template <typename T, typename A>
__device__ __forceinline__ void element(const LstmBackwardArgs<T, A>& p, int64_t i, int64_t b,
                                        int64_t j) {
  const int64_t H = p.H;
  const T dh = read_or_zero(p.dh_in[0], b, j) + read_or_zero(p.dh_in[1], b, j) +
               read_or_zero(p.dh_in[2], b, j);
  const T* gp = p.gates + b * 4 * H;
  const T ig = gp[j], fg = gp[H + j], gg = gp[2 * H + j], og = gp[3 * H + j];
  T di, df, dg, d_o, dc_prev;
  lstm_cell_backward(dh, p.dc_carry[i], ig, fg, gg, og, p.c[i], read_or_zero(p.c_prev, i), di, df,
                     dg, d_o, dc_prev);
  p.dc_carry[i] = dc_prev;
  store_gates(p.d_gates + b * 4 * H + j, H, di, df, dg, d_o);
  store_gates(p.d_gates_copy, b, H, j, di, df, dg, d_o);
}

template <typename T, typename A>
__device__ __forceinline__ void element(const ReparamBackwardArgs<T, A>& p, int64_t i, int64_t b,
                                        int64_t j) {
  const int64_t Z = p.Z;
  const T dz = read_or_zero(p.dz, b, j);
  const T dmu = dz + read_or_zero(p.grad_mu, i);
  const T lv = p.logvar[i];
  const T dlv = reparam_logvar_grad(dz, p.eps[i], lv) + read_or_zero(p.grad_logvar, i);
  p.d_q[b * 2 * Z + j] = dmu;
  p.d_q[b * 2 * Z + Z + j] = dlv;
  store(p.d_q_copy, b, j, dmu);
  store(p.d_q_copy, b, Z + j, dlv);
  store(p.grad_eps, i, reparam_eps_grad(dz, lv));
}

// One kernel for every stage: the grid-stride loop over the (B, width) index space.
template <typename Args>
__global__ void __launch_bounds__(kThreads) avme_sw_pointwise_kernel(const Grid<Args> g) {
  const int64_t width = g.width, n = g.a.B * width;
  for (int64_t i = first_index(); i < n; i += g.stride) {
    const int64_t b = i / width;
    element(g.a, i, b, i - b * width);
  }
}

// ---------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------
#ifdef AVME_CPU_EMULATION
// The emulator runs blocks one after another, kThreads OS threads each: two blocks exercise
// the block offset and the grid-stride loop at a bearable cost.
constexpr int64_t kMaxBlocks = 2;
#else
constexpr int64_t kMaxBlocks = 65536;
#endif

}  // namespace

template <typename Args>
void launch(const Args& args, cudaStream_t stream) {
  const int64_t width = args.width(), n = args.B * width;
  if (n <= 0) return;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks);
  const Grid<Args> grid{args, blocks * kThreads, width};
#ifdef AVME_CPU_EMULATION
  (void)stream;
  emu::launch(avme_sw_pointwise_kernel<Args>, blocks, 0, grid);
#else
  avme_sw_pointwise_kernel<Args><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(grid);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

#define AVME_SW_INSTANTIATE(T, A)                                                 \
  template void launch(const LstmForwardArgs<T, A>&, cudaStream_t);              \
  template void launch(const ReparamArgs<T, A>&, cudaStream_t);                  \
  template void launch(const CanvasArgs<T, A>&, cudaStream_t);                   \
  template void launch(const CanvasGradArgs<T, A>&, cudaStream_t);               \
  template void launch(const LstmBackwardArgs<T, A>&, cudaStream_t);             \
  template void launch(const ReparamBackwardArgs<T, A>&, cudaStream_t);
AVME_SW_INSTANTIATE(float, float)
AVME_SW_INSTANTIATE(float, c10::BFloat16)
AVME_SW_INSTANTIATE(double, double)
#undef AVME_SW_INSTANTIATE

}  // namespace stagewise
}  // namespace avme
