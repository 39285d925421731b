"""Backward pass from the chunk-start states the forward kernels saved (plain-JAX path, bwd="xla";
with bwd="fused" steps 1 and 3 are the Triton kernels `gpu/pullback.py` and `gpu/chunk_bwd.py`;
with bwd="explicit" step 3 is the hand-derived `grads.chunk_grads`, as the Triton kernel
`gpu/chunk_grads.py` or vmapped in XLA).

1. Per chunk and in parallel: the chunk's state map S_n -> S_{n+1} = a_n S_n - ek_n^T (P_n S_n + ...)
   and Y_n, the output cotangent pulled back to S_n.
2. One reverse pass over chunks: X_{n} = Y_n + a_n X_{n+1} - P_n^T (ek_n X_{n+1}) gives the
   cotangent of every chunk's end state (X_0 is the initial state's gradient).
3. Per chunk and in parallel: `jax.vjp` of the same chunk function the kernel runs (`chunk_step`,
   with the triangular solve of XLA in place of the in-kernel substitution) given its saved start
   state, with cotangents (do_n, X_{n+1}).
Memory stays O(T): nothing K x V is kept per token, only per chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import Prepared, chunk_decays, chunk_step, matmul_dtype, mm
from pallas_kernels.grads import chunk_grads


def _xla_inverse(m):
    eye = jnp.eye(m.shape[-1], dtype=m.dtype)
    return jax.lax.linalg.triangular_solve(eye + m, eye, left_side=True, lower=True,
                                           unit_diagonal=True)


def _chunked(x, chunk):
    """[B, Tp, H, ...] -> [B, H, N, C, ...]."""
    B, Tp, H = x.shape[:3]
    x = x.reshape(B, Tp // chunk, chunk, H, *x.shape[3:])
    return jnp.moveaxis(x, 3, 1)


def _unchunked(x):
    """[B, H, N, C, ...] -> [B, Tp, H, ...]."""
    B, H, N, C = x.shape[:4]
    return jnp.moveaxis(x, 1, 3).reshape(B, N * C, H, *x.shape[4:])


def _one_chunk(q, k, v, beta, g, r, rm1, s, *, scale, mm_dtype):
    """One chunk, one head: q [C, K], k [C, L, K], v [C, L, V], beta [C, L], g/r/rm1 [C], s [K, V]."""
    f32 = jnp.float32
    L = k.shape[1]
    beta = beta.astype(f32)
    ks = [k[:, l] for l in range(L)]
    vws = [beta[:, l, None] * v[:, l].astype(f32) for l in range(L)]
    d = chunk_decays(g, r, rm1)
    o, s_new = chunk_step(s, q, ks[0], ks, vws, beta[:, 0], d, mm_dtype=mm_dtype,
                          inverse=_xla_inverse)
    return scale * o, s_new


def _chunk_inverse(k0, beta0, g, r, rm1, *, mm_dtype):
    """One chunk's (I + m)^{-1} [C, C] float32, m = diag(beta0) (k0 k0^T . m1m1)."""
    d = chunk_decays(g, r, rm1)
    return _xla_inverse(beta0.astype(jnp.float32)[:, None] * mm(k0, k0, dtype=mm_dtype, trans_b=True) * d.m1m1)


def _state_pullback(q, k0, beta0, g, r, rm1, do, a_inv=None, *, scale, mm_dtype):
    """Per chunk: (P [C, K], ek [C, K], a [], Y [K, V]) with S_C = a S - ek^T (P S) + (terms not in S)
    and Y = d<o, do>/dS; a_inv: the chunk's `_chunk_inverse` (None: solved here)."""
    f32 = jnp.float32
    if a_inv is None:
        a_inv = _chunk_inverse(k0, beta0, g, r, rm1, mm_dtype=mm_dtype)
    beta0 = beta0.astype(f32)
    dot = functools.partial(mm, dtype=mm_dtype)
    d = chunk_decays(g, r, rm1)
    p = dot(a_inv, (beta0 * d.start_m1)[:, None] * k0.astype(f32))
    ek = d.end_m1[:, None] * k0.astype(f32)
    qk = dot(q, k0, trans_b=True) * d.t_m1
    do = scale * do.astype(f32)
    y = dot(d.start[:, None] * q.astype(f32), do, trans_a=True) - dot(p, dot(qk, do, trans_a=True),
                                                                      trans_a=True)
    return p, ek, d.all, y


def _explicit_chunk(q, k, v, beta, g, r, rm1, s, do, x, a_inv, *, scale, mm_dtype):
    """`grads.chunk_grads` on one chunk in the layout of `_one_chunk` (k [C, L, K], ...), a_inv the
    chunk's `_chunk_inverse`. Returns (dq, dk, dv, dbeta, dg) in that layout, float32."""
    f32 = jnp.float32
    L = k.shape[1]
    ks = [k[:, l] for l in range(L)]
    betas = [beta[:, l].astype(f32) for l in range(L)]
    dq, dks, dvs, dbetas, dg = chunk_grads(q, ks, [v[:, l] for l in range(L)], betas, g, r, rm1, s, do, x,
                                           a_inv, scale=scale, mm_dtype=mm_dtype)
    return dq, jnp.stack(dks, 1), jnp.stack(dvs, 1), jnp.stack(dbetas, 1), dg


def _over_chunks(fn):
    return jax.vmap(jax.vmap(jax.vmap(fn)))  # [B, H, N, ...]


def reverse_scan(p, ek, a, y, dfinal):
    """Plain-JAX reverse state-gradient pass (reference of `gpu/state_bwd.py`); shapes as there."""

    def step(xs, inputs):  # xs: cotangent of this chunk's end state
        p_n, ek_n, a_n, y_n = inputs
        ekx = jnp.einsum("bhck,bhkv->bhcv", ek_n, xs, precision="highest")
        ds = y_n + a_n[..., None, None] * xs - jnp.einsum("bhck,bhcv->bhkv", p_n, ekx,
                                                          precision="highest")
        return ds, xs

    moved = jax.tree.map(lambda t: jnp.moveaxis(t, 2, 0), (p, ek, a, y))
    ds0, cot_end = jax.lax.scan(step, dfinal, moved, reverse=True)
    return jnp.moveaxis(cot_end, 0, 2), ds0


def explicit_xla_grads(x: Prepared, starts, do, cot_end, a_inv, *, scale, chunk_size):
    """(dq, dk, dv, dbeta, dg) float32 of the padded inputs: the hand-derived `grads.chunk_grads` of
    every chunk, vmapped in XLA (batched products over all chunks at once). starts, cot_end
    [B, H, N, K, V] (float32 or 16-bit: both enter as float32), a_inv [B, H, N, C, C] the chunks'
    (I + m)^{-1} (float32 or 16-bit)."""
    C = chunk_size
    B, Tp, H, K = x.q.shape
    mm_dtype = matmul_dtype(x.q.dtype)
    q, k, v, beta, g, do_c = (_chunked(t, C) for t in (x.q, x.k, x.v, x.beta, x.g, do))
    rc = lambda t: jnp.broadcast_to(t.reshape(B, 1, Tp // C, C), (B, H, Tp // C, C))
    f32 = lambda t: t.astype(jnp.float32)
    fn = _over_chunks(functools.partial(_explicit_chunk, scale=scale, mm_dtype=mm_dtype))
    grads = fn(q, k, v, beta, g, rc(x.r), rc(x.rm1), f32(starts), do_c, f32(cot_end), f32(a_inv))
    return tuple(_unchunked(t) for t in grads)


_CHUNK_PATHS = ("xla", "gpu", "interpret", "explicit-xla", "explicit-gpu", "explicit-interpret")


def backward(x: Prepared, starts, do, dfinal, *, scale, chunk_size, reverse="scan", chunk="xla",
             block_v=None, num_warps=None, num_stages=None, ainv=None, v_split=None):
    """Gradients (dq, dk, dv, dbeta, dg, ds0) of the padded inputs; do [B, Tp, H, V], dfinal [B, H, K, V].

    reverse: "scan" (lax.scan), "gpu" (the Triton kernel) or "interpret" (that kernel on CPU).
    chunk: the per-chunk work, "xla" (vmapped XLA: `_state_pullback` and `jax.vjp` of `_one_chunk`),
    "gpu" (the Triton kernels `gpu/pullback.py` and `gpu/chunk_bwd.py`; block kwargs go to the
    latter) or "interpret" (those kernels on CPU); the hand-derived gradients: "explicit-xla"
    (`_state_pullback` and `grads.chunk_grads` vmapped in XLA), "explicit-gpu" (`gpu/pullback.py`
    and `gpu/chunk_grads.py`; block kwargs and v_split go to the latter) or "explicit-interpret"
    (those kernels on CPU); ainv [B, H, N, C, C]: the chunks' (I + m)^{-1} from the forward, or None
    (the kernels recompute them)."""
    if chunk not in _CHUNK_PATHS:
        raise ValueError(f"backward: `chunk` is {chunk!r}, expected one of {_CHUNK_PATHS}")
    xla_chunks = chunk in ("xla", "explicit-xla")
    C = chunk_size
    B, Tp, H, K = x.q.shape
    mm_dtype = matmul_dtype(x.q.dtype)
    q, k, v, beta, g, do_c = (_chunked(t, C) for t in (x.q, x.k, x.v, x.beta, x.g, do))
    rc = lambda t: jnp.broadcast_to(t.reshape(B, 1, Tp // C, C), (B, H, Tp // C, C))
    r, rm1 = rc(x.r), rc(x.rm1)

    if xla_chunks:  # (I + m)^{-1} solved once here for the pull-back and the explicit gradients
        a_inv = (_over_chunks(functools.partial(_chunk_inverse, mm_dtype=mm_dtype))(k[..., 0, :], beta[..., 0], g,
                                                                                  r, rm1)
                 if ainv is None else ainv.astype(jnp.float32))
        pull = _over_chunks(functools.partial(_state_pullback, scale=scale, mm_dtype=mm_dtype))
        p, ek, a, y = pull(q, k[..., 0, :], beta[..., 0], g, r, rm1, do_c, a_inv)
    else:
        from pallas_kernels.gpu.pullback import state_pullback

        p, ek, a, y = state_pullback(x.q, x.k, x.beta, x.g, x.r, x.rm1, do, scale=scale, chunk_size=C,
                                     ainv=ainv, interpret=chunk.endswith("interpret"))

    if reverse == "scan":
        cot_end, ds0 = reverse_scan(p, ek, a, y, dfinal.astype(jnp.float32))
    else:
        from pallas_kernels.gpu.state_bwd import reverse_pass

        # The fused path runs the reverse products in the matmul dtype, as the forward's state pass.
        cot_end, ds0 = reverse_pass(p, ek, a, y, dfinal.astype(jnp.float32),
                                    mm_dtype=jnp.float32 if xla_chunks else mm_dtype,
                                    interpret=reverse == "interpret")

    if chunk == "explicit-xla":
        return (*explicit_xla_grads(x, starts, do, cot_end, a_inv, scale=scale, chunk_size=C), ds0)
    if chunk in ("explicit-gpu", "explicit-interpret"):
        from pallas_kernels.gpu.chunk_grads import chunk_grads_backward

        grads = chunk_grads_backward(x.q, x.k, x.v, x.beta, x.g, x.r, x.rm1, starts, do, cot_end,
                                     scale=scale, chunk_size=C, ainv=ainv, block_v=block_v, v_split=v_split,
                                     num_warps=num_warps, num_stages=num_stages,
                                     interpret=chunk == "explicit-interpret")
        return (*grads, ds0)
    if chunk != "xla":
        from pallas_kernels.gpu.chunk_bwd import chunk_backward

        grads = chunk_backward(x.q, x.k, x.v, x.beta, x.g, x.r, x.rm1, starts, do, cot_end,
                               scale=scale, chunk_size=C, block_v=block_v, num_warps=num_warps,
                               num_stages=num_stages, ainv=ainv, interpret=chunk == "interpret")
        return (*grads, ds0)
    chunk_fn = _over_chunks(functools.partial(_one_chunk, scale=scale, mm_dtype=mm_dtype))
    _, vjp = jax.vjp(lambda *a: chunk_fn(*a, r, rm1, starts), q, k, v, beta, g)
    dq, dk, dv, dbeta, dg = vjp((do_c.astype(jnp.float32), cot_end))
    return (*(_unchunked(t) for t in (dq, dk, dv, dbeta, dg)), ds0)
