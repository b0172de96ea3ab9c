// The inner product of the weight-stationary kernels: one warp's register tile of
//     out[r][n] = sum_k W[k][r] * X[k][n]      (r < kRows weight rows, n < kCols batch columns)
// with both operands in shared memory, k-major:
//   W row k holds the tile's kRows weights contiguously (row stride ldw, 16-byte aligned rows);
//   X row k holds kCols = 32 * NBL batch columns contiguously (row stride ldx).
// Every tile has the same members, so the stage code (csrc/persistent/stage.cuh) takes any:
//   zero();
//   mac(w, ldw, x, ldx, krows, split, nsplit, lane): accumulate the k rows of a tile of krows
//       rows that belong to split `split` of `nsplit` (interleaved; rows >= krows are not read);
//   store(out, ldo, lane) / add_from(in, ldo, lane): write / add the accumulators in the plain
//       [kRows][kCols] layout, whatever the registers' layout (cross-warp reduction, epilogues).
//
// FmaTile (CUDA cores, fp32 or fp64 FMA): lane l owns batch columns l + 32 i (i < NBL) of all
// kRows rows; per k the warp reads kRows weights as broadcasts (one address for all lanes, vector
// loads) and NBL activations without bank conflicts, for kRows * NBL FMAs per lane.
//
// Tf32Tile (tensor cores, float only, sm_80+): mma.sync m16n8k8 TF32 with the batch as M (16
// columns per mma) and the weight rows as N (8 rows per mma): rows pad to 8, not 16, which
// suits the few rows per block of these kernels. kPasses = 3 is 3xTF32 (a b ~ a_big b_big +
// a_big b_small + a_small b_big: about float32 accuracy), kPasses = 1 plain TF32 (10-bit
// mantissas). k rows are taken in blocks of 8 (split-K by blocks).
#pragma once

#include <type_traits>

#ifdef AVME_CPU_EMULATION
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#endif

#include "common/device_math.cuh"
#include "common/mma_tf32.cuh"

namespace avme {

// Whether load_row reads T[N] with 16-byte vector loads.
template <typename T, int N>
constexpr bool kVectorRow = (std::is_same_v<T, float> && N % 4 == 0) ||
                            (std::is_same_v<T, double> && N % 2 == 0);

// v[i] = p[i], i < N, with 16-byte vector loads where the type and N allow (p 16-byte aligned).
template <typename T, int N>
__device__ __forceinline__ void load_row(const T* p, T (&v)[N]) {
#ifdef AVME_CPU_EMULATION
  // The emulator reads element-wise, but checks the alignment the GPU's vector loads need.
  if (kVectorRow<T, N> && reinterpret_cast<std::uintptr_t>(p) % 16 != 0) {
    std::fprintf(stderr, "avme CUDA emulator: 16-byte vector load from %p (not 16-byte aligned)\n",
                 static_cast<const void*>(p));
    std::abort();
  }
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

template <typename T, int RT, int NBL>
struct FmaTile {
  static constexpr int kRows = RT;
  static constexpr int kCols = 32 * NBL;

  T acc[RT][NBL];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int i = 0; i < NBL; ++i) acc[r][i] = T(0);
  }

  // acc[r][i] += w[kk * ldw + r] * x[kk * ldx + lane + 32 i] for kk = split, split + nsplit,
  // ... < krows (w and x point at row 0 of the current tile).
  __device__ __forceinline__ void mac(const T* __restrict__ w, int ldw, const T* __restrict__ x,
                                      int ldx, int krows, int split, int nsplit, int lane) {
    for (int kk = split; kk < krows; kk += nsplit) {
      T wv[RT];
      load_row<T, RT>(w + static_cast<long>(kk) * ldw, wv);
      T xv[NBL];
#pragma unroll
      for (int i = 0; i < NBL; ++i) xv[i] = x[kk * ldx + lane + 32 * i];
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int i = 0; i < NBL; ++i) acc[r][i] = dfma(wv[r], xv[i], acc[r][i]);
    }
  }

  // out[r * ldo + col] = the accumulator of row r, column col (r < kRows, col < kCols).
  __device__ __forceinline__ void store(T* out, int ldo, int lane) const {
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int i = 0; i < NBL; ++i) out[r * ldo + lane + 32 * i] = acc[r][i];
  }

  // acc += in (same layout as store).
  __device__ __forceinline__ void add_from(const T* in, int ldo, int lane) {
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int i = 0; i < NBL; ++i) acc[r][i] += in[r * ldo + lane + 32 * i];
  }
};

template <int RT, int NBL, int kPasses>
struct Tf32Tile {
  static_assert(RT % 8 == 0, "Tf32Tile: rows in n-tiles of 8");
  static_assert(kPasses == 1 || kPasses == 3, "Tf32Tile: 1 (TF32) or 3 (3xTF32) passes");
  static constexpr int kRows = RT;
  static constexpr int kCols = 32 * NBL;
  static constexpr int kNTiles = RT / 8;     // weight rows, 8 per mma
  static constexpr int kMTiles = 2 * NBL;    // batch columns, 16 per mma

  float acc[kMTiles][kNTiles][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kMTiles; ++i)
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;
  }

  // k blocks kb = split, split + nsplit, ... of 8 rows (rows >= krows count as 0).
  // A (batch x k) = X^T: a0 = X[k0 + t][m0 + g], a1 = X[k0 + t][m0 + g + 8],
  //                      a2 = X[k0 + t + 4][m0 + g], a3 = X[k0 + t + 4][m0 + g + 8];
  // B (k x rows) = W:    b0 = W[k0 + t][n0 + g], b1 = W[k0 + t + 4][n0 + g].
  __device__ __forceinline__ void mac(const float* __restrict__ w, int ldw,
                                      const float* __restrict__ x, int ldx, int krows, int split,
                                      int nsplit, int lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int k0 = split * 8; k0 < krows; k0 += nsplit * 8) {
      const int ka = k0 + t, kb = k0 + t + 4;
      const bool va = ka < krows, vb = kb < krows;
      uint32_t bh[kNTiles][2], bl[kNTiles][2];
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) {
        const float b0 = va ? w[ka * ldw + 8 * j + g] : 0.0f;
        const float b1 = vb ? w[kb * ldw + 8 * j + g] : 0.0f;
        if constexpr (kPasses == 3) {
          split_tf32(b0, bh[j][0], bl[j][0]);
          split_tf32(b1, bh[j][1], bl[j][1]);
        } else {
          bh[j][0] = to_tf32(b0);
          bh[j][1] = to_tf32(b1);
        }
      }
#pragma unroll
      for (int i = 0; i < kMTiles; ++i) {
        const int m = 16 * i + g;
        const float av[4] = {va ? x[ka * ldx + m] : 0.0f, va ? x[ka * ldx + m + 8] : 0.0f,
                             vb ? x[kb * ldx + m] : 0.0f, vb ? x[kb * ldx + m + 8] : 0.0f};
        uint32_t ah[4], al[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if constexpr (kPasses == 3) {
            split_tf32(av[q], ah[q], al[q]);
          } else {
            ah[q] = to_tf32(av[q]);
          }
        }
#pragma unroll
        for (int j = 0; j < kNTiles; ++j) {
          if constexpr (kPasses == 3) {
            mma_tf32_m16n8k8(acc[i][j], al, bh[j]);
            mma_tf32_m16n8k8(acc[i][j], ah, bl[j]);
          }
          mma_tf32_m16n8k8(acc[i][j], ah, bh[j]);
        }
      }
    }
  }

  // D element (m, n) of tile (i, j) is out[(8 j + n) * ldo + 16 i + m]: c0 (g, 2t), c1 (g, 2t+1),
  // c2 (g + 8, 2t), c3 (g + 8, 2t + 1) with m the batch column and n the weight row.
  template <typename Fn>
  __device__ __forceinline__ void for_each(int lane, Fn&& fn) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < kMTiles; ++i)
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int col = 16 * i + g + (q >= 2 ? 8 : 0);
          const int row = 8 * j + 2 * t + (q & 1);
          fn(acc[i][j][q], row, col);
        }
  }

  __device__ __forceinline__ void store(float* out, int ldo, int lane) {
    for_each(lane, [&](float& v, int row, int col) { out[row * ldo + col] = v; });
  }

  __device__ __forceinline__ void add_from(const float* in, int ldo, int lane) {
    for_each(lane, [&](float& v, int row, int col) { v += in[row * ldo + col]; });
  }
};

}  // namespace avme
