"""Mosaic GPU intra-chunk kernel: the triangular solve of each 64-token chunk, P and Qe.

Drop-in for `pallas_kernels.gpu.split.intra` at chunk_size = 64 with 16-bit inputs. Per chunk
(prism-math.md section 3, `pallas_kernels.common.chunk_solve`):

    m  = diag(beta0) (k0 k0^T . m1m1)     strictly lower, m1m1[t, i] = exp(Gm1_t - Gm1_i), same segment
    X  = (I + m)^{-1}
    P  = X diag(beta0 start_m1) k0                                              [C, K]
    Qe = X diag(beta0) sum_l (k0 k_l^T . m1_0) (beta_l v_l)                      [C, V]

One CTA (one warpgroup) walks `chunks_per_cta` consecutive chunks of one (batch, head): grid
(B, N / chunks_per_cta, H). Per chunk:
- TMA brings the chunk's L key tiles [C, K], L value tiles [C, V] and its token vectors (from
  `token_vectors`, head-major float32) into SMEM, all on one barrier. With chunks_per_cta > 1 the
  inputs have two slots and the next chunk's loads are issued when a chunk starts, so they run
  while it is solved. The vectors are loaded into registers where they are used (a COLS vector is
  16 registers per thread), and m is formed twice (one k0 k0^T wgmma each) rather than kept live
  across the substitution: the fewer tiles live, the fewer spills.
- Qe's right-hand side first (it does not need X): the L products k0 k_l^T issued back to back,
  scaled by m1_0 and beta_l, staged, summed against v_l in one accumulator, and stored in the SMEM
  tile of v_0 (v is not read again).
- The inverse, blocked as `common.blocked_unit_lower_inverse`:
  1. the `block` x `block` diagonal blocks (default 16) by `block - 1` steps of column
     substitution, all blocks at once (`_diagonal_block_inverse`): each step reads one row of
     W = S m^T (formed once by a hi + lo pair of wgmma products, staged in float32 SMEM), so the
     dependent chain is a row reduction within a quad of lanes and a select per step; block 2
     takes the 2 x 2 blocks directly (I - m's) with no substitution;
  2. doubling to 2 * block, ..., 64: X <- X - X (Off X), two dependent products per doubling, each
     operand staged once in SMEM (Off and X, then the link into Off's buffer while X stays as the
     A operand); `merge_split=True` (default) multiplies 16-bit high parts and low remainders
     (three wgmma issued back to back into one accumulator), float32-accurate to ~2e-5; with False
     one 16-bit product (~5e-4 on random chunks, ~1e-2 on adversarial ones: P then 1e-2 to 3e-2
     off float64, so it is not the default).
- Qe = (X diag(beta0)) rhs and P = (X diag(beta0 start_m1)) k0 by wgmma, X's scaled columns rounded
  to the input dtype as the Triton kernel rounds its operands; Qe, P (input dtype) and X (float32,
  `save_inverse`) go back by TMA with the three stores in flight together, one wait at the end.
- SMEM: the inputs (slots x (L C (K + V) 16-bit + vectors)) and one region shared by the phases
  (each its own `run_scoped`): substitution 40 KiB, doublings 32 KiB, right-hand side L C^2
  16-bit, outputs 40 KiB (`smem_bytes`). At K = V = 128: one slot 74 KiB at L = 1 (three CTAs per
  SM), 106 KiB at L = 2 (two); two slots 108 KiB at L = 1 (two), 173 KiB at L = 2 (one).
  `chunks_per_cta=None` takes 4 or 2 where two CTAs with two slots still fit on an SM and the grid
  still has two CTAs per SM, else 1 (`default_chunks_per_cta`); SMEM beyond 227 KiB is rejected.
  There is no gate-free variant (X0 = (I + m0)^{-1} of the decay-free m0, X = X0 . exp(Gm1_t -
  Gm1_i)): it is the same number of dependent steps here, since m's decay is one exp per entry.

Measured in the interpreter (CPU) against the float64 chunk math: X to ~1e-6 (random chunks) and
~2e-5 (beta = 1, nearly parallel keys); P and Qe to 3e-3 / 5e-3, the same as the Triton kernel at
chunk 64 (on the adversarial chunk both are 2e-3 / 4.6e-2 off float64: Qe's rows cancel after the
bf16 rounding of its operands).

Expected cost per chunk (block 16, L = 2, hi/lo doubling): 11 wgmma waits (~20 wgmma of
64 x 64 x {64, 128}: ~5 MFLOP, noise), ~10 SMEM staging commits, 15 substitution steps of ~200
instructions per thread, one TMA load wait and one TMA store wait, ~100 KiB of HBM traffic. The
phase-1 kernel took ~60 us per CTA on the H200 (1.9 ms for 8 K chunks at two CTAs per SM), far
above this count: register spills and the number of separate phases (three TMA store waits, m,
kk and 7 vectors live across the inverse) are the suspects this version removes. Worth sweeping
on the device: `block` in {2, 4, 8, 16, 32} (substitution steps against doublings),
`chunks_per_cta` in {1, 2, 4}, `merge_split` False (half the doubling work, less accurate).
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
SMS = 132  # H200 streaming multiprocessors
SMEM_PER_SM = 228 * 1024  # shared memory of one SM; each resident CTA also reserves 1 KiB
MAX_WRITES = 4  # L: the L key and value tiles and L staged products stay in SMEM


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


def _diagonal_block_inverse(m, a_s, b_s, w_s, *, block):
    """The inverses of the `block` x `block` diagonal blocks of I + m (strictly lower m [C, C]
    float32 registers), zero elsewhere, by column substitution on all blocks at once.

    Column j = blk * block + c of X = (I + m)^{-1} is e_j - sum_{i > j} X[:, i] m[i, j] (from
    X (I + m) = I), for c = block - 1 down to 0. Step c reads, for each i, w_c[i] = m[i, blk(i) *
    block + c] along columns: the rows of W = S m_diag^T with S[c, j] = [j % block == c], one
    hi + lo pair of 16-bit wgmma products (S is exact in 16 bits), staged in the float32 SMEM
    buffer w_s and read back row by row. The dependent chain is then a row reduction (within a
    quad of lanes) and a select per step, with no cross-warp reduction."""
    sq = (C, C)
    rows, cols = mc.iota(sq, 0), mc.iota(sq, 1)
    same_block = lax.div(rows, block) == lax.div(cols, block)
    a_s.at[0][...] = jnp.where(lax.rem(cols, block) == rows, 1.0, 0.0).astype(a_s.dtype)
    _stage(b_s, jnp.where(same_block, m, 0.0), True)
    _to_smem(w_s, _matmul_sum([(a_s.at[0], b_s.at[0].T), (a_s.at[0], b_s.at[1].T)], sq))
    x = jnp.where(rows == cols, 1.0, 0.0).astype(f32)
    for c in range(block - 2, -1, -1):  # the last column of each block is e_j
        w = plgpu.load(w_s.at[c], layout=mc.COLS)
        contrib = jnp.sum(x * mc.cols_of(w, sq), axis=1)
        x = x - jnp.where(same_block & (lax.rem(cols, block) == c), mc.rows_of(contrib, sq), 0.0)
    return x


def _inverse(m_of, dt, *, block, split):
    """(I + m)^{-1} [C, C] float32 for strictly lower m = m_of() (float32 registers, formed once for
    the substitution and once for the doublings, so that it is not live across the substitution;
    16-bit operand dtype dt): diagonal blocks by substitution, then doubling
    X_2s = X_s - X_s (Off_s X_s) (exact: Off_s X_s Off_s = 0).

    SMEM: each phase is its own `run_scoped` (the memory is reused): the substitution 40 KiB, the
    doublings two [2, C, C] 16-bit buffers (32 KiB): Off_s into a_s and X_s into b_s, then the
    link Off_s X_s into a_s while X_s stays in b_s as the A operand of X_s (Off_s X_s)."""
    sq = (C, C)
    if block == 2:  # the 2 x 2 diagonal blocks of (I + m)^{-1} are I - m's: no substitution
        rows, cols = mc.iota(sq, 0), mc.iota(sq, 1)
        x = jnp.where(rows == cols, 1.0, jnp.where(lax.div(rows, 2) == lax.div(cols, 2), -m_of(), 0.0))
    else:
        with jax.named_scope("diagonal"):
            x = pl.run_scoped(lambda a_s, b_s, w_s: _diagonal_block_inverse(m_of(), a_s, b_s, w_s, block=block),
                              mc.smem((1, C, C), dt), mc.smem((2, C, C), dt), plgpu.SMEM((C, C), f32))

    def doubling(a_s, b_s):
        rows, cols = mc.iota(sq, 0), mc.iota(sq, 1)
        m = m_of()
        y, s = x, block
        while s < C:
            off = (lax.div(rows, 2 * s) == lax.div(cols, 2 * s)) & (lax.div(rows, s) != lax.div(cols, s))
            a_s.at[0][...] = jnp.where(off, m, 0.0).astype(dt)  # Off_s
            if split:
                a_s.at[1][...] = jnp.where(off, m - m.astype(dt).astype(f32), 0.0).astype(dt)
            _stage(b_s, y, split)  # one commit for both
            link = _staged_product(a_s, b_s, split)  # Off_s X_s
            _stage(a_s, link, split)  # the product has read a_s
            y = y - _staged_product(b_s, a_s, split)
            s *= 2
        return y

    with jax.named_scope("doubling"):
        return pl.run_scoped(doubling, mc.smem((2, C, C), dt), mc.smem((2, C, C), dt))


def smem_bytes(L, K, V, *, slots, save_inverse=True):
    """SMEM of one CTA: `slots` copies of the chunk inputs (L key and value tiles, token vectors)
    and the largest phase's staging buffers (the phases reuse one region)."""
    inputs = L * C * (K + V) * 2 + (2 + 3 + L) * C * 4 + 3 * C * 4
    phases = max(C * C * 2 * 3 + C * C * 4,  # substitution: S, m_diag hi / lo, W (float32)
                 C * C * 2 * 4,  # doubling: Off_s and X_s (then the link) as hi / lo
                 L * C * C * 2,  # Qe's right-hand side (into v_0's tile)
                 C * C * 2 + C * K * 2 + (C * C * 4 if save_inverse else 0))  # Qe (in v_0's tile), P and X
    return slots * inputs + phases


def default_chunks_per_cta(B, H, N, L, K, V, save_inverse=True):
    """4 or 2 consecutive chunks per CTA (next chunk prefetched into a second SMEM slot) where N
    allows, two such CTAs still fit on an SM, and the grid still puts two CTAs on every SM;
    else 1 (one chunk per CTA, the CTAs sharing an SM overlap each other's loads)."""
    fits = 2 * (smem_bytes(L, K, V, slots=2, save_inverse=save_inverse) + 1024) <= SMEM_PER_SM
    for cpc in (4, 2):
        if fits and N % cpc == 0 and B * H * (N // cpc) >= 2 * SMS:
            return cpc
    return 1


def _masked_exp(keep, diff):
    return jnp.where(keep, jnp.exp(jnp.where(keep, diff, 0.0)), 0.0)


def intra(x: Prepared, tv: mc.TokenVectors, *, save_inverse=True, block=16, merge_split=True,
          chunks_per_cta=None, chunk_size=C, profile=None, interpret=False):
    """(P [B, Tp, H, K], Qe [B, Tp, H, V] in the input dtype, ainv [B, H, N, C, C] float32 or None
    unless `save_inverse`): `split.intra(x, chunk_size=64)` on Hopper (Mosaic GPU).

    x: `prepare(..., chunk_size=64)` with bf16 / f16 k, v; tv: `token_vectors(x)`; chunk_size:
    must be 64 (accepted for the Triton kernel's signature).
    block: the inverse's diagonal block size (2, 4, 8, 16 or 32; 2: no substitution, five doublings); merge_split: hi/lo 16-bit products in
    the inverse's doubling (see the module docstring). chunks_per_cta: consecutive chunks one CTA
    walks (a divisor of N), the next chunk's tiles loaded by TMA into a second SMEM slot while the
    current one is solved; grid (B, N / chunks_per_cta, H); None: `default_chunks_per_cta`.
    profile: None, or Mosaic GPU's in-kernel profiler settings ({"profile_space": ..., "profile_dir":
    ...}), which time the regions "wait", "rhs", "diagonal", "doubling" and "out" of every chunk
    (`benchmarks/mosaic_diag.py profile --kernel intra`).
    """
    if chunk_size != C:
        raise ValueError(f"mosaic intra: chunk_size = {chunk_size}; only {C} is supported")
    _check(x, tv, block)
    if chunks_per_cta is None:
        chunks_per_cta = default_chunks_per_cta(x.q.shape[0], x.q.shape[2], x.q.shape[1] // C, x.v.shape[-2],
                                                x.q.shape[-1], x.v.shape[-1], save_inverse)
    if chunks_per_cta < 1 or (x.q.shape[1] // C) % chunks_per_cta:
        raise ValueError(f"mosaic intra: chunks_per_cta = {chunks_per_cta} must divide the number of chunks "
                         f"N = {x.q.shape[1] // C}")
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    N = Tp // C
    dt = x.k.dtype
    sq = (C, C)

    slots = 2 if chunks_per_cta > 1 else 1
    if smem_bytes(L, K, V, slots=slots, save_inverse=save_inverse) > SMEM_PER_SM - 1024:
        raise ValueError(f"mosaic intra: chunks_per_cta = {chunks_per_cta} at L = {L}, K = {K}, V = {V} needs "
                         f"{smem_bytes(L, K, V, slots=slots, save_inverse=save_inverse) // 1024} KiB of SMEM "
                         "(two input slots); the H200 has 227 KiB per CTA: use chunks_per_cta = 1")
    n_rows, n_cols = 2, 3 + L  # float32 vectors per slot loaded as ROWS / as COLS

    def body(k_ref, v_ref, g_ref, gm1_ref, r_ref, rm1_ref, sm1_ref, beta_ref, p_ref, qe_ref, *ainv_ref, k_s, v_s,
             vr_s, vc_s, ir_s, ic_s, bar):
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
            copy(rm1_ref.at[b, rows], ir_s.at[slot])
            copy(rm1_ref.at[b, rows], ic_s.at[slot * 2])
            copy(r_ref.at[b, rows], ic_s.at[slot * 2 + 1])

        def chunk(j, slot):
            n = nb * chunks_per_cta + j
            rows = pl.ds(n * C, C)
            k_l = lambda l: k_s.at[slot * L + l]
            # The vectors are loaded from SMEM where they are used (a COLS vector takes 16 registers
            # per thread): nothing but the tiles in use stays live across the inverse.
            load_r = lambda buf, i: plgpu.load(buf.at[i], layout=mc.ROWS)
            load_c = lambda buf, i: plgpu.load(buf.at[i], layout=mc.COLS)
            gm1_r, beta0_r = (lambda: load_r(vr_s, slot * n_rows)), (lambda: load_r(vr_s, slot * n_rows + 1))
            gm1_c, g_c, start_m1_c = ((lambda i=i: load_c(vc_s, slot * n_cols + i)) for i in range(3))
            beta_c = lambda l: load_c(vc_s, slot * n_cols + 3 + l)
            rm1_r = lambda: load_r(ir_s, slot)
            rm1_c, r_c = (lambda: load_c(ic_s, slot * 2)), (lambda: load_c(ic_s, slot * 2 + 1))

            def m_of():  # beta0_t (k0 k0^T)_ti exp(Gm1_t - Gm1_i) on i < t, same segment
                ri, ci = mc.iota(sq, 0), mc.iota(sq, 1)
                lower = (ri > ci) & (mc.rows_of(rm1_r(), sq) == mc.cols_of(rm1_c(), sq))
                kk = mc.matmul(k_l(0), k_l(0).T, sq)
                gm1_diff = mc.rows_of(gm1_r(), sq) - mc.cols_of(gm1_c(), sq)
                return jnp.where(lower, kk * mc.rows_of(beta0_r(), sq) * _masked_exp(lower, gm1_diff), 0.0)

            # Qe's right-hand side sum_l (k0 k_l^T . m1_0 . beta_l) v_l, m1_0 = exp(Gm1_t - G_i) on
            # i < t, first (it does not need X), into the SMEM tile of v_0 (v is not read after it).
            # Each phase's staging buffers live in their own `run_scoped` (SMEM is reused across them).
            v0 = v_s.at[slot * L]

            def rhs_phase(prod_s):
                kks = _matmuls([(k_l(0), k_l(l).T) for l in range(L)], sq)  # issued back to back
                m1_0 = mc.decay_matrix(gm1_r(), rm1_r(), g_c(), r_c(), sq, strict=True)
                for l in range(L):
                    prod_s.at[l][...] = (kks[l] * m1_0 * mc.cols_of(beta_c(l), sq)).astype(dt)
                plgpu.commit_smem()
                rhs = _matmul_sum([(prod_s.at[l], v_s.at[slot * L + l]) for l in range(L)], (C, V))
                _to_smem(v0, rhs)  # the products have read v

            with jax.named_scope("rhs"):
                pl.run_scoped(rhs_phase, mc.smem((L, C, C), dt))

            xinv = _inverse(m_of, dt, block=block, split=merge_split)

            def out_phase(xs_s, p_s, *x_s):  # Qe, P and (save_inverse) X: their TMA stores in flight at once
                _to_smem(xs_s, xinv * mc.cols_of(beta_c(0), sq))
                _to_smem(v0, mc.matmul(xs_s, v0, (C, V)))  # Qe (the product has read v0 and xs_s)
                plgpu.copy_smem_to_gmem(v0, qe_ref.at[b, rows, h])
                _to_smem(xs_s, xinv * mc.cols_of(beta_c(0) * start_m1_c(), sq))
                _to_smem(p_s, mc.matmul(xs_s, k_l(0), (C, K)))
                plgpu.copy_smem_to_gmem(p_s, p_ref.at[b, rows, h])
                if save_inverse:
                    _to_smem(x_s[0], xinv)
                    plgpu.copy_smem_to_gmem(x_s[0], ainv_ref[0].at[b, h, n])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # before the region (and v0) is reused

            with jax.named_scope("out"):
                pl.run_scoped(out_phase, mc.smem((C, C), dt), mc.smem((C, K), dt),
                              *([mc.smem((C, C), f32)] if save_inverse else []))

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
        ir_s=plgpu.SMEM((slots, C), jnp.int32), ic_s=plgpu.SMEM((slots * 2, C), jnp.int32),
        bar=plgpu.Barrier(num_arrivals=3 * L + 8, num_barriers=slots))
    out_type = [jax.ShapeDtypeStruct((B, Tp, H, K), dt), jax.ShapeDtypeStruct((B, Tp, H, V), dt)]
    if save_inverse:
        out_type.append(jax.ShapeDtypeStruct((B, H, N, C, C), f32))
    outs = mc.kernel(body, name="prism_intra_mosaic", out_type=tuple(out_type), scratch=scratch,
                     grid=(B, N // chunks_per_cta, H), grid_names=("b", "n", "h"), profile=profile,
                     interpret=interpret)(
        x.k, x.v, tv.G, tv.Gm1, tv.r, tv.rm1, tv.start_m1, tv.beta)
    return outs[0], outs[1], (outs[2] if save_inverse else None)
