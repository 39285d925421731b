"""Mosaic GPU state pull-back kernel (`pallas_kernels/gpu/mosaic/pullback.py`): in the interpreter
against `backward._state_pullback` vmapped over chunks in float64 and against the Triton
`gpu.pullback.state_pullback` (interpret mode, chunk 64, same saved inverse); lowered for CUDA on
CPU; on the GPU at a larger shape."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import backward
from pallas_kernels.common import prepare
from pallas_kernels.gpu import pullback, split
from pallas_kernels.gpu.mosaic import common as mc
from pallas_kernels.gpu.mosaic.pullback import state_pullback

C = mc.CHUNK
SCALE = 0.3


def _inputs(B, T, H, K, V, L, *, resets, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, H, L, K))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, H, L, V), jnp.bfloat16)
    beta = jax.random.uniform(ks[3], (B, T, H, L)).astype(jnp.bfloat16)
    g = -jax.random.uniform(ks[4], (B, T, H)) * 0.2
    seg = None
    if resets:
        seg = jnp.zeros((B, T), jnp.int32).at[:, T // 3:].set(1).at[:, T - 5:].set(2)
    x = prepare(q, k, v, beta, g, None, seg, C)
    do = jax.random.normal(ks[5], x.q.shape[:3] + (V,), jnp.bfloat16)
    return x, do


def _reference64(x, do):
    """`backward._state_pullback` per chunk in float64 on the same (16-bit) inputs."""
    B, Tp, H, K = x.q.shape
    N = Tp // C
    with jax.enable_x64(True):
        f64 = lambda t: jnp.asarray(np.asarray(t.astype(jnp.float32), np.float64))
        ch = lambda t: backward._chunked(f64(t), C)
        rc = lambda t: jnp.broadcast_to(jnp.asarray(t).reshape(B, 1, N, C), (B, H, N, C))
        fn = backward._over_chunks(functools.partial(backward._state_pullback, scale=SCALE,
                                                     mm_dtype=jnp.float64))
        out = fn(ch(x.q), ch(x.k)[..., 0, :], ch(x.beta)[..., 0], ch(x.g), rc(x.r), rc(x.rm1), ch(do))
        return [np.asarray(t) for t in out]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def _ainv(x):
    return split.intra(x, chunk_size=C, inverse="rows", save_inverse=True, interpret=True)[2]


def _check(got, ref, tol):
    for name, g, r in zip(("p", "ek", "a", "y"), got, ref):
        assert g.shape == r.shape, name
        assert _rel(np.asarray(g.astype(jnp.float32)), r) < tol, name


@pytest.mark.parametrize("T,V,L,resets,block_v", [(99, 64, 1, False, None), (99, 128, 2, True, None),
                                                   (99, 128, 3, True, 64)])
def test_pullback_interpreter_matches_float64_and_triton(T, V, L, resets, block_v):
    x, do = _inputs(1, T, 2, 64, V, L, resets=resets)
    ainv = _ainv(x)
    tv = mc.token_vectors(x)
    got = state_pullback(x, tv, do, scale=SCALE, ainv=ainv, block_v=block_v, interpret=True)
    assert got[0].dtype == got[1].dtype == x.q.dtype and got[2].dtype == got[3].dtype == jnp.float32
    _check(got, _reference64(x, do), 1e-2)
    triton = pullback.state_pullback(x.q, x.k, x.beta, x.g, x.r, x.rm1, do, scale=SCALE, chunk_size=C,
                                     ainv=ainv, interpret=True)
    _check(got, [np.asarray(t, np.float64) for t in triton], 1e-2)


def test_pullback_lowers_for_cuda():
    for K, V, block_v in ((64, 128, 64), (128, 128, None)):
        x, do = _inputs(1, 100, 2, K, V, 1, resets=True)
        ainv = jnp.zeros((1, 2, x.q.shape[1] // C, C, C), jnp.float32)
        fn = functools.partial(state_pullback, scale=SCALE, block_v=block_v, interpret=False)
        lowered = jax.jit(fn).trace(x, mc.token_vectors(x), do, ainv=ainv).lower(lowering_platforms=("cuda",))
        assert "mosaic_gpu" in lowered.as_text()


def test_pullback_rejects_unsupported_inputs():
    x, do = _inputs(1, 64, 1, 64, 64, 1, resets=False)
    tv = None  # the checks come before the token vectors are read
    ainv = jnp.zeros((1, 1, 1, C, C), jnp.float32)
    with pytest.raises(ValueError, match="dtype"):
        state_pullback(x._replace(q=x.q.astype(jnp.float32)), tv, do, scale=1.0, ainv=ainv)
    with pytest.raises(ValueError, match="ainv"):
        state_pullback(x, tv, do, scale=1.0, ainv=None)
    with pytest.raises(ValueError, match="block_v"):
        state_pullback(x, tv, do, scale=1.0, ainv=ainv, block_v=32)
    with pytest.raises(ValueError, match="sizes"):
        state_pullback(x, tv, jnp.zeros(x.q.shape[:3] + (32,), x.q.dtype), scale=1.0, ainv=ainv)


@pytest.mark.gpu
def test_pullback_on_gpu_matches_float64():
    x, do = _inputs(2, 512, 4, 128, 128, 2, resets=True, seed=3)
    ainv = split.intra(x, chunk_size=C, inverse="rows", save_inverse=True)[2]
    got = state_pullback(x, mc.token_vectors(x), do, scale=SCALE, ainv=ainv)
    _check(got, _reference64(x, do), 1e-2)
