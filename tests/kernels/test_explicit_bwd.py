"""The hand-derived chunk backward (`pallas_kernels/grads.py`, `gpu/chunk_grads.py`, bwd="explicit").

Per-chunk gradients against `jax.vjp` of the chunk map in float64; whole-op gradients of
`prism_pallas(..., bwd="explicit")` (interpret mode on CPU) against the reference and a float64
directional derivative; lowering to Triton for an H200; and (`-m gpu`) the real kernels.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.backward import _xla_inverse
from pallas_kernels.common import chunk_decays, chunk_step
from pallas_kernels.grads import chunk_grads


def _mm64(a, b, *, dtype, trans_a=False, trans_b=False):
    """`common.mm` without its float32 accumulation: exact products for the float64 checks."""
    dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
    return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), dims, precision="highest")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _chunk_inputs(seed, L, C, K, V, reset_at):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape))
    q = f(C, K)
    ks = [k / jnp.linalg.norm(k, axis=-1, keepdims=True) for k in (f(C, K) for _ in range(L))]
    vls = [f(C, V) for _ in range(L)]
    betas = [jnp.asarray(rng.uniform(size=C)) for _ in range(L)]
    resets = np.zeros(C, np.int32)
    resets[list(reset_at)] = 1
    r = jnp.asarray(np.cumsum(resets) + 3, jnp.int32)  # counts carried in from earlier chunks
    rm1 = r - jnp.asarray(resets)
    g = jnp.where(jnp.asarray(resets) > 0, 0.0, jnp.log(jnp.asarray(rng.uniform(0.5, 1.0, size=C))))
    return q, ks, vls, betas, g, r, rm1, f(K, V), f(C, V), f(K, V)


def _vjp_of_chunk_step(q, ks, vls, betas, g, r, rm1, s, do, x, *, scale):
    def chunk(q, ks, vls, betas, g):
        vws = [b[:, None] * v for b, v in zip(betas, vls)]
        o, s_new = chunk_step(s, q, ks[0], ks, vws, betas[0], chunk_decays(g, r, rm1), mm_dtype=jnp.float64,
                              inverse=_xla_inverse, matmul=_mm64)
        return scale * o, s_new

    return jax.jit(lambda *a: jax.vjp(chunk, *a)[1]((do, x)))(q, ks, vls, betas, g)


# Default: one case per L, chunk 16 and 32, K != V, both inverse sources; the other half is slow.
@pytest.mark.parametrize("L,C,K,V,reset_at,saved_inverse", [
    (1, 16, 16, 32, (3, 9), False),
    (2, 32, 32, 16, (0, 17, 31), True),  # a reset at the chunk's first and last token
    (3, 16, 16, 32, (5,), True),
    pytest.param(1, 32, 32, 16, (3, 9), True, marks=pytest.mark.slow),
    pytest.param(2, 32, 32, 16, (0, 17, 31), False, marks=pytest.mark.slow),
    pytest.param(3, 16, 16, 16, (), False, marks=pytest.mark.slow),
])
def test_chunk_grads_match_vjp_of_chunk_map(L, C, K, V, reset_at, saved_inverse):
    """float64 (exact products) with a saved inverse; float32 (`common.mm`, in-chunk solve) without."""
    with jax.enable_x64(True):
        args = _chunk_inputs(L + C, L, C, K, V, reset_at)
        want = _vjp_of_chunk_step(*args, scale=0.3)
        if saved_inverse:
            q, ks, _, betas, g, r, rm1 = args[:7]
            m = betas[0][:, None] * (ks[0] @ ks[0].T) * chunk_decays(g, r, rm1).m1m1
            got = jax.jit(functools.partial(chunk_grads, scale=0.3, mm_dtype=jnp.float64, matmul=_mm64))(
                *args, _xla_inverse(m))
            tol, dtype = 1e-12, jnp.float64
        else:
            f32 = lambda t: jax.tree.map(lambda u: u if u.dtype == jnp.int32 else u.astype(jnp.float32), t)
            got = jax.jit(functools.partial(chunk_grads, scale=0.3, mm_dtype=jnp.float32))(*f32(args))
            tol, dtype = 2e-6, jnp.float32
    for name, gs, ws in zip(("dq", "dks", "dvs", "dbetas", "dg"), got, want):
        gs, ws = jax.tree.leaves(gs), jax.tree.leaves(ws)
        assert len(gs) == len(ws), name
        for i, (a, b) in enumerate(zip(gs, ws)):
            assert a.dtype == dtype and a.shape == b.shape, (name, i)
            assert _rel(a, b) < tol, (name, i, _rel(a, b))
