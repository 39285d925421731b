"""Chunkwise forward for TPU: Pallas Mosaic TPU, state in VMEM scratch across a sequential chunk axis.

Grid (B*H "parallel", N "arbitrary"). One grid step = one chunk of one head: the intra-chunk work
(key products, the triangular solve, the L write terms), the chunk's outputs, its start state
(saved for the backward) and the state update, all from VMEM tiles; the state [K, V] float32 lives
in a VMEM scratch buffer between steps. Inputs are moved to head-major layouts first so that each
block's last two dims are (chunk, feature).

Per-token scalars are 2-D columns and the triangular inverse doubles solved diagonal blocks
(`tpu/common.py`). Same algebra as `pallas_kernels.common` (GPU) and as the plain-JAX reference
`prism_jax.ops.prism.chunk.prism_chunk`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import Prepared, matmul_dtype, mm
from pallas_kernels.tpu.common import (Specs, decays, grid_operands, heads_last, right_hand_side,
                                       unit_lower_inverse)

f32 = jnp.float32


def _kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, r_ref, rm1_ref, s0_ref, o_ref, *refs, n_writes, scale, mm_dtype,
            save_starts):
    starts_ref, ainv_ref, final_ref, s_scr = refs if save_starts else (None, None, *refs)
    n = pl.program_id(1)

    @pl.when(n == 0)
    def _():
        s_scr[...] = s0_ref[...]

    dot = functools.partial(mm, dtype=mm_dtype)
    s = s_scr[...]
    if save_starts:
        starts_ref[...] = s
    d = decays(g_ref[...], r_ref[...], rm1_ref[...])
    q = q_ref[...]
    ks = [k_ref[l] for l in range(n_writes)]
    betas = [beta_ref[:, l:l + 1].astype(f32) for l in range(n_writes)]  # [C, 1] columns
    vws = [betas[l] * v_ref[l].astype(f32) for l in range(n_writes)]
    k0, beta0 = ks[0], betas[0]

    qk_raw, kk_raw, rhs = right_hand_side(q, ks, vws, beta0, dot(k0, s), d, dot)
    a_inv = unit_lower_inverse(beta0 * kk_raw[0] * d["m1m1"])
    if save_starts:
        ainv_ref[...] = a_inv.astype(ainv_ref.dtype)
    o = d["start"] * dot(q, s)
    s_new = d["all"] * s
    for l, (kl, vwl) in enumerate(zip(ks, vws)):
        o = o + dot(qk_raw[l] * d["t_0"], vwl)
        s_new = s_new + dot(d["end"] * kl.astype(f32), vwl, trans_a=True)
    e = dot(a_inv, rhs)
    o = o - dot(qk_raw[0] * d["t_m1"], e)
    s_new = s_new - dot(d["end_m1"] * k0.astype(f32), e, trans_a=True)
    o_ref[...] = (scale * o).astype(o_ref.dtype)
    s_scr[...] = s_new

    @pl.when(n == pl.num_programs(1) - 1)
    def _():
        final_ref[...] = s_new


def forward(x: Prepared, *, scale, chunk_size, block_v=None, save_starts=True, interpret=False):
    """Returns (o [B, Tp, H, V] in v's dtype, final [B, H, K, V] f32, starts [B, H, N, K, V] f32, ainv
    [B, H, N, C, C]): the chunks' start states and (I + m)^{-1} in the matmul dtype (the backward
    multiplies by it in that dtype), or None for both without `save_starts` (a forward that is not
    differentiated writes neither).

    block_v is accepted for a common signature and ignored (a step holds all V columns)."""
    del block_v
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    C, N, BH = chunk_size, Tp // chunk_size, B * H
    mm_dtype = matmul_dtype(x.q.dtype)
    sp = Specs(C, L, K, V, chunk=lambda n: n)
    saved = [(sp.chunk_state(), jax.ShapeDtypeStruct((BH, N, K, V), f32)),
             (sp.chunk_square(), jax.ShapeDtypeStruct((BH, N, C, C), mm_dtype))] if save_starts else []
    o, *saved_out, final = pl.pallas_call(
        functools.partial(_kernel, n_writes=L, scale=scale, mm_dtype=mm_dtype, save_starts=save_starts),
        grid=(BH, N),
        in_specs=[sp.tok(K), sp.writes(K), sp.writes(V), sp.tok(L), sp.tok(1), sp.tok(1), sp.tok(1), sp.state()],
        out_specs=[sp.tok(V), *(spec for spec, _ in saved), sp.state()],
        out_shape=(jax.ShapeDtypeStruct((BH, Tp, V), x.v.dtype), *(shape for _, shape in saved),
                   jax.ShapeDtypeStruct((BH, K, V), f32)),
        scratch_shapes=[pltpu.VMEM((K, V), f32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="prism_fwd_tpu",
    )(*grid_operands(x).values(), x.s0.reshape(BH, K, V))
    starts, ainv = ((saved_out[0].reshape(B, H, N, K, V), saved_out[1].reshape(B, H, N, C, C)) if save_starts
                    else (None, None))
    return heads_last(o, B, H), final.reshape(B, H, K, V), starts, ainv
