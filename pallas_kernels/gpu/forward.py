"""Fused chunkwise forward kernel, Pallas with the Triton lowering (GPU; interpret mode on CPU).

Grid: (B * H, V / block_v). Each program owns one head and a block of value columns and walks the
chunks of its sequence in order, carrying the state [K, block_v] in float32 registers. Per chunk it
does all the intra-chunk work (key products, the triangular solve, the L write terms), writes that
chunk's outputs and its start state (kept for the backward pass), and updates the state. No
per-token intermediate leaves the kernel. The solve is repeated for each value block; with
V = block_v there is no repetition.

Plain-JAX reference beside it: `prism_jax.ops.prism.chunk.prism_chunk` (same algebra, XLA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import Prepared, chunk_decays, chunk_step, lower_inverse, matmul_dtype, triton_params


def _kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, r_ref, rm1_ref, s0_ref,
            o_ref, starts_ref, final_ref, *, heads, n_writes, chunk, block_v, n_chunks, scale,
            mm_dtype, inverse):
    bh = pl.program_id(0)
    vb = pl.program_id(1)
    b, h = bh // heads, bh % heads
    vs = pl.ds(vb * block_v, block_v)
    f32 = jnp.float32

    def body(n, s):
        ts = pl.ds(n * chunk, chunk)
        q = q_ref[b, ts, h, :]
        ks = [k_ref[b, ts, h, l, :] for l in range(n_writes)]
        betas = [beta_ref[b, ts, h, l].astype(f32) for l in range(n_writes)]
        vws = [betas[l][:, None] * v_ref[b, ts, h, l, vs].astype(f32) for l in range(n_writes)]
        d = chunk_decays(g_ref[b, ts, h], r_ref[b, ts], rm1_ref[b, ts])
        starts_ref[b, h, n, :, vs] = s
        o, s = chunk_step(s, q, ks[0], ks, vws, betas[0], d, mm_dtype=mm_dtype, inverse=inverse)
        o_ref[b, ts, h, vs] = (scale * o).astype(o_ref.dtype)
        return s

    s = jax.lax.fori_loop(0, n_chunks, body, s0_ref[b, h, :, vs].astype(f32))
    final_ref[b, h, :, vs] = s


def forward(x: Prepared, *, scale, chunk_size, block_v=None, num_warps=None, num_stages=None,
            interpret=False, inverse="rows"):
    """Returns (o [B, Tp, H, V] in v's dtype, final [B, H, K, V] f32, starts [B, H, N, K, V] f32).

    inverse: the triangular inverse, "rows", "blocked" or "blocked8" (`common.lower_inverse`)."""
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    block_v = V if block_v is None else block_v
    N = Tp // chunk_size
    kernel = functools.partial(
        _kernel, heads=H, n_writes=L, chunk=chunk_size, block_v=block_v, n_chunks=N, scale=scale,
        mm_dtype=matmul_dtype(x.q.dtype), inverse=lower_inverse(inverse))
    out_shape = (
        jax.ShapeDtypeStruct((B, Tp, H, V), x.v.dtype),
        jax.ShapeDtypeStruct((B, H, N, K, V), jnp.float32),
        jax.ShapeDtypeStruct((B, H, K, V), jnp.float32),
    )
    params = triton_params(interpret, num_warps or 4, num_stages)
    o, starts, final = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(B * H, V // block_v), compiler_params=params,
        interpret=interpret, name="prism_fwd",
    )(x.q, x.k, x.v, x.beta, x.g, x.r, x.rm1, x.s0)
    return o, final, starts
