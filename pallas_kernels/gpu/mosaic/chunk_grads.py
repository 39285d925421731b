"""Per-chunk hand-derived backward (`grads.chunk_grads`) as one Mosaic GPU kernel, chunk 64.

Grid (N, H, B * V / 64), one warpgroup per CTA: a CTA owns one chunk of one head and one block of
BV = 64 value columns. It TMA-loads the chunk's q, k_l, v_l, do tiles, its start state S and
end-state cotangent dS' (16-bit [K, BV]; float32 inputs are cast in XLA), the forward's
(I + m)^{-1} (cast to 16 bits in XLA: `grads` multiplies it in the matmul dtype too) and the
per-token vectors of `token_vectors`, then runs `grads.block_step` and `grads.finish` as wgmma
products (every product a [64, 64] tile over a 64 / K / BV contraction, every register product
that is an operand again staged in 16-bit SMEM). One CTA holds exactly one value block, so the
[C, C] sums of `grads.Acc` are single wgmmas over BV (dR E^T, dO E^T, dO vw_l^T, dR vw_l^T), never
carried; `finish` is linear in them, so each CTA writes its share of dq, dk_l, dbeta_l and of the
per-token decay cotangents and XLA sums the V / 64 shares. At V = 128 the value-independent tiles
(the 2L raw products q k_l^T, k0 k_l^T, formed twice per CTA for their float32 values) are formed
by both value blocks.

Latency: a CTA is a chain of dependent steps, so the products are issued in groups of independent
accumulators with one wait per group (`_issue`; products that sum chain into one accumulator with
no wait between). Waits per CTA at L = 1, K = 128: 8 (raw tiles; k0 S, k0 dS', sum B_l vw_l, QK0^T
dO; E and dR together; dvw_l with q S and S^T dS'; dR E^T, dO E^T and the raw tiles again; dO vw^T
and dR vw^T; one per 64-column slice of the [C, K] outputs, all of dq / dk_0 / dk_l in one group:
`fold` moves the row scalings of their state terms into the 16-bit operands). Phase 1 waited ~46
times. Loads: two barriers; the tiles that the raw products need first, S, dS', dO, X behind the
second (in flight while the [C, C] tiles form). Outputs: dv_l and the [C, 64] float32 dq / dk
slices leave by TMA and stay in flight (two staging slots where they fit in 227 KiB, `out_slots`).
`approx_math` (default on) takes exp from ex2.approx for the decay matrices (each formed once per
phase). Accuracy in the interpreter against float64 (L = 2, K = V = 64, bf16): dq 2.4e-3 with
`fold` (1.7e-3 without: dO is rounded once more), dk 3.2e-3, dv 2.0e-3, dbeta 1.7e-3, dg 3.2e-3.

SMEM (16-bit [64, 64] tiles, 8 KiB each; reused: X -> dQK0 . t_m1, -scale QK0 -> dkk, scale QK_l ->
dQK_l . t_0, diag(beta0) B_l -> dA_l, v_l -> dv_l, E holds rhs first, dR holds dE first): q, k_l
(1 + L) K / 64; v_l, vw_l 2L; dO 1; S, dS' 2 K / 64; X, QK0 2; QK_l, B_l 2L; E, dR 2; plus one or
two float32 [64, 64] output slots, the vectors and Pallas' reduction scratch (`reduction_scratch`,
2 KiB). K = 128: L = 1 160 KiB (176 with two slots), L = 2 208 (224); L = 3 257 KiB: refused;
K = 64: L = 1 126, L = 2 166, L = 3 207 KiB. One CTA per SM at K = 128. Registers: [64, 64] float32
values (32 / thread) live only between their wgmma and their SMEM store or row sum, at most ~5
accumulators at once. Row sums are ROWS-layout reductions; the column sums of the decay
cotangents are reduced in the COLS layout, stored to SMEM and read back as ROWS.

Registers and `per_write` (phase 3). Measured on the H200 (phase 2): L = 1 ~34 us per CTA, L = 2
~90 us (2.7x for ~1.5x the wgmmas), same CTA count and one CTA per SM at both (160 / 208 KiB of
SMEM). The XLA glue barely depends on L (B * T = 32K, H = 16, K = V = 128: casting float32 starts
and cot_end to 16 bits moves ~1.5 GiB, ~0.35 ms, and disappears when the caller passes 16-bit
ones; the sums of the two value-block partials of dq and dk move ~0.75 GiB per K-row of output,
~0.17 ms for dq, ~0.35 ms for dk at L = 2: ~0.9 ms at L = 2 against ~0.7 at L = 1), so the jump is
inside the kernel. What grows with L is the live register set of the default path: all 2L raw
[C, C] tiles in one group, 2L + 2 = 6 float32 [64, 64] accumulators (32 registers per thread each:
192 of 255) in finish's first group at L = 2, and the 2L raw tiles plus two decay matrices kept
across finish's loop: spills are likely. `per_write=True` forms one raw pair per write where it is
used (at most 4 accumulators and 1-2 decay matrices live; each write's dvw_l at its use too) for
L - 1 more waits per phase; "split" pairs every accumulator with one other (at most 2 live, ~2L
more waits). The output group is 1 + L chained accumulators (dk_0's terms and write 0's k0 terms
share one). Settings to time: /work/briefs/try_grads3.txt.

Two warpgroups (`warpgroups=2`, phase 4; `_body_wg2`). Grid (N, H, B), one CTA per chunk and
head over V = 128, warpgroup w owning value columns [64 w, 64 w + 64]: the value-independent
[C, C] tiles (QK0, QK_l by w = 0, diag(beta0) B_l by w = 1) are formed once, not per value block;
the block step runs per half; finish's [C, C] cotangents are single wgmma chains over both halves
(both in SMEM: no float32 sums across warpgroups needed), split between the warpgroups (w = 0:
dR E^T, dO E^T; w = 1: each write's dO vw_l^T, dR vw_l^T); the [C, 64] dq / dk slices alternate
between the warpgroups, each a chain over both halves, written once (no XLA sums of partials;
only the per-token vectors stay two partials). Five barriers that both warpgroups arrive at
separate the phases (the last one so that neither exits while the other issues wgmma). SMEM: q,
k_l and the [C, C] tiles once, v_l, vw_l, dO, E, dR, S, dS' per half; the float32 output slots
share their bytes with v_l (dead once dv_l is stored): K = 128, L = 1 217 KiB with ONE output
slot that the two warpgroups take in turns (`turn` barriers: a store waits for the other's to be
read); K = 64, L = 1 185 KiB with a slot per warpgroup; K = 64, L = 2 refused at the default
`reduction_scratch` (Mosaic counts 227.1 KiB; 1024 would fit, untested); L = 2 at K = 128 needs
~282 KiB: refused (for the value split).

The work split (`split="work"`, session 7; the default where the value split does not fit).
Grid (N, H, B * V / 64) as the one-warpgroup kernel, one value block of 64 per CTA (index 0 of
the per-half buffers), its two warpgroups sharing the steps: A as above (QK0, QK_l by w = 0,
diag(beta0) B_l by w = 1, vw_l by w = l % 2); B w = 0 forms rhs and E = X rhs, w = 1 dE and
dR = X^T dE (each forms k0 S and k0 dS' itself, for re / rs), then, after a sixth barrier, write
l's dvw_l, dbeta_l, dv_l by w = l % 2 (the state terms by w = 1); C and E as in the value split with
one half; D w = 0 folds dO and dR, w = 1 E and vw_l. dq / dk leave as per-value-block partials
summed in XLA (as the one-warpgroup kernel); the per-token outputs as one partial per warpgroup
and value block. SMEM at K = 128: L = 1 ~156 KiB, L = 2 ~212 KiB (a slot per warpgroup), L = 3
243 KiB (Mosaic's count with one slot): refused at 64 value columns per CTA. At 32 (`block_v=32`,
session 17; the default where nothing fits at 64: L = 3 at K = 128, L = 4 at K = 64) the per-block
tiles halve: L = 3 at K = 128 takes 211 KiB with a slot per warpgroup (the pipeline's default there,
`NARROW_BY_DEFAULT`: 1.7x faster than the XLA chunk backward in the whole op, session 19), for twice the CTAs, each
forming the value-independent [C, C] tiles again, and every 16-bit tile on the 64-byte swizzle (wgmma
takes one swizzle for both operands, and a 32-column B operand allows 64 bytes); <S, dS'> then
comes from the diagonals of S_j dS'_j^T over the key-row blocks j (`_state_terms`). H100, B * T = 32K, H = 16, K = V = 128: L = 2 7.18 ms against 10.74 for one
warpgroup. The interpreter runs `num_threads=2` (both splits tested there against float64).

Summing the value blocks' dq / dk shares (session 8, `dqk_sum`). On the GPU, with two value blocks, dq
and dk are zeroed float32 arrays handed to the kernel as `jax.new_ref`s (the kernel's operands alias
them) and every [C, 64] share goes out by TMA reduce-add (`copy_smem_to_gmem(reduction_op="add")`): no
[V / 64, ...] partials in HBM and no XLA sum over them. H100, L = 2, work split: 7.32 -> 5.61 ms
(the partials plus their sum had cost ~1.7 ms, more than their ~2 GB of traffic suggests); the whole
op at L = 2 8.40 -> 7.58 ms. The interpreter has no TMA reduction, so interpret=True keeps the
partials ("xla"); the two paths differ only in that store (GPU tests run both). The grid keeps
consecutive chunks of one value block in adjacent CTAs (`order="chunks"`): putting the value blocks of
one chunk side by side (`order="values"`, to share q, k_l, X and the added rows in L2) was slower,
8.22 against 7.32 ms with XLA sums and 7.73 against 5.61 with the add.

Three warpgroups at L = 1 (session 11, `chunk_grads_wg3.py`; the default where it takes the shape):
one CTA per chunk over all value columns, each warpgroup its own stream of products (forward side,
backward side, key side) handing tiles over through SMEM barriers. H100, L = 1, 16-bit states: 2.39 ms
against 2.54 for the value split, in one run.

Post-processing in XLA (O(T) elementwise): the sum over value blocks where dq / dk come as partials;
dg = reverse cumsum within the chunk of (dG + dGm1) - dGm1 + dG_C, dG_C = sum over the chunk of the
kernel's per-token
rend end - re end_m1 + exp(G_C) diag(S^T dS') (<S, dS'> is the trace of one [BV, BV] wgmma;
BV = C, so its diagonal rides in that per-token output).

Expected cost, K = V = 128, L = 2, per (chunk, head): 2 CTAs x (~50 wgmmas of 64 x 64 x 64..128,
10 waits) ~ 2 x 50 MFLOP, read ~2 x 70 KiB (q, k twice; v, do, S, dS' once), written dq, dk
partials float32 2 x 2 x 48 KiB (added in place on the GPU, above).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.common import Prepared, chunk_decays, mm
from pallas_kernels.gpu.mosaic import common as mc

f32 = jnp.float32
C = mc.CHUNK
SMEM_LIMIT = 227 * 1024
# The automatic second output slot: up to the limit (K = 128, L = 2 at an estimated 224 KiB compiled
# and ran on the H200 at 19:15 UTC, 2% faster than one slot).
_AUTO_SLOT_LIMIT = SMEM_LIMIT
# Row indices of the float32 per-token vectors loaded in the ROWS layout.
_G, _GM1, _START_M1, _START, _END_M1, _END, _ALL = range(7)
_N_ROW_VECS = 7  # then beta_0 .. beta_{L-1}
# Per-token outputs besides dbeta_l (which come first): dG, dGm1, the dG_C share.
_N_OUT_VECS = 3
# CTA orders of the grid (`_grid`) and the ways the value blocks' dq / dk shares are summed.
ORDERS = ("values", "chunks")
DQK_SUMS = ("add", "add16", "xla")
TMA_SUMS = ("add", "add16")  # the sums the kernel makes itself (TMA reduce-add into a zeroed output)
# dqk_sum=None takes "add16" from this many value blocks per chunk on, that is wherever the blocks' shares are
# summed. H100, whole op fwd+bwd, each pair in one run: L = 3 at K = V = 128 (four blocks of 32, the work split)
# 12.45 against 13.31 ms with float32 sums, 2.76 against 3.44 GiB (session 22); L = 2 (two blocks of 64, the
# work split) 6.89 against 8.15 ms, 2.38 against 2.63 GiB (session 23). Gradients 3.5e-3 / 4.0e-3 against
# 2.9e-3 off the float32 chunk form (the target is 1e-2 against float64).
ADD16_MIN_BLOCKS = 2


def _grid(N, H, B, nvb, order):
    """(grid, grid_names). "values": (N * nvb, H, B), the value blocks of one chunk in adjacent CTAs
    (they read the same q, k_l, X and add into the same dq / dk rows, so both meet in L2); "chunks":
    (N, H, B * nvb), consecutive chunks in adjacent CTAs."""
    if order == "values":
        return (N * nvb, H, B), ("nv", "h", "b")
    return (N, H, B * nvb), ("n", "h", "bv")


def _coords(nvb, order):
    """(n, h, b, vb) of this CTA under `_grid(..., order)`."""
    if order == "values":
        nv = lax.axis_index("nv")
        return nv // nvb, lax.axis_index("h"), lax.axis_index("b"), nv % nvb
    bv = lax.axis_index("bv")
    return lax.axis_index("n"), lax.axis_index("h"), bv // nvb, bv % nvb


def _sum_mode(nvb, dqk_sum, interpret, dtype):
    """(add, dq / dk dtype): `dqk_sum` None -> TMA reduce-add where there are several value blocks and
    the kernel runs on the GPU ("add16" from ADD16_MIN_BLOCKS blocks on, else "add"), else "xla"; with
    one value block the kernel's dq / dk are the whole values and leave in the inputs' 16-bit dtype (the
    rounding the caller's cast makes anyway: no float32 copy written and cast in XLA), else float32
    shares; "add16" adds 16-bit shares into a 16-bit output (each share and each sum rounded to 16 bits)."""
    if dqk_sum is None:
        dqk_sum = ("add16" if nvb >= ADD16_MIN_BLOCKS else "add") if nvb > 1 and not interpret else "xla"
    add = dqk_sum in TMA_SUMS
    return add, (dtype if (nvb == 1 and not add) or dqk_sum == "add16" else f32)


def _store_share(src, ref, add, vb, *idx):
    """TMA-stores a [C, 64] share of dq / dk: float32, added into the zeroed output (`add`, TMA
    reduce-add), or written to value block vb's partial (float32 summed in XLA where there are
    several value blocks, else the whole value in the inputs' 16-bit dtype: `_sum_mode`)."""
    if add:
        plgpu.copy_smem_to_gmem(src, ref.at[idx], reduction_op="add")
    else:
        plgpu.copy_smem_to_gmem(src, ref.at[(vb, *idx)])


def _mm(a, b, shape, init=None):
    """`mc.matmul` with `init` added in registers: `mc.matmul(init=...)` discharges to a wgmma form the
    CPU interpreter does not run (jax 0.11.2)."""
    out = mc.matmul(a, b, shape)
    return out if init is None else init + out


def _smem_bytes(K, BV, L, dtype, out_slots, reduction_scratch=2048):
    """Bytes of SMEM the kernel allocates (for the check before compiling)."""
    it = jnp.dtype(dtype).itemsize
    tiles = ((1 + L) * C * K  # q, k_l
             + 2 * L * C * BV  # v_l (later dv_l), vw_l
             + C * BV + 2 * K * BV  # do, S, dS'
             + (2 + 2 * L) * C * C  # X, QK0, QK_l, beta0 B_l (later the cotangent operands)
             + 2 * C * BV) * it  # rhs -> E, dE -> dR
    vecs = 4 * ((_N_ROW_VECS + L + 2) * C + (L + _N_OUT_VECS) * C + 2 * C) + 4 * 4 * C
    # + float32 [C, 64] output slots, the reduction scratch, barriers and alignment
    return tiles + vecs + out_slots * 4 * C * 64 + reduction_scratch + 1024


def _out_slots(K, BV, L, dtype, out_slots, reduction_scratch=2048):
    """The output staging slots: as asked, or None = 2 where they fit in 227 KiB of SMEM, else 1."""
    if out_slots is not None:
        return out_slots
    return 2 if _smem_bytes(K, BV, L, dtype, 2, reduction_scratch) <= _AUTO_SLOT_LIMIT else 1


class _Phases:
    """Consecutive named regions of a kernel body (`jax.named_scope`): `phase("tiles")` closes the
    open region and opens the next, `phase()` closes the last. They only matter under `profile`."""

    def __init__(self):
        self._scope = None

    def __call__(self, name=None):
        if self._scope is not None:
            self._scope.__exit__(None, None, None)
            self._scope = None
        if name is not None:
            self._scope = jax.named_scope(name)
            self._scope.__enter__()


def _kernel(body, *, approx_math, reduction_scratch, interpret, profile=None, **kw):
    """`mc.kernel` with this kernel's compiler parameters: approx_math (exp by ex2.approx: the decay
    matrices), the SMEM scratch for cross-warp reductions (the column sums) and Mosaic GPU's in-kernel
    profiler (`profile`: {"profile_space": ..., "profile_dir": ...}; not in the interpreter)."""
    params = plgpu.CompilerParams(approx_math=approx_math, reduction_scratch_bytes=reduction_scratch,
                                  **({} if interpret or not profile else profile))
    return plgpu.kernel(body, compiler_params=params,
                        interpret=plgpu.InterpretGPUParams() if interpret else False, **kw)


def _issue(*sums):
    """Sums of wgmma products [M, N] float32, every wgmma of every sum issued before one wait.

    sums: (shape, [(a, b), ...]) each, a / b SMEM refs (or `.T` views). Products of one sum chain
    into one accumulator (no wait between them), independent sums overlap; the values pass through
    an optimization barrier (as `mc.matmul`: no arithmetic scheduled before the wait)."""
    def scoped(*accs):
        for acc, (_, pairs) in zip(accs, sums):
            for a, b in pairs:
                plgpu.wgmma(acc, a, b)
        return tuple(acc[...] for acc in accs)

    out = pl.run_scoped(scoped, *(plgpu.ACC(shape, f32) for shape, _ in sums))
    return lax.optimization_barrier(out)


class _ChunkVectors:
    """The chunk's per-token vectors (`rv_s` rows [7 + L, C], `cv_s` columns [2, C], `ri_s` reset
    counts [4, C]) and its decay matrices.

    hold=False reads each from SMEM at every use: a COLS-layout vector costs 16 registers per thread,
    a ROWS one 2. Measured on the H100 (B * T = 32K, H = 16, K = V = 128, ptxas reports): the
    two-warpgroup kernel went from 1092 to 240 bytes of spill stores and from 3.99 to 2.99 ms; the
    one-warpgroup kernel from 1720 to 996 bytes, yet 4.63 -> 5.30 ms at L = 1 and 10.08 -> 12.11 at
    L = 2 (ptxas then serialized its wgmmas for registers), so it holds them (hold=True: all loaded
    once, here)."""

    def __init__(self, rv_s, cv_s, ri_s, *, hold):
        self._rv, self._cv, self._ri = rv_s, cv_s, ri_s
        keys = [("r", i) for i in range(rv_s.shape[0]) if i != _ALL] + [("c", 0), ("c", 1)] + [("i", i) for i in range(4)]
        self._held = {key: self._load(*key) for key in keys} if hold else {}  # exp(G_C): read where used

    def _load(self, kind, i):
        ref, layout = {"r": (self._rv, mc.ROWS), "c": (self._cv, mc.COLS),
                       "i": (self._ri, mc.COLS if i >= 2 else mc.ROWS)}[kind]
        return plgpu.load(ref.at[i], layout=layout)

    def _get(self, kind, i):
        return self._held[kind, i] if (kind, i) in self._held else self._load(kind, i)

    def row(self, i):
        return self._get("r", i)

    G = property(lambda self: self.row(_G))
    Gm1 = property(lambda self: self.row(_GM1))
    start_m1 = property(lambda self: self.row(_START_M1))
    start = property(lambda self: self.row(_START))
    end_m1 = property(lambda self: self.row(_END_M1))
    end = property(lambda self: self.row(_END))
    all = property(lambda self: self.row(_ALL))
    beta0 = property(lambda self: self.beta(0))

    def beta(self, l):
        return self.row(_N_ROW_VECS + l)

    def _decay(self, prev_rows, prev_cols, strict, row_log2=None):
        """exp(G(m1 if prev_rows)[i] - G(m1 if prev_cols)[j]) on the kept (causal, same document)
        entries: m1m1, m1_0, t_m1, t_0 of `grads`; times 2**row_log2[i] where given (`mc.decay_matrix`)."""
        g_rows = self.row(_GM1 if prev_rows else _G)
        r_rows = self._get("i", 1 if prev_rows else 0)
        g_cols = self._get("c", 1 if prev_cols else 0)
        r_cols = self._get("i", 3 if prev_cols else 2)
        return mc.decay_matrix(g_rows, r_rows, g_cols, r_cols, (C, C), strict=strict, row_log2=row_log2)

    m1m1 = lambda self, row_log2=None: self._decay(True, True, True, row_log2)
    m1_0 = lambda self, row_log2=None: self._decay(True, False, True, row_log2)
    t_m1 = lambda self, row_log2=None: self._decay(False, True, False, row_log2)
    t_0 = lambda self, row_log2=None: self._decay(False, False, False, row_log2)

    def alpha_cols(self):
        """exp(g_j) = exp(G_j - Gm1_j) in the COLS layout, zero where token j starts a document."""
        keep = self._get("i", 2) == self._get("i", 3)  # r_j == rm1_j
        return jnp.where(keep, jnp.exp(self._get("c", 0) - self._get("c", 1)), 0.0)

    def _paired(self, base):
        """(base . alpha_j, base): the decay matrix one step further back in its columns from one exp.
        exp(X_i - Gm1_j) = exp(X_i - G_j) exp(g_j) (gates <= 1, so the product is no larger than base,
        which never overflows), and at a token j that starts a document both masks agree that the
        column is zero (r_i >= r_j > rm1_j for i >= j)."""
        return base * mc.cols_of(self.alpha_cols(), base.shape), base

    t_pair = lambda self, row_log2=None: self._paired(self.t_0(row_log2))  # (t_m1, t_0)
    m_pair = lambda self, row_log2=None: self._paired(self.m1_0(row_log2))  # (m1m1, m1_0)


def _body(q_ref, k_ref, v_ref, do_ref, s_ref, x_ref, ainv_ref, rvec_ref, cvec_ref, ri_ref,
          dq_ref, dk_ref, dv_ref, dvec_ref,
          q_s, k_s, v_s, vw_s, do_s, s_s, x_s, xinv_s, qk0_s, qk_s, b_s, e_s, dr_s,
          rv_s, cv_s, ri_s, cs_s, ovec_s, out_s, bar0, bar1, *, L, nvb, scale, fold, per_write, order, add):
    """SMEM reuse (each buffer keeps one register layout): xinv_s holds X, then dQK0 . t_m1;
    qk0_s -scale QK0, then dkk; qk_s[l] scale QK_l, then dQK_l . t_0; b_s[l] diag(beta0) B_l, then
    dA_l; v_s[l] v_l, then dv_l; e_s the right-hand side, then E; dr_s dE, then dR."""
    n, h, b, vb = _coords(nvb, order)
    K = q_s.shape[-1]
    BV = v_s.shape[-1]
    rows = pl.ds(n * C, C)
    cols = pl.ds(vb * BV, BV)

    phase = _Phases()
    phase("loads")
    # ---- loads: what the value-independent tiles need behind bar0; S, dS', dO, X behind bar1,
    # still in flight while the [C, C] tiles are formed.
    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_s, bar0)
    for l in range(L):
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, h, l], k_s.at[l], bar0)
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, h, l, cols], v_s.at[l], bar0)
    for i in range(_N_ROW_VECS + L):
        plgpu.copy_gmem_to_smem(rvec_ref.at[b, h, i, rows], rv_s.at[i], bar0)
    for i in range(2):
        plgpu.copy_gmem_to_smem(cvec_ref.at[b, h, i, rows], cv_s.at[i], bar0)
    for i in range(4):  # r, rm1 as rows; r, rm1 as columns
        plgpu.copy_gmem_to_smem(ri_ref.at[b, i % 2, rows], ri_s.at[i], bar0)
    plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h, cols], do_s, bar1)
    plgpu.copy_gmem_to_smem(s_ref.at[b, h, n, :, cols], s_s, bar1)
    plgpu.copy_gmem_to_smem(x_ref.at[b, h, n, :, cols], x_s, bar1)
    plgpu.copy_gmem_to_smem(ainv_ref.at[b, h, n], xinv_s, bar1)
    plgpu.barrier_wait(bar0)
    phase("vectors")

    vx = _ChunkVectors(rv_s, cv_s, ri_s, hold=True)
    sq, sv = (C, C), (C, BV)
    R = lambda vec, shape=sq: mc.rows_of(vec, shape)
    m1m1, m1_0, t_m1, t_0 = vx.m1m1, vx.m1_0, vx.t_m1, vx.t_0

    def put(buf, value):
        buf[...] = value.astype(buf.dtype)

    # Raw (undecayed) value-independent products: q k_l^T (l = 0 also gives QK0) and k0 k_l^T
    # (l = 0 also gives k0 k0^T of m); formed here and again in `finish` for their float32 values.
    raw_tiles = lambda: ([(sq, [(q_s, k_s.at[l].T)]) for l in range(L)]
                         + [(sq, [(k_s.at[0], k_s.at[l].T)]) for l in range(L)])

    raw_pair = lambda l: [(sq, [(q_s, k_s.at[l].T)]), (sq, [(k_s.at[0], k_s.at[l].T)])]

    phase("tiles")
    # ---- value-independent tiles (16-bit operands) and the gated values vw_l = beta_l v_l.
    # per_write: one group of two raw tiles per write (2 accumulators live, not 2L).
    if not per_write:
        raw = _issue(*raw_tiles())
        qk_raw, kk_raw = raw[:L], raw[L:]
        put(qk0_s, -scale * qk_raw[0] * t_m1())
        d_t0, d_m10 = t_0(), m1_0()
    for l in range(L):
        if per_write:
            qk_l, kk_l = _issue(*raw_pair(l))
            if l == 0:
                put(qk0_s, -scale * qk_l * t_m1())
            d_t0, d_m10 = t_0(), m1_0()
        else:
            qk_l, kk_l = qk_raw[l], kk_raw[l]
        put(qk_s.at[l], scale * qk_l * d_t0)
        put(b_s.at[l], R(vx.beta0) * kk_l * d_m10)  # diag(beta0) B_l: rhs and dvw_l both want it
        put(vw_s.at[l], R(vx.beta(l), sv) * plgpu.load(v_s.at[l], layout=mc.WGMMA).astype(f32))
    phase("wait_bar1")
    plgpu.commit_smem()
    plgpu.barrier_wait(bar1)
    phase("block")

    # ---- block step: E, dE, dR, dv_l and the row sums.
    kx0, re, rs = _solve_step(vx, L, k_s, s_s, x_s, vw_s, do_s, b_s, qk0_s, xinv_s, e_s, dr_s, put)
    # q S and S^T dS' (the state terms of dG and dG_C, `state_vectors`) ride along at L = 1, where
    # the group is small.
    state_pair = [(sv, [(q_s, s_s)]), ((BV, BV), [(s_s.T, x_s)])]

    def state_vectors(qs, sx):
        """rowsum(dO S^T . q) = rowsum(dO . q S): the start-state share of dG, without slicing K;
        <S, dS'> of this value block: the diagonal of S^T dS' [BV, BV], as a vector over value
        columns; BV = C, so it rides in the per-token dG_C output, which XLA sums over the chunk."""
        dof = plgpu.load(do_s, layout=mc.WGMMA).astype(f32)
        diag = jnp.sum(jnp.where(mc.iota((BV, BV), 0) == mc.iota((BV, BV), 1), sx, 0.0), axis=1)
        return scale * jnp.sum(dof * qs, axis=1) * vx.start, diag

    dvw_group = lambda l: (sv, [(b_s.at[l].T, dr_s), (qk_s.at[l].T, do_s)])
    kx_group = lambda l: (sv, [(k_s.at[l], x_s)])  # k_l dS'
    per_l = per_write and L > 1  # each write's dvw_l (and k_l dS') in its own group, at its use
    if not per_l:
        dvws = _issue(*[dvw_group(l) for l in range(L)], *[kx_group(l) for l in range(1, L)],
                      *(state_pair if L == 1 else []))
        if L == 1:
            dG_state, sx_diag = state_vectors(*dvws[1:])
        kxs = [kx0, *dvws[L:2 * L - 1]]
    rend = jnp.zeros_like(re)
    dbetas = []
    for l in range(L):
        if per_l:
            dvw_raw, *kx_l = _issue(dvw_group(l), *([kx_group(l)] if l else []))
            kx = kx_l[0] if l else kx0
        else:
            dvw_raw, kx = dvws[l], kxs[l]
        dvw = dvw_raw + R(vx.end, sv) * kx
        vl = plgpu.load(v_s.at[l], layout=mc.WGMMA).astype(f32)
        dbetas.append(jnp.sum(dvw * vl, axis=1))
        rend = rend + jnp.sum(R(vx.beta(l), sv) * vl * kx, axis=1)
        put(v_s.at[l], R(vx.beta(l), sv) * dvw)  # dv_l
    plgpu.commit_smem()
    for l in range(L):
        plgpu.copy_smem_to_gmem(v_s.at[l], dv_ref.at[b, rows, h, l, cols])

    phase("finish")
    # ---- finish: the [C, C] cotangents (one wgmma over BV each) and the decay terms.
    def colsum(w, i):
        """Column sums of w [C, C] in the ROWS layout (through SMEM: reduced as COLS, read as ROWS)."""
        cs_s[i] = jnp.sum(w, axis=0)
        plgpu.commit_smem()
        return plgpu.load(cs_s.at[i], layout=mc.ROWS)

    # dR E^T, dO E^T and the raw tiles again (qk0_s and xinv_s are rewritten below: all read first);
    # per_write: only the l = 0 pair here, each write's pair again in its loop step.
    # "split": dR E^T with k0 k0^T, then dO E^T with q k0^T (two accumulators per group).
    dm_pair = [(sq, [(dr_s, e_s.T)]), raw_pair(0)[1]]
    dqk0_pair = [(sq, [(do_s, e_s.T)]), raw_pair(0)[0]]
    if per_write == "split":
        dm_raw, kk_raw0 = _issue(*dm_pair)
    else:
        dm_raw, dqk0_raw, *raw = _issue(dm_pair[0], dqk0_pair[0], *(raw_pair(0) if per_write else raw_tiles()))
        qk_raw, kk_raw = raw[:len(raw) // 2], raw[len(raw) // 2:]
        qk_raw0, kk_raw0 = qk_raw[0], kk_raw[0]
    d_m1m1 = m1m1()
    kk_m = kk_raw0 * d_m1m1
    dm = -dm_raw
    dbeta0 = jnp.sum(dm * kk_m, axis=1) + vx.start_m1 * rs
    w_m1m1 = R(vx.beta0) * dm * kk_m
    put(qk0_s, R(vx.beta0) * dm * d_m1m1)  # dkk
    if per_write == "split":
        dqk0_raw, qk_raw0 = _issue(*dqk0_pair)
    dqk0 = -scale * dqk0_raw * t_m1()
    w_tm1 = dqk0 * qk_raw0
    put(xinv_s, dqk0)
    dG = jnp.sum(w_tm1, axis=1)
    dGm1 = jnp.sum(w_m1m1, axis=1) - colsum(w_m1m1 + w_tm1, 0)
    cols_t0_m10 = None  # column sums of sum_l (w_t0,l + w_m10,l), COLS layout
    if not per_write:
        d_t0, d_m10 = t_0(), m1_0()
    for l in range(L):
        cot_pair = [(sq, [(do_s, vw_s.at[l].T)]), (sq, [(dr_s, vw_s.at[l].T)])]
        if per_write == "split":  # groups of two: q k_l^T with dO vw_l^T, then k0 k_l^T with dR vw_l^T
            dqkl_raw, qk_l = _issue(cot_pair[0], raw_pair(l)[0])
            d_t0 = t_0()
        elif per_write:  # the decay matrices formed again at each use: fewer live registers
            dqkl_raw, drv, qk_l, kk_l = _issue(*cot_pair, *raw_pair(l))
            d_t0, d_m10 = t_0(), m1_0()
        else:
            (dqkl_raw, drv), qk_l, kk_l = _issue(*cot_pair), qk_raw[l], kk_raw[l]
        dqkl = scale * dqkl_raw * d_t0
        w_t0 = dqkl * qk_l
        put(qk_s.at[l], dqkl)
        dG = dG + jnp.sum(w_t0, axis=1)
        if per_write == "split":
            drv, kk_l = _issue(cot_pair[1], raw_pair(l)[1])
            d_m10 = m1_0()
        drv_m = drv * d_m10
        dbeta0 = dbeta0 + jnp.sum(drv_m * kk_l, axis=1)
        dbl = R(vx.beta0) * drv_m
        w_m10 = dbl * kk_l
        put(b_s.at[l], dbl)  # dA_l
        dGm1 = dGm1 + jnp.sum(w_m10, axis=1)
        cs = jnp.sum(w_t0 + w_m10, axis=0)
        cols_t0_m10 = cs if cols_t0_m10 is None else cols_t0_m10 + cs
    cs_s[1] = cols_t0_m10
    plgpu.commit_smem()
    dG = dG - plgpu.load(cs_s.at[1], layout=mc.ROWS)

    if L > 1:
        dG_state, sx_diag = state_vectors(*_issue(*state_pair))
    dG = dG + dG_state - rend * vx.end
    dGm1 = dGm1 + vx.beta0 * rs * vx.start_m1 + re * vx.end_m1

    phase("outputs")
    # ---- [C, K] outputs in [C, 64] column slices, float32, TMA-stored from out_s slots.
    n_slots = out_s.shape[0]
    stores = [0]

    def store_out(value, ref, *idx):
        slot = stores[0] % n_slots
        stores[0] += 1
        plgpu.wait_smem_to_gmem(n_slots - 1, wait_read_only=True)  # this slot's last store left it
        out_s[slot] = value.astype(out_s.dtype)
        plgpu.commit_smem()
        _store_share(out_s.at[slot], ref, add, vb, *idx)

    if fold:
        # The row scalings of the state terms go into their 16-bit operands (each buffer's last
        # use), so that every [C, 64] output is one accumulator chain: one wait per slice of K.
        load = lambda buf: plgpu.load(buf, layout=mc.WGMMA).astype(f32)
        put(do_s, R(vx.start * scale, sv) * load(do_s))
        put(dr_s, R(vx.beta0 * vx.start_m1, sv) * load(dr_s))
        put(e_s, -R(vx.end_m1, sv) * load(e_s))
        for l in range(L):
            put(vw_s.at[l], R(vx.end, sv) * load(vw_s.at[l]))
    plgpu.commit_smem()
    so = (C, 64)
    for kh in range(K // 64):
        kc = pl.ds(kh * 64, 64)
        sl = lambda ref: ref if K == 64 else ref.at[:, kc]  # 64 columns of a [C, K] operand
        st = lambda ref: (ref if K == 64 else ref.at[kc]).T  # ... of ref^T, ref [K, BV]
        q_h, k_h = sl(q_s), [sl(k_s.at[l]) for l in range(L)]
        if fold:
            # dk_0's own terms and the k0-only terms of every write chain into one accumulator.
            dkl_pairs = lambda l: [(vw_s.at[l], st(x_s)), (qk_s.at[l].T, q_h), (b_s.at[l].T, k_h[0])]
            dq, *dks = _issue(
                (so, [(do_s, st(s_s)), (xinv_s, k_h[0])] + [(qk_s.at[l], k_h[l]) for l in range(L)]),
                (so, [(dr_s, st(s_s)), (e_s, st(x_s)), (qk0_s, k_h[0]), (qk0_s.T, k_h[0]), (xinv_s.T, q_h)]
                 + [(b_s.at[l], k_h[l]) for l in range(L)] + dkl_pairs(0)),
                *[(so, dkl_pairs(l)) for l in range(1, L)])
            store_out(dq, dq_ref, b, rows, h, kc)
            for l in range(L):
                store_out(dks[l], dk_ref, b, rows, h, l, kc)
            continue
        dq_s, dq_r = _issue((so, [(do_s, st(s_s))]),
                            (so, [(xinv_s, k_h[0])] + [(qk_s.at[l], k_h[l]) for l in range(L)]))
        store_out(R(vx.start * scale, so) * dq_s + dq_r, dq_ref, b, rows, h, kc)

        dk_s, dk_x, dk_r = _issue(
            (so, [(dr_s, st(s_s))]), (so, [(e_s, st(x_s))]),
            (so, [(qk0_s, k_h[0]), (qk0_s.T, k_h[0]), (xinv_s.T, q_h)]
             + [(b_s.at[l], k_h[l]) for l in range(L)]))
        dk0 = R(vx.beta0 * vx.start_m1, so) * dk_s - R(vx.end_m1, so) * dk_x + dk_r
        for l in range(L):
            dkl_x, dkl_r = _issue((so, [(vw_s.at[l], st(x_s))]),
                                  (so, [(qk_s.at[l].T, q_h), (b_s.at[l].T, k_h[0])]))
            dkl = R(vx.end, so) * dkl_x + dkl_r
            store_out(dkl + dk0 if l == 0 else dkl, dk_ref, b, rows, h, l, kc)

    dbetas[0] = dbetas[0] + dbeta0
    for l in range(L):
        ovec_s[l] = dbetas[l]
    ovec_s[L] = dG
    ovec_s[L + 1] = dGm1
    ovec_s[L + 2] = rend * vx.end - re * vx.end_m1 + sx_diag * vx.all
    plgpu.commit_smem()
    for i in range(L + _N_OUT_VECS):
        plgpu.copy_smem_to_gmem(ovec_s.at[i], dvec_ref.at[vb, b, h, i, rows])
    plgpu.wait_smem_to_gmem(0)
    phase()


SPLITS = ("values", "work")
# The work split's narrow value blocks: where nothing fits at 64 value columns per CTA (L = 3 at
# K = 128: ~245 KiB), 32 columns per CTA fit (~213 KiB with a slot per warpgroup), at twice the CTAs,
# each forming the value-independent [C, C] tiles again; every 16-bit tile then takes the 64-byte
# swizzle (`state.operand_smem`: wgmma takes one swizzle for both operands).
NARROW_BLOCK_V = 32
# Whether `supported` (so the pipeline's default stages) counts the narrow work split. On: its GPU tests
# against float64 passed (session 18, H100), and the whole op at L = 3, K = V = 128 (B * T = 32K, H = 16,
# T = 2K, output kept) took 13.45 ms fwd+bwd against 23.27 with the XLA chunk backward it replaces, in
# 3.44 GiB against 7.93, gradients 2.9e-3 against 3.2e-3 off the float32 chunk form (session 19, one H100).
# `chunk_grads_backward` always takes it where nothing else fits.
NARROW_BY_DEFAULT = True


def _halves(split):
    return 2 if split == "values" else 1


def _smem_bytes_wg2(K, L, dtype, slots, reduction_scratch=2048, split="values", block_v=64):
    """SMEM bytes of the two-warpgroup kernel with `slots` float32 [C, 64] output staging tiles
    (sharing their bytes with the v_l tiles). split="values": V = 128, two value halves of 64, one
    per warpgroup; "work": one value block of `block_v` (64 or 32) that both warpgroups share."""
    it = jnp.dtype(dtype).itemsize
    nh = _halves(split)
    bv = block_v
    shared = ((1 + L) * C * K + (2 + 2 * L) * C * C) * it  # q, k_l; X, QK0, QK_l, B_l
    half = (L * C * bv + 3 * C * bv + 2 * K * bv) * it  # vw_l, dO, E, dR; S, dS'
    union = max(nh * L * C * bv * it, slots * 4 * C * 64)  # v_l (then dv_l) of the halves | output slots
    vecs = 4 * ((_N_ROW_VECS + L) * C + 2 * C + 4 * C + 2 * C + 2 * (L + _N_OUT_VECS) * C)
    # + barriers and alignment: Mosaic counted 232536 bytes at K = 64, L = 2 where this sum is 231168
    return shared + nh * half + union + vecs + reduction_scratch + 3072


def _pick_split(K, L, V, dtype, block_v=64, reduction_scratch=2048):
    """The two-warpgroup split that takes this shape: at block_v = 64 "values" where V is two value
    blocks of 64 and its SMEM plan fits, else "work" where V is whole blocks of 64 and its plan
    fits; at block_v = 32 (`NARROW_BLOCK_V`) "work" where it fits; else None."""
    if block_v not in (64, NARROW_BLOCK_V) or K not in (64, 128) or V % block_v:
        return None
    for split in SPLITS:
        if split == "values" and (V != 2 * block_v or block_v != 64):
            continue
        slots = _wg2_slots(K, L, dtype, reduction_scratch, split, block_v)
        if _smem_bytes_wg2(K, L, dtype, slots, reduction_scratch, split, block_v) <= SMEM_LIMIT:
            return split
    return None


def _wg2_slots(K, L, dtype, reduction_scratch=2048, split="values", block_v=64):
    """Output slots of the two-warpgroup kernel: one per warpgroup where they fit, else one shared
    slot taken in turns."""
    fits = _smem_bytes_wg2(K, L, dtype, 2, reduction_scratch, split, block_v) <= SMEM_LIMIT
    return 2 if fits else 1


def _body_wg2(q_ref, k_ref, v_ref, do_ref, s_ref, x_ref, ainv_ref, rvec_ref, cvec_ref, ri_ref,
              dq_ref, dk_ref, dv_ref, dvec_ref,
              q_s, k_s, v_out, vw_s, do_s, s_s, x_s, xinv_s, qk0_s, qk_s, b_s, e_s, dr_s,
              rv_s, cv_s, ri_s, cs_s, ovec_s, bar0, barv, sync, turn, cs_turn, *, L, scale, split, nvb, order,
              add):
    """Two warpgroups per CTA. split="values": one CTA per (chunk, head, batch) over V = 128;
    warpgroup w owns value columns [64 w, 64 w + 64] (its halves v_s[w], vw_s[w], do_s[w], s_s[w],
    x_s[w], e_s[w], dr_s[w]). split="work": one CTA per (chunk, head, batch and 64-column value
    block), as the one-warpgroup kernel, with one value half (index 0 of those buffers) that both
    warpgroups share, the steps divided between them.
    Phases, each ended by a barrier both warpgroups arrive at (sync[i]): A value-independent tiles
    (w = 0: QK0, QK_l; w = 1: diag(beta0) B_l; "values": each its half's vw_l, "work": vw_l by
    w = l % 2); B the block step: "values" each on its own half (E, dR, dv_l, partial row sums into
    ovec_s[w]); "work" w = 0 forms E, w = 1 dR, then write l's dvw_l / dv_l by w = l % 2; C finish's
    [C, C] cotangents, each one wgmma chain over the halves (w = 0: dR E^T, dO E^T; w = 1: dO
    vw_l^T, dR vw_l^T), written over the shared tiles; D the row scalings folded into the 16-bit
    operands ("values": each its own half; "work": w = 0 dO, dR, w = 1 E, vw_l); E the [C, 64]
    output slices, alternating between the warpgroups, each one chain over the halves; then both
    arrive at the last barrier (a warpgroup must not exit while the other still issues wgmma).
    Every per-token output is a partial per warpgroup (dvec part 2 vb + w), summed in XLA.

    v_out: the v_l tiles (then dv_l) and, once their stores have been read, the float32 output
    slots: one per warpgroup, or one shared slot (`turn[t]`: output t has left it)."""
    (v_s,), (out_s,) = v_out
    n, h, b, vb = _coords(nvb, order)
    wg = lax.axis_index("wg")
    K = q_s.shape[-1]
    BV = v_s.shape[-1]
    work = split == "work"
    halves = (0,) if work else (0, 1)
    rows = pl.ds(n * C, C)
    cols = pl.ds(vb * BV, BV) if work else pl.ds(wg * BV, BV)

    def together(i):
        plgpu.barrier_arrive(sync.at[i])
        plgpu.barrier_wait(sync.at[i])

    @pl.when(wg == 0)
    def _():
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_s, bar0)
        for l in range(L):
            plgpu.copy_gmem_to_smem(k_ref.at[b, rows, h, l], k_s.at[l], bar0)
        for i in range(_N_ROW_VECS + L):
            plgpu.copy_gmem_to_smem(rvec_ref.at[b, h, i, rows], rv_s.at[i], bar0)
        for i in range(2):
            plgpu.copy_gmem_to_smem(cvec_ref.at[b, h, i, rows], cv_s.at[i], bar0)
        for i in range(4):
            plgpu.copy_gmem_to_smem(ri_ref.at[b, i % 2, rows], ri_s.at[i], bar0)
        plgpu.copy_gmem_to_smem(ainv_ref.at[b, h, n], xinv_s, bar0)

    def load_half(u):
        for l in range(L):
            plgpu.copy_gmem_to_smem(v_ref.at[b, rows, h, l, cols], v_s.at[u, l], barv.at[u])
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h, cols], do_s.at[u], barv.at[u])
        plgpu.copy_gmem_to_smem(s_ref.at[b, h, n, :, cols], s_s.at[u], barv.at[u])
        plgpu.copy_gmem_to_smem(x_ref.at[b, h, n, :, cols], x_s.at[u], barv.at[u])

    if work:
        pl.when(wg == 1)(lambda: load_half(0))
    else:
        load_half(wg)
    plgpu.barrier_wait(bar0)

    vx = _ChunkVectors(rv_s, cv_s, ri_s, hold=False)
    sq, sv = (C, C), (C, BV)
    R = lambda vec, shape=sq: mc.rows_of(vec, shape)
    m1m1, m1_0, t_m1, t_0 = vx.m1m1, vx.m1_0, vx.t_m1, vx.t_0
    load = lambda buf: plgpu.load(buf, layout=mc.WGMMA).astype(f32)

    def put(buf, value):
        buf[...] = value.astype(buf.dtype)

    def add_vec(w, i, value):
        ovec_s[w, i] = plgpu.load(ovec_s.at[w, i], layout=mc.ROWS) + value

    # ---- A: value-independent tiles, half each; every warpgroup its own vw_l.
    @pl.when(wg == 0)
    def _():
        for l in range(L):
            qk_l = mc.matmul(q_s, k_s.at[l].T, sq)
            if l == 0:
                put(qk0_s, -scale * qk_l * t_m1())
            put(qk_s.at[l], scale * qk_l * t_0())

    @pl.when(wg == 1)
    def _():
        for l in range(L):
            put(b_s.at[l], R(vx.beta0) * mc.matmul(k_s.at[0], k_s.at[l].T, sq) * m1_0())

    if work:
        plgpu.barrier_wait(barv.at[0])
        for l in range(L):
            pl.when(wg == l % 2)(lambda: put(vw_s.at[0, l], R(vx.beta(l), sv) * load(v_s.at[0, l])))
        plgpu.commit_smem()
        together(0)
        _block_step_work(wg, vx, L, scale, q_s, k_s, v_s.at[0], vw_s.at[0], do_s.at[0], s_s.at[0], x_s.at[0],
                         xinv_s, qk0_s, qk_s, b_s, e_s.at[0], dr_s.at[0], ovec_s, put, load,
                         lambda l: dv_ref.at[b, rows, h, l, cols], lambda: together(5))
    else:
        plgpu.barrier_wait(barv.at[wg])
        for l in range(L):
            put(vw_s.at[wg, l], R(vx.beta(l), sv) * load(v_s.at[wg, l]))
        plgpu.commit_smem()
        together(0)
        _block_step_values(wg, vx, L, scale, q_s, k_s, v_s.at[wg], vw_s.at[wg], do_s.at[wg], s_s.at[wg],
                           x_s.at[wg], xinv_s, qk0_s, qk_s, b_s, e_s.at[wg], dr_s.at[wg], ovec_s, put, load,
                           lambda l: dv_ref.at[b, rows, h, l, cols])
    together(1)

    # ---- C: finish's [C, C] cotangents, each a chain over both value halves.
    def colsum(w, x):
        cs_s[w] = jnp.sum(x, axis=0)
        plgpu.commit_smem()
        return plgpu.load(cs_s.at[w], layout=mc.ROWS)

    @pl.when(wg == 0)
    def _():
        dm_raw, dqk0_raw, qk_raw0, kk_raw0 = _issue(
            (sq, [(dr_s.at[w], e_s.at[w].T) for w in halves]), (sq, [(do_s.at[w], e_s.at[w].T) for w in halves]),
            (sq, [(q_s, k_s.at[0].T)]), (sq, [(k_s.at[0], k_s.at[0].T)]))
        d_m1m1 = m1m1()
        kk_m = kk_raw0 * d_m1m1
        dm = -dm_raw
        w_m1m1 = R(vx.beta0) * dm * kk_m
        put(qk0_s, R(vx.beta0) * dm * d_m1m1)  # dkk
        dqk0 = -scale * dqk0_raw * t_m1()
        w_tm1 = dqk0 * qk_raw0
        put(xinv_s, dqk0)
        add_vec(0, 0, jnp.sum(dm * kk_m, axis=1))
        add_vec(0, L, jnp.sum(w_tm1, axis=1))
        add_vec(0, L + 1, jnp.sum(w_m1m1, axis=1) - colsum(0, w_m1m1 + w_tm1))
        plgpu.barrier_arrive(cs_turn)  # Pallas' reduction scratch is free for warpgroup 1

    @pl.when(wg == 1)
    def _():
        dbeta0 = dG = dGm1 = cols = None
        for l in range(L):
            dqkl_raw, drv, qk_l, kk_l = _issue(
                (sq, [(do_s.at[w], vw_s.at[w, l].T) for w in halves]),
                (sq, [(dr_s.at[w], vw_s.at[w, l].T) for w in halves]),
                (sq, [(q_s, k_s.at[l].T)]), (sq, [(k_s.at[0], k_s.at[l].T)]))
            dqkl = scale * dqkl_raw * t_0()
            w_t0 = dqkl * qk_l
            put(qk_s.at[l], dqkl)
            drv_m = drv * m1_0()
            dbl = R(vx.beta0) * drv_m
            w_m10 = dbl * kk_l
            put(b_s.at[l], dbl)  # dA_l
            terms = (jnp.sum(drv_m * kk_l, axis=1), jnp.sum(w_t0, axis=1), jnp.sum(w_m10, axis=1),
                     w_t0 + w_m10)
            if l == 0:
                dbeta0, dG, dGm1, cols = terms
            else:
                dbeta0, dG, dGm1, cols = (a + t for a, t in zip((dbeta0, dG, dGm1, cols), terms))
        # A column sum is a cross-warp reduction through Pallas' one reduction scratch: taken only
        # after warpgroup 0's (concurrent column sums raced on the H200: dg wrong, all else right).
        plgpu.barrier_wait(cs_turn)
        cs_s[1] = jnp.sum(cols, axis=0)
        plgpu.commit_smem()
        add_vec(1, 0, dbeta0)
        add_vec(1, L, dG - plgpu.load(cs_s.at[1], layout=mc.ROWS))
        add_vec(1, L + 1, dGm1)

    plgpu.commit_smem()
    together(2)

    # ---- D: the state terms' row scalings folded into the 16-bit operands ("values": this half's;
    # "work": w = 0 dO and dR, w = 1 E and vw_l).
    u = 0 if work else wg

    def fold_do_dr():
        put(do_s.at[u], R(vx.start * scale, sv) * load(do_s.at[u]))
        put(dr_s.at[u], R(vx.beta0 * vx.start_m1, sv) * load(dr_s.at[u]))

    def fold_e_vw():
        put(e_s.at[u], -R(vx.end_m1, sv) * load(e_s.at[u]))
        for l in range(L):
            put(vw_s.at[u, l], R(vx.end, sv) * load(vw_s.at[u, l]))

    if work:
        pl.when(wg == 0)(fold_do_dr)
        pl.when(wg == 1)(fold_e_vw)
    else:
        fold_do_dr()
        fold_e_vw()
    plgpu.commit_smem()
    for i in range(L + _N_OUT_VECS):
        plgpu.copy_smem_to_gmem(ovec_s.at[wg, i], dvec_ref.at[2 * vb + wg, b, h, i, rows])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # dv_l left v_s: its bytes become the output slots
    together(3)

    # ---- E: [C, 64] output slices, alternately per warpgroup, one chain over both halves each.
    so = (C, 64)
    shared_slot = out_s.shape[0] == 1
    # o = 0: dq, 1 + l: dk_l. dk_0 is the long chain (~3x dq's wgmmas at L = 1): the order runs back
    # on odd slices of K so that alternating jobs give each warpgroup one dk_0 slice per two slices.
    jobs = [(o, kh) for kh in range(K // 64) for o in (range(1 + L) if kh % 2 == 0 else reversed(range(1 + L)))]
    for w in (0, 1):
        @pl.when(wg == w)
        def _():
            for i, (o, kh) in enumerate(jobs[w::2]):
                kc = pl.ds(kh * 64, 64)
                sl = lambda ref: ref if K == 64 else ref.at[:, kc]
                st = lambda ref: (ref if K == 64 else ref.at[kc]).T
                q_h, k_h = sl(q_s), [sl(k_s.at[l]) for l in range(L)]
                if o == 0:
                    pairs = ([(do_s.at[u], st(s_s.at[u])) for u in halves] + [(xinv_s, k_h[0])]
                             + [(qk_s.at[l], k_h[l]) for l in range(L)])
                    ref, idx = dq_ref, (b, rows, h, kc)
                else:
                    l = o - 1
                    pairs = ([(vw_s.at[u, l], st(x_s.at[u])) for u in halves]
                             + [(qk_s.at[l].T, q_h), (b_s.at[l].T, k_h[0])])
                    if l == 0:
                        pairs += ([(dr_s.at[u], st(s_s.at[u])) for u in halves]
                                  + [(e_s.at[u], st(x_s.at[u])) for u in halves]
                                  + [(qk0_s, k_h[0]), (qk0_s.T, k_h[0]), (xinv_s.T, q_h)]
                                  + [(b_s.at[j], k_h[j]) for j in range(L)])
                    ref, idx = dk_ref, (b, rows, h, l, kc)
                (value,) = _issue((so, pairs))
                t = w + 2 * i  # this output's place in the order of all outputs
                slot = 0 if shared_slot else w
                if shared_slot and t:
                    plgpu.barrier_wait(turn.at[t - 1])  # the other warpgroup's output left the slot
                else:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                out_s[slot] = value.astype(out_s.dtype)
                plgpu.commit_smem()
                _store_share(out_s.at[slot], ref, add, vb, *idx)
                if shared_slot:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    plgpu.barrier_arrive(turn.at[t])

    plgpu.wait_smem_to_gmem(0)
    together(4)


def _block_step_values(wg, vx, L, scale, q_s, k_s, v_w, vw_w, do_w, s_w, x_w, xinv_s, qk0_s, qk_s, b_s, e_w,
                       dr_w, ovec_s, put, load, dv_dst):
    """Phase B of `_body_wg2` with split="values": the whole block step on warpgroup wg's value half
    (E, dR, dv_l stored to dv_dst(l), the half's per-token partials into ovec_s[wg])."""
    kx0, re, rs = _solve_step(vx, L, k_s, s_w, x_w, vw_w, do_w, b_s, qk0_s, xinv_s, e_w, dr_w, put)
    dbetas, rend = _write_steps(range(L), vx, k_s, v_w, do_w, x_w, qk_s, b_s, dr_w, put, load, dv_dst, kx0=kx0)
    dG_state, sx_diag = _state_terms(vx, scale, q_s, s_w, x_w, do_w, load)
    dbetas[0] = dbetas[0] + vx.start_m1 * rs
    for l in range(L):
        ovec_s[wg, l] = dbetas[l]
    ovec_s[wg, L] = dG_state - rend * vx.end
    ovec_s[wg, L + 1] = vx.beta0 * rs * vx.start_m1 + re * vx.end_m1
    ovec_s[wg, L + 2] = rend * vx.end - re * vx.end_m1 + sx_diag * vx.all


def _solve_step(vx, L, k_s, s_w, x_w, vw_w, do_w, b_s, qk0_s, xinv_s, e_w, dr_w, put):
    """E = X rhs and dR = X^T dE of one value block, written over e_w (rhs first) and dr_w (dE
    first); returns (k0 dS' float32, re = rowsum(E . k0 dS'), rs = rowsum(dR . k0 S))."""
    sv = (C, e_w.shape[-1])
    R = lambda vec: mc.rows_of(vec, sv)
    k0s, kx0, bvw, qdo = _issue((sv, [(k_s.at[0], s_w)]), (sv, [(k_s.at[0], x_w)]),  # k0 S, k0 dS'
                                (sv, [(b_s.at[l], vw_w.at[l]) for l in range(L)]), (sv, [(qk0_s.T, do_w)]))
    put(e_w, R(vx.beta0 * vx.start_m1) * k0s + bvw)  # rhs
    put(dr_w, qdo - R(vx.end_m1) * kx0)  # dE
    plgpu.commit_smem()
    e, dr = _issue((sv, [(xinv_s, e_w)]), (sv, [(xinv_s.T, dr_w)]))
    re = jnp.sum(e * kx0, axis=1)
    rs = jnp.sum(dr * k0s, axis=1)
    put(e_w, e)
    put(dr_w, dr)
    plgpu.commit_smem()
    return kx0, re, rs


def _write_steps(writes, vx, k_s, v_w, do_w, x_w, qk_s, b_s, dr_w, put, load, dv_dst, kx0=None):
    """Each listed write's dvw_l = B_l^T dR + QK_l^T dO + end k_l dS', dbeta_l and dv_l (over v_l's
    tile, then stored to dv_dst(l)); kx0: k0 dS' already formed (else issued with write 0's group).
    Returns ([dbeta_l per listed write], the sum of their rend shares, or None for no write)."""
    sv = (C, v_w.shape[-1])
    R = lambda vec: mc.rows_of(vec, sv)
    rend, dbetas = None, []
    for l in writes:
        reuse = l == 0 and kx0 is not None
        dvw_raw, *kx_l = _issue((sv, [(b_s.at[l].T, dr_w), (qk_s.at[l].T, do_w)]),
                                *([] if reuse else [(sv, [(k_s.at[l], x_w)])]))
        kx = kx0 if reuse else kx_l[0]
        dvw = dvw_raw + R(vx.end) * kx
        vl = load(v_w.at[l])
        dbetas.append(jnp.sum(dvw * vl, axis=1))
        r_l = jnp.sum(R(vx.beta(l)) * vl * kx, axis=1)
        rend = r_l if rend is None else rend + r_l
        put(v_w.at[l], R(vx.beta(l)) * dvw)  # dv_l
    plgpu.commit_smem()
    for l in writes:
        plgpu.copy_smem_to_gmem(v_w.at[l], dv_dst(l))
    return dbetas, rend


def _state_terms(vx, scale, q_s, s_w, x_w, do_w, load):
    """The start-state share of dG, rowsum(dO . q S) scale start, and <S, dS'> of this value block as
    a vector of C = 64 parts that rides in the per-token dG_C output (which XLA sums over the chunk):
    the diagonal of S^T dS' [BV, BV] (a vector over value columns) at BV = C; at BV < C the diagonal
    of sum_j S_j dS'_j^T [C, C] over the key-row blocks j of 64 rows (a vector over key rows)."""
    BV, K = s_w.shape[-1], s_w.shape[0]
    if BV == C:
        sx_pairs = [(s_w.T, x_w)]
    else:
        sx_pairs = [(s_w.at[pl.ds(j * C, C)], x_w.at[pl.ds(j * C, C)].T) for j in range(K // C)]
    qs, sx = _issue(((C, BV), [(q_s, s_w)]), ((C, C), sx_pairs))
    dG_state = scale * jnp.sum(load(do_w) * qs, axis=1) * vx.start
    sx_diag = jnp.sum(jnp.where(mc.iota((C, C), 0) == mc.iota((C, C), 1), sx, 0.0), axis=1)
    return dG_state, sx_diag


def _block_step_work(wg, vx, L, scale, q_s, k_s, v_w, vw_w, do_w, s_w, x_w, xinv_s, qk0_s, qk_s, b_s, e_w,
                     dr_w, ovec_s, put, load, dv_dst, together):
    """Phase B of `_body_wg2` with split="work" on the CTA's one value block: w = 0 forms E = X rhs
    (and re), w = 1 dR = X^T dE (and rs, the state terms); after `together()` (both warpgroups) write
    l's dvw_l, dbeta_l and dv_l (stored to dv_dst(l)) by w = l % 2. Each warpgroup writes every row
    of its partial per-token outputs ovec_s[w] (XLA sums the parts)."""
    sv = (C, v_w.shape[-1])
    R = lambda vec, shape=(C, C): mc.rows_of(vec, shape)
    k0 = k_s.at[0]
    zero = lambda: 0.0 * vx.start  # a ROWS-layout zero: Mosaic GPU stores no splat of C = 64 elements

    def writes(w):
        """Write l's steps for l = w, w + 2, ...: ({l: dbeta_l}, the sum of their rend shares)."""
        ls = range(w, L, 2)
        dbetas, rend = _write_steps(ls, vx, k_s, v_w, do_w, x_w, qk_s, b_s, dr_w, put, load, dv_dst)
        return dict(zip(ls, dbetas)), zero() if rend is None else rend

    @pl.when(wg == 0)
    def _():
        k0s, kx0, bvw = _issue((sv, [(k0, s_w)]), (sv, [(k0, x_w)]),
                               (sv, [(b_s.at[l], vw_w.at[l]) for l in range(L)]))
        put(e_w, R(vx.beta0 * vx.start_m1, sv) * k0s + bvw)  # rhs
        plgpu.commit_smem()
        (e,) = _issue((sv, [(xinv_s, e_w)]))
        re = jnp.sum(e * kx0, axis=1)
        put(e_w, e)
        plgpu.commit_smem()
        together()
        dbeta, rend = writes(0)
        for l in range(L):
            ovec_s[0, l] = dbeta.get(l, zero())
        ovec_s[0, L] = -rend * vx.end
        ovec_s[0, L + 1] = re * vx.end_m1
        ovec_s[0, L + 2] = rend * vx.end - re * vx.end_m1

    @pl.when(wg == 1)
    def _():
        k0s, kx0, qdo = _issue((sv, [(k0, s_w)]), (sv, [(k0, x_w)]), (sv, [(qk0_s.T, do_w)]))
        put(dr_w, qdo - R(vx.end_m1, sv) * kx0)  # dE
        plgpu.commit_smem()
        (dr,) = _issue((sv, [(xinv_s.T, dr_w)]))
        rs = jnp.sum(dr * k0s, axis=1)
        put(dr_w, dr)
        plgpu.commit_smem()
        together()
        dG_state, sx_diag = _state_terms(vx, scale, q_s, s_w, x_w, do_w, load)
        dbeta, rend = writes(1)
        for l in range(L):
            ovec_s[1, l] = dbeta.get(l, zero()) + (vx.start_m1 * rs if l == 0 else 0.0)
        ovec_s[1, L] = dG_state - rend * vx.end
        ovec_s[1, L + 1] = vx.beta0 * rs * vx.start_m1
        ovec_s[1, L + 2] = rend * vx.end + sx_diag * vx.all


def supported(K: int, L: int, dtype=jnp.bfloat16, *, block_v: int = 64, narrow=None) -> bool:
    """Whether the pipeline runs this kernel by default at this key width, write count and dtype: where
    one value block of 64 per CTA fits in SMEM, and where only the work split's blocks of 32 fit
    (`NARROW_BLOCK_V`: L = 3 at K = 128) when `NARROW_BY_DEFAULT` (or `narrow`) is set; callers fall
    back to another kernel elsewhere."""
    narrow = NARROW_BY_DEFAULT if narrow is None else narrow
    return (jnp.dtype(dtype) in mc.DTYPES and K in (64, 128) and block_v == 64
            and (_smem_bytes(K, block_v, L, dtype, 1) <= SMEM_LIMIT
                 or (narrow and _pick_split(K, L, 2 * NARROW_BLOCK_V, dtype, NARROW_BLOCK_V) == "work")))


def _check(x: Prepared, starts, cot_end, ainv, block_v, out_slots, reduction_scratch, per_write=False,
           one_warpgroup=True):
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    if x.q.dtype not in mc.DTYPES or any(t.dtype != x.q.dtype for t in (x.k, x.v)):
        raise ValueError(f"chunk_grads_backward: q, k, v must share a 16-bit dtype (bf16 / f16), got "
                         f"{x.q.dtype}, {x.k.dtype}, {x.v.dtype}")
    if Tp % C:
        raise ValueError(f"chunk_grads_backward: padded T = {Tp} must be a multiple of chunk {C}")
    if K not in (64, 128):
        raise ValueError(f"chunk_grads_backward: K = {K} not supported, expected 64 or 128")
    allowed = (64,) if one_warpgroup else (64, NARROW_BLOCK_V)
    if block_v not in allowed or V % block_v:
        raise ValueError(f"chunk_grads_backward: `block_v` = {block_v} must be one of {allowed} and divide "
                         f"V = {V}" + ("" if one_warpgroup else f" ({NARROW_BLOCK_V}: the work split only)"))
    if ainv is not None and ainv.shape != (B, H, Tp // C, C, C):
        raise ValueError(f"chunk_grads_backward: `ainv` must be None or [B, H, N, {C}, {C}] = "
                         f"{(B, H, Tp // C, C, C)}, got {ainv.shape}")
    for name, t in (("starts", starts), ("cot_end", cot_end)):
        if t.shape != (B, H, Tp // C, K, V):
            raise ValueError(f"chunk_grads_backward: `{name}` must be [B, H, N, K, V] = "
                             f"{(B, H, Tp // C, K, V)}, got {t.shape}")
    if reduction_scratch < 0 or reduction_scratch % 128:
        raise ValueError(f"chunk_grads_backward: `reduction_scratch` = {reduction_scratch} must be a "
                         f"non-negative multiple of 128 bytes")
    if per_write not in (False, True, "split"):
        raise ValueError(f"chunk_grads_backward: `per_write` = {per_write!r} must be False, True or 'split'")
    if out_slots not in (None, 1, 2):
        raise ValueError(f"chunk_grads_backward: `out_slots` = {out_slots} must be None, 1 or 2")
    if not one_warpgroup:
        return
    need = _smem_bytes(K, block_v, L, x.q.dtype, _out_slots(K, block_v, L, x.q.dtype, out_slots),
                       reduction_scratch)
    if need > SMEM_LIMIT:
        raise ValueError(f"chunk_grads_backward: K = {K}, L = {L} needs {need // 1024} KiB of SMEM "
                         f"(limit {SMEM_LIMIT // 1024} KiB); supported: L <= 2 at K = 128, L <= 3 at K = 64 (one warpgroup); "
                         f"L = 3 at K = 128 and L = 4 at K = 64 take the work split at block_v = {NARROW_BLOCK_V} by default")


def chunk_inverses(x: Prepared):
    """(I + m)^{-1} [B, H, N, C, C] float32 of every chunk by XLA's triangular solve, for callers whose
    forward did not save it (m = diag(beta0) (k0 k0^T . m1m1), products in the input dtype)."""
    B, Tp, H = x.g.shape
    N = Tp // C
    heads_first = lambda t: jnp.moveaxis(t.reshape(B, N, C, H, *t.shape[3:]), 3, 1)  # [B, H, N, C, ...]
    k0, beta0, g = heads_first(x.k[..., 0, :]), heads_first(x.beta[..., 0]), heads_first(x.g)
    counts = lambda t: jnp.broadcast_to(t.reshape(B, 1, N, C), (B, H, N, C))

    def one(k0, beta0, g, r, rm1):
        d = chunk_decays(g, r, rm1)
        m = beta0.astype(f32)[:, None] * mm(k0, k0, dtype=k0.dtype, trans_b=True) * d.m1m1
        eye = jnp.eye(C, dtype=f32)
        return lax.linalg.triangular_solve(eye + m, eye, left_side=True, lower=True, unit_diagonal=True)

    return jax.vmap(jax.vmap(jax.vmap(one)))(k0, beta0, g, counts(x.r), counts(x.rm1))


def chunk_grads_backward(x: Prepared, tv: mc.TokenVectors, starts, do, cot_end, *, scale, ainv,
                         block_v=64, out_slots=None, fold=True, per_write=True, approx_math=True,
                         reduction_scratch=2048, warpgroups=None, split=None, order="chunks", dqk_sum=None,
                         registers=None, paired_decays=None, vw_by=None, loads_by=None, block_loops=None,
                         profile=None, interpret=False):
    """Input cotangents of every chunk (chunk 64), the contract of
    `gpu.chunk_grads.chunk_grads_backward` at chunk_size = 64.

    x: `Prepared` (q [B, Tp, H, K], k [B, Tp, H, L, K], v [B, Tp, H, L, V] bf16 / f16, beta, g, r,
    rm1); tv = `mc.token_vectors(x)`; starts, cot_end [B, H, N, K, V] float32 chunk start states
    and end-state cotangents (already 16-bit: used as they are; float32: cast in XLA, a pass over
    them); do [B, Tp, H, V]; ainv [B, H, N, C, C] (I + m)^{-1} of the forward, float32 (cast to the
    inputs' dtype in XLA) or already 16-bit, or None (`chunk_inverses`, in XLA).
    block_v: value columns per CTA, 64, or 32 for the work split
    (`NARROW_BLOCK_V`, which warpgroups=None takes where nothing fits at 64: L = 3 at K = 128 and L = 4
    at K = 64, also interpreted; twice the CTAs of 64, each forming the value-independent tiles). out_slots: float32 [C, 64] staging
    tiles for the dq / dk stores (2: a store stays in flight while the next output forms; None = 2
    where they fit in 227 KiB of SMEM, else 1: at K = 128 two for L <= 2). fold: the row
    scalings of the state terms of dq / dk (start, beta0 start_m1, end_m1, end) multiplied into
    their 16-bit operands (dO, dR, E, vw_l) so that each [C, 64] output slice is one chained
    accumulator (one wgmma wait per slice; one more 16-bit rounding of those operands); False
    scales the float32 products. per_write (default True: 10.2 ms against 11.9 for False on the H200
    at L = 2, T = 2K, B * T = 32K, H = 16, K = V = 128): False (all 2L raw value-independent tiles q k_l^T,
    k0 k_l^T in one group: 6 accumulators live at L = 2), True (one raw pair per write l, formed
    where it is used, again in the l-th step of `finish`; decay matrices formed at each use; each
    write's dvw_l at its use: at most 4 accumulators live, L - 1 more waits per phase, 2 more
    wgmmas) or "split" (as True, with every group of `finish` cut to two accumulators: ~2L more
    waits). approx_math: exp by the approximate ex2 instruction (decay matrices; relative error
    ~1e-7, far below the bf16 operands). reduction_scratch: SMEM bytes for cross-warp reductions
    (the [C, C] column sums; `plgpu.CompilerParams.reduction_scratch_bytes`). warpgroups: 1, 2
    (`_body_wg2`: one CTA per (chunk, head) over V = 128, two warpgroups of 64 value columns, the
    value-independent tiles formed once, no XLA sums of dq / dk; always folded and per write, the
    output slots in v_l's bytes: `out_slots`, `fold`, `per_write` do not apply), 3 (L = 1, K and V
    in {64, 128}: `chunk_grads_wg3`, three warpgroups that each own a stream of products and hand
    tiles over through SMEM barriers; H100, L = 1, 16-bit states, `benchmarks/mosaic_diag.py time`:
    2.39 ms against 2.54 for the value split in one run) or None: 3 where it takes the shape, else 2
    where a `split` fits (`out_slots`, `fold`, `per_write`, `block_v` at their defaults, `dqk_sum`
    not "add", compiled for the GPU), else 1. split (two
    warpgroups only): "values" (one CTA over V = 128, each warpgroup 64 value columns; SMEM: L = 1
    at K = 64 and 128), "work" (one CTA per 64 value columns as the one-warpgroup kernel, E and dR
    formed by different warpgroups, the writes' steps alternating between them; SMEM: L <= 2 at
    K = 128, L <= 3 at K = 64; at block_v = 32 also L = 3 at K = 128, ~211 KiB by Mosaic's count)
    or None: "values" where it fits, else "work". H100, B * T = 32K,
    H = 16, K = V = 128, this kernel alone (`benchmarks/mosaic_stages.py`): L = 1 values 3.16 ms,
    work 3.63, one warpgroup 4.54; L = 2 work 7.18, one warpgroup 10.74. In the interpreter the
    multi-warpgroup kernels run only when asked for: each warpgroup is a thread blocking in a host
    callback at barrier waits, and they deadlock where XLA's CPU thread pool is smaller than the
    warpgroups plus one (a 2-core machine; the tests set NPROC=8, `tests/conftest.py`).
    order: the grid's CTA order (`ORDERS`): "chunks" (default) puts consecutive chunks of one value
    block in adjacent CTAs; "values" the V / 64 value blocks of one chunk (they read the same q, k_l,
    X and add into the same dq / dk rows; slower on the H100: L = 2 work split 8.22 against 7.32 ms
    with XLA sums, 7.73 against 5.61 with "add"). dqk_sum: how the value blocks' dq / dk shares are
    summed (`DQK_SUMS`): "add" (TMA reduce-add of each [C, 64] float32 share into a zeroed output
    passed as a `jax.new_ref`: no partials in HBM; float32 additions in a run-dependent order),
    "add16" (the same in the inputs' 16-bit dtype: half the zeroing and TMA traffic and no float32
    dq / dk cast in XLA, for one 16-bit rounding per share and per addition; GPU only),
    "xla" (a [V / 64, ...] partial per block, summed in XLA) or None: on the GPU where there are several
    value blocks "add16" (from `ADD16_MIN_BLOCKS` blocks on, else "add"; the Mosaic GPU interpreter
    has no TMA reduction), else "xla". warpgroups=3 at L >= 2 (`chunk_grads_wg3w`) takes block_v 64 as
    "the widest value block that fits" (32 at K = 128). H100, L = 2, work split: "add" 5.61 ms against 7.32 for "xla" (order "chunks").
    registers: `warpgroups` = 3 only: (WG0, WG1, WG2) registers per thread by setmaxnreg
    (`chunk_grads_wg3`; (168, 168, 168): the launch share, no setmaxnreg), None: the three-warpgroup
    kernel's `DEFAULT_REGISTERS` at K = V = 128, else the launch share.
    paired_decays, vw_by: `warpgroups` = 3 only (`chunk_grads_wg3`; None: its defaults): each pair of
    decay matrices one column step apart from one exp (True / False); the warpgroup that forms
    vw = beta v ("backward", "keys", "forward"). loads_by: `warpgroups` = 3 at L = 1 only: who issues the
    input copies ("forward": WG0's one thread, the default; "each": every warpgroup its own operands).
    block_loops: `warpgroups` = 3 at L = 1 only: the per-64-column stretches as loops (True, the default:
    28-32% faster on the H100) or unrolled (False; `chunk_grads_wg3`).
    profile: None, or Mosaic GPU's in-kernel profiler settings ({"profile_space": 16, "profile_dir":
    DIR}): a trace per call in DIR with each CTA's time in every named phase of the one-warpgroup
    body (`benchmarks/mosaic_diag.py profile`).
    Grid (`_grid`, order "chunks") (N, H, B * V / block_v); the value split (N, H, B) x 2 warpgroups.
    Returns (dq [B, Tp, H, K], dk [B, Tp, H, L, K], dbeta [B, Tp, H, L], dg [B, Tp, H]) float32 and
    dv [B, Tp, H, L, V] in v's dtype, as (dq, dk, dv, dbeta, dg); dq and dk in q's 16-bit dtype where
    one CTA holds all value columns and sums nothing (the value split; V = block_v) and `dqk_sum` is
    not "add" (`_sum_mode`): the rounding the caller's cast makes anyway, without a float32 copy
    written and cast in XLA.
    """
    if warpgroups is None:
        B, Tp, H, K = x.q.shape
        L, V = x.v.shape[-2:]
        from pallas_kernels.gpu.mosaic import chunk_grads_wg3
        # An explicit TMA sum rules out only the three-warpgroup kernel at L = 1 (one CTA over every value
        # column: nothing to sum); session 22's first "add16" rows at L = 2 fell through to one warpgroup.
        defaults = (not interpret and out_slots is None and fold is True and per_write is True and block_v == 64)
        if defaults and dqk_sum not in TMA_SUMS and chunk_grads_wg3.supported(K, L, V, x.q.dtype, reduction_scratch):
            warpgroups = 3
        elif defaults and _pick_split(K, L, V, x.q.dtype, block_v, reduction_scratch) is not None:
            warpgroups = 2
        elif (block_v == 64 and out_slots is None and _smem_bytes(K, 64, L, x.q.dtype, 1) > SMEM_LIMIT
              and _pick_split(K, L, V, x.q.dtype, NARROW_BLOCK_V, reduction_scratch) == "work"):
            # nothing fits at 64 value columns per CTA (L = 3 at K = 128): the work split at 32 (also
            # interpreted: the one-warpgroup kernel does not take the shape at all)
            warpgroups, split, block_v = 2, "work", NARROW_BLOCK_V
        else:
            warpgroups = 1
    if order not in ORDERS:
        raise ValueError(f"chunk_grads_backward: `order` = {order!r} must be one of {ORDERS}")
    if dqk_sum not in (None, *DQK_SUMS):
        raise ValueError(f"chunk_grads_backward: `dqk_sum` = {dqk_sum!r} must be None or one of {DQK_SUMS}")
    if dqk_sum in TMA_SUMS and interpret:
        raise ValueError(f"chunk_grads_backward: `dqk_sum`={dqk_sum!r} needs interpret=False (the Mosaic GPU "
                         "interpreter has no TMA reduce-add); use 'xla' or None")
    sums = dict(order=order, dqk_sum=dqk_sum)
    # The three-warpgroup kernel's own options at L = 1 (None: its defaults), given only where they apply.
    wg3_options = {k: v for k, v in dict(paired_decays=paired_decays, vw_by=vw_by, loads_by=loads_by,
                                          block_loops=block_loops).items() if v is not None}
    if warpgroups == 3 and x.v.shape[-2] > 1:
        from pallas_kernels.gpu.mosaic.chunk_grads_wg3w import chunk_grads_wg3w
        if out_slots is not None or wg3_options:
            raise ValueError("chunk_grads_backward: `warpgroups` = 3 at L >= 2 takes no `out_slots`, "
                             "`paired_decays`, `vw_by`, `loads_by` or `block_loops`")
        return chunk_grads_wg3w(x, tv, starts, do, cot_end, scale=scale, ainv=ainv,
                                block_v=None if block_v == 64 else block_v, approx_math=approx_math,
                                reduction_scratch=reduction_scratch, registers=registers, profile=profile,
                                interpret=interpret, **sums)
    if warpgroups == 3:
        from pallas_kernels.gpu.mosaic.chunk_grads_wg3 import chunk_grads_wg3
        if dqk_sum in TMA_SUMS or block_v != 64 or out_slots is not None:
            raise ValueError("chunk_grads_backward: `warpgroups` = 3 (one CTA over all value columns) takes no "
                             "`dqk_sum`='add', `block_v` or `out_slots`")
        return chunk_grads_wg3(x, tv, starts, do, cot_end, scale=scale, ainv=ainv, approx_math=approx_math,
                               reduction_scratch=reduction_scratch, registers=registers, order=order,
                               profile=profile, interpret=interpret, **wg3_options)
    if registers is not None or wg3_options:
        raise ValueError("chunk_grads_backward: `registers` (setmaxnreg budgets), `paired_decays`, `vw_by`, "
                         "`loads_by` and `block_loops` apply to `warpgroups` = 3 only")
    if warpgroups == 2:
        return _two_warpgroups(x, tv, starts, do, cot_end, scale=scale, ainv=ainv, block_v=block_v,
                               approx_math=approx_math, reduction_scratch=reduction_scratch,
                               interpret=interpret, split=split, profile=profile, **sums)
    if warpgroups != 1:
        raise ValueError(f"chunk_grads_backward: `warpgroups` = {warpgroups} must be None, 1, 2 or 3")
    _check(x, starts, cot_end, ainv, block_v, out_slots, reduction_scratch, per_write)
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    N, nvb, dt = Tp // C, V // block_v, x.q.dtype
    out_slots = _out_slots(K, block_v, L, dt, out_slots, reduction_scratch)
    add, out_dt = _sum_mode(nvb, dqk_sum, interpret, dt)
    if ainv is None:
        ainv = chunk_inverses(x)
    rvec, cvec, rint = _token_operands(tv)
    sq, sv, sk = (C, C), (C, block_v), (C, K)
    scratch = dict(
        q_s=mc.smem(sk, dt), k_s=mc.smem((L, *sk), dt), v_s=mc.smem((L, *sv), dt),
        vw_s=mc.smem((L, *sv), dt), do_s=mc.smem(sv, dt), s_s=mc.smem((K, block_v), dt),
        x_s=mc.smem((K, block_v), dt), xinv_s=mc.smem(sq, dt), qk0_s=mc.smem(sq, dt),
        qk_s=mc.smem((L, *sq), dt), b_s=mc.smem((L, *sq), dt), e_s=mc.smem(sv, dt),
        dr_s=mc.smem(sv, dt),
        rv_s=plgpu.SMEM((_N_ROW_VECS + L, C), f32), cv_s=plgpu.SMEM((2, C), f32),
        ri_s=plgpu.SMEM((4, C), jnp.int32), cs_s=plgpu.SMEM((2, C), f32),
        ovec_s=plgpu.SMEM((L + _N_OUT_VECS, C), f32), out_s=mc.smem((out_slots, C, 64), out_dt),
        bar0=plgpu.Barrier(num_arrivals=1 + 2 * L + _N_ROW_VECS + L + 2 + 4),
        bar1=plgpu.Barrier(num_arrivals=4))
    body = functools.partial(_body, L=L, nvb=nvb, scale=scale, fold=fold, per_write=per_write)
    dq, dk, dv, dvec = _launch(body, x, (do, starts, cot_end, ainv, rvec, cvec, rint), nvb=nvb, n_vec_parts=nvb,
                               order=order, add=add, dqk_dtype=out_dt, kernel_name="prism_chunk_grads_mgpu",
                               scratch_types=scratch, approx_math=approx_math,
                               reduction_scratch=reduction_scratch, interpret=interpret, profile=profile)
    return (dq, dk, dv, *_token_grads(dvec, L, N))


def _launch(body, x: Prepared, operands, *, nvb, n_vec_parts, order, add, dqk_dtype, interpret, **kernel_kw):
    """Runs the kernel `body` (grid `_grid(..., order)`) on x's q, k, v and `operands` (do, starts,
    cot_end, ainv in x's dtype; the token operands). Returns dq [B, Tp, H, K], dk [B, Tp, H, L, K]
    (`dqk_dtype`; the value blocks' shares summed as `_sum_mode` says: `add` or in XLA), dv, and the
    per-token partials [n_vec_parts, B, H, L + 3, Tp]."""
    B, Tp, H, K = x.q.shape
    L = x.v.shape[-2]
    dt = x.q.dtype
    do, starts, cot_end, ainv, *tok = operands
    ins = (x.q, x.k, x.v, do.astype(dt), starts.astype(dt), cot_end.astype(dt), ainv.astype(dt), *tok)
    dqk_shapes = ((B, Tp, H, K), (B, Tp, H, L, K))
    rest = (jax.ShapeDtypeStruct(x.v.shape, x.v.dtype),
            jax.ShapeDtypeStruct((n_vec_parts, B, H, L + _N_OUT_VECS, Tp), f32))
    grid, names = _grid(Tp // C, H, B, nvb, order)
    body = functools.partial(body, order=order, add=add)
    run = lambda out_type: _kernel(body, out_type=out_type, grid=grid, grid_names=names, interpret=interpret,
                                   **kernel_kw)
    if add:
        # The outputs' HBM is zeroed and handed to the kernel as refs: the shares are added into it.
        accs = [jax.new_ref(jnp.zeros(shape, dqk_dtype)) for shape in dqk_shapes]
        dv, dvec = run(rest)(*ins, *accs)
        dq, dk = (a[...] for a in accs)
    else:
        dq, dk, dv, dvec = run(tuple(jax.ShapeDtypeStruct((nvb, *shape), dqk_dtype) for shape in dqk_shapes)
                               + rest)(*ins)
        dq, dk = (t[0] if nvb == 1 else t.sum(0) for t in (dq, dk))
    return dq, dk, dv, dvec


def _token_grads(dvec, L, N):
    """dbeta [B, Tp, H, L] and dg [B, Tp, H] from the kernel's per-token partials
    [parts, B, H, L + 3, Tp] (summed over parts here)."""
    dvec = dvec.sum(0)
    B, H, _, Tp = dvec.shape
    dbeta = jnp.transpose(dvec[:, :, :L], (0, 3, 1, 2))  # [B, Tp, H, L]
    dG, dGm1, pC = (dvec[:, :, L + i].reshape(B, H, N, C) for i in range(_N_OUT_VECS))
    dGC = pC.sum(-1)
    dg = jnp.flip(jnp.cumsum(jnp.flip(dG + dGm1, -1), -1), -1) - dGm1 + dGC[..., None]
    dg = jnp.moveaxis(dg.reshape(B, H, Tp), 1, 2)
    return dbeta, dg


def _token_operands(tv):
    """The kernel's float32 per-token row vectors [B, H, 7 + L, Tp], column vectors [B, H, 2, Tp]
    and reset counts [B, 2, Tp]."""
    all_t = jnp.repeat(tv.all, C, axis=-1)  # exp(G_C) on every token of its chunk
    rvec = jnp.concatenate([jnp.stack([tv.G, tv.Gm1, tv.start_m1, tv.start, tv.end_m1, tv.end, all_t], 2),
                            tv.beta], axis=2)
    return rvec, jnp.stack([tv.G, tv.Gm1], 2), jnp.stack([tv.r, tv.rm1], 1)


def _two_warpgroups(x: Prepared, tv, starts, do, cot_end, *, scale, ainv, block_v, approx_math,
                    reduction_scratch, interpret, split=None, profile=None, order="chunks", dqk_sum=None):
    """`chunk_grads_backward(warpgroups=2)`: two warpgroups per CTA (`_body_wg2`); split="values":
    grid (N, H, B); "work": grid (N, H, B * V / 64) at order "chunks" (`_grid`); None: `_pick_split`."""
    _check(x, starts, cot_end, ainv, block_v, 1, reduction_scratch, one_warpgroup=False)
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    N, dt = Tp // C, x.q.dtype
    if split is None:
        split = _pick_split(K, L, V, dt, block_v, reduction_scratch) or "work"
    if split not in SPLITS:
        raise ValueError(f"chunk_grads_backward: `split` = {split!r} must be None or one of {SPLITS}")
    if split == "values" and (V != 2 * block_v or block_v != 64):
        raise ValueError(f"chunk_grads_backward: `warpgroups` = 2 with split='values' needs block_v = 64 and "
                         f"V = 128 (two value blocks), got block_v = {block_v}, V = {V}")
    slots = _wg2_slots(K, L, dt, reduction_scratch, split, block_v)
    need = _smem_bytes_wg2(K, L, dt, slots, reduction_scratch, split, block_v)
    if need > SMEM_LIMIT:
        raise ValueError(f"chunk_grads_backward: `warpgroups` = 2 (split={split!r}, block_v = {block_v}) at K = {K}, "
                         f"L = {L} needs {need // 1024} KiB of SMEM (limit {SMEM_LIMIT // 1024} KiB); supported: "
                         f"split='values' at L = 1, split='work' at L <= 2 (K = 64, 128), and at L = 3 with "
                         f"block_v = {NARROW_BLOCK_V}")
    if ainv is None:
        ainv = chunk_inverses(x)
    rvec, cvec, rint = _token_operands(tv)
    nh = _halves(split)
    nvb = V // block_v if split == "work" else 1
    add, out_dt = _sum_mode(nvb, dqk_sum, interpret, dt)
    sq, sv, sk = (C, C), (C, block_v), (C, K)
    # every 16-bit tile is a wgmma operand beside [*, block_v] B operands: at most block_v * 2 bytes of swizzle
    op = lambda shape: mc.smem(shape, dt, max_swizzle=min(128, block_v * jnp.dtype(dt).itemsize))
    scratch = dict(
        q_s=op(sk), k_s=op((L, *sk)),
        v_out=plgpu.RefUnion([op((nh, L, *sv))], [mc.smem((slots, C, 64), out_dt)]),
        vw_s=op((nh, L, *sv)), do_s=op((nh, *sv)), s_s=op((nh, K, block_v)),
        x_s=op((nh, K, block_v)), xinv_s=op(sq), qk0_s=op(sq),
        qk_s=op((L, *sq)), b_s=op((L, *sq)), e_s=op((nh, *sv)),
        dr_s=op((nh, *sv)),
        rv_s=plgpu.SMEM((_N_ROW_VECS + L, C), f32), cv_s=plgpu.SMEM((2, C), f32),
        ri_s=plgpu.SMEM((4, C), jnp.int32), cs_s=plgpu.SMEM((2, C), f32),
        ovec_s=plgpu.SMEM((2, L + _N_OUT_VECS, C), f32),
        bar0=plgpu.Barrier(num_arrivals=1 + L + _N_ROW_VECS + L + 2 + 4 + 1),
        barv=plgpu.Barrier(num_arrivals=L + 3, num_barriers=nh),
        sync=plgpu.Barrier(num_arrivals=2, num_barriers=6),
        turn=plgpu.Barrier(num_arrivals=1, num_barriers=(1 + L) * K // 64),
        cs_turn=plgpu.Barrier(num_arrivals=1))
    body = functools.partial(_body_wg2, L=L, scale=scale, split=split, nvb=nvb)
    name = "prism_chunk_grads_mgpu_wg2" + ("" if split == "values" else "_work")
    dq, dk, dv, dvec = _launch(body, x, (do, starts, cot_end, ainv, rvec, cvec, rint), nvb=nvb,
                               n_vec_parts=2 * nvb, order=order, add=add, dqk_dtype=out_dt, kernel_name=name,
                               scratch_types=scratch, num_threads=2, thread_name="wg", approx_math=approx_math,
                               reduction_scratch=reduction_scratch, interpret=interpret, profile=profile)
    return (dq, dk, dv, *_token_grads(dvec, L, N))
