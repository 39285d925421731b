"""Chunkwise forward for TPU: Pallas Mosaic TPU, state in VMEM scratch across a sequential chunk axis.

Grid (B*H "parallel", N "arbitrary"). One grid step = one chunk of one head: the intra-chunk work
(key products, the triangular solve, the L write terms), the chunk's outputs, its start state
(saved for the backward) and the state update, all from VMEM tiles; the state [K, V] float32 lives
in a VMEM scratch buffer between steps. Inputs are moved to head-major layouts first so that each
block's last two dims are (chunk, feature).

Mosaic works on 2-D vregs, so per-token scalars are kept as columns [C, 1] and rows [1, C] (a row is
made from a column by a masked sublane sum), and the triangular solve is forward substitution
where each step is one masked matmul. Same algebra as `pallas_kernels.common` (GPU) and as the
plain-JAX reference `prism_jax.ops.prism.chunk.prism_chunk`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import Prepared, matmul_dtype, mm

f32 = jnp.float32


def _iotas(C):
    return (jax.lax.broadcasted_iota(jnp.int32, (C, C), 0),
            jax.lax.broadcasted_iota(jnp.int32, (C, C), 1))


def _to_row(col, rows, cols):
    """[C, 1] -> [1, C] without a transpose."""
    return jnp.sum(jnp.where(rows == cols, col, 0.0), axis=0, keepdims=True)


def _masked_exp(diff, mask):
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def _decays(g, r, rm1):
    """g, r, rm1: [C, 1] float32 columns (r, rm1: reset counts). Returns a dict of decay factors:
    [C, C] matrices, [C, 1] columns and [1, 1] scalars (see pallas_kernels.common.ChunkDecays)."""
    C = g.shape[0]
    rows, cols = _iotas(C)
    g_row = _to_row(g, rows, cols)
    G = jnp.sum(jnp.where(cols <= rows, g_row, 0.0), axis=1, keepdims=True)  # [C, 1] cumsum
    Gm1 = G - g
    G_row, Gm1_row = _to_row(G, rows, cols), _to_row(Gm1, rows, cols)
    r_row, rm1_row = _to_row(r, rows, cols), _to_row(rm1, rows, cols)
    GC = jnp.sum(g, axis=0, keepdims=True)  # [1, 1]
    r_prev = jnp.min(rm1, axis=0, keepdims=True)
    rC = jnp.max(r, axis=0, keepdims=True)
    strict, incl = cols < rows, cols <= rows
    same = lambda a, b: (a == b).astype(f32)
    return dict(
        m1m1=_masked_exp(Gm1 - Gm1_row, strict & (rm1 == rm1_row)),
        m1_0=_masked_exp(Gm1 - G_row, strict & (rm1 == r_row)),
        t_m1=_masked_exp(G - Gm1_row, incl & (r == rm1_row)),
        t_0=_masked_exp(G - G_row, incl & (r == r_row)),
        start_m1=jnp.exp(Gm1) * same(rm1, r_prev),
        start=jnp.exp(G) * same(r, r_prev),
        end_m1=jnp.exp(GC - Gm1) * same(rm1, rC),
        end=jnp.exp(GC - G) * same(r, rC),
        all=jnp.exp(GC) * same(rC, r_prev),
    )


def _unit_lower_inverse(m):
    """(I + m)^{-1}, m [C, C] strictly lower: forward substitution, one masked matmul per row."""
    C = m.shape[0]
    rows, cols = _iotas(C)
    eye = (rows == cols).astype(f32)

    def body(i, x):  # row i of m @ x, the only nonzero row, is subtracted from row i of x
        return x - mm(jnp.where(rows == i, m, 0.0), x, dtype=f32)

    return jax.lax.fori_loop(1, C, body, eye)


def _kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, r_ref, rm1_ref, s0_ref, o_ref, starts_ref,
            final_ref, s_scr, *, n_writes, scale, mm_dtype):
    n = pl.program_id(1)

    @pl.when(n == 0)
    def _():
        s_scr[...] = s0_ref[...]

    dot = functools.partial(mm, dtype=mm_dtype)
    s = s_scr[...]
    starts_ref[...] = s
    d = _decays(g_ref[...], r_ref[...], rm1_ref[...])
    q = q_ref[...]
    ks = [k_ref[l] for l in range(n_writes)]
    betas = [beta_ref[:, l:l + 1].astype(f32) for l in range(n_writes)]  # [C, 1] columns
    vws = [betas[l] * v_ref[l].astype(f32) for l in range(n_writes)]
    k0, beta0 = ks[0], betas[0]

    a_inv = _unit_lower_inverse(beta0 * dot(k0, k0, trans_b=True) * d["m1m1"])
    rhs = dot(beta0 * d["start_m1"] * k0.astype(f32), s)
    o = d["start"] * dot(q, s)
    s_new = d["all"] * s
    for kl, vwl in zip(ks, vws):
        rhs = rhs + beta0 * dot(dot(k0, kl, trans_b=True) * d["m1_0"], vwl)
        o = o + dot(dot(q, kl, trans_b=True) * d["t_0"], vwl)
        s_new = s_new + dot(d["end"] * kl.astype(f32), vwl, trans_a=True)
    e = dot(a_inv, rhs)
    o = o - dot(dot(q, k0, trans_b=True) * d["t_m1"], e)
    s_new = s_new - dot(d["end_m1"] * k0.astype(f32), e, trans_a=True)
    o_ref[...] = (scale * o).astype(o_ref.dtype)
    s_scr[...] = s_new

    @pl.when(n == pl.num_programs(1) - 1)
    def _():
        final_ref[...] = s_new


def forward(x: Prepared, *, scale, chunk_size, block_v=None, interpret=False):
    """Returns (o [B, Tp, H, V] in v's dtype, final [B, H, K, V] f32, starts [B, H, N, K, V] f32).

    block_v is accepted for a common signature and ignored (a step holds all V columns)."""
    del block_v
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    C, N, BH = chunk_size, Tp // chunk_size, B * H
    heads_first = lambda t: jnp.moveaxis(t, 2, 1).reshape(BH, *t.shape[1:2], *t.shape[3:])
    q = heads_first(x.q)  # [BH, Tp, K]
    k = jnp.moveaxis(heads_first(x.k), 2, 1)  # [BH, L, Tp, K]
    v = jnp.moveaxis(heads_first(x.v), 2, 1)  # [BH, L, Tp, V]
    beta = heads_first(x.beta)  # [BH, Tp, L]
    g = heads_first(x.g[..., None])  # [BH, Tp, 1]
    per_head = lambda t: jnp.broadcast_to(t[:, None, :, None].astype(f32), (B, H, Tp, 1)).reshape(BH, Tp, 1)
    r, rm1 = per_head(x.r), per_head(x.rm1)
    s0 = x.s0.reshape(BH, K, V)

    tok = lambda width: pl.BlockSpec((None, C, width), lambda i, n: (i, n, 0))
    writes = lambda width: pl.BlockSpec((None, L, C, width), lambda i, n: (i, 0, n, 0))
    state = pl.BlockSpec((None, K, V), lambda i, n: (i, 0, 0))
    o, starts, final = pl.pallas_call(
        functools.partial(_kernel, n_writes=L, scale=scale, mm_dtype=matmul_dtype(x.q.dtype)),
        grid=(BH, N),
        in_specs=[tok(K), writes(K), writes(V), tok(L), tok(1), tok(1), tok(1), state],
        out_specs=[tok(V), pl.BlockSpec((None, None, K, V), lambda i, n: (i, n, 0, 0)), state],
        out_shape=(jax.ShapeDtypeStruct((BH, Tp, V), x.v.dtype),
                   jax.ShapeDtypeStruct((BH, N, K, V), f32),
                   jax.ShapeDtypeStruct((BH, K, V), f32)),
        scratch_shapes=[pltpu.VMEM((K, V), f32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="prism_fwd_tpu",
    )(q, k, v, beta, g, r, rm1, s0)
    o = jnp.moveaxis(o.reshape(B, H, Tp, V), 1, 2)
    return o, final.reshape(B, H, K, V), starts.reshape(B, H, N, K, V)
