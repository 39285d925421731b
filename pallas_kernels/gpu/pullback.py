"""First step of the backward as one Pallas (Triton-lowered) kernel: each chunk's state map and the
output cotangent pulled back to its start state, all chunks in parallel.

Grid (B*H, N). Per chunk n (prism-math.md section 3; `common.chunk_step`):

    S_{n+1} = a_n S_n - ek_n^T (P_n S_n) + (terms without S_n),   P_n = A^{-1} diag(beta0 e^{G_{t-1}}) k0
    Y_n     = d<o_n, do_n>/dS_n = scale (diag(e^G) q)^T do_n - P_n^T ((q k0^T . T_m1)^T scale do_n)

Writes P_n, ek_n [C, K], a_n [] and Y_n [K, V] (float32) for the reverse pass (`state_bwd.py`).
Plain-JAX reference beside it: `pallas_kernels.backward._state_pullback` (vmapped XLA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import chunk_decays, matmul_dtype, mm, triton_params, unit_lower_inverse

f32 = jnp.float32


def _kernel(*refs, heads, chunk, scale, mm_dtype, has_ainv):
    if has_ainv:
        q_ref, k_ref, beta_ref, g_ref, r_ref, rm1_ref, do_ref, ainv_ref, p_ref, ek_ref, a_ref, y_ref = refs
    else:
        q_ref, k_ref, beta_ref, g_ref, r_ref, rm1_ref, do_ref, p_ref, ek_ref, a_ref, y_ref = refs
    bh, n = pl.program_id(0), pl.program_id(1)
    b, h = bh // heads, bh % heads
    ts = pl.ds(n * chunk, chunk)
    dot = functools.partial(mm, dtype=mm_dtype)
    q, k0 = q_ref[b, ts, h, :], k_ref[b, ts, h, 0, :]
    beta0 = beta_ref[b, ts, h, 0].astype(f32)
    d = chunk_decays(g_ref[b, ts, h], r_ref[b, ts], rm1_ref[b, ts])
    if has_ainv:
        a_inv = ainv_ref[b, h, n]
    else:
        a_inv = unit_lower_inverse(beta0[:, None] * dot(k0, k0, trans_b=True) * d.m1m1)
    p = dot(a_inv, (beta0 * d.start_m1)[:, None] * k0.astype(f32))
    do = scale * do_ref[b, ts, h, :].astype(f32)
    qk = dot(q, k0, trans_b=True) * d.t_m1
    y = dot(d.start[:, None] * q.astype(f32), do, trans_a=True) - dot(p, dot(qk, do, trans_a=True),
                                                                        trans_a=True)
    p_ref[b, h, n] = p
    ek_ref[b, h, n] = d.end_m1[:, None] * k0.astype(f32)
    a_ref[b, h, pl.ds(n, 1)] = jnp.full((1,), d.all, f32)
    y_ref[b, h, n] = y


def state_pullback(q, k, beta, g, r, rm1, do, *, scale, chunk_size, ainv=None, num_warps=None,
                   interpret=False):
    """q [B, Tp, H, K], k [B, Tp, H, L, K], beta [B, Tp, H, L], g [B, Tp, H] f32, r / rm1 [B, Tp]
    int32, do [B, Tp, H, V]; ainv [B, H, N, C, C] the chunks' (I + m)^{-1} saved by the forward, or
    None (solved here). Returns p, ek [B, H, N, C, K], a [B, H, N], y [B, H, N, K, V] (float32)."""
    B, Tp, H, K = q.shape
    V = do.shape[-1]
    C, N = chunk_size, Tp // chunk_size
    params = triton_params(interpret, num_warps or 8)
    S = lambda *shape: jax.ShapeDtypeStruct(shape, f32)
    return pl.pallas_call(
        functools.partial(_kernel, heads=H, chunk=C, scale=scale, mm_dtype=matmul_dtype(q.dtype),
                          has_ainv=ainv is not None),
        grid=(B * H, N), compiler_params=params, interpret=interpret, name="prism_state_pullback",
        out_shape=(S(B, H, N, C, K), S(B, H, N, C, K), S(B, H, N), S(B, H, N, K, V)),
    )(q, k, beta, g, r, rm1, do, *([] if ainv is None else [ainv]))
