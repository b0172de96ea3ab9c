// One stage of the persistent kernels: a block multiplies its stationary weight rows (shared
// memory) by an activation matrix every block reads from global memory / L2, then runs the
// stage's element-wise epilogue on the result:
//     out[r][b] = sum_k W[k][r] * X[k][b]      r < rows (this block's), b < B, k < K_stage
// X is feature-major (row k holds the batch contiguously, row stride bp), so a tile of kc rows x
// nb batch columns is a set of contiguous 16-byte runs: it is streamed into shared memory with
// cp.async, double-buffered, while the previous tile is multiplied.
//
// Work split inside a block (nwarps warps): the rows form groups of RT (the register tile of
// common/tile_product.cuh: FMA or tensor-core); a pass takes up to nwarps groups (fewer when
// their sums would not fit in the scratch area), and the warps sharing a group split each tile's
// k rows (split-K: split s of nsplit). After the last tile the
// split partial sums of a group are added by a tree over shared memory (rounds h = 1, 2, 4...:
// split s + h stores, split s adds; fixed order, so results are deterministic), split 0 stores
// the group's sums, and the epilogue reads row sums from there (PassSums). Rows beyond one pass
// take further passes (each re-streams X; the planned sizes need one). The batch is processed
// in chunks of nb = 32 * NBL columns; columns >= B of the last chunk are zero-filled and never
// written back.
#pragma once

#include <type_traits>

#include "common/async_copy.cuh"
#include "common/tile_product.cuh"
#include "persistent/plan.h"

#ifndef AVME_DYNAMIC_SMEM  // (the CPU emulator defines its own)
#define AVME_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace avme {
namespace persistent {

// Per-launch constants every stage needs.
template <typename T>
struct StageContext {
  T* scratch;             // shared memory: 2 activation tiles, then partial and row sums
  int64_t scratch_elems;  // its size (elements)
  int kc;                 // k rows per tile
  int64_t bp;             // row stride of X
  int64_t B;              // batch rows
  int nchunks;            // batch chunks of nb columns
};

// Row sums of one pass, [rows of the pass][nb] in shared memory.
template <typename T>
struct PassSums {
  const T* sums;
  int ld;

  // Sum of row `row` (relative to the pass's first row), batch column `col` of the chunk.
  __device__ __forceinline__ T operator()(int row, int col) const { return sums[row * ld + col]; }
};

// Split-K bookkeeping of a pass: warp w works on group w % groups as split w / groups.
__device__ __forceinline__ int splits_of(int group, int groups, int nwarps) {
  return (nwarps - group + groups - 1) / groups;
}

// Pairs (s, s + h), s a multiple of 2h, among ns splits.
__device__ __forceinline__ int pairs_of(int ns, int h) {
  return ns > h ? (ns - h + 2 * h - 1) / (2 * h) : 0;
}

// Shared-memory slot of the pair (s, s + h) of `group` in reduction round h (slots are numbered
// over all groups: at most nwarps / 2 per round).
__device__ __forceinline__ int pair_slot(int group, int s, int h, int groups, int nwarps) {
  int slot = 0;
  for (int g = 0; g < group; ++g) slot += pairs_of(splits_of(g, groups, nwarps), h);
  return slot + s / (2 * h);
}

// Units of `block` whose rows lie in the pass's rows [row0, row0 + nrows).
__device__ __forceinline__ Range units_in_pass(const RowBlock& block, int row0, int nrows) {
  const int rpu = block.rows_per_unit;
  auto first_unit_at_or_after = [&](int row) {
    const int rel = row - block.offset;
    if (rel <= 0) return 0;
    const int u = (rel + rpu - 1) / rpu;
    return u < block.count ? u : block.count;
  };
  const int lo = first_unit_at_or_after(row0);
  const int hi = first_unit_at_or_after(row0 + nrows);
  return Range{lo, hi - lo};
}

// Last row (exclusive) of a row block, 0 when it is empty.
__device__ __forceinline__ int block_end(const RowBlock& block) {
  return block.count > 0 ? block.offset + block.count * block.rows_per_unit : 0;
}

// Rows of a stage a block needs: up to the end of its last non-empty row block.
__device__ __forceinline__ int rows_used(const RowBlock& a, const RowBlock& b = RowBlock{},
                                         const RowBlock& c = RowBlock{}) {
  const int ab = block_end(a) > block_end(b) ? block_end(a) : block_end(b);
  return ab > block_end(c) ? ab : block_end(c);
}

// Runs `fn(unit, b, col)` for every unit of `units` and batch column of the chunk (col: column in
// the chunk, b = b0 + col), spread over the block's threads, batch fastest. The index runs in
// int64: the start-up loops pass the whole batch as one chunk (units x B can exceed 2^31).
template <typename Fn>
__device__ __forceinline__ void for_units(const Range& units, int64_t b0, int ncols, Fn&& fn) {
  const int64_t total = static_cast<int64_t>(units.count) * ncols;
  for (int64_t idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int64_t q = idx / ncols;
    const int col = static_cast<int>(idx - q * ncols);
    fn(units.begin + static_cast<int>(q), b0 + col, col);
  }
}

// Issues the cp.async copies of X rows [k0, k0 + krows), batch columns [b0, b0 + ncols) into a
// tile of NB columns and row stride LDX (columns >= ncols zero-filled).
template <typename T, int NB, int LDX>
__device__ __forceinline__ void load_tile(T* tile, const T* __restrict__ x, int64_t bp, int k0,
                                          int krows, int64_t b0, int ncols) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  constexpr int kPerRow = NB / kVec;
  const int total = krows * kPerRow;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int kk = idx / kPerRow;
    const int c = (idx - kk * kPerRow) * kVec;
    int valid = ncols - c;
    valid = valid < 0 ? 0 : (valid > kVec ? kVec : valid);
    const T* src = x + (static_cast<int64_t>(k0) + kk) * bp + b0 + c;
    copy_16_async(tile + kk * LDX + c, valid > 0 ? src : x, valid * static_cast<int>(sizeof(T)));
  }
}

// The stage with register tile `Tile`; see the file comment. `epilogue(row0, nrows, sums, b0,
// ncols)` is called once per pass and batch chunk, by every thread of the block.
template <typename Tile, typename T, typename Epilogue>
__device__ void run_stage_tiled(const StageContext<T>& ctx, const T* w, int ld, int rows,
                                const T* __restrict__ x, int k, Epilogue& epilogue) {
  constexpr int RT = Tile::kRows;
  constexpr int NB = Tile::kCols;
  constexpr int LDX = NB + kTilePad;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int ngroups = (rows + RT - 1) / RT;
  const int fit = static_cast<int>(ctx.scratch_elems / (RT * NB));  // groups whose sums fit
  const int max_groups = fit < nwarps ? fit : nwarps;
  const int ntiles = (k + ctx.kc - 1) / ctx.kc;
  // Tile buffer i & 1 at scratch + (i & 1) * kc * LDX. (Computed, not looked up in an array of
  // two pointers: a runtime index into such an array puts it in local memory and loses the
  // shared address space, so the innermost loop would use generic loads.)
  const int64_t tile_elems = static_cast<int64_t>(ctx.kc) * LDX;
  auto tile_buffer = [&](int i) { return ctx.scratch + (i & 1) * tile_elems; };

  for (int chunk = 0; chunk < ctx.nchunks; ++chunk) {
    const int64_t b0 = static_cast<int64_t>(chunk) * NB;
    const int ncols = static_cast<int>(ctx.B - b0 < NB ? ctx.B - b0 : NB);
    for (int g0 = 0; g0 < ngroups; g0 += max_groups) {
      const int groups = ngroups - g0 < max_groups ? ngroups - g0 : max_groups;
      const int group = warp % groups;
      const int split = warp / groups;
      const int nsplit = splits_of(group, groups, nwarps);
      const T* const wg = w + (g0 + group) * RT;

      Tile tile;
      tile.zero();
      load_tile<T, NB, LDX>(tile_buffer(0), x, ctx.bp, 0, k < ctx.kc ? k : ctx.kc, b0, ncols);
      async_commit();
      for (int i = 0; i < ntiles; ++i) {
        const int k0 = i * ctx.kc;
        if (i + 1 < ntiles) {
          const int k1 = k0 + ctx.kc;
          load_tile<T, NB, LDX>(tile_buffer(i + 1), x, ctx.bp, k1,
                                k - k1 < ctx.kc ? k - k1 : ctx.kc, b0, ncols);
          async_commit();
          async_wait<1>();
        } else {
          async_wait<0>();
        }
        __syncthreads();  // tile i is in shared memory for every warp
        const int krows = k - k0 < ctx.kc ? k - k0 : ctx.kc;
        tile.mac(wg + static_cast<int64_t>(k0) * ld, ld, tile_buffer(i), LDX, krows, split,
                 nsplit, lane);
        __syncthreads();  // every warp is done with tile i before its buffer is refilled
      }
      // Split-K partial sums of each group, added by a tree (the tile buffers are free now).
      const int most_splits = splits_of(0, groups, nwarps);
      for (int h = 1; h < most_splits; h *= 2) {
        if (split % (2 * h) == h)
          tile.store(ctx.scratch + pair_slot(group, split - h, h, groups, nwarps) * RT * NB, NB,
                     lane);
        __syncthreads();
        if (split % (2 * h) == 0 && split + h < nsplit)
          tile.add_from(ctx.scratch + pair_slot(group, split, h, groups, nwarps) * RT * NB, NB,
                        lane);
        __syncthreads();
      }
      if (split == 0) tile.store(ctx.scratch + group * RT * NB, NB, lane);
      __syncthreads();
      epilogue(g0 * RT, groups * RT, PassSums<T>{ctx.scratch, NB}, b0, ncols);
      __syncthreads();  // the scratch area is reused by the next pass / stage
    }
  }
}

// A stage of `layout` for this block's first `rows` rows (0: nothing to do; every thread of the
// block must agree). x: the activation, k = layout.k rows of stride ctx.bp. MATH (Math) picks
// the tile: CUDA-core FMA in T, or TF32 tensor cores (T = float).
template <typename T, int NBL, int MATH, typename Epilogue>
__device__ void run_stage(const StageContext<T>& ctx, const StageLayout& layout, const T* smem,
                          int rows, const T* x, Epilogue&& epilogue) {
  if (rows <= 0) return;
  const T* w = smem + layout.offset;
  if constexpr (MATH == kMathFma) {
    if (layout.rt == 4) {
      run_stage_tiled<FmaTile<T, 4, NBL>>(ctx, w, layout.ld, rows, x, layout.k, epilogue);
    } else {
      run_stage_tiled<FmaTile<T, 8, NBL>>(ctx, w, layout.ld, rows, x, layout.k, epilogue);
    }
  } else {
    static_assert(std::is_same_v<T, float>, "tensor-core tiles take float tensors");
    constexpr int kPasses = MATH == kMathTf32x3 ? 3 : 1;
    if (layout.rt == 8) {
      run_stage_tiled<Tf32Tile<8, NBL, kPasses>>(ctx, w, layout.ld, rows, x, layout.k, epilogue);
    } else {
      run_stage_tiled<Tf32Tile<16, NBL, kPasses>>(ctx, w, layout.ld, rows, x, layout.k, epilogue);
    }
  }
}

// Fills a stage's stationary weights: w[k][r] = value(k, r) for k < layout.k, r < layout.ld
// (value returns 0 for padding rows and units the block does not own).
template <typename T, typename Value>
__device__ void fill_stage(T* smem, const StageLayout& layout, Value&& value) {
  if (layout.rows <= 0) return;
  T* w = smem + layout.offset;
  const int64_t total = static_cast<int64_t>(layout.k) * layout.ld;
  for (int64_t idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int kk = static_cast<int>(idx / layout.ld);
    const int r = static_cast<int>(idx - static_cast<int64_t>(kk) * layout.ld);
    w[idx] = value(kk, r);
  }
}

// This block's per-block state (plan.priv_elems elements): in shared memory when the plan put it
// there, else the block's slice of the workspace.
template <typename T>
__device__ __forceinline__ T* block_state(const PlanBase& plan, T* smem, T* ws) {
  return plan.priv_in_smem
             ? smem + plan.priv_smem
             : ws + plan.ws_priv + static_cast<int64_t>(blockIdx.x) * plan.priv_elems;
}

// Sets rows x bp elements to zero (per-block state at the start of a launch).
template <typename T>
__device__ void zero_fill(T* p, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) p[i] = T(0);
}

}  // namespace persistent
}  // namespace avme
