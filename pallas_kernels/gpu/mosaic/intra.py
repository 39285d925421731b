"""Mosaic GPU intra-chunk kernel: the triangular solve of each 64-token chunk, P and Qe.

Drop-in for `pallas_kernels.gpu.split.intra` at chunk_size = 64 with 16-bit inputs. Per chunk
(prism-math.md section 3, `pallas_kernels.common.chunk_solve`):

    m  = diag(beta0) (k0 k0^T . m1m1)     strictly lower, m1m1[t, i] = exp(Gm1_t - Gm1_i), same segment
    X  = (I + m)^{-1}
    P  = X diag(beta0 start_m1) k0                                              [C, K]
    Qe = X diag(beta0) sum_l (k0 k_l^T . m1_0) (beta_l v_l)                      [C, V]

computed as (the gate-free form, as FlashQLA / jax-linear-attention solve Gated DeltaNet's inverse):

    m0 = diag(beta0) (k0 k0^T)            strictly lower, same segment (no decay)
    X0 = (I + m0)^{-1},   X = X0 . exp(Gm1_t - Gm1_i)      (m = D m0 D^-1 with D = diag(exp(Gm1)))
    Qe = Z v_0 + X diag(beta0) sum_{l >= 1} (k0 k_l^T . m1_0) (beta_l v_l)
    Z  = ((I - X0) + X0 D0) . m1_0 . beta_0 (columns)

For the first write k_0 = k0, so its right-hand side is m (up to the columns' decay), and X m =
I - X: Z needs no product with X. m1_0[t, i] = exp(Gm1_t - G_i) <= 1 bounds every factor (the
gated form would need exp(-g_i), which overflows). D0 = diag(beta0) (k0 k0^T) on the columns of
tokens that start a document (m0 masks them: the count before t matches the count up to i but not
the count before i); it is zero without segment_ids, so `resets=False` drops its extra k0 k0^T and
X0 D0 products. The (I - X0) form also avoids the cancellation of X R on nearly parallel keys: on
the adversarial chunk of the tests Qe is 3.5e-3 off float64 at L = 1, against 4.9e-2 for X R.

One CTA (one warpgroup) walks `chunks_per_cta` consecutive chunks of one (batch, head): grid
(B, N / chunks_per_cta, H). Per chunk:
- TMA brings the chunk's L key tiles [C, K], L value tiles [C, V] and its token vectors (from
  `token_vectors`, head-major float32) into SMEM, all on one barrier. With chunks_per_cta > 1 the
  inputs have two slots and the next chunk's loads are issued when a chunk starts, so they run
  while it is solved. The vectors are loaded into registers where they are used (a COLS vector is
  16 registers per thread).
- The L products k0 k_l^T issued back to back (one wait); for L > 1 the right-hand side of the
  writes l >= 1 is scaled, staged, summed against v_l in one accumulator and stored in v_1's tile.
- X0, blocked as `common.blocked_unit_lower_inverse`:
  1. the `block` x `block` diagonal blocks (default 16) by `block - 1` steps of column
     substitution, all blocks at once (`_diagonal_block_inverse`): each step reads one row of
     W = S m0^T (formed once by a hi + lo pair of wgmma products, staged in float32 SMEM), so the
     dependent chain is a row reduction within a quad of lanes and a select per step; block 2
     takes the 2 x 2 blocks directly (I - m0's) with no substitution;
  2. doubling to 2 * block, ..., 64: X0 <- X0 - X0 (Off X0), two dependent products per doubling.
     With `hold_m` m0 is staged once (hi / lo) and held in SMEM, and Off X0 is m0 X0 masked to
     Off's blocks; without it m0 is formed again by a k0 k0^T wgmma and Off staged per doubling.
     `merge_split=True` (default) multiplies 16-bit high parts and low remainders (three wgmma
     issued back to back into one accumulator), float32-accurate to ~2e-5; with False one 16-bit
     product (~5e-4 on random chunks, ~1e-2 on adversarial ones, so it is not the default).
- X = X0 . decay; X diag(beta0 start_m1), Z (and X diag(beta0) for L > 1) rounded to the input
  dtype as the Triton kernel rounds its operands; P and Qe by wgmma into two accumulators, one
  wait; P goes back from k0's tile, Qe from v0's, X (float32, `save_inverse`) from its own, the
  three TMA stores in flight together.
- SMEM (`smem_bytes`): the inputs (slots x (L C (K + V) 16-bit + vectors)), m0 (16 KiB, `hold_m`)
  and one region shared by the phases (each its own `run_scoped`): substitution 24 KiB (40 without
  hold_m), doublings 32 KiB, right-hand side (L - 1) C^2 16-bit, outputs 32-40 KiB. At K = V = 128:
  one slot 82 KiB at L = 1 with m0 held (two CTAs per SM), 106 KiB at L = 2 without (two). hold_m=None
  holds m0 where two one-slot CTAs still fit (`default_hold_m`); chunks_per_cta=None takes 4 or 2
  where two CTAs with two slots still fit on an SM and the grid still has two CTAs per SM, else 1
  (`default_chunks_per_cta`); SMEM beyond 227 KiB is rejected.

Measured in the interpreter (CPU) against the float64 chunk math: X to ~1e-6 (random chunks) and
~3e-5 (beta = 1, nearly parallel keys); P and Qe to 3e-3 / 5e-3 on random chunks.

Cost per chunk at L = 1 (block 16, hold_m, no resets): 7 wgmma waits (k0 k0^T; W; two per
doubling; P and Qe), against 11 before this form (the first write's right-hand side, m formed
three times, Qe's product after P's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.common import Prepared
from pallas_kernels.gpu.mosaic import common as mc

f32 = jnp.float32
C = mc.CHUNK
SIZES = (64, 128)  # supported K and V
BLOCKS = (2, 4, 8, 16, 32)  # supported diagonal block sizes of the inverse
STEP_COLUMNS = (1, 2, 4)  # substitution columns per dependent step
DIAGONAL_SOLVES = ("rows", "columns")  # how the inverse's diagonal blocks are solved (`intra`)
# `intra(diagonal=None)` on a GPU; the interpreter always takes "rows" (it does not run inline Mosaic GPU code).
# "columns": 11% faster alone on an H100 (session 18: 0.592 against 0.667 ms at L = 1); its GPU tests against
# float64 (L = 1, 2, with documents, blocks 16 and 8) passed on an H200. Its SMEM never exceeds the row
# solve's choice of hold_m / chunks_per_cta (same defaults at every L <= 4, K, V in {64, 128, 256}).
DEFAULT_DIAGONAL = "columns"
SMS = 132  # H200 streaming multiprocessors
SMEM_PER_SM = 228 * 1024  # shared memory of one SM; each resident CTA also reserves 1 KiB
MAX_WRITES = 4  # L: the L key and value tiles and L staged products stay in SMEM
# The reset columns' correction of Qe only in chunks with a reset (it passed its GPU tests; on reset-free
# chunks it timed as no correction, while the correction in every chunk cost 0.2 ms at L = 1 on an H200:
# docs/benchmarks.md, session 13).
RESET_CHUNKS_ONLY = True


def _check(x: Prepared, tv: mc.TokenVectors, block: int):
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    if jnp.dtype(x.k.dtype) not in mc.DTYPES:
        raise ValueError(f"mosaic intra: k has dtype {x.k.dtype}; supported: bfloat16, float16 "
                         "(float32 inputs use the Triton kernels)")
    if x.v.dtype != x.k.dtype:
        raise ValueError(f"mosaic intra: v dtype {x.v.dtype} must equal k's ({x.k.dtype})")
    if K not in SIZES or x.k.shape[-1] != K:
        raise ValueError(f"mosaic intra: key size K = {x.k.shape[-1]}; supported: {SIZES}")
    if V not in SIZES:
        raise ValueError(f"mosaic intra: value size V = {V}; supported: {SIZES}")
    if not 1 <= L <= MAX_WRITES:
        raise ValueError(f"mosaic intra: L = {L} writes per token; supported: 1 to {MAX_WRITES}")
    if Tp % C:
        raise ValueError(f"mosaic intra: padded length {Tp} must be a multiple of the chunk size {C} "
                         "(prepare(..., chunk_size=64))")
    if tv.G.shape != (B, H, Tp) or tv.beta.shape != (B, H, L, Tp):
        raise ValueError(f"mosaic intra: tv must be token_vectors(x) with chunk {C}: G {tv.G.shape}, "
                         f"expected {(B, H, Tp)}; beta {tv.beta.shape}, expected {(B, H, L, Tp)}")
    if block not in BLOCKS:
        raise ValueError(f"mosaic intra: block = {block}; supported: {BLOCKS}")


def _to_smem(buf, value):
    buf[...] = value.astype(buf.dtype)
    plgpu.commit_smem()


def _matmul_sum(pairs, shape):
    """sum_i a_i @ b_i [M, N] float32 in one wgmma accumulator (a_i, b_i: SMEM refs or `.T` of
    them). `common.matmul(init=...)` goes through `pl.run_state`, which the interpreter cannot run;
    a scoped accumulator takes the products one after another instead."""
    def scoped(acc):
        for a, b in pairs:
            plgpu.wgmma(acc, a, b)
        return acc[...]

    return lax.optimization_barrier(pl.run_scoped(scoped, plgpu.ACC(shape, f32)))


def _matmuls(pairs, shape):
    """[a_i @ b_i] [M, N] float32, one accumulator each, all wgmmas issued before the first wait."""
    def scoped(*accs):
        for acc, (a, b) in zip(accs, pairs):
            plgpu.wgmma(acc, a, b)
        return [acc[...] for acc in accs]

    return lax.optimization_barrier(pl.run_scoped(scoped, *(plgpu.ACC(shape, f32) for _ in pairs)))


def _stage(buf, value, split):
    """float32 registers `value` into the 16-bit [2, C, C] SMEM buffer: buf[0] = its 16-bit rounding
    and, with `split`, buf[1] = the remainder (value = buf[0] + buf[1] to ~2^-16 relative); one commit."""
    hi = value.astype(buf.dtype)
    buf.at[0][...] = hi
    if split:
        buf.at[1][...] = (value - hi.astype(f32)).astype(buf.dtype)
    plgpu.commit_smem()


def _staged_product(a_s, b_s, split):
    """a @ b [C, C] float32 of two `_stage`d tiles: a_h b_h (+ a_h b_l + a_l b_h with `split`), the
    wgmmas issued back to back into one accumulator."""
    pairs = [(a_s.at[0], b_s.at[0])]
    if split:
        pairs += [(a_s.at[0], b_s.at[1]), (a_s.at[1], b_s.at[0])]
    return _matmul_sum(pairs, (C, C))


def _diagonal_block_inverse(m, a_s, m_s, w_s, *, block, split, hold, step_columns=1):
    """The inverses of the `block` x `block` diagonal blocks of I + m (strictly lower m [C, C]
    float32 registers), zero elsewhere, by column substitution on all blocks at once. With `hold`,
    on return the [2, C, C] 16-bit buffer m_s holds m `_stage`d (with `split`) for the doublings.

    Column j = blk * block + c of X = (I + m)^{-1} is e_j - sum_{i > j} X[:, i] m[i, j] (from
    X (I + m) = I), for c = block - 1 down to 0. Step c reads, for each i, w_c[i] = m[i, blk(i) *
    block + c] along columns: the rows of W = S m_diag^T with S[c, j] = [j % block == c], one
    hi + lo pair of 16-bit wgmma products (S is exact in 16 bits), staged in the float32 SMEM
    buffer w_s and read back row by row. The dependent chain is then a row reduction (within a
    quad of lanes) and a select per step, with no cross-warp reduction. m_diag is staged in m_s and
    (`hold`) replaced there by the whole m once W is formed, before the substitution: m is not live
    across it.

    step_columns: columns c, c - 1, ... solved in one dependent step. Their row reductions a_t run
    against the same x (independent), then y_t = a_t - sum_{u < t} y_u mu_ut, with mu_ut[r] =
    m[c_u, c_t] in row r's block (what column c_u's update adds to a_t; reductions that do not
    depend on x), and column c_t gets -y_t: 15 steps at block 16 become 8 (2 columns) or 4 (4)."""
    sq = (C, C)
    rows, cols = mc.iota(sq, 0), mc.iota(sq, 1)
    same_block = lax.div(rows, block) == lax.div(cols, block)
    a_s.at[0][...] = jnp.where(lax.rem(cols, block) == rows, 1.0, 0.0).astype(a_s.dtype)
    _stage(m_s, jnp.where(same_block, m, 0.0), True)
    _to_smem(w_s, _matmul_sum([(a_s.at[0], m_s.at[0].T), (a_s.at[0], m_s.at[1].T)], sq))
    if hold:
        _stage(m_s, m, split)  # the product has read m_diag
    x = jnp.where(rows == cols, 1.0, 0.0).astype(f32)
    col_in_block = lax.rem(cols, block)
    block_start = lax.div(rows, block) * block if step_columns > 1 else None
    c = block - 2  # the last column of each block is e_j
    while c >= 0:
        cs = [c - t for t in range(step_columns) if c - t >= 0]  # this step's columns, descending
        ws = [mc.cols_of(plgpu.load(w_s.at[ct], layout=mc.COLS), sq) for ct in cs]
        a = [jnp.sum(x * w, axis=1) for w in ws]
        y = []
        for t, w in enumerate(ws):
            for u in range(t):
                a[t] = a[t] - y[u] * jnp.sum(jnp.where(cols == block_start + cs[u], w, 0.0), axis=1)
            y.append(a[t])
        for ct, yt in zip(cs, y):
            x = x - jnp.where(same_block & (col_in_block == ct), mc.rows_of(yt, sq), 0.0)
        c -= len(cs)
    return x


# Padding of the rows of the column solve's float32 SMEM buffers: a WGMMA-layout store writes 8 rows
# per instruction, and at a 256-byte row stride all of them fall in the same banks.
SOLVE_PAD = 8


def _column_solve(block):
    """`inline_mgpu` function (m [C, C] float32 WGMMA registers, m_ref, x_ref: float32 [C, C] SMEM)
    -> the inverses of I + m's `block` x `block` diagonal blocks (WGMMA registers; entries outside
    them undefined: the caller masks). Thread c < C of the warpgroup solves column c of its block,
    (I + m) x = e_c, right-looking: r = e_c; for j in the block, x_j = r_j, then r_i -= m_ij x_j
    for every later row i of the block. The updates of a step are independent, so the dependent
    chain is one multiply-add per step (no reductions, no shuffles); m_ij is a same-address read
    across the threads of a block (a broadcast). Mosaic GPU's interpreter does not run inline
    Mosaic GPU code: `intra(diagonal="rows")` is the interpreter's path."""
    import jax.experimental.mosaic.gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, math as mlir_math, memref

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(), plgpu.RefType()),
                       return_type=plgpu.ShapeDtypeStruct((C, C), f32, layout=plgpu.Layout.WGMMA))
    def solve(ctx, m, m_ref, x_ref):
        del ctx
        m.store_untiled(m_ref, optimized=False)
        mu.warpgroup_barrier()  # every thread reads entries that others stored
        i32, index, fp = ir.IntegerType.get_signless(32), ir.IndexType.get(), ir.F32Type.get()
        thread = arith.remui(mu.thread_idx(), mu.c(128, i32))  # within the warpgroup
        with mu.when(arith.cmpi(arith.CmpIPredicate.ult, thread, mu.c(C, i32))):
            in_block = arith.remui(thread, mu.c(block, i32))
            column = arith.index_cast(index, thread)
            first = arith.index_cast(index, arith.subi(thread, in_block))  # the block's first row
            row = lambda j: arith.addi(first, mu.c(j, index))
            one, zero = mu.c(1.0, fp), mu.c(0.0, fp)
            r = [arith.select(arith.cmpi(arith.CmpIPredicate.eq, in_block, mu.c(i, i32)), one, zero)
                 for i in range(block)]
            for j in range(block):
                memref.store(r[j], x_ref, [row(j), column])
                minus_x = arith.negf(r[j])
                for i in range(j + 1, block):
                    r[i] = mlir_math.fma(memref.load(m_ref, [row(i), row(j)]), minus_x, r[i])
        mu.warpgroup_barrier()  # every column is in before any thread reads rows
        return mgpu.FragmentedArray.load_untiled(x_ref, layout=mgpu.WGMMA_LAYOUT, optimized=False)

    return solve


def _inverse(m0, dt, *, block, split, m_s=None, m_of=None, step_columns=1, diagonal="rows"):
    """X0 = (I + m0)^{-1} [C, C] float32 for the gate-free strictly lower m0 (float32 registers, not
    live after the diagonal blocks): diagonal blocks by substitution, then doubling
    X_2s = X_s - X_s (Off_s X_s) (exact: Off_s X_s Off_s = 0).

    With m_s (the caller's [2, C, C] 16-bit buffer, held through the doublings) m0 is staged there
    once and Off_s X_s is the product m0 X_s masked to Off_s's blocks afterwards (X_s is block
    diagonal, so on those blocks m0 X_s only meets Off_s). Without it, m_of() forms m0 again after
    the substitution and Off_s is staged for each doubling (16 KiB less SMEM, one more wgmma wait).
    SMEM beside m_s, each phase its own `run_scoped` (the memory is reused): the substitution 24 KiB
    (S, W; 40 KiB with m_diag's own buffer without m_s), the doublings 32 KiB (X_s and the link as
    hi / lo; without m_s Off_s first takes the link's buffer). diagonal="columns": the diagonal blocks
    by `_column_solve` (two padded float32 [C, C] buffers, 36 KiB; GPU only)."""
    sq = (C, C)
    rows, cols = mc.iota(sq, 0), mc.iota(sq, 1)
    if block == 2:  # the 2 x 2 diagonal blocks of (I + m0)^{-1} are I - m0's: no substitution
        x = jnp.where(rows == cols, 1.0, jnp.where(lax.div(rows, 2) == lax.div(cols, 2), -m0, 0.0))
        if m_s is not None:
            _stage(m_s, m0, split)
    elif diagonal == "columns":
        def diagonal_columns(m_pad, x_pad):
            if m_s is not None:
                _stage(m_s, m0, split)
            x = _column_solve(block)(m0, m_pad.at[:, :C], x_pad.at[:, :C])
            return jnp.where(lax.div(rows, block) == lax.div(cols, block), x, 0.0)

        with jax.named_scope("diagonal"):
            pad = plgpu.SMEM((C, C + SOLVE_PAD), f32)
            x = pl.run_scoped(diagonal_columns, pad, pad)
    else:
        def diagonal(a_s, w_s, *b_s):
            return _diagonal_block_inverse(m0, a_s, m_s if m_s is not None else b_s[0], w_s, block=block,
                                           split=split, hold=m_s is not None, step_columns=step_columns)

        with jax.named_scope("diagonal"):
            x = pl.run_scoped(diagonal, mc.smem((1, C, C), dt), plgpu.SMEM((C, C), f32),
                              *([mc.smem((2, C, C), dt)] if m_s is None else []))

    def doubling(xs_s, link_s):
        m = m_of() if m_s is None else None
        y, s = x, block
        while s < C:
            off = (lax.div(rows, 2 * s) == lax.div(cols, 2 * s)) & (lax.div(rows, s) != lax.div(cols, s))
            _stage(xs_s, y, split)
            if m_s is None:
                _stage(link_s, jnp.where(off, m, 0.0), split)  # Off_s
                link = _staged_product(link_s, xs_s, split)
            else:
                link = jnp.where(off, _staged_product(m_s, xs_s, split), 0.0)
            _stage(link_s, link, split)  # Off_s X_s (the product has read Off_s)
            y = y - _staged_product(xs_s, link_s, split)
            s *= 2
        return y

    with jax.named_scope("doubling"):
        return pl.run_scoped(doubling, mc.smem((2, C, C), dt), mc.smem((2, C, C), dt))


def smem_bytes(L, K, V, *, slots, hold_m=True, factors=False, diagonal="rows", inverse16=False):
    """SMEM of one CTA: `slots` copies of the chunk inputs (L key and value tiles, token vectors)
    and the largest phase's buffers (the phases reuse one region); hold_m: m0 staged through the
    inverse (`_inverse`'s m_s); factors: the output factors too (q's tile, three more vectors; at L = 1
    Qe's own tile, at L > 1 the writes' right-hand side's own tile, which Qe then leaves from, and L - 2
    more [C, C] tiles); diagonal: the diagonal blocks' solve (`intra`); inverse16: X saved in 16 bits (its
    own [C, C] tile beside the float32 one)."""
    inputs = L * C * (K + V) * 2 + (2 + 3 + L) * C * 4 + 3 * C * 4
    inputs += (C * K * 2 + 3 * C * 4) if factors else 0
    rhs = C * V * 2 if factors and L > 1 else 0  # one tile, not one per slot
    solve = max(C * C * 2 * 4,  # doubling: X_s and the link as hi / lo
                C * C * 2 + C * C * 4 + (0 if hold_m else C * C * 2 * 2),  # substitution: S, W (float32), m_diag
                2 * C * (C + SOLVE_PAD) * 4 if diagonal == "columns" else 0,  # column solve: m, X (float32)
                (L - 1) * C * C * 2)  # the right-hand side of the writes l >= 1
    solve += C * C * 2 * 2 if hold_m else 0
    # X's scalings, Z; X or the reset correction (float32, counted either way; P and Qe go out from k0's
    # and v0's tiles)
    out = C * C * 2 * (2 + (L > 1) + inverse16) + C * C * 4
    if factors:
        out += C * V * 2 if L == 1 else max(0, L - 2) * C * C * 2
    return slots * inputs + rhs + max(solve, out)


def _fits(L, K, V, slots, hold_m, factors=False, diagonal="rows", inverse16=False):
    """Whether two CTAs fit on an SM."""
    need = smem_bytes(L, K, V, slots=slots, hold_m=hold_m, factors=factors, diagonal=diagonal, inverse16=inverse16)
    return 2 * (need + 1024) <= SMEM_PER_SM


def default_hold_m(L, K, V, factors=False, diagonal="rows", inverse16=False):
    """Hold the staged m0 through the inverse where two one-slot CTAs still fit on an SM."""
    return _fits(L, K, V, 1, True, factors, diagonal, inverse16)


def default_chunks_per_cta(B, H, N, L, K, V, hold_m=True, factors=False, diagonal="rows", inverse16=False):
    """4 or 2 consecutive chunks per CTA (next chunk prefetched into a second SMEM slot) where N
    allows, two such CTAs still fit on an SM, and the grid still puts two CTAs on every SM;
    else 1 (one chunk per CTA, the CTAs sharing an SM overlap each other's loads)."""
    fits = _fits(L, K, V, 2, hold_m, factors, diagonal, inverse16)
    for cpc in (4, 2):
        if fits and N % cpc == 0 and B * H * (N // cpc) >= 2 * SMS:
            return cpc
    return 1


def intra(x: Prepared, tv: mc.TokenVectors, *, save_inverse=True, inverse_dtype=None, block=16, merge_split=True,
          chunks_per_cta=None, chunk_size=C, resets=True, reset_chunks_only=RESET_CHUNKS_ONLY, hold_m=None,
          step_columns=1, diagonal=None, factors=False, scale=None, profile=None, interpret=False):
    """(P [B, Tp, H, K], Qe [B, Tp, H, V] in the input dtype, ainv [B, H, N, C, C] float32 (or
    `inverse_dtype`) or None unless `save_inverse`): `split.intra(x, chunk_size=64)` on Hopper (Mosaic
    GPU); with `factors` two more, the output factors (Qf [B, Tp, H, K], Of [B, Tp, H, V] in the input dtype, as
    `output_factors.output_factors(x, tv, P, Qe, scale=scale)`).

    x: `prepare(..., chunk_size=64)` with bf16 / f16 k, v; tv: `token_vectors(x)`; chunk_size:
    must be 64 (accepted for the Triton kernel's signature).
    block: the inverse's diagonal block size (2, 4, 8, 16 or 32; 2: no substitution, five
    doublings); merge_split: hi/lo 16-bit products in the inverse's doubling (see the module
    docstring). chunks_per_cta: consecutive chunks one CTA
    walks (a divisor of N), the next chunk's tiles loaded by TMA into a second SMEM slot while the
    current one is solved; grid (B, N / chunks_per_cta, H); None: `default_chunks_per_cta`.
    resets: whether the inputs may hold document resets (`prepare(..., segment_ids)`); False drops
    the reset columns' correction of Qe (one product per chunk), which is then wrong where a reset
    falls inside or at the start of a chunk. reset_chunks_only: the correction only in chunks with
    a reset inside or at their first token (a scalar read and `pl.when`; the default), else in
    every chunk.
    hold_m: m0 staged once and held in SMEM through the
    inverse (16 KiB) rather than formed again for the doublings; None: `default_hold_m` (where two
    one-slot CTAs still fit on an SM). step_columns: 1, 2 or 4 columns of the diagonal blocks'
    substitution per dependent step (`_diagonal_block_inverse`; 2 and 4 not yet timed on a GPU).
    diagonal: how the diagonal blocks are solved: "rows" (`_diagonal_block_inverse`: the steps are row
    reductions over W = S m^T's rows) or "columns" (`_column_solve`: a thread per column, one
    multiply-add per dependent step; GPU only); None: `DEFAULT_DIAGONAL` on a GPU, "rows" with interpret.
    factors: also form the chunk outputs' factors Qf = scale (diag(start) q - (q k0^T . T_m1) P) and
    Of = scale (sum_l (q k_l^T . T_0 . beta_l) v_l - (q k0^T . T_m1) Qe) (`output_factors`), which the
    state pass turns into the outputs (`state_pass(factors=...)`): q k0^T joins the P / Qe products, the
    factor products take one more wait (at L > 1 two: q k_l^T for l >= 1 first). At L > 1 the writes'
    right-hand side goes to a tile of its own instead of v_1's (the v_l are read again for Of), and Qe
    leaves from it. scale: the outputs' scale (required with factors).
    inverse_dtype: None (float32) or the inputs' 16-bit dtype: X rounded once in the kernel, for a reader
    that takes it as a 16-bit operand only (the Mosaic chunk backward), instead of float32 X cast by XLA.
    profile: None, or Mosaic GPU's in-kernel profiler settings ({"profile_space": ..., "profile_dir":
    ...}), which time the regions "wait", "rhs", "diagonal", "doubling" and "out" of every chunk
    (`benchmarks/mosaic_diag.py profile --kernel intra`).
    """
    if chunk_size != C:
        raise ValueError(f"mosaic intra: chunk_size = {chunk_size}; only {C} is supported")
    _check(x, tv, block)
    if step_columns not in STEP_COLUMNS:
        raise ValueError(f"mosaic intra: step_columns = {step_columns!r}; supported: {STEP_COLUMNS}")
    if diagonal is None:
        diagonal = "rows" if interpret else DEFAULT_DIAGONAL
    if diagonal not in DIAGONAL_SOLVES:
        raise ValueError(f"mosaic intra: diagonal = {diagonal!r}; supported: {DIAGONAL_SOLVES}")
    if diagonal == "columns" and interpret:
        raise ValueError("mosaic intra: diagonal='columns' is inline Mosaic GPU code, which the interpreter does "
                         "not run; use diagonal='rows' with interpret=True")
    if factors and scale is None:
        raise ValueError("mosaic intra: factors=True needs the outputs' `scale`")
    if inverse_dtype is not None and jnp.dtype(inverse_dtype) not in (jnp.dtype(f32), jnp.dtype(x.k.dtype)):
        raise ValueError(f"mosaic intra: inverse_dtype = {inverse_dtype}; expected None, float32 or k's dtype "
                         f"({x.k.dtype})")
    inverse16 = save_inverse and inverse_dtype is not None and jnp.dtype(inverse_dtype) != jnp.dtype(f32)
    if factors and x.q.dtype != x.k.dtype:
        raise ValueError(f"mosaic intra: q dtype {x.q.dtype} must equal k's ({x.k.dtype}) with factors=True")
    if hold_m is None:
        hold_m = default_hold_m(x.v.shape[-2], x.q.shape[-1], x.v.shape[-1], factors, diagonal, inverse16)
    if chunks_per_cta is None:
        chunks_per_cta = default_chunks_per_cta(x.q.shape[0], x.q.shape[2], x.q.shape[1] // C, x.v.shape[-2],
                                                x.q.shape[-1], x.v.shape[-1], hold_m, factors, diagonal,
                                                inverse16)
    if chunks_per_cta < 1 or (x.q.shape[1] // C) % chunks_per_cta:
        raise ValueError(f"mosaic intra: chunks_per_cta = {chunks_per_cta} must divide the number of chunks "
                         f"N = {x.q.shape[1] // C}")
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    N = Tp // C
    dt = x.k.dtype
    sq = (C, C)

    slots = 2 if chunks_per_cta > 1 else 1
    need = smem_bytes(L, K, V, slots=slots, hold_m=hold_m, factors=factors, diagonal=diagonal, inverse16=inverse16)
    if need > SMEM_PER_SM - 1024:
        raise ValueError(f"mosaic intra: chunks_per_cta = {chunks_per_cta}, hold_m = {hold_m} at L = {L}, K = {K}, "
                         f"V = {V} needs {need // 1024} KiB of SMEM; the H200 has 227 KiB per CTA: use "
                         "chunks_per_cta = 1 or hold_m = False")
    # float32 vectors per slot loaded as ROWS / as COLS; int32 rows (the factors add G, start, r rows)
    n_rows, n_cols, n_irows = 2 + 2 * factors, 3 + L, 1 + factors

    def body(k_ref, v_ref, g_ref, gm1_ref, r_ref, rm1_ref, sm1_ref, beta_ref, *refs, k_s, v_s, vr_s, vc_s, ir_s,
             ic_s, bar, q_s=None, rhs_s=None):
        refs = list(refs)
        q_ref, start_ref = (refs.pop(0), refs.pop(0)) if factors else (None, None)
        p_ref, qe_ref = refs.pop(0), refs.pop(0)
        ainv_ref = [refs.pop(0)] if save_inverse else []
        qf_ref, of_ref = (refs.pop(0), refs.pop(0)) if factors else (None, None)
        b, nb, h = lax.axis_index("b"), lax.axis_index("n"), lax.axis_index("h")

        def issue(j, slot):  # the TMA loads of this CTA's chunk j into `slot`
            rows = pl.ds((nb * chunks_per_cta + j) * C, C)
            copy = lambda src, dst: plgpu.copy_gmem_to_smem(src, dst, bar.at[slot])
            for l in range(L):
                copy(k_ref.at[b, rows, h, l], k_s.at[slot * L + l])
                copy(v_ref.at[b, rows, h, l], v_s.at[slot * L + l])
                copy(beta_ref.at[b, h, l, rows], vc_s.at[slot * n_cols + 3 + l])
            copy(gm1_ref.at[b, h, rows], vr_s.at[slot * n_rows])
            copy(beta_ref.at[b, h, 0, rows], vr_s.at[slot * n_rows + 1])
            copy(gm1_ref.at[b, h, rows], vc_s.at[slot * n_cols])
            copy(g_ref.at[b, h, rows], vc_s.at[slot * n_cols + 1])
            copy(sm1_ref.at[b, h, rows], vc_s.at[slot * n_cols + 2])
            copy(rm1_ref.at[b, rows], ir_s.at[slot * n_irows])
            copy(rm1_ref.at[b, rows], ic_s.at[slot * 2])
            copy(r_ref.at[b, rows], ic_s.at[slot * 2 + 1])
            if factors:
                copy(q_ref.at[b, rows, h], q_s.at[slot])
                copy(g_ref.at[b, h, rows], vr_s.at[slot * n_rows + 2])
                copy(start_ref.at[b, h, rows], vr_s.at[slot * n_rows + 3])
                copy(r_ref.at[b, rows], ir_s.at[slot * n_irows + 1])

        def chunk(j, slot):
            n = nb * chunks_per_cta + j
            rows = pl.ds(n * C, C)
            k_l = lambda l: k_s.at[slot * L + l]
            v_l = lambda l: v_s.at[slot * L + l]
            # The vectors are loaded from SMEM where they are used (a COLS vector takes 16 registers
            # per thread): nothing but the tiles in use stays live across the inverse.
            load_r = lambda buf, i: plgpu.load(buf.at[i], layout=mc.ROWS)
            load_c = lambda buf, i: plgpu.load(buf.at[i], layout=mc.COLS)
            gm1_r, beta0_r = (lambda: load_r(vr_s, slot * n_rows)), (lambda: load_r(vr_s, slot * n_rows + 1))
            gm1_c, g_c, start_m1_c = ((lambda i=i: load_c(vc_s, slot * n_cols + i)) for i in range(3))
            beta_c = lambda l: load_c(vc_s, slot * n_cols + 3 + l)
            rm1_r = lambda: load_r(ir_s, slot * n_irows)
            rm1_c, r_c = (lambda: load_c(ic_s, slot * 2)), (lambda: load_c(ic_s, slot * 2 + 1))
            lower = lambda: mc.iota(sq, 0) > mc.iota(sq, 1)
            same = lambda: mc.rows_of(rm1_r(), sq) == mc.cols_of(rm1_c(), sq)
            m1_0 = lambda: mc.decay_matrix(gm1_r(), rm1_r(), g_c(), r_c(), sq, strict=True)
            m0_of = lambda kk: jnp.where(lower() & same(), kk * mc.rows_of(beta0_r(), sq), 0.0)

            def solve_phase(*m_s):
                """X0, with the right-hand side of the writes l >= 1 in v_1's tile."""
                kks = _matmuls([(k_l(0), k_l(l).T) for l in range(L)], sq)  # issued back to back
                if L > 1:  # sum_{l >= 1} (k0 k_l^T . m1_0 . beta_l) v_l into v_1's tile (not read again) or,
                    # with factors (Of reads every v_l), into its own
                    def rhs_phase(prod_s):
                        decay = m1_0()
                        for l in range(1, L):
                            prod_s.at[l - 1][...] = (kks[l] * decay * mc.cols_of(beta_c(l), sq)).astype(dt)
                        plgpu.commit_smem()
                        _to_smem(rhs_s if factors else v_l(1),
                                 _matmul_sum([(prod_s.at[l - 1], v_l(l)) for l in range(1, L)], (C, V)))

                    with jax.named_scope("rhs"):
                        pl.run_scoped(rhs_phase, mc.smem((L - 1, C, C), dt))
                return _inverse(m0_of(kks[0]), dt, block=block, split=merge_split, m_s=m_s[0] if hold_m else None,
                                m_of=lambda: m0_of(mc.matmul(k_l(0), k_l(0).T, sq)), step_columns=step_columns,
                                diagonal=diagonal)

            x0 = pl.run_scoped(solve_phase, *([mc.smem((2, C, C), dt)] if hold_m else []))

            def out_phase(xp_s, z_s, *more):  # P, Qe and (save_inverse) X: their TMA stores in flight at once
                more = list(more)
                xi_s = more.pop() if inverse16 else None  # X's 16-bit tile
                qe_o = more.pop(0) if factors and L == 1 else None  # Qe's own tile: v_0 is read again for Of
                xb_s = more.pop(0) if L > 1 else None
                w_more = [more.pop(0) for _ in range(L - 2)] if factors else []  # Of's [C, C] tiles l >= 2
                z = -x0  # (I - X0) off the diagonal
                if resets:  # + X0 D0: the write columns of reset tokens, which m0 masks (module docstring)
                    def correction():
                        with jax.named_scope("resets"):
                            kk = mc.matmul(k_l(0), k_l(0).T, sq)
                            new = (lower() & (mc.rows_of(rm1_r(), sq) == mc.cols_of(r_c(), sq))
                                   & (mc.rows_of(rm1_r(), sq) != mc.cols_of(rm1_c(), sq)))
                            z_s[...] = jnp.where(new, kk * mc.rows_of(beta0_r(), sq), 0.0).astype(dt)
                            _to_smem(xp_s, x0)
                            return mc.matmul(xp_s, z_s, sq)  # the product has read both

                    if reset_chunks_only:  # only a chunk with a reset inside or at its first token has D0 != 0
                        corr_s = more[0]  # X's buffer, written after
                        has_reset = ic_s[slot * 2 + 1, C - 1] != ic_s[slot * 2, 0]

                        @pl.when(has_reset)
                        def _correction():
                            corr_s[...] = correction()

                        @pl.when(jnp.logical_not(has_reset))
                        def _no_correction():
                            corr_s[...] = x0 * 0.0

                        z = plgpu.load(corr_s, layout=mc.WGMMA) + z  # each thread reads what it wrote
                    else:
                        z = correction() + z
                x = x0 * mc.decay_matrix(gm1_r(), rm1_r(), gm1_c(), rm1_c(), sq, strict=False)
                xp_s[...] = (x * mc.cols_of(beta_c(0) * start_m1_c(), sq)).astype(dt)
                z_s[...] = (z * m1_0() * mc.cols_of(beta_c(0), sq)).astype(dt)
                if L > 1:
                    xb_s[...] = (x * mc.cols_of(beta_c(0), sq)).astype(dt)
                plgpu.commit_smem()

                def products(p_acc, qe_acc, *qk_acc):
                    plgpu.wgmma(p_acc, xp_s, k_l(0))
                    plgpu.wgmma(qe_acc, z_s, v_l(0))
                    if L > 1:
                        plgpu.wgmma(qe_acc, xb_s, rhs_s if factors else v_l(1))
                    if factors:
                        plgpu.wgmma(qk_acc[0], q_s.at[slot], k_l(0).T)
                    return (p_acc[...], qe_acc[...], *(acc[...] for acc in qk_acc))

                accs = [plgpu.ACC((C, K), f32), plgpu.ACC((C, V), f32)] + ([plgpu.ACC(sq, f32)] if factors else [])
                p, qe, *qk = lax.optimization_barrier(pl.run_scoped(products, *accs))
                qe_s = (rhs_s if L > 1 else qe_o) if factors else v_l(0)
                _to_smem(qe_s, qe)  # the products have read v_0 and k_0
                plgpu.copy_smem_to_gmem(qe_s, qe_ref.at[b, rows, h])
                _to_smem(k_l(0), p)
                plgpu.copy_smem_to_gmem(k_l(0), p_ref.at[b, rows, h])
                if save_inverse:
                    x_s = xi_s if inverse16 else more[0]
                    _to_smem(x_s, x)
                    plgpu.copy_smem_to_gmem(x_s, ainv_ref[0].at[b, h, n])
                if factors:
                    with jax.named_scope("factors"):
                        output_factors_phase(qk[0], [xp_s, z_s] + ([xb_s] if L > 1 else []) + w_more, qe_s)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # before the region and the slot are reused

            def output_factors_phase(qk, bufs, qe_s):
                """Qf and Of (`intra`'s docstring) from q k0^T and the P, Qe just staged (k_0's tile, qe_s);
                bufs: L + 1 free [C, C] buffers (a, then w_l per write). Qf leaves from q's tile, Of from v_0's."""
                a_s, w_s = bufs[0], bufs[1:]
                qks = [qk] + (_matmuls([(q_s.at[slot], k_l(l).T) for l in range(1, L)], sq) if L > 1 else [])
                g_r, start_r = load_r(vr_s, slot * n_rows + 2), load_r(vr_s, slot * n_rows + 3)
                r_r = load_r(ir_s, slot * n_irows + 1)
                a_s[...] = (-(qk * mc.decay_matrix(g_r, r_r, gm1_c(), rm1_c(), sq, strict=False))).astype(dt)
                t0 = mc.decay_matrix(g_r, r_r, g_c(), r_c(), sq, strict=False)
                for l in range(L):
                    w_s[l][...] = (qks[l] * t0 * mc.cols_of(beta_c(l), sq)).astype(dt)
                plgpu.commit_smem()

                def factor_products(qf_acc, of_acc):  # -(q k0^T . T_m1) P; sum_l (...) v_l - (q k0^T . T_m1) Qe
                    plgpu.wgmma(qf_acc, a_s, k_l(0))
                    for l in range(L):
                        plgpu.wgmma(of_acc, w_s[l], v_l(l))
                    plgpu.wgmma(of_acc, a_s, qe_s)
                    return qf_acc[...], of_acc[...]

                qf, of = lax.optimization_barrier(pl.run_scoped(factor_products, plgpu.ACC((C, K), f32),
                                                                plgpu.ACC((C, V), f32)))
                q_rows = plgpu.load(q_s.at[slot], layout=mc.WGMMA).astype(f32)
                _to_smem(q_s.at[slot], scale * (mc.rows_of(start_r, (C, K)) * q_rows + qf))
                plgpu.copy_smem_to_gmem(q_s.at[slot], qf_ref.at[b, rows, h])
                _to_smem(v_l(0), scale * of)
                plgpu.copy_smem_to_gmem(v_l(0), of_ref.at[b, rows, h])

            with jax.named_scope("out"):
                pl.run_scoped(out_phase, mc.smem((C, C), dt), mc.smem((C, C), dt),
                              *([mc.smem((C, V), dt)] if factors and L == 1 else []),
                              *([mc.smem((C, C), dt)] if L > 1 else []),
                              *([mc.smem((C, C), dt) for _ in range(L - 2)] if factors else []),
                              *([mc.smem((C, C), f32)] if (save_inverse and not inverse16) or resets else []),
                              *([mc.smem((C, C), dt)] if inverse16 else []))

        issue(0, 0)
        if chunks_per_cta == 1:
            with jax.named_scope("wait"):
                plgpu.barrier_wait(bar.at[0])
            chunk(0, 0)
        else:
            @pl.loop(0, chunks_per_cta)
            def _walk(j):
                slot = lax.rem(j, 2)
                with jax.named_scope("wait"):
                    plgpu.barrier_wait(bar.at[slot])

                @pl.when(j + 1 < chunks_per_cta)
                def _prefetch():  # the other slot's last readers (chunk j - 1) are done
                    plgpu.commit_smem()
                    issue(j + 1, 1 - slot)

                chunk(j, slot)

        plgpu.wait_smem_to_gmem(0)

    scratch = dict(
        k_s=mc.smem((slots * L, C, K), dt), v_s=mc.smem((slots * L, C, V), dt),
        vr_s=plgpu.SMEM((slots * n_rows, C), f32), vc_s=plgpu.SMEM((slots * n_cols, C), f32),
        ir_s=plgpu.SMEM((slots * n_irows, C), jnp.int32), ic_s=plgpu.SMEM((slots * 2, C), jnp.int32),
        bar=plgpu.Barrier(num_arrivals=3 * L + 8 + 4 * factors, num_barriers=slots))
    if factors:
        scratch.update(q_s=mc.smem((slots, C, K), dt))
    if factors and L > 1:
        scratch.update(rhs_s=mc.smem((C, V), dt))
    out_type = [jax.ShapeDtypeStruct((B, Tp, H, K), dt), jax.ShapeDtypeStruct((B, Tp, H, V), dt)]
    if save_inverse:
        out_type.append(jax.ShapeDtypeStruct((B, H, N, C, C), dt if inverse16 else f32))
    if factors:
        out_type += [jax.ShapeDtypeStruct((B, Tp, H, K), dt), jax.ShapeDtypeStruct((B, Tp, H, V), dt)]
    outs = mc.kernel(body, name="prism_intra_mosaic", out_type=tuple(out_type), scratch=scratch,
                     grid=(B, N // chunks_per_cta, H), grid_names=("b", "n", "h"), profile=profile,
                     interpret=interpret)(
        x.k, x.v, tv.G, tv.Gm1, tv.r, tv.rm1, tv.start_m1, tv.beta, *((x.q, tv.start) if factors else ()))
    result = (outs[0], outs[1], (outs[2] if save_inverse else None))
    return result + tuple(outs[-2:]) if factors else result
