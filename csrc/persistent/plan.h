// Work split and memory layout of the persistent kernels (host and device): which units each
// block owns, where each stage's stationary weights sit in shared memory, and the global
// workspace through which the blocks exchange activations. Computed once on the host per
// launch (plan_forward / plan_backward) and passed to the kernel by value.
#pragma once

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
  bool encoder = true;
};

// Shared-memory and workspace layout of the forward / sampler kernel.
//   Stages per step: E (encoder gates from r_t), Q (posterior from h_enc_t, plus the h_enc part
//   of step t+1's encoder gates), D (decoder gates from z_t), W (canvas from h_dec_t, plus the
//   h_dec parts of step t+1's encoder and decoder gates).
//   Per-block state (rows of bp columns): p_enc / p_dec (the recurrent parts of the next
//   step's gate pre-activations), c_enc / c_dec (cell states), s (canvas of the owned pixels).
//   Workspace, feature-major (rows of bp columns, shared by all blocks): h_enc, h_dec, z (the
//   sampler: z of all K steps), r (the encoder input of the next step).
struct ForwardPlan {
  Config cfg;
  int nb = 0;        // batch columns per chunk (32 * nbl)
  int nchunks = 0;   // ceil(B / nb)
  int64_t bp = 0;    // row stride of every (rows, batch) array: B rounded up to 4
  int ne = 0, nz = 0, nd = 0, np = 0;  // most encoder / latent / decoder units, pixels per block
  StageLayout E, Q, D, W;
  int q_he = 0;                  // Q: first row of the h_enc -> encoder-gates block
  int w_ehd = 0, w_dhh = 0;      // W: first rows of the h_dec -> encoder / decoder gates blocks
  int64_t scratch = 0, scratch_elems = 0;  // activation tiles, then the cross-warp partial sums
  bool priv_in_smem = false;
  int64_t priv_elems = 0;        // per block
  int64_t priv_smem = 0;         // offset of the per-block state in shared memory
  int64_t p_enc = 0, p_dec = 0, c_enc = 0, c_dec = 0, s = 0;  // offsets inside it
  int64_t smem_elems = 0;
  int64_t ws_henc = 0, ws_hdec = 0, ws_z = 0, ws_r = 0, ws_priv = 0, ws_elems = 0;
};

// Shared-memory and workspace layout of the backward-through-time kernel.
//   Stages per step t = K-1..0: B1 (decoder cell backward from dL/ds_t), B2 (d[mu, logvar]
//   from the decoder gate gradients, plus their recurrent part of dh_dec_{t-1}), B3 (encoder
//   cell backward from d[mu, logvar]), B4 (from the encoder gate gradients: dL/ds_{t-1} of the
//   owned pixels and the encoder's parts of dh_dec_{t-1} and dh_enc_{t-1}).
//   Per-block state: dc_dec, dc_enc (carried cell gradients), p_dec, p_enc (carried dh parts),
//   gs (dL/ds of the owned pixels). Workspace, feature-major: gs, dgd (4Hd rows), dq (2Z rows),
//   dge (4He rows).
struct BackwardPlan {
  Config cfg;
  int nb = 0;
  int nchunks = 0;
  int64_t bp = 0;
  int ne = 0, nz = 0, nd = 0, np = 0;
  StageLayout B1, B2, B3, B4;
  int b2_dhh = 0;                // B2: first row of the W_hh(dec)^T block
  int b4_ehd = 0, b4_ehh = 0;    // B4: first rows of the W_hdec^T and W_hh(enc)^T blocks
  int64_t scratch = 0, scratch_elems = 0;
  bool priv_in_smem = false;
  int64_t priv_elems = 0;
  int64_t priv_smem = 0;
  int64_t dc_dec = 0, dc_enc = 0, p_dec = 0, p_enc = 0, gs = 0;
  int64_t smem_elems = 0;
  int64_t ws_gs = 0, ws_dgd = 0, ws_dq = 0, ws_dge = 0, ws_priv = 0, ws_elems = 0;
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

// `cfg` fully resolved; `smem_limit` (bytes) decides whether the per-block state fits in shared
// memory next to the weights (else it lives in the global workspace).
inline ForwardPlan plan_forward(const Dims& d, const Config& cfg, size_t elem_size,
                                int64_t smem_limit) {
  ForwardPlan f;
  f.cfg = cfg;
  f.nb = 32 * cfg.nbl;
  f.nchunks = static_cast<int>((d.B + f.nb - 1) / f.nb);
  f.bp = round_up(d.B, 4);
  const int G = cfg.ctas;
  f.ne = d.encoder ? max_share(d.He, G) : 0;
  f.nz = d.encoder ? max_share(d.Z, G) : 0;
  f.nd = max_share(d.Hd, G);
  f.np = max_share(d.D, G);
  Allocator smem;
  f.E = make_stage(d.D, 4 * f.ne, cfg.math, smem);
  f.q_he = 2 * f.nz;
  f.Q = make_stage(d.He, 2 * f.nz + 4 * f.ne, cfg.math, smem);
  f.D = make_stage(d.Z, 4 * f.nd, cfg.math, smem);
  f.w_ehd = f.np;
  f.w_dhh = f.np + 4 * f.ne;
  f.W = make_stage(d.Hd, f.np + 4 * f.ne + 4 * f.nd, cfg.math, smem);
  f.scratch_elems = scratch_elems_for(cfg, f.nb);
  f.scratch = smem.take(f.scratch_elems);

  Allocator priv;
  f.p_enc = priv.take(4 * f.ne * f.bp);
  f.p_dec = priv.take(4 * f.nd * f.bp);
  f.c_enc = priv.take(f.ne * f.bp);
  f.c_dec = priv.take(f.nd * f.bp);
  f.s = priv.take(f.np * f.bp);
  f.priv_elems = priv.end;
  f.priv_in_smem =
      static_cast<int64_t>((smem.end + f.priv_elems) * elem_size) <= smem_limit;
  if (f.priv_in_smem) f.priv_smem = smem.take(f.priv_elems);
  f.smem_elems = smem.end;

  Allocator ws;
  f.ws_henc = ws.take(static_cast<int64_t>(d.encoder ? d.He : 0) * f.bp);
  f.ws_hdec = ws.take(static_cast<int64_t>(d.Hd) * f.bp);
  f.ws_z = ws.take(static_cast<int64_t>(d.encoder ? 1 : d.K) * d.Z * f.bp);
  f.ws_r = ws.take(static_cast<int64_t>(d.encoder ? d.D : 0) * f.bp);
  f.ws_priv = ws.take(f.priv_in_smem ? 0 : G * f.priv_elems);
  f.ws_elems = ws.end;
  return f;
}

inline BackwardPlan plan_backward(const Dims& d, const Config& cfg, size_t elem_size,
                                  int64_t smem_limit) {
  BackwardPlan b;
  b.cfg = cfg;
  b.nb = 32 * cfg.nbl;
  b.nchunks = static_cast<int>((d.B + b.nb - 1) / b.nb);
  b.bp = round_up(d.B, 4);
  const int G = cfg.ctas;
  b.ne = max_share(d.He, G);
  b.nz = max_share(d.Z, G);
  b.nd = max_share(d.Hd, G);
  b.np = max_share(d.D, G);
  Allocator smem;
  b.B1 = make_stage(d.D, b.nd, cfg.math, smem);
  b.b2_dhh = b.nz;
  b.B2 = make_stage(4 * d.Hd, b.nz + b.nd, cfg.math, smem);
  b.B3 = make_stage(2 * d.Z, b.ne, cfg.math, smem);
  b.b4_ehd = b.np;
  b.b4_ehh = b.np + b.nd;
  b.B4 = make_stage(4 * d.He, b.np + b.nd + b.ne, cfg.math, smem);
  b.scratch_elems = scratch_elems_for(cfg, b.nb);
  b.scratch = smem.take(b.scratch_elems);

  Allocator priv;
  b.dc_dec = priv.take(b.nd * b.bp);
  b.dc_enc = priv.take(b.ne * b.bp);
  b.p_dec = priv.take(b.nd * b.bp);
  b.p_enc = priv.take(b.ne * b.bp);
  b.gs = priv.take(b.np * b.bp);
  b.priv_elems = priv.end;
  b.priv_in_smem =
      static_cast<int64_t>((smem.end + b.priv_elems) * elem_size) <= smem_limit;
  if (b.priv_in_smem) b.priv_smem = smem.take(b.priv_elems);
  b.smem_elems = smem.end;

  Allocator ws;
  b.ws_gs = ws.take(static_cast<int64_t>(d.D) * b.bp);
  b.ws_dgd = ws.take(4 * static_cast<int64_t>(d.Hd) * b.bp);
  b.ws_dq = ws.take(2 * static_cast<int64_t>(d.Z) * b.bp);
  b.ws_dge = ws.take(4 * static_cast<int64_t>(d.He) * b.bp);
  b.ws_priv = ws.take(b.priv_in_smem ? 0 : G * b.priv_elems);
  b.ws_elems = ws.end;
  return b;
}

}  // namespace persistent
}  // namespace avme
