// One stage of the persistent kernels: a block multiplies its stationary weight rows (shared
// memory) by an activation matrix every block reads from global memory / L2, then runs the
// stage's element-wise epilogue on the result:
//     out[r][b] = sum_k W[k][r] * X[k][b]      r < rows (this block's), b < B, k < K_stage
// X is feature-major (row k holds the batch contiguously, row stride bp), so a tile of kc rows x
// nb batch columns is a set of contiguous 16-byte runs: it is streamed into shared memory with
// cp.async, double-buffered, while the previous tile is multiplied.
//
// Work split inside a block (plan.h, warp_rows / warp_cols): every warp covers ALL the rows of
// a pass (up to the tile's kRows) for one column slice of the batch chunk (kCols columns; a
// chunk of 128 columns has 2 slices, of 32 or 64 columns 1), and the warps of a slice split each
// tile's k steps (split s of nsplit takes steps s, s + nsplit, ...; a step is 1 k row for FMA, 8
// for tensor cores). So each activation element of a tile is read (and converted) by exactly
// one warp of the block, and every warp has the same work whatever the stage's row count. After
// the last tile the split partial sums of a slice are added by a tree over shared memory (rounds
// h = 1, 2, 4: split s + h stores, split s adds; fixed order, so results are deterministic),
// split 0 stores the slice's sums, and the epilogue reads row sums from there (PassSums). Rows
// beyond one pass take further passes (each re-streams X; at the paper's sizes every stage has
// one). The batch is processed in chunks of nb = 32 * NBL columns; columns >= B of the last
// chunk are zero-filled and never written back.
//
// The weights arrive packed by the host side of the launch in shared-memory order, one slice
// per block (pack_stage, launch.h): the kernel copies its slice with 16-byte cp.async
// (start_weight_copy), with no index arithmetic and no dependent loads.
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

// Pairs (s, s + h), s a multiple of 2h, among ns splits (the partial tiles of a tree round).
__device__ __forceinline__ int pairs_of(int ns, int h) {
  return ns > h ? (ns - h + 2 * h - 1) / (2 * h) : 0;
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
// the chunk, b = b0 + col), spread over the block's threads, unit fastest: consecutive threads
// take consecutive units of one batch row, so the (K, B, H) outputs and the (B, H) inputs the
// epilogues touch are read and written in runs of the block's units (one or two 32-byte
// sectors) instead of one sector per element, at the same sector count for the feature-major
// workspace. One division per call, none per element (the start-up loops pass the whole batch
// as one chunk: ncols up to 2^30).
template <typename Fn>
__device__ __forceinline__ void for_units(const Range& units, int64_t b0, int ncols, Fn&& fn) {
  const int n = units.count;
  if (n <= 0) return;
  const int step = static_cast<int>(blockDim.x);
  const int du = step % n, dcol = step / n;
  int u = static_cast<int>(threadIdx.x) % n;
  int col = static_cast<int>(threadIdx.x) / n;
  while (col < ncols) {
    fn(units.begin + u, b0 + col, col);
    u += du;
    col += dcol;
    if (u >= n) {
      u -= n;
      ++col;
    }
  }
}

// A value a kernel writes as the activation of a later stage's product: rounded to TF32 when
// that product takes its operands as they are (MATH == kMathTf32: the 1-pass tile does not
// convert), unchanged otherwise. The exact value goes wherever else it is needed (outputs, the
// per-block state).
template <int MATH, typename T>
__device__ __forceinline__ T stage_operand(T v) {
  if constexpr (MATH == kMathTf32 && std::is_same_v<T, float>) {
    return tf32_value(to_tf32(v));
  } else {
    return v;
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

// The stage with register tile `Tile` on batch chunks of NB columns; see the file comment.
// `epilogue(row0, nrows, sums, b0, ncols)` is called once per pass and batch chunk, by every
// thread of the block. w: the stage's weights (layout of Tile, row stride / n-tile count ld).
template <typename Tile, int NB, typename T, typename Epilogue>
__device__ void run_stage_tiled(const StageContext<T>& ctx, const T* w, int ld, int rows,
                                const T* __restrict__ x, int k, Epilogue& epilogue) {
  constexpr int kCols = Tile::kCols;
  static_assert(NB % kCols == 0, "a batch chunk is a whole number of column slices");
  constexpr int kSlices = NB / kCols;
  constexpr int LDX = NB + kTilePad;   // activation tile rows
  constexpr int LDP = kCols + kSumPad; // partial tiles of the split-K tree
  constexpr int LDO = NB + kSumPad;    // row sums
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nsplit = (blockDim.x >> 5) / kSlices;  // >= 1 (resolve_config)
  const int slice = warp % kSlices;
  const int split = warp / kSlices;
  const bool active = split < nsplit;  // (an odd warp count leaves one warp idle)
  const int ntiles = (k + ctx.kc - 1) / ctx.kc;
  // Tile buffer i & 1 at scratch + (i & 1) * kc * LDX. (Computed, not looked up in an array of
  // two pointers: a runtime index into such an array puts it in local memory and loses the
  // shared address space, so the innermost loop would use generic loads.)
  const int64_t tile_elems = static_cast<int64_t>(ctx.kc) * LDX;
  auto tile_buffer = [&](int i) { return ctx.scratch + (i & 1) * tile_elems; };

  for (int chunk = 0; chunk < ctx.nchunks; ++chunk) {
    const int64_t b0 = static_cast<int64_t>(chunk) * NB;
    const int ncols = static_cast<int>(ctx.B - b0 < NB ? ctx.B - b0 : NB);
    for (int row0 = 0; row0 < rows; row0 += Tile::kRows) {
      const int left = rows - row0 < Tile::kRows ? rows - row0 : Tile::kRows;
      const int nrows = (left + Tile::kRowStep - 1) / Tile::kRowStep * Tile::kRowStep;
      const T* const wp = Tile::weights_at(w, ld, 0, row0);

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
        if (active)
          tile.mac(wp + static_cast<int64_t>(k0) * ld, ld, tile_buffer(i) + slice * kCols, LDX,
                   krows, split, nsplit, lane, nrows);
        __syncthreads();  // every warp is done with tile i before its buffer is refilled
      }
      // Split-K partial sums of each slice, added by a tree (the tile buffers are free now).
      const int64_t slot_elems = static_cast<int64_t>(nrows) * LDP;
      for (int h = 1; h < nsplit; h *= 2) {
        const int pairs = pairs_of(nsplit, h);
        if (active && split % (2 * h) == h)
          tile.store(ctx.scratch + (slice * pairs + (split - h) / (2 * h)) * slot_elems, LDP,
                     lane, nrows);
        __syncthreads();
        if (active && split % (2 * h) == 0 && split + h < nsplit)
          tile.add_from(ctx.scratch + (slice * pairs + split / (2 * h)) * slot_elems, LDP, lane,
                        nrows);
        __syncthreads();
      }
      if (active && split == 0) tile.store(ctx.scratch + slice * kCols, LDO, lane, nrows);
      __syncthreads();
      epilogue(row0, nrows, PassSums<T>{ctx.scratch, LDO}, b0, ncols);
      __syncthreads();  // the scratch area is reused by the next pass / stage
    }
  }
}

// A stage of `layout` for this block's first `rows` rows (0: nothing to do; every thread of the
// block must agree). x: the activation, k = layout.k rows of stride ctx.bp. MATH (Math) picks
// the tile: CUDA-core FMA in T, or TF32 tensor cores (T = float); the tile's shape is the one
// the planner sized the scratch area for (plan.h: warp_rows, warp_cols).
template <typename T, int NBL, int MATH, typename Epilogue>
__device__ void run_stage(const StageContext<T>& ctx, const StageLayout& layout, const T* smem,
                          int rows, const T* x, Epilogue&& epilogue) {
  if (rows <= 0) return;
  const T* w = smem + layout.offset;
  constexpr int kRows = warp_rows(MATH, static_cast<int>(sizeof(T)));
  constexpr int kCpl = warp_cols(NBL) / 32;  // columns per lane
  if constexpr (MATH == kMathFma) {
    using Tile = FmaTile<T, kRows, kCpl>;
    run_stage_tiled<Tile, 32 * NBL>(ctx, w, layout.ld, rows, x, layout.k, epilogue);
  } else {
    static_assert(std::is_same_v<T, float>, "tensor-core tiles take float tensors");
    using Tile = Tf32Tile<kRows / 8, 2 * kCpl, MATH == kMathTf32x3 ? 3 : 1>;
    run_stage_tiled<Tile, 32 * NBL>(ctx, w, layout.ld, rows, x, layout.k, epilogue);
  }
}

// Starts copying this block's packed weights (`elems` elements at `packed`, already in
// shared-memory order: pack_stage) into shared memory from offset 0, with 16-byte cp.async in
// one commit group. Wait for it with async_wait<0>() and __syncthreads() before the first stage.
template <typename T>
__device__ void start_weight_copy(T* smem, const T* __restrict__ packed, int64_t elems) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const int vecs = static_cast<int>(elems / kVec);  // elems: a multiple of 4 (plan.h)
  for (int i = threadIdx.x; i < vecs; i += blockDim.x)
    copy_16_async(smem + i * kVec, packed + i * kVec, 16);
  async_commit();
}

// Writes one stage's weights of one block in the stage's layout: positions begin, begin +
// stride, ... of the stage's region `out` get value(k, r) (0 in the k padding), rounded to TF32
// when kRoundTf32 (the 1-pass tensor-core product takes them as they are). Run by the packing
// kernel on the GPU and by the emulated launch on the host (launch.h).
template <bool kRoundTf32, typename T, typename Value>
__device__ void pack_stage(const StageLayout& layout, T* out, int begin, int stride,
                           const Value& value) {
  const int n = static_cast<int>(layout.elems());
  for (int i = begin; i < n; i += stride) {
    int kk, r;
    layout.at(i, kk, r);
    const T v = kk < layout.k ? value(kk, r) : T(0);
    out[i] = stage_operand<kRoundTf32 ? kMathTf32 : kMathFma>(v);
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
