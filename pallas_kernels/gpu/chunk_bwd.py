"""Fused per-chunk backward as one Pallas (Triton-lowered) kernel.

Grid (B*H, N, V/block_v): every program owns one chunk of one head and a block of value columns.
It loads the chunk inputs, the chunk's saved start state S_n [K, block_v], the output cotangent
do_n [C, block_v] and the cotangent of the chunk's end state X_{n+1} [K, block_v] (from the reverse
state pass) and pulls (do_n, X_{n+1}) back through the chunk map with `jax.vjp` of the same chunk
math the forward runs (`common.chunk_step`), traced inside the kernel body. For that trace to lower
to Triton, the pieces whose transposes would not are given matmul-only rules:

    products      `common.mm_diff`: pull-back = two bf16 / f32 dots, never a mixed-dtype dot;
    (I + m)^{-1}  the forward's saved inverse (`common.saved_inverse`; recomputed by
                  `common.differentiable_inverse` where the forward kept none), pull-back
                  dm = -(X^T dX X^T) on the strict lower part;
    cumsum of g   `common.masked_cumsum` (a masked row sum, its transpose a column sum);
    reset counts  closed over (integers carry no gradient).

dq, dk, dbeta, dg of one chunk get a contribution from every value block: the kernel writes them
per block and XLA sums the blocks; dv is the block's own. Plain-JAX reference beside it: the
`jax.vjp` of `_one_chunk` in `pallas_kernels/backward.py` (bwd="xla").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jax.extend.core as jcore
from jax.experimental import pallas as pl

from pallas_kernels.common import (call_chunk_backward, chunk_decays, chunk_step, differentiable_inverse,
                                   masked_cumsum, mm_diff, saved_inverse, triton_params)

f32 = jnp.float32


def _eval_inlined(jaxpr, consts, *args):
    """Evaluates a jaxpr with every custom_vjp / custom_jvp / jit call replaced by its body.

    `jax.vjp` keeps the primal of a custom_vjp function as a `custom_vjp_call`, which the Triton
    lowering lacks; evaluating the body instead is exact (nothing here differentiates it again)."""
    env = {}
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        inner = eqn.params.get("call_jaxpr", eqn.params.get("jaxpr"))
        if eqn.primitive.name in _INLINED and isinstance(inner, jcore.ClosedJaxpr):
            outs = _eval_inlined(inner.jaxpr, inner.consts, *invals)
        else:
            outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


_INLINED = ("custom_vjp_call", "custom_jvp_call", "pjit", "jit", "closed_call")


def chunk_vjp(q, ks, vls, betas, g, r, rm1, s, do, x, a_inv=None, *, scale, mm_dtype, cumsum=masked_cumsum):
    """Cotangents of one chunk's inputs (plain `jnp` on values; the kernel body runs it).

    q [C, K]; ks: L keys [C, K]; vls: L values [C, BV]; betas: L gates [C]; g [C] (all float32);
    r, rm1 [C] int32; s [K, BV] start state; do [C, BV]; x [K, BV] end-state cotangent; a_inv
    [C, C] the chunk's (I + m)^{-1} saved by the forward, or None (solved again here).
    `cumsum` of g: `masked_cumsum` (its transpose lowers to Triton; tests pass `jnp.cumsum`).
    Returns (dq [C, K], dks L x [C, K], dvs L x [C, BV], dbetas L x [C], dg [C]), float32.
    """
    def chunk(q, ks, vls, betas, g, *, r, rm1, s, a_inv):
        inverse = (differentiable_inverse(mm_dtype) if a_inv is None
                   else saved_inverse(a_inv, mm_dtype))
        d = chunk_decays(g, r, rm1, cumsum=cumsum)
        vws = [b[:, None] * v for b, v in zip(betas, vls)]
        o, s_new = chunk_step(s, q, ks[0], ks, vws, betas[0], d, mm_dtype=mm_dtype, inverse=inverse,
                              matmul=mm_diff)
        return scale * o, s_new

    def pullback(q, ks, vls, betas, g, r, rm1, s, do, x, a_inv):
        f = functools.partial(chunk, r=r, rm1=rm1, s=s, a_inv=a_inv)
        return jax.vjp(f, q, ks, vls, betas, g)[1]((do, x))

    args = (q, ks, vls, betas, g, r, rm1, s, do, x, a_inv)
    closed, out_tree = jax.make_jaxpr(pullback, return_shape=True)(*args)
    flat = _eval_inlined(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_tree), flat)


def _kernel(*refs, heads, n_writes, chunk, block_v, scale, mm_dtype, has_ainv):
    (q_ref, k_ref, v_ref, beta_ref, g_ref, r_ref, rm1_ref, starts_ref, do_ref, cot_ref), refs = refs[:10], refs[10:]
    ainv_ref, refs = (refs[0], refs[1:]) if has_ainv else (None, refs)
    dq_ref, dk_ref, dv_ref, dbeta_ref, dg_ref = refs
    bh, n, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = bh // heads, bh % heads
    ts, vs = pl.ds(n * chunk, chunk), pl.ds(vb * block_v, block_v)
    L = range(n_writes)
    dq, dks, dvs, dbetas, dg = chunk_vjp(
        q_ref[b, ts, h, :].astype(f32),
        [k_ref[b, ts, h, l, :].astype(f32) for l in L],
        [v_ref[b, ts, h, l, vs].astype(f32) for l in L],
        [beta_ref[b, ts, h, l].astype(f32) for l in L],
        g_ref[b, ts, h], r_ref[b, ts], rm1_ref[b, ts],
        starts_ref[b, h, n, :, vs], do_ref[b, ts, h, vs].astype(f32), cot_ref[b, h, n, :, vs],
        None if ainv_ref is None else ainv_ref[b, h, n], scale=scale, mm_dtype=mm_dtype)
    dq_ref[vb, b, ts, h, :] = dq
    dg_ref[vb, b, ts, h] = dg
    for l in L:
        dk_ref[vb, b, ts, h, l, :] = dks[l]
        dbeta_ref[vb, b, ts, h, l] = dbetas[l]
        dv_ref[b, ts, h, l, vs] = dvs[l].astype(dv_ref.dtype)


def chunk_backward(q, k, v, beta, g, r, rm1, starts, do, cot_end, *, scale, chunk_size, ainv=None,
                   block_v=None, num_warps=None, num_stages=None, interpret=False):
    """Input cotangents of every chunk, all chunks in parallel.

    q [B, Tp, H, K], k [B, Tp, H, L, K], v [B, Tp, H, L, V], beta [B, Tp, H, L] (input dtypes);
    g [B, Tp, H] f32; r, rm1 [B, Tp] int32; starts, cot_end [B, H, N, K, V] f32 (start states and
    end-state cotangents per chunk); do [B, Tp, H, V]; ainv [B, H, N, C, C] f32 the chunks'
    (I + m)^{-1} saved by the forward, or None (the kernel solves again).
    Returns (dq, dk, dbeta, dg) float32 and dv in v's dtype, shaped like the inputs.
    """
    from pallas_kernels.common import matmul_dtype

    B, Tp, H, K = q.shape
    L, V = v.shape[-2:]
    block_v = min(V, 32) if block_v is None else block_v  # H200 sweep: 32 x 8 warps fastest
    nv, N = V // block_v, Tp // chunk_size
    kernel = functools.partial(_kernel, heads=H, n_writes=L, chunk=chunk_size, block_v=block_v,
                               scale=scale, mm_dtype=matmul_dtype(q.dtype), has_ainv=ainv is not None)
    return call_chunk_backward(
        kernel, (q, k, v, beta, g, r, rm1, starts, do, cot_end, *([] if ainv is None else [ainv])),
        name="prism_chunk_bwd", grid=(B * H, N, nv), parts=nv, q=q, k=k, v=v,
        params=triton_params(interpret, num_warps or 8, num_stages), interpret=interpret)
