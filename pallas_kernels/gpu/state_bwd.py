"""Reverse state-gradient pass of the backward as one Pallas (Triton-lowered) kernel.

For chunks n = N-1 .. 0, with X the cotangent of chunk n's end state (X = dfinal for the last):

    cot_end[n] = X;    X <- Y_n + a_n X - P_n^T (ek_n X)

Grid (B*H, V/block_v); X [K, block_v] stays in float32 registers. Plain-JAX reference beside it:
the `lax.scan` in `pallas_kernels.backward.reverse_scan`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import mm, triton_params


def _kernel(p_ref, ek_ref, a_ref, y_ref, dfinal_ref, cot_ref, ds0_ref, *, heads, block_v, n_chunks,
            mm_dtype):
    bh, vb = pl.program_id(0), pl.program_id(1)
    b, h = bh // heads, bh % heads
    vs = pl.ds(vb * block_v, block_v)
    dot = functools.partial(mm, dtype=mm_dtype)

    def body(i, xs):
        n = n_chunks - 1 - i
        cot_ref[b, h, n, :, vs] = xs
        a = a_ref[b, h, pl.ds(n, 1)]  # [1]
        ekx = dot(ek_ref[b, h, n], xs)
        return y_ref[b, h, n, :, vs] + a[:, None] * xs - dot(p_ref[b, h, n], ekx, trans_a=True)

    ds0_ref[b, h, :, vs] = jax.lax.fori_loop(0, n_chunks, body, dfinal_ref[b, h, :, vs])


def reverse_pass(p, ek, a, y, dfinal, *, block_v=None, num_warps=None, mm_dtype=jnp.float32,
                 interpret=False):
    """p, ek [B, H, N, C, K]; a [B, H, N]; y [B, H, N, K, V]; dfinal [B, H, K, V] (all float32).
    mm_dtype: operand dtype of the two products per step (float32: IEEE; bf16 as the forward's state
    pass, X stays float32 between steps).

    block_v: value columns per program; None = the forward state pass's rule (`split.state_block_v`:
    64, fewer while there are under 2 programs per SM, as at long T with a small batch).

    Returns (cot_end [B, H, N, K, V], ds0 [B, H, K, V])."""
    from pallas_kernels.gpu.split import state_block_v

    B, H, N, K, V = y.shape
    block_v = state_block_v(B, H, V) if block_v is None else block_v
    params = triton_params(interpret, num_warps or 4)
    return pl.pallas_call(
        functools.partial(_kernel, heads=H, block_v=block_v, n_chunks=N, mm_dtype=mm_dtype),
        grid=(B * H, V // block_v), compiler_params=params, interpret=interpret,
        name="prism_state_bwd",
        out_shape=(jax.ShapeDtypeStruct(y.shape, jnp.float32),
                   jax.ShapeDtypeStruct(dfinal.shape, jnp.float32)),
    )(p, ek, a, y, dfinal)
