// Work split and memory layout of the persistent kernels (host and device): which units each
// block owns, where each stage's stationary weights sit in shared memory, and the global
// workspace through which the blocks exchange activations. Computed once on the host per
// launch (plan_forward / plan_backward) and passed to the kernel by value.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

#include "avme.h"

#ifdef AVME_CPU_EMULATION
#include "emulation/cuda_emulation.h"
#endif

namespace avme {
namespace persistent {

// Largest block the kernels are compiled for (__launch_bounds__).
constexpr int kMaxThreads = 256;
// Extra columns per activation-tile row in shared memory (tensor-core fragment loads without
// bank conflicts).
constexpr int kTilePad = 8;

// How the stage products are computed (common/tile_product.cuh):
constexpr int kMathFma = 0;     // CUDA-core FMA in the tensor dtype (float or double)
constexpr int kMathTf32x3 = 1;  // TF32 tensor cores, 3 products per term (~float accuracy)
constexpr int kMathTf32 = 2;    // TF32 tensor cores, 1 product (10-bit mantissas)

// Grid and tile sizes of one launch; 0 = choose (resolve_config in persistent.h).
struct Config {
  int ctas = 0;     // blocks: all co-resident (at most one per SM), each owns a slice of units
  int threads = 0;  // threads per block: a multiple of 32, at most kMaxThreads
  int nbl = 0;      // batch columns per lane: 1, 2 or 4 (a batch chunk has 32 * nbl columns)
  int kc = 0;       // activation rows (k) per tile streamed into shared memory
  int math = kMathFma;  // kMathFma, kMathTf32x3 or kMathTf32 (tensor cores: float, sm_80+)
};

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

__host__ __device__ inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// A stage's stationary weights in shared memory, k-major: for each of the k input features, the
// stage's `rows` output rows (largest over the blocks) padded to ld = a multiple of rt.
struct StageLayout {
  int k = 0;
  int rows = 0;
  int rt = 8;
  int ld = 0;
  int64_t offset = 0;  // elements from the start of shared memory
};

// Rows of one kind inside a stage: `count` units of `rows_per_unit` rows from row `offset`.
// (LSTM blocks have the four gate rows of a unit adjacent; their offset is 0, so a pass of a
// multiple of 4 rows never splits a unit.)
struct RowBlock {
  int offset = 0;
  int count = 0;
  int rows_per_unit = 1;
};

// Register-tile rows for a stage of `rows` rows: FMA tiles have 4 or 8 rows, tensor-core tiles
// 8 or 16; the larger unless it pads more.
__host__ __device__ inline int tile_rows_for(int rows, int math) {
  const int small = math == kMathFma ? 4 : 8;
  return round_up(rows, small) < round_up(rows, 2 * small) ? small : 2 * small;
}

__host__ __device__ inline int max_tile_rows(int math) { return math == kMathFma ? 8 : 16; }

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
  int64_t scratch = 0, scratch_elems = 0;  // activation tiles, then the cross-warp partial sums
  bool priv_in_smem = false;
  int64_t priv_elems = 0;        // per-block state, per block
  int64_t priv_smem = 0;         // offset of the per-block state in shared memory
  int64_t smem_elems = 0;
  int64_t ws_priv = 0, ws_elems = 0;  // per-block state in the workspace (when not in smem)
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
  s.rows = rows;
  s.rt = tile_rows_for(rows, math);
  s.ld = static_cast<int>(round_up(rows, s.rt));
  s.offset = rows > 0 ? smem.take(static_cast<int64_t>(k) * s.ld) : 0;
  return s;
}

// Shared memory of the stage products: two activation tiles (kc rows of nb + kTilePad), reused
// after the last tile for the split-K tree (at most nwarps / 2 partial tiles per round) and the
// row sums (at least one group).
inline int64_t scratch_elems_for(const Config& cfg, int nb) {
  const int64_t tiles = 2 * static_cast<int64_t>(cfg.kc) * (nb + kTilePad);
  const int64_t half = cfg.threads / 64 > 1 ? cfg.threads / 64 : 1;
  const int64_t partials = half * max_tile_rows(cfg.math) * nb;
  return tiles > partials ? tiles : partials;
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

// After the stages' weights: the scratch area, then the per-block state of `priv_elems`
// elements, in shared memory when it fits next to the weights within `smem_limit` bytes.
inline void plan_scratch_and_state(PlanBase& plan, Allocator& smem, int64_t priv_elems,
                                   size_t elem_size, int64_t smem_limit) {
  plan.scratch_elems = scratch_elems_for(plan.cfg, plan.nb);
  plan.scratch = smem.take(plan.scratch_elems);
  plan.priv_elems = priv_elems;
  plan.priv_in_smem =
      static_cast<int64_t>((smem.end + priv_elems) * elem_size) <= smem_limit;
  if (plan.priv_in_smem) plan.priv_smem = smem.take(priv_elems);
  plan.smem_elems = smem.end;
}

// After the exchange buffers: the per-block state in the workspace (when not in shared memory)
// and the workspace's size.
inline void plan_state_workspace(PlanBase& plan, Allocator& ws) {
  plan.ws_priv = ws.take(plan.priv_in_smem ? 0 : plan.cfg.ctas * plan.priv_elems);
  plan.ws_elems = ws.end;
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
  plan_scratch_and_state(f, smem, priv.end, elem_size, smem_limit);

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
  plan_scratch_and_state(b, smem, priv.end, elem_size, smem_limit);

  Allocator ws;
  b.ws_gs = ws.take(static_cast<int64_t>(d.D) * b.bp);
  b.ws_dgd = ws.take(4 * static_cast<int64_t>(d.Hd) * b.bp);
  b.ws_dq = ws.take(2 * static_cast<int64_t>(d.Z) * b.bp);
  b.ws_dge = ws.take(4 * static_cast<int64_t>(d.He) * b.bp);
  plan_state_workspace(b, ws);
  return b;
}

// The padded rows of each stage of a plan (the launcher compares them across block counts).
inline std::array<int, 4> stage_rows(const ForwardPlan& f) {
  return {f.E.ld, f.Q.ld, f.D.ld, f.W.ld};
}
inline std::array<int, 4> stage_rows(const BackwardPlan& b) {
  return {b.B1.ld, b.B2.ld, b.B3.ld, b.B4.ld};
}

}  // namespace persistent
}  // namespace avme
