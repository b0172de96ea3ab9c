// The inner product of the weight-stationary kernels: one warp's register tile of
//     out[r][n] = sum_k W[k][r] * X[k][n]      (r < rows <= kRows weight rows, n < kCols columns)
// with both operands in shared memory:
//   X is k-major: row k holds the warp's kCols batch columns contiguously (row stride ldx);
//   W is the stage's weight layout (csrc/persistent/plan.h, StageLayout): k-major rows of ldw
//   values for FmaTile, mma.m16n8k8 B fragments for Tf32Tile; `w` points at the weights of the
//   tile's first k row and the pass's first weight row (weights_at).
// Every tile has the same members, so the stage code (csrc/persistent/stage.cuh) takes any:
//   kRows, kCols, kKStep (k rows per split step), kRowStep (rows are padded to a multiple);
//   weights_at(w, ldw, k0, r0): where the weights of k row k0 and weight row r0 start;
//   zero();
//   mac(w, ldw, x, ldx, krows, split, nsplit, lane, rows): accumulate the k steps split,
//       split + nsplit, ... of a tile of krows k rows (rows >= krows are not read), for the
//       first `rows` weight rows (a multiple of kRowStep, <= kRows; the others stay 0);
//   store(out, ldo, lane, rows) / add_from(in, ldo, lane, rows): write / add the first `rows`
//       rows of the accumulators in the plain [row][col] layout (row stride ldo).
// `rows` is the same for every lane of the warp: the loops over rows are unrolled to kRows with
// a uniform guard, so the accumulators stay in registers.
//
// FmaTile (CUDA cores, fp32 or fp64 FMA): lane l owns batch columns l + 32 i (i < CPL) of all
// rows; per k the warp reads the rows' weights as broadcasts (one address for all lanes, 16-byte
// vector loads) and CPL activations without bank conflicts, for rows * CPL FMAs per lane.
//
// Tf32Tile (tensor cores, float only, sm_80+): mma.sync m16n8k8 TF32 with the batch as M (16
// columns per mma, MT m-tiles) and the weight rows as N (8 rows per mma, up to NT n-tiles).
// Per k block of 8 the warp loads the B fragments of its rows (one 8-byte load per lane and
// n-tile) and then, per m-tile, one A fragment used by every n-tile. kPasses = 3 is 3xTF32 (a b ~
// a_big b_big + a_big b_small + a_small b_big: about float32 accuracy), both operands split
// here; kPasses = 1 plain TF32 (10-bit mantissas) takes operands their producers already rounded
// to TF32 (the weights when packed, the activations when written: stage_operand in
// csrc/persistent/stage.cuh), so its inner loop is loads and mma only; the CPU emulator checks
// that every such operand is rounded.
#pragma once

#include <type_traits>

#ifdef AVME_CPU_EMULATION
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#endif

#include "common/device_math.cuh"
#include "common/mma_tf32.cuh"

namespace avme {

#ifdef AVME_CPU_EMULATION
// The alignment a vector load of `bytes` needs on the GPU (the emulator reads element-wise).
inline void check_vector_alignment(const void* p, int bytes) {
  if (reinterpret_cast<std::uintptr_t>(p) % bytes != 0) {
    std::fprintf(stderr, "avme CUDA emulator: %d-byte vector load from %p (not %d-byte aligned)\n",
                 bytes, p, bytes);
    std::abort();
  }
}
#endif

// v[i] = p[i], i < N, with 16-byte vector loads where the type and N allow (p 16-byte aligned).
template <typename T, int N>
__device__ __forceinline__ void load_row(const T* p, T (&v)[N]) {
#ifdef AVME_CPU_EMULATION
  constexpr bool kVector = (std::is_same_v<T, float> && N % 4 == 0) ||
                           (std::is_same_v<T, double> && N % 2 == 0);
  if (kVector) check_vector_alignment(p, 16);
#else
  if constexpr (std::is_same_v<T, float> && N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const float4 q = reinterpret_cast<const float4*>(p)[i];
      v[4 * i] = q.x;
      v[4 * i + 1] = q.y;
      v[4 * i + 2] = q.z;
      v[4 * i + 3] = q.w;
    }
  } else if constexpr (std::is_same_v<T, double> && N % 2 == 0) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const double2 q = reinterpret_cast<const double2*>(p)[i];
      v[2 * i] = q.x;
      v[2 * i + 1] = q.y;
    }
  } else
#endif
  {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = p[i];
  }
}

template <typename T, int ROWS, int CPL>
struct FmaTile {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // weights per vector load
  static_assert(ROWS % 4 == 0, "FmaTile: rows in multiples of 4");
  static constexpr int kRows = ROWS;
  static constexpr int kCols = 32 * CPL;
  static constexpr int kKStep = 1;
  static constexpr int kRowStep = 4;

  T acc[ROWS][CPL];

  __device__ static const T* weights_at(const T* w, int ldw, int k0, int r0) {
    return w + static_cast<int64_t>(k0) * ldw + r0;
  }

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int i = 0; i < CPL; ++i) acc[r][i] = T(0);
  }

  // acc[r][i] += w[kk * ldw + r] * x[kk * ldx + lane + 32 i] for kk = split, split + nsplit,
  // ... < krows and r < rows.
  __device__ __forceinline__ void mac(const T* __restrict__ w, int ldw, const T* __restrict__ x,
                                      int ldx, int krows, int split, int nsplit, int lane,
                                      int rows) {
    for (int kk = split; kk < krows; kk += nsplit) {
      T xv[CPL];
#pragma unroll
      for (int i = 0; i < CPL; ++i) xv[i] = x[kk * ldx + lane + 32 * i];
      const T* const wk = w + kk * ldw;
#pragma unroll
      for (int q = 0; q < ROWS / kVec; ++q) {
        if (q * kVec < rows) {
          T wv[kVec];
          load_row<T, kVec>(wk + q * kVec, wv);
#pragma unroll
          for (int v = 0; v < kVec; ++v)
#pragma unroll
            for (int i = 0; i < CPL; ++i)
              acc[q * kVec + v][i] = dfma(wv[v], xv[i], acc[q * kVec + v][i]);
        }
      }
    }
  }

  __device__ __forceinline__ void store(T* out, int ldo, int lane, int rows) const {
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
      if (r < rows)
#pragma unroll
        for (int i = 0; i < CPL; ++i) out[r * ldo + lane + 32 * i] = acc[r][i];
  }

  __device__ __forceinline__ void add_from(const T* in, int ldo, int lane, int rows) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
      if (r < rows)
#pragma unroll
        for (int i = 0; i < CPL; ++i) acc[r][i] += in[r * ldo + lane + 32 * i];
  }
};

// A TF32 operand of the 1-pass product: its producer rounded it already (the emulator checks).
__device__ __forceinline__ uint32_t rounded_tf32_bits(float v) {
#ifdef AVME_CPU_EMULATION
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x1fffu) != 0 && (bits & 0x7f800000u) != 0x7f800000u) {
    std::fprintf(stderr, "avme CUDA emulator: a TF32 operand (%a) was not rounded to TF32 by its "
                 "producer\n", static_cast<double>(v));
    std::abort();
  }
  return bits;
#else
  return __float_as_uint(v);
#endif
}

// The 8-byte pair p[0], p[1] (p 8-byte aligned).
__device__ __forceinline__ void load_pair(const float* p, float& a, float& b) {
#ifdef AVME_CPU_EMULATION
  check_vector_alignment(p, 8);
  a = p[0];
  b = p[1];
#else
  const float2 q = *reinterpret_cast<const float2*>(p);
  a = q.x;
  b = q.y;
#endif
}

template <int NT, int MT, int kPasses>
struct Tf32Tile {
  static_assert(kPasses == 1 || kPasses == 3, "Tf32Tile: 1 (TF32) or 3 (3xTF32) passes");
  static constexpr int kRows = 8 * NT;  // weight rows, 8 per mma (n-tiles)
  static constexpr int kCols = 16 * MT; // batch columns, 16 per mma (m-tiles)
  static constexpr int kKStep = 8;
  static constexpr int kRowStep = 8;

  float acc[MT][NT][4];

  __device__ static const float* weights_at(const float* w, int ldw, int k0, int r0) {
    return w + static_cast<int64_t>(k0) * ldw + 8 * r0;
  }

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;
  }

  // An operand as the mma takes it: big (and small) TF32 parts.
  __device__ __forceinline__ static void operand(float v, uint32_t& big, uint32_t& small) {
    if constexpr (kPasses == 3) {
      split_tf32(v, big, small);
    } else {
      big = rounded_tf32_bits(v);
      small = 0;
    }
  }

  // k blocks kb = split, split + nsplit, ... of 8 rows (rows >= krows count as 0).
  // A (batch x k) = X^T: a0 = X[8 kb + t][16 i + g], a1 = X[8 kb + t][16 i + g + 8],
  //                      a2 = X[8 kb + t + 4][16 i + g], a3 = X[8 kb + t + 4][16 i + g + 8];
  // B (k x rows) = W: the packed fragment of k block kb and n-tile j at w + 8 kb ldw + 64 j.
  __device__ __forceinline__ void mac(const float* __restrict__ w, int ldw,
                                      const float* __restrict__ x, int ldx, int krows, int split,
                                      int nsplit, int lane, int rows) {
    const int g = lane >> 2, t = lane & 3;
    const int nt = (rows + 7) >> 3;
    for (int kb = split; 8 * kb < krows; kb += nsplit) {
      const int ka = 8 * kb + t, kb4 = ka + 4;
      const bool va = ka < krows, vb = kb4 < krows;
      const float* const wk = w + 8 * kb * ldw + 2 * lane;
      uint32_t bh[NT][2], bl[NT][2];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        if (j < nt) {
          float b0, b1;
          load_pair(wk + 64 * j, b0, b1);
          operand(b0, bh[j][0], bl[j][0]);
          operand(b1, bh[j][1], bl[j][1]);
        }
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int m = 16 * i + g;
        const float av[4] = {va ? x[ka * ldx + m] : 0.0f, va ? x[ka * ldx + m + 8] : 0.0f,
                             vb ? x[kb4 * ldx + m] : 0.0f, vb ? x[kb4 * ldx + m + 8] : 0.0f};
        uint32_t ah[4], al[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) operand(av[q], ah[q], al[q]);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          if (j < nt) {
            if constexpr (kPasses == 3) {
              mma_tf32x3_m16n8k8(acc[i][j], ah, al, bh[j], bl[j]);
            } else {
              mma_tf32_m16n8k8(acc[i][j], ah, bh[j]);
            }
          }
        }
      }
    }
  }

  // D element (m, n) of tile (i, j) is out[(8 j + n) * ldo + 16 i + m]: c0 (g, 2t), c1 (g, 2t+1),
  // c2 (g + 8, 2t), c3 (g + 8, 2t + 1) with m the batch column and n the weight row. With ldo 4
  // words past a multiple of 32 banks, the lanes of one register hit 32 different banks.
  template <typename Fn>
  __device__ __forceinline__ void for_each(int lane, int rows, Fn&& fn) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < NT; ++j)
      if (8 * j < rows)
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int col = 16 * i + g + (q >= 2 ? 8 : 0);
            const int row = 8 * j + 2 * t + (q & 1);
            fn(acc[i][j][q], row, col);
          }
  }

  __device__ __forceinline__ void store(float* out, int ldo, int lane, int rows) {
    for_each(lane, rows, [&](float& v, int row, int col) { out[row * ldo + col] = v; });
  }

  __device__ __forceinline__ void add_from(const float* in, int ldo, int lane, int rows) {
    for_each(lane, rows, [&](float& v, int row, int col) { v += in[row * ldo + col]; });
  }
};

}  // namespace avme
