"""Chunkwise forward as three Pallas (Triton-lowered) kernels; the GPU default.

The fused kernel (`forward.py`) puts the triangular solve, a chain of C dependent row steps, on the
sequential path of every program; with few programs (long T, small batch) that latency dominates.
Here only cheap matmuls stay sequential:

  1. intra  grid (B*H, N)        per chunk, all in parallel: the solve, P [C, K] and Qe [C, V]
                                 (E = P S_0 + Qe), written in the matmul dtype; the inverse
                                 (I + m)^{-1} [C, C] f32 is kept for the backward.
  2. state  grid (B*H, V/bv)     sequential over chunks: S <- a S - ek^T (P S + Qe) + writes;
                                 writes every chunk's start state (also kept for the backward).
  3. output grid (B*H, N)        per chunk, all in parallel: o from q, the chunk inputs, P, Qe and
                                 the chunk's start state.

Plain-JAX reference beside it: `prism_jax.ops.prism.chunk.prism_chunk` (same algebra, XLA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import (Prepared, chunk_decays, chunk_end_decays, chunk_output,
                                   chunk_solve, chunk_state_update, matmul_dtype)

f32 = jnp.float32


def _load_writes(k_ref, v_ref, beta_ref, b, ts, h, vs, n_writes):
    ks = [k_ref[b, ts, h, l, :] for l in range(n_writes)]
    betas = [beta_ref[b, ts, h, l].astype(f32) for l in range(n_writes)]
    vws = [betas[l][:, None] * v_ref[b, ts, h, l, vs].astype(f32) for l in range(n_writes)]
    return ks, betas, vws


def _intra_kernel(k_ref, v_ref, beta_ref, g_ref, r_ref, rm1_ref, p_ref, qe_ref, *ainv_ref, heads,
                  n_writes, chunk, mm_dtype):
    bh, n = pl.program_id(0), pl.program_id(1)
    b, h = bh // heads, bh % heads
    ts = pl.ds(n * chunk, chunk)
    ks, betas, vws = _load_writes(k_ref, v_ref, beta_ref, b, ts, h, slice(None), n_writes)
    d = chunk_decays(g_ref[b, ts, h], r_ref[b, ts], rm1_ref[b, ts])
    p, qe, a_inv = chunk_solve(ks[0], ks, vws, betas[0], d, mm_dtype=mm_dtype)
    if ainv_ref:  # only when the backward will use it (bwd="fused" under differentiation)
        ainv_ref[0][b, h, n] = a_inv
    p_ref[b, ts, h, :] = p.astype(p_ref.dtype)
    qe_ref[b, ts, h, :] = qe.astype(qe_ref.dtype)


def _state_kernel(k_ref, v_ref, beta_ref, g_ref, r_ref, rm1_ref, p_ref, qe_ref, s0_ref, starts_ref,
                  final_ref, *, heads, n_writes, chunk, block_v, n_chunks, mm_dtype):
    bh, vb = pl.program_id(0), pl.program_id(1)
    b, h = bh // heads, bh % heads
    vs = pl.ds(vb * block_v, block_v)

    def body(n, s):
        ts = pl.ds(n * chunk, chunk)
        ks, _, vws = _load_writes(k_ref, v_ref, beta_ref, b, ts, h, vs, n_writes)
        d = chunk_end_decays(g_ref[b, ts, h], r_ref[b, ts], rm1_ref[b, ts])
        starts_ref[b, h, n, :, vs] = s
        return chunk_state_update(s, p_ref[b, ts, h, :], qe_ref[b, ts, h, vs].astype(f32), ks[0],
                                  ks, vws, d, mm_dtype=mm_dtype)

    s = jax.lax.fori_loop(0, n_chunks, body, s0_ref[b, h, :, vs].astype(f32))
    final_ref[b, h, :, vs] = s


def _output_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, r_ref, rm1_ref, p_ref, qe_ref, starts_ref,
                   o_ref, *, heads, n_writes, chunk, scale, mm_dtype):
    bh, n = pl.program_id(0), pl.program_id(1)
    b, h = bh // heads, bh % heads
    ts = pl.ds(n * chunk, chunk)
    ks, _, vws = _load_writes(k_ref, v_ref, beta_ref, b, ts, h, slice(None), n_writes)
    d = chunk_decays(g_ref[b, ts, h], r_ref[b, ts], rm1_ref[b, ts])
    o = chunk_output(starts_ref[b, h, n], p_ref[b, ts, h, :], qe_ref[b, ts, h, :].astype(f32),
                     q_ref[b, ts, h, :], ks[0], ks, vws, d, mm_dtype=mm_dtype)
    o_ref[b, ts, h, :] = (scale * o).astype(o_ref.dtype)


def forward(x: Prepared, *, scale, chunk_size, block_v=None, num_warps=None, num_stages=None,
            interpret=False, save_inverse=True):
    """Returns (o [B, Tp, H, V] in v's dtype, final [B, H, K, V] f32, starts [B, H, N, K, V] f32,
    ainv [B, H, N, C, C] f32: each chunk's (I + m)^{-1}, saved for the backward; None unless
    `save_inverse`)."""
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    block_v = min(V, 64) if block_v is None else block_v
    N = Tp // chunk_size
    mm_dtype = matmul_dtype(x.q.dtype)
    common = dict(heads=H, n_writes=L, chunk=chunk_size, mm_dtype=mm_dtype)
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        if num_warps is None:  # H200 sweep (docs/benchmarks.md): 8 warps at chunk 32, 4 at chunk 64
            num_warps = 8 if chunk_size <= 32 else 4
        params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages or 1)
    call = functools.partial(pl.pallas_call, compiler_params=params, interpret=interpret)
    writes = (x.k, x.v, x.beta, x.g, x.r, x.rm1)
    out_shape = [jax.ShapeDtypeStruct((B, Tp, H, K), mm_dtype), jax.ShapeDtypeStruct((B, Tp, H, V), mm_dtype)]
    if save_inverse:
        out_shape.append(jax.ShapeDtypeStruct((B, H, N, chunk_size, chunk_size), f32))
    p, qe, *ainv = call(functools.partial(_intra_kernel, **common), grid=(B * H, N), name="prism_intra",
                        out_shape=tuple(out_shape))(*writes)
    starts, final = call(
        functools.partial(_state_kernel, block_v=block_v, n_chunks=N, **common),
        grid=(B * H, V // block_v), name="prism_state",
        out_shape=(jax.ShapeDtypeStruct((B, H, N, K, V), f32), jax.ShapeDtypeStruct((B, H, K, V), f32)),
    )(*writes, p, qe, x.s0)
    o = call(
        functools.partial(_output_kernel, scale=scale, **common), grid=(B * H, N), name="prism_output",
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, V), x.v.dtype),
    )(x.q, *writes, p, qe, starts)
    return o, final, starts, (ainv[0] if save_inverse else None)
