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
from pallas_kernels.gpu.mosaic.pullback import SMEM_LIMIT, default_block_v, smem_bytes, state_pullback

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
    cpu = jax.devices("cpu")[0]  # float64 matmuls do not run on the GPU
    x, do = jax.device_put((x, do), cpu)
    with jax.enable_x64(True), jax.default_device(cpu):
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


CASES = [  # (T, V, L, resets, block_v, chunks_per_cta, slots)
    (150, 64, 1, True, None, 3, None),  # three chunks through two slots (0, 1, 0)
    (99, 128, 2, True, 64, 2, 1),  # two chunks through one slot, two value blocks
    pytest.param(99, 64, 1, False, None, 1, None, marks=pytest.mark.slow),  # one chunk per CTA
    pytest.param(99, 128, 3, True, 64, 2, 2, marks=pytest.mark.slow),
    pytest.param(150, 128, 1, True, None, None, None, marks=pytest.mark.slow),  # the defaults
]


@pytest.mark.parametrize("T,V,L,resets,block_v,chunks_per_cta,slots", CASES)
def test_pullback_interpreter_matches_float64_and_triton(T, V, L, resets, block_v, chunks_per_cta, slots):
    x, do = _inputs(1, T, 2, 64, V, L, resets=resets)
    ainv = _ainv(x)
    tv = mc.token_vectors(x)
    got = state_pullback(x, tv, do, scale=SCALE, ainv=ainv, block_v=block_v, chunks_per_cta=chunks_per_cta,
                         slots=slots, interpret=True)
    assert got[0].dtype == got[1].dtype == x.q.dtype and got[2].dtype == got[3].dtype == jnp.float32
    _check(got, _reference64(x, do), 1e-2)
    triton = pullback.state_pullback(x.q, x.k, x.beta, x.g, x.r, x.rm1, do, scale=SCALE, chunk_size=C,
                                     ainv=ainv, interpret=True)
    _check(got, [np.asarray(t, np.float64) for t in triton], 1e-2)


@pytest.mark.parametrize("y_dtype", ["bfloat16"])
def test_pullback_16bit_y_is_the_float32_y_rounded(y_dtype):
    """y_dtype: Y leaves rounded once from its float32 accumulator, bit for bit the float32 output's
    rounding; P, ek and a unchanged."""
    x, do = _inputs(1, 150, 2, 64, 64, 1, resets=True)
    ainv, tv = _ainv(x), mc.token_vectors(x)
    run = lambda **kw: state_pullback(x, tv, do, scale=SCALE, ainv=ainv, chunks_per_cta=3, interpret=True, **kw)
    full, low = run(), run(y_dtype=y_dtype)
    assert low[3].dtype == jnp.dtype(y_dtype)
    np.testing.assert_array_equal(np.asarray(full[3].astype(y_dtype), np.float32), np.asarray(low[3], np.float32))
    for a, b in zip(full[:3], low[:3]):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with pytest.raises(ValueError, match="`y_dtype`"):
        run(y_dtype="float16")


# (K, V, block_v, chunks_per_cta, slots): the defaults at K = V = 128 (all columns, two slots) and
# K = 64, 64 columns through one slot, one chunk per CTA.
LOWERING = [(128, 128, None, 3, None), (64, 128, 64, 3, 1), (128, 128, 64, 1, None)]


@pytest.mark.parametrize("K,V,block_v,chunks_per_cta,slots", LOWERING)
def test_pullback_lowers_for_cuda(K, V, block_v, chunks_per_cta, slots):
    x, do = _inputs(1, 150, 2, K, V, 1, resets=True)
    ainv = jnp.zeros((1, 2, x.q.shape[1] // C, C, C), jnp.float32)
    fn = functools.partial(state_pullback, scale=SCALE, block_v=block_v, chunks_per_cta=chunks_per_cta,
                           slots=slots, interpret=False)
    lowered = jax.jit(fn).trace(x, mc.token_vectors(x), do, ainv=ainv).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def test_pullback_defaults():
    assert default_block_v(128, 128) == 128 and smem_bytes(128, 128, 2) <= SMEM_LIMIT
    assert default_block_v(64, 64) == 64 and smem_bytes(64, 64, 2) <= SMEM_LIMIT


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
    with pytest.raises(ValueError, match="chunks_per_cta"):
        state_pullback(x, tv, do, scale=1.0, ainv=ainv, chunks_per_cta=2)
    with pytest.raises(ValueError, match="slots"):
        state_pullback(x, tv, do, scale=1.0, ainv=ainv, chunks_per_cta=1, slots=3)
    with pytest.raises(ValueError, match="sizes"):
        state_pullback(x, tv, jnp.zeros(x.q.shape[:3] + (32,), x.q.dtype), scale=1.0, ainv=ainv)


@pytest.mark.gpu
@pytest.mark.parametrize("chunks_per_cta,block_v,y_dtype", [(None, None, None), (4, None, None), (4, 64, None),
                                                            (1, None, None), (None, None, "bfloat16")])
def test_pullback_on_gpu_matches_float64(chunks_per_cta, block_v, y_dtype):
    x, do = _inputs(2, 512, 4, 128, 128, 2, resets=True, seed=3)
    ainv = split.intra(x, chunk_size=C, inverse="rows", save_inverse=True)[2]
    got = state_pullback(x, mc.token_vectors(x), do, scale=SCALE, ainv=ainv, block_v=block_v,
                         chunks_per_cta=chunks_per_cta, y_dtype=y_dtype)
    _check(got, _reference64(x, do), 1e-2)
    triton = pullback.state_pullback(x.q, x.k, x.beta, x.g, x.r, x.rm1, do, scale=SCALE, chunk_size=C, ainv=ainv)
    _check(got, [np.asarray(t, np.float64) for t in triton], 1e-2)
