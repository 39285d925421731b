"""Pieces shared by the kernels: input preparation, the in-kernel chunk math, block checks.

The chunk math here is written once on plain `jnp` values so that the GPU (Triton-lowered) kernel,
the TPU (Mosaic) kernel and the interpret-mode runs on CPU all execute the same lines. It follows
`prism_jax/ops/prism/chunk.py` (prism-math.md section 3) term for term:

    (I + M) E = D S_0 + R            E: erased rows [C, V] of one chunk
    o   = diag(e^G) q S_0 - (q k0^T . T_m1) E + sum_l (q k_l^T . T_0) (b_l v_l)
    S_C = e^{G_C} S_0 - (e^{G_C - G_{i-1}} k0)^T E + sum_l (e^{G_C - G_i} k_l)^T (b_l v_l)

Document resets are carried by an int32 count of resets up to each token (`r`) and the count before
it (`rm1`); a decay factor between two tokens is zero unless their counts match (masked before
exponentiating, never a log-decay of -inf).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from prism_jax.ops.prism.common import resets_from_segments


class Prepared(NamedTuple):
    """Inputs padded to a whole number of chunks, in the caller's layout.

    q [B, Tp, H, K], k [B, Tp, H, L, K], v [B, Tp, H, L, V], beta [B, Tp, H, L] (input dtypes);
    g [B, Tp, H] float32 with the log-decay zeroed at resets; r, rm1 [B, Tp] int32 reset counts up to
    and before each token; s0 [B, H, K, V] float32.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    beta: jax.Array
    g: jax.Array
    r: jax.Array
    rm1: jax.Array
    s0: jax.Array


def prepare(q, k, v, beta, g, initial_state, segment_ids, chunk_size) -> Prepared:
    """Pads T up to a multiple of `chunk_size` with identity steps (beta = 0, g = 0, v = 0)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    resets = resets_from_segments(segment_ids, B, T)
    r = jnp.cumsum(resets.astype(jnp.int32), axis=1)
    rm1 = r - resets.astype(jnp.int32)
    g = jnp.where(resets[:, :, None], 0.0, g.astype(jnp.float32))
    pad = -T % chunk_size
    if pad:
        padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, beta, g = map(padt, (q, k, v, beta, g))
        r = jnp.pad(r, [(0, 0), (0, pad)], mode="edge")
        rm1 = jnp.pad(rm1, [(0, 0), (0, pad)], mode="edge")
        rm1 = rm1.at[:, T:].set(r[:, T:])
    s0 = (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    return Prepared(q, k, v, beta, g, r, rm1, s0)


def _masked_exp(diff, mask):
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def unit_lower_inverse(m):
    """(I + m)^{-1} for a strictly lower-triangular m [C, C], by forward substitution over rows.

    Exact in the working precision (no power series); only elementwise ops and row reductions, so it
    lowers to Triton and Mosaic alike.
    """
    C = m.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    eye = (rows == cols).astype(jnp.float32)

    def body(i, x):
        m_row = jnp.sum(jnp.where(rows == i, m, 0.0), axis=0)  # m[i, :], indexed by column j
        contrib = jnp.sum(m_row[:, None] * x, axis=0)  # sum_j m[i, j] x[j, :]
        return x - jnp.where(rows == i, contrib[None, :], 0.0)

    return jax.lax.fori_loop(1, C, body, eye)


class ChunkDecays(NamedTuple):
    m1m1: jax.Array  # [C, C] exp(G_{t-1} - G_{i-1}), i < t
    m1_0: jax.Array  # [C, C] exp(G_{t-1} - G_i), i < t
    t_m1: jax.Array  # [C, C] exp(G_t - G_{i-1}), i <= t
    t_0: jax.Array  # [C, C] exp(G_t - G_i), i <= t
    start_m1: jax.Array  # [C] exp(G_{t-1})
    start: jax.Array  # [C] exp(G_t)
    end_m1: jax.Array  # [C] exp(G_C - G_{i-1})
    end: jax.Array  # [C] exp(G_C - G_i)
    all: jax.Array  # [] exp(G_C)


def masked_cumsum(g):
    """Inclusive cumulative sum of g [C] as a masked row reduction: its transpose is a reduction
    too (a reverse cumsum need not lower to Triton)."""
    C = g.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    return jnp.sum(jnp.where(cols <= rows, g[None, :], 0.0), axis=1)


def chunk_decays(g, r, rm1, *, cumsum=jnp.cumsum) -> ChunkDecays:
    """Decay factors of one chunk; g [C] float32, r / rm1 [C] int32 reset counts (up to / before t)."""
    C = g.shape[0]
    G = cumsum(g)
    Gm1 = G - g
    GC = jnp.sum(g)
    r_prev = jnp.min(rm1)  # counts are non-decreasing: the count before the chunk
    rC = jnp.max(r)
    rows = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    strict, incl = cols < rows, cols <= rows

    def pair(ga, ra, gb, rb, causal):
        return _masked_exp(ga[:, None] - gb[None, :], causal & (ra[:, None] == rb[None, :]))

    f32 = lambda b: b.astype(jnp.float32)
    return ChunkDecays(
        m1m1=pair(Gm1, rm1, Gm1, rm1, strict),
        m1_0=pair(Gm1, rm1, G, r, strict),
        t_m1=pair(G, r, Gm1, rm1, incl),
        t_0=pair(G, r, G, r, incl),
        start_m1=jnp.exp(Gm1) * f32(rm1 == r_prev),
        start=jnp.exp(G) * f32(r == r_prev),
        end_m1=jnp.exp(GC - Gm1) * f32(rm1 == rC),
        end=jnp.exp(GC - G) * f32(r == rC),
        all=jnp.exp(GC) * f32(rC == r_prev),
    )


def mm(a, b, *, dtype, trans_a=False, trans_b=False):
    """2-D matmul with operands cast to `dtype` (bf16 -> tensor cores) and float32 accumulation.

    float32 operands ask for full precision (IEEE in Triton, no TF32 in XLA)."""
    dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), dims, precision=precision,
                               preferred_element_type=jnp.float32)


def chunk_step(s, q, k0, ks, vws, beta0, d: ChunkDecays, *, mm_dtype, inverse=unit_lower_inverse,
               matmul=None):
    """One chunk for one head and one block of value columns.

    s [K, BV] float32 start state; q, k0 [C, K]; ks: L write keys [C, K]; vws: L gated write values
    b_l v_l [C, BV] (float32); beta0 [C]. `inverse(m)` gives (I + m)^{-1} for strictly lower m;
    `matmul` (default `mm`) the 2-D products.
    Returns (o [C, BV] unscaled, end state [K, BV]).
    """
    matmul = mm if matmul is None else matmul
    dot = lambda a, b, **kw: matmul(a, b, dtype=mm_dtype, **kw)
    kk = dot(k0, k0, trans_b=True)
    a_inv = inverse(beta0[:, None] * kk * d.m1m1)
    rhs = dot((beta0 * d.start_m1)[:, None] * k0, s)
    qk = dot(q, k0, trans_b=True) * d.t_m1
    o = d.start[:, None] * dot(q, s)
    s_new = d.all * s
    for kl, vwl in zip(ks, vws):
        rhs = rhs + beta0[:, None] * dot(dot(k0, kl, trans_b=True) * d.m1_0, vwl)
        o = o + dot(dot(q, kl, trans_b=True) * d.t_0, vwl)
        s_new = s_new + dot(d.end[:, None] * kl, vwl, trans_a=True)
    e = dot(a_inv, rhs)
    o = o - dot(qk, e)
    s_new = s_new - dot(d.end_m1[:, None] * k0, e, trans_a=True)
    return o, s_new


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _mm_diff(a, b, dtype, trans_a, trans_b):
    return mm(a, b, dtype=dtype, trans_a=trans_a, trans_b=trans_b)


def _mm_diff_fwd(a, b, dtype, trans_a, trans_b):
    return _mm_diff(a, b, dtype, trans_a, trans_b), (a, b)


def _mm_diff_bwd(dtype, trans_a, trans_b, res, ct):
    a, b = res
    dot = functools.partial(mm, dtype=dtype)
    # out = op(a) op(b); d op(a) = ct op(b)^T, d op(b) = op(a)^T ct, each transposed back if op is.
    da = dot(b, ct, trans_a=trans_b, trans_b=True) if trans_a else dot(ct, b, trans_b=not trans_b)
    db = dot(ct, a, trans_a=True, trans_b=trans_a) if trans_b else dot(a, ct, trans_a=not trans_a)
    return da.astype(a.dtype), db.astype(b.dtype)


_mm_diff.defvjp(_mm_diff_fwd, _mm_diff_bwd)


def mm_diff(a, b, *, dtype, trans_a=False, trans_b=False):
    """`mm` whose pull-back is two more `mm`s with the cotangent cast to `dtype` (bf16 operands, f32
    accumulation: what a kernel's backward does), never a mixed-dtype dot."""
    return _mm_diff(a, b, dtype, trans_a, trans_b)


def _inverse_pullback(x, dx, mm_dtype):
    """X = (I + m)^{-1} for strictly lower m  =>  dm = -(X^T dX X^T) on the strictly lower part."""
    C = x.shape[0]
    strict = (jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
              < jax.lax.broadcasted_iota(jnp.int32, (C, C), 0))
    xt_dx = mm(x, dx, dtype=mm_dtype, trans_a=True)
    return jnp.where(strict, -mm(xt_dx, x, dtype=mm_dtype, trans_b=True), 0.0)


def differentiable_inverse(mm_dtype):
    """`unit_lower_inverse` with a matmul-only pull-back (the substitution loop is not differentiated)."""

    @jax.custom_vjp
    def inverse(m):
        return unit_lower_inverse(m)

    def fwd(m):
        x = unit_lower_inverse(m)
        return x, x

    inverse.defvjp(fwd, lambda x, dx: (_inverse_pullback(x, dx, mm_dtype),))
    return inverse


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _saved_inverse(m, saved, mm_dtype):
    return saved


_saved_inverse.defvjp(lambda m, saved, mm_dtype: (saved, saved),
                      lambda mm_dtype, x, dx: (_inverse_pullback(x, dx, mm_dtype), jnp.zeros_like(x)))


def saved_inverse(saved, mm_dtype):
    """An `inverse(m)` that returns `saved` = (I + m)^{-1} (computed by the forward kernel from the
    same inputs) with the matmul-only pull-back: no substitution loop in the backward."""
    return lambda m: _saved_inverse(m, saved, mm_dtype)


def matmul_dtype(dtype):
    """bf16 / f16 inputs use their own dtype on the matrix units; everything else float32 (IEEE)."""
    return dtype if dtype in (jnp.bfloat16, jnp.float16) else jnp.float32


class EndDecays(NamedTuple):
    end_m1: jax.Array  # [C] exp(G_C - G_{i-1})
    end: jax.Array  # [C] exp(G_C - G_i)
    all: jax.Array  # [] exp(G_C)


def chunk_end_decays(g, r, rm1) -> EndDecays:
    """The decay factors the state pass needs (no C x C work)."""
    G = jnp.cumsum(g)
    GC = jnp.sum(g)
    rC = jnp.max(r)
    f32 = lambda b: b.astype(jnp.float32)
    return EndDecays(
        end_m1=jnp.exp(GC - (G - g)) * f32(rm1 == rC),
        end=jnp.exp(GC - G) * f32(r == rC),
        all=jnp.exp(GC) * f32(rC == jnp.min(rm1)),
    )


def chunk_solve(k0, ks, vws, beta0, d: ChunkDecays, *, mm_dtype, inverse=unit_lower_inverse):
    """The start-state-free part of one chunk: E = P S_0 + Qe with P [C, K] and Qe [C, V].

    k0 [C, K]; ks: L write keys [C, K]; vws: L gated write values [C, V] float32; beta0 [C].
    Returns (P, Qe, A^{-1} [C, C]); the backward reuses A^{-1}.
    """
    dot = lambda a, b, **kw: mm(a, b, dtype=mm_dtype, **kw)
    a_inv = inverse(beta0[:, None] * dot(k0, k0, trans_b=True) * d.m1m1)
    p = dot(a_inv, (beta0 * d.start_m1)[:, None] * k0.astype(jnp.float32))
    rhs = sum(dot(dot(k0, kl, trans_b=True) * d.m1_0, vwl) for kl, vwl in zip(ks, vws))
    return p, dot(a_inv, beta0[:, None] * rhs), a_inv


def chunk_state_update(s, p, qe, k0, ks, vws, d: EndDecays, *, mm_dtype):
    """End state [K, BV] of one chunk from its start state s [K, BV] and (P [C, K], Qe [C, BV])."""
    dot = lambda a, b, **kw: mm(a, b, dtype=mm_dtype, **kw)
    e = dot(p, s) + qe
    s_new = d.all * s - dot(d.end_m1[:, None] * k0.astype(jnp.float32), e, trans_a=True)
    for kl, vwl in zip(ks, vws):
        s_new = s_new + dot(d.end[:, None] * kl.astype(jnp.float32), vwl, trans_a=True)
    return s_new


def chunk_output(s, p, qe, q, k0, ks, vws, d: ChunkDecays, *, mm_dtype):
    """Unscaled outputs [C, BV] of one chunk from its start state s [K, BV] and (P, Qe)."""
    dot = lambda a, b, **kw: mm(a, b, dtype=mm_dtype, **kw)
    e = dot(p, s) + qe
    o = d.start[:, None] * dot(q, s) - dot(dot(q, k0, trans_b=True) * d.t_m1, e)
    for kl, vwl in zip(ks, vws):
        o = o + dot(dot(q, kl, trans_b=True) * d.t_0, vwl)
    return o


def triton_params(interpret, num_warps, num_stages=None):
    """Triton compiler parameters of a GPU kernel (None in interpret mode); num_stages default 1."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages or 1)


def call_chunk_backward(kernel, args, *, name, grid, parts, q, k, v, params, interpret):
    """The pallas_call of a per-chunk backward kernel whose programs each cover part of the value
    columns: dq [B, Tp, H, K], dk [B, Tp, H, L, K], dbeta [B, Tp, H, L], dg [B, Tp, H] come back as
    `parts` float32 partial sums (summed here), dv in v's dtype whole. Returns (dq, dk, dv, dbeta, dg)."""
    B, Tp, H, K = q.shape
    L = k.shape[3]
    part = lambda *shape: jax.ShapeDtypeStruct((parts, *shape), jnp.float32)
    dq, dk, dv, dbeta, dg = pl.pallas_call(
        kernel, grid=grid, compiler_params=params, interpret=interpret, name=name,
        out_shape=(part(B, Tp, H, K), part(B, Tp, H, L, K), jax.ShapeDtypeStruct(v.shape, v.dtype),
                   part(B, Tp, H, L), part(B, Tp, H)),
    )(*args)
    return dq.sum(0), dk.sum(0), dv, dbeta.sum(0), dg.sum(0)


def blocked_unit_lower_inverse(m, block=16):
    """(I + m)^{-1} for a strictly lower-triangular m [C, C], the substitution cut to `block` rows.

    1. The block x block diagonal blocks, all at once: `block - 1` row steps of forward substitution
       (each step does row i of every block; the same masked reductions as `unit_lower_inverse`).
    2. Doubling: with X_s = (I + D_s)^{-1} (D_s: m's block-diagonal part at size s) and Off the part
       of m in the lower-left s-block of each 2s-block, X_2s = X_s - X_s Off X_s (exact: Off X_s Off
       = 0), two float32 (IEEE) C x C matmuls per doubling.
    C / block must be a power of two. The dependent chain is block - 1 + 2 log2(C / block) steps
    instead of C - 1.
    """
    C = m.shape[0]
    block = min(block, C)
    if C % block or (C // block) & (C // block - 1):
        raise ValueError(f"blocked_unit_lower_inverse: C = {C} must be `block` = {block} times a power of two")
    rows = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    same_block = rows // block == cols // block
    m_diag = jnp.where(same_block, m, 0.0)
    x = (rows == cols).astype(jnp.float32)

    def body(i, x):
        step_rows = same_block & (rows % block == i)  # row i of every diagonal block
        # For column j the one row of j's block that steps now: m[blk(j) * block + i, j].
        m_row = jnp.sum(jnp.where(step_rows, m_diag, 0.0), axis=0)
        # x is block diagonal, so column c sums over j in blk(c): the value for row blk(c) * block + i.
        contrib = jnp.sum(m_row[:, None] * x, axis=0)
        return x - jnp.where(step_rows, contrib[None, :], 0.0)

    x = jax.lax.fori_loop(1, block, body, x)
    s = block
    while s < C:
        off = jnp.where((rows // (2 * s) == cols // (2 * s)) & (rows // s != cols // s), m, 0.0)
        x = x - mm(mm(x, off, dtype=jnp.float32), x, dtype=jnp.float32)
        s *= 2
    return x


def lower_inverse(name):
    """The `inverse(m)` of a forward kernel by name: "rows" (`unit_lower_inverse`), "blocked"
    (`blocked_unit_lower_inverse`, 16-row blocks) or "blocked8" (8-row blocks)."""
    if name == "rows":
        return unit_lower_inverse
    if name in ("blocked", "blocked8"):
        return functools.partial(blocked_unit_lower_inverse, block=8 if name == "blocked8" else 16)
    raise ValueError(f"inverse is {name!r}, expected 'rows', 'blocked' or 'blocked8'")
