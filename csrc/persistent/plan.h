// Work split and memory layout of the persistent kernels (host and device): which units each
// block owns, where each stage's stationary weights sit in shared memory, and the global
// workspace through which the blocks exchange activations. Computed once on the host per
// launch (plan_forward / plan_backward) and passed to the kernel by value.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "avme.h"

#ifdef AVME_CPU_EMULATION
#include "emulation/cuda_emulation.h"
#endif

namespace avme {
namespace persistent {

// Largest block the kernels are compiled for (__launch_bounds__).
constexpr int kMaxThreads = 256;
// Extra columns per activation-tile row in shared memory (tensor-core A fragments without bank
// conflicts: the row stride is 8 words past a multiple of 32 banks).
constexpr int kTilePad = 8;
// Extra columns per row of the split-K partial sums and the row sums (tensor-core accumulator
// stores without bank conflicts: 4 words past a multiple of 32 banks).
constexpr int kSumPad = 4;

// How the stage products are computed (common/tile_product.cuh):
constexpr int kMathFma = 0;     // CUDA-core FMA in the tensor dtype (float or double)
constexpr int kMathTf32x3 = 1;  // TF32 tensor cores, 3 products per term (~float accuracy)
constexpr int kMathTf32 = 2;    // TF32 tensor cores, 1 product (10-bit mantissas)
// Precision "fp32", resolved per launch (launch.h): kMathTf32x3 for float tensors on a device
// with TF32 tensor cores when that plan fits the shared memory, else kMathFma.
constexpr int kMathFp32 = -1;

// Stages of a kernel (forward E, Q, D, W; backward B1..B4), with a grid barrier between them.
constexpr int kStages = 4;

// Grid and tile sizes of one launch; 0 = choose (resolve_config in launch.h).
struct Config {
  int ctas = 0;     // blocks: all co-resident (at most one per SM), each owns a slice of units
  int threads = 0;  // threads per block: a multiple of 32, at most kMaxThreads
  int nbl = 0;      // batch chunk of 32 * nbl columns: nbl 1, 2 or 4 (4 needs >= 2 warps)
  int kc = 0;       // activation rows (k) per tile streamed into shared memory (tensor cores:
                    // a multiple of 8)
  int math = kMathFma;  // kMathFma, kMathTf32x3 or kMathTf32 (tensor cores: float, sm_80+), or
                        // kMathFp32 in a request
};

// The warps' share of a stage (stage.cuh). Every warp covers all the rows of a pass (up to
// warp_rows) for one column slice of the batch chunk (warp_cols columns) over one of the k
// splits: each activation element of a tile is read by one warp of the block, and a stage's
// work is the same for every warp whatever its row count.
//   rows per warp: 40 (TF32: 5 n-tiles of 8 rows; FMA float: 40 rows x 2 columns per lane), 24
//   for FMA in double (the accumulators of a lane stay within ~100 registers);
//   columns per warp: 32 (a batch chunk of 32) or 64; a chunk of 128 has two column slices;
//   k splits: the warps / column slices; a split takes every splits-th k step of a tile (1 row
//   for FMA, a block of 8 rows for the m16n8k8 tensor-core products).
__host__ __device__ constexpr int warp_rows(int math, int elem_size) {
  return math == kMathFma && elem_size == 8 ? 24 : 40;
}
__host__ __device__ constexpr int warp_cols(int nbl) { return 32 * (nbl < 2 ? nbl : 2); }
__host__ __device__ constexpr int column_slices(int nbl) { return 32 * nbl / warp_cols(nbl); }
__host__ __device__ constexpr int k_step(int math) { return math == kMathFma ? 1 : 8; }
// Rows of a stage's weights are padded to a multiple of row_step (FMA: a 16-byte vector of
// float; tensor cores: an n-tile).
__host__ __device__ constexpr int row_step(int math) { return math == kMathFma ? 4 : 8; }

// Contiguous share of n items owned by part i of `parts` (sizes differ by at most one).
struct Range {
  int begin = 0;
  int count = 0;
};

__host__ __device__ inline Range share(int n, int parts, int i) {
  const int64_t b = static_cast<int64_t>(n) * i / parts;
  const int64_t e = static_cast<int64_t>(n) * (i + 1) / parts;
  return Range{static_cast<int>(b), static_cast<int>(e - b)};
}

__host__ __device__ inline int max_share(int n, int parts) { return (n + parts - 1) / parts; }

// The units of each kind block `cta` of `ctas` owns (contiguous shares).
struct OwnedUnits {
  Range enc, lat, dec, pix;  // encoder units, latent units, decoder units, pixels
};

__host__ __device__ inline OwnedUnits owned_units(int He, int Z, int Hd, int D, int ctas, int cta) {
  return OwnedUnits{share(He, ctas, cta), share(Z, ctas, cta), share(Hd, ctas, cta),
                    share(D, ctas, cta)};
}

__host__ __device__ inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// A stage's stationary weights in shared memory (this block's `rows` output rows, largest over
// the blocks, padded to ld; zero where a block owns fewer), in one of two layouts:
//   FMA (fragments false): k-major, w[k * ld + r], ld a multiple of 4 (16-byte rows of float);
//   tensor cores (fragments true): the B fragments of mma.m16n8k8 in the order the lanes load
//   them: k blocks of 8 rows (k padded to kpad, a multiple of 8, with zeros), in each the ld / 8
//   n-tiles of 8 rows, in each 32 lanes x {b0, b1} (64 contiguous values): lane 4 g + t holds
//   (k = 8 kb + t, r = 8 j + g) and (k + 4, r). A warp reads a fragment as one 8-byte load per
//   lane, 256 contiguous bytes: no bank conflicts and no padding of ld.
// Either way the weights of k rows [k0, k0 + 8i) and rows [r0, ...) start at k0 * ld (+ r0 for
// FMA, + 8 r0 for fragments) when k0 and r0 are multiples of 8.
struct StageLayout {
  int k = 0;
  int kpad = 0;
  int rows = 0;
  int ld = 0;
  bool fragments = false;
  int64_t offset = 0;  // elements from the start of shared memory

  __host__ __device__ int64_t elems() const { return static_cast<int64_t>(kpad) * ld; }

  // Position of weight (k, r) in the stage's region.
  __host__ __device__ int64_t index(int kk, int r) const {
    if (!fragments) return static_cast<int64_t>(kk) * ld + r;
    const int kb = kk >> 3, j = r >> 3, g = r & 7, t = kk & 3, hi = (kk >> 2) & 1;
    return (static_cast<int64_t>(kb) * (ld >> 3) + j) * 64 + (4 * g + t) * 2 + hi;
  }

  // The inverse: (k, r) of position i (a stage fits in shared memory: 32-bit arithmetic).
  __host__ __device__ void at(int i, int& kk, int& r) const {
    if (!fragments) {
      kk = i / ld;
      r = i - kk * ld;
      return;
    }
    const int block = i >> 6, e = i & 63, lane = e >> 1;
    const int ntl = ld >> 3;
    const int kb = block / ntl, j = block - kb * ntl;
    kk = 8 * kb + (lane & 3) + 4 * (e & 1);
    r = 8 * j + (lane >> 2);
  }
};

// Rows of one kind inside a stage: `count` units of `rows_per_unit` rows from row `offset`.
// (LSTM blocks have the four gate rows of a unit adjacent; their offset is 0, so a pass of a
// multiple of 4 rows never splits a unit.)
struct RowBlock {
  int offset = 0;
  int count = 0;
  int rows_per_unit = 1;
};

// Sizes of one launch's problem (forward or backward).
struct Dims {
  int64_t B = 0;
  int K = 0, D = 0, He = 0, Hd = 0, Z = 0;
  int C = 0;             // classes (backward: the width of the y columns of the weights)
  bool encoder = true;
};

// What every plan holds besides its stages: batch chunking, units per block, the scratch area,
// the per-block state and the totals.
struct PlanBase {
  Config cfg;
  int nb = 0;        // batch columns per chunk (32 * nbl)
  int nchunks = 0;   // ceil(B / nb)
  int64_t bp = 0;    // row stride of every (rows, batch) array: B rounded up to 4
  int ne = 0, nz = 0, nd = 0, np = 0;  // most encoder / latent / decoder units, pixels per block
  int64_t weights_elems = 0;     // shared memory of the stages' weights (from offset 0)
  int64_t scratch = 0, scratch_elems = 0;  // activation tiles, then the cross-warp partial sums
  bool priv_in_smem = false;
  int64_t priv_elems = 0;        // per-block state, per block
  int64_t priv_smem = 0;         // offset of the per-block state in shared memory
  int64_t smem_elems = 0;
  int64_t ws_priv = 0, ws_elems = 0;  // per-block state in the workspace (when not in smem)
  int64_t ws_weights = 0;        // every block's weights, packed in shared-memory order
                                 // (weights_elems per block), copied in at the start
};

// Shared-memory and workspace layout of the forward / sampler kernel.
//   Stages per step: E (encoder gates from r_t), Q (posterior from h_enc_t, plus the h_enc part
//   of step t+1's encoder gates), D (decoder gates from z_t), W (canvas from h_dec_t, plus the
//   h_dec parts of step t+1's encoder and decoder gates).
//   Per-block state (rows of bp columns): p_enc / p_dec (the recurrent parts of the next
//   step's gate pre-activations), c_enc / c_dec (cell states), s (canvas of the owned pixels).
//   Workspace, feature-major (rows of bp columns, shared by all blocks): h_enc, h_dec, z (the
//   sampler: z of all K steps), r (the encoder input of the next step).
struct ForwardPlan : PlanBase {
  StageLayout E, Q, D, W;
  int q_he = 0;                  // Q: first row of the h_enc -> encoder-gates block
  int w_ehd = 0, w_dhh = 0;      // W: first rows of the h_dec -> encoder / decoder gates blocks
  int64_t p_enc = 0, p_dec = 0, c_enc = 0, c_dec = 0, s = 0;  // offsets in the per-block state
  int64_t ws_henc = 0, ws_hdec = 0, ws_z = 0, ws_r = 0;
};

// Shared-memory and workspace layout of the backward-through-time kernel.
//   Stages per step t = K-1..0: B1 (decoder cell backward from dL/ds_t), B2 (d[mu, logvar]
//   from the decoder gate gradients, plus their recurrent part of dh_dec_{t-1}), B3 (encoder
//   cell backward from d[mu, logvar]), B4 (from the encoder gate gradients: dL/ds_{t-1} of the
//   owned pixels and the encoder's parts of dh_dec_{t-1} and dh_enc_{t-1}).
//   Per-block state: dc_dec, dc_enc (carried cell gradients), p_dec, p_enc (carried dh parts),
//   gs (dL/ds of the owned pixels). Workspace, feature-major: gs, dgd (4Hd rows), dq (2Z rows),
//   dge (4He rows).
struct BackwardPlan : PlanBase {
  StageLayout B1, B2, B3, B4;
  int b2_dhh = 0;                // B2: first row of the W_hh(dec)^T block
  int b4_ehd = 0, b4_ehh = 0;    // B4: first rows of the W_hdec^T and W_hh(enc)^T blocks
  int64_t dc_dec = 0, dc_enc = 0, p_dec = 0, p_enc = 0, gs = 0;
  int64_t ws_gs = 0, ws_dgd = 0, ws_dq = 0, ws_dge = 0;
};

// Appends regions to a layout, each starting at a multiple of 4 elements (16 bytes for float:
// cp.async and vector loads).
struct Allocator {
  int64_t end = 0;
  int64_t take(int64_t elems) {
    const int64_t at = end;
    end = round_up(end + elems, 4);
    return at;
  }
};

inline StageLayout make_stage(int k, int rows, int math, Allocator& smem) {
  StageLayout s;
  s.k = k;
  s.fragments = math != kMathFma;
  s.kpad = static_cast<int>(round_up(k, k_step(math)));
  s.rows = rows;
  s.ld = static_cast<int>(round_up(rows, row_step(math)));
  s.offset = rows > 0 ? smem.take(s.elems()) : 0;
  return s;
}

// Rows of the passes of a stage of `ld` padded rows (the last pass may have fewer).
__host__ __device__ inline int pass_rows(int ld, int math, int elem_size) {
  const int most = warp_rows(math, elem_size);
  return ld < most ? ld : most;
}

// A stage of a launch and how the warps of a block share it, as the kernel runs it (for reports
// and tests).
struct StageSplit {
  int k = 0;            // activation rows (the stage's input features)
  int rows = 0;         // weight rows of the largest block
  int ld = 0;           // padded rows
  int passes = 0;       // row passes (each streams the stage's activation once)
  int slices = 0;       // column slices of a batch chunk
  int splits = 0;       // k splits of each slice (warps beyond slices * splits idle)
  int busy_warps = 0;   // warps with work in a full tile
};

__host__ __device__ inline StageSplit split_of(const StageLayout& layout, const Config& cfg,
                                               int elem_size) {
  StageSplit s;
  s.k = layout.k;
  s.rows = layout.rows;
  s.ld = layout.ld;
  const int most = pass_rows(layout.ld, cfg.math, elem_size);
  s.passes = layout.rows > 0 ? (layout.ld + most - 1) / most : 0;
  s.slices = column_slices(cfg.nbl);
  s.splits = cfg.threads / 32 / s.slices;
  const int steps = (cfg.kc + k_step(cfg.math) - 1) / k_step(cfg.math);
  s.busy_warps = layout.rows > 0 ? s.slices * (s.splits < steps ? s.splits : steps) : 0;
  return s;
}

// Shared memory of the stage products for passes of at most `rows` padded rows: two activation
// tiles (kc rows of nb + kTilePad), reused after the last tile for the split-K tree (at most
// nwarps / 2 partial tiles of rows x (warp_cols + kSumPad) in its first round) and then the
// row sums (rows x (nb + kSumPad)).
inline int64_t scratch_elems_for(const Config& cfg, int nb, int rows) {
  const int64_t tiles = 2 * static_cast<int64_t>(cfg.kc) * (nb + kTilePad);
  const int64_t half = cfg.threads / 64 > 1 ? cfg.threads / 64 : 1;
  const int64_t partials = half * rows * (warp_cols(cfg.nbl) + kSumPad);
  const int64_t sums = static_cast<int64_t>(rows) * (nb + kSumPad);
  const int64_t most = tiles > partials ? tiles : partials;
  return most > sums ? most : sums;
}

// The first part of a plan: batch chunks and the units each block owns (d.encoder false: no
// encoder or latent units).
inline void plan_batch_and_units(PlanBase& plan, const Dims& d, const Config& cfg) {
  plan.cfg = cfg;
  plan.nb = 32 * cfg.nbl;
  plan.nchunks = static_cast<int>((d.B + plan.nb - 1) / plan.nb);
  plan.bp = round_up(d.B, 4);
  plan.ne = d.encoder ? max_share(d.He, cfg.ctas) : 0;
  plan.nz = d.encoder ? max_share(d.Z, cfg.ctas) : 0;
  plan.nd = max_share(d.Hd, cfg.ctas);
  plan.np = max_share(d.D, cfg.ctas);
}

// After the stages' weights (the first `smem.end` elements; `widest` the largest padded rows of
// a stage): the scratch area, then the per-block state of `priv_elems` elements, in shared
// memory when it fits next to the weights within `smem_limit` bytes.
inline void plan_scratch_and_state(PlanBase& plan, Allocator& smem, int widest,
                                   int64_t priv_elems, size_t elem_size, int64_t smem_limit) {
  plan.weights_elems = smem.end;
  plan.scratch_elems = scratch_elems_for(
      plan.cfg, plan.nb, pass_rows(widest, plan.cfg.math, static_cast<int>(elem_size)));
  plan.scratch = smem.take(plan.scratch_elems);
  plan.priv_elems = priv_elems;
  plan.priv_in_smem =
      static_cast<int64_t>((smem.end + priv_elems) * elem_size) <= smem_limit;
  if (plan.priv_in_smem) plan.priv_smem = smem.take(priv_elems);
  plan.smem_elems = smem.end;
}

// After the exchange buffers: the per-block state in the workspace (when not in shared
// memory), the packed weights of every block, and the workspace's size.
inline void plan_state_workspace(PlanBase& plan, Allocator& ws) {
  plan.ws_priv = ws.take(plan.priv_in_smem ? 0 : plan.cfg.ctas * plan.priv_elems);
  plan.ws_weights = ws.take(plan.cfg.ctas * plan.weights_elems);
  plan.ws_elems = ws.end;
}

// The widest of a plan's stages (padded rows).
inline int widest_of(std::initializer_list<StageLayout> stages) {
  int w = 0;
  for (const StageLayout& s : stages) w = s.ld > w ? s.ld : w;
  return w;
}

// `cfg` fully resolved; `smem_limit` (bytes) decides whether the per-block state fits in shared
// memory next to the weights (else it lives in the global workspace).
inline ForwardPlan plan_forward(const Dims& d, const Config& cfg, size_t elem_size,
                                int64_t smem_limit) {
  ForwardPlan f;
  plan_batch_and_units(f, d, cfg);
  Allocator smem;
  f.E = make_stage(d.D, 4 * f.ne, cfg.math, smem);
  f.q_he = 2 * f.nz;
  f.Q = make_stage(d.He, 2 * f.nz + 4 * f.ne, cfg.math, smem);
  f.D = make_stage(d.Z, 4 * f.nd, cfg.math, smem);
  f.w_ehd = f.np;
  f.w_dhh = f.np + 4 * f.ne;
  f.W = make_stage(d.Hd, f.np + 4 * f.ne + 4 * f.nd, cfg.math, smem);

  Allocator priv;
  f.p_enc = priv.take(4 * f.ne * f.bp);
  f.p_dec = priv.take(4 * f.nd * f.bp);
  f.c_enc = priv.take(f.ne * f.bp);
  f.c_dec = priv.take(f.nd * f.bp);
  f.s = priv.take(f.np * f.bp);
  plan_scratch_and_state(f, smem, widest_of({f.E, f.Q, f.D, f.W}), priv.end, elem_size,
                         smem_limit);

  Allocator ws;
  f.ws_henc = ws.take(static_cast<int64_t>(d.encoder ? d.He : 0) * f.bp);
  f.ws_hdec = ws.take(static_cast<int64_t>(d.Hd) * f.bp);
  f.ws_z = ws.take(static_cast<int64_t>(d.encoder ? 1 : d.K) * d.Z * f.bp);
  f.ws_r = ws.take(static_cast<int64_t>(d.encoder ? d.D : 0) * f.bp);
  plan_state_workspace(f, ws);
  return f;
}

inline BackwardPlan plan_backward(const Dims& d, const Config& cfg, size_t elem_size,
                                  int64_t smem_limit) {
  BackwardPlan b;
  plan_batch_and_units(b, d, cfg);
  Allocator smem;
  b.B1 = make_stage(d.D, b.nd, cfg.math, smem);
  b.b2_dhh = b.nz;
  b.B2 = make_stage(4 * d.Hd, b.nz + b.nd, cfg.math, smem);
  b.B3 = make_stage(2 * d.Z, b.ne, cfg.math, smem);
  b.b4_ehd = b.np;
  b.b4_ehh = b.np + b.nd;
  b.B4 = make_stage(4 * d.He, b.np + b.nd + b.ne, cfg.math, smem);

  Allocator priv;
  b.dc_dec = priv.take(b.nd * b.bp);
  b.dc_enc = priv.take(b.ne * b.bp);
  b.p_dec = priv.take(b.nd * b.bp);
  b.p_enc = priv.take(b.ne * b.bp);
  b.gs = priv.take(b.np * b.bp);
  plan_scratch_and_state(b, smem, widest_of({b.B1, b.B2, b.B3, b.B4}), priv.end, elem_size,
                         smem_limit);

  Allocator ws;
  b.ws_gs = ws.take(static_cast<int64_t>(d.D) * b.bp);
  b.ws_dgd = ws.take(4 * static_cast<int64_t>(d.Hd) * b.bp);
  b.ws_dq = ws.take(2 * static_cast<int64_t>(d.Z) * b.bp);
  b.ws_dge = ws.take(4 * static_cast<int64_t>(d.He) * b.bp);
  plan_state_workspace(b, ws);
  return b;
}

// The stages of a plan in the kernel's order (stage i of the weight packing).
__host__ __device__ inline const StageLayout& stage_of(const ForwardPlan& f, int i) {
  return i == 0 ? f.E : (i == 1 ? f.Q : (i == 2 ? f.D : f.W));
}
__host__ __device__ inline const StageLayout& stage_of(const BackwardPlan& b, int i) {
  return i == 0 ? b.B1 : (i == 1 ? b.B2 : (i == 2 ? b.B3 : b.B4));
}
// The padded rows of each stage of a plan (the launcher compares them across block counts).
template <typename Plan>
std::array<int, kStages> stage_rows(const Plan& plan) {
  std::array<int, kStages> rows{};
  for (int i = 0; i < kStages; ++i) rows[i] = stage_of(plan, i).ld;
  return rows;
}

}  // namespace persistent
}  // namespace avme
