"""Mosaic GPU reverse state-gradient pass (`pallas_kernels/gpu/mosaic/reverse.py`): in the Mosaic GPU
interpreter against `backward.reverse_scan` in float64 and against the Triton reverse pass (interpret
mode, bf16 products), lowered for CUDA on CPU, and a GPU test for the device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.backward import _chunked, _over_chunks, _state_pullback, reverse_scan
from pallas_kernels.common import prepare
from pallas_kernels.gpu.mosaic import common as mc
from pallas_kernels.gpu.mosaic.reverse import reverse_from_factors, reverse_pass
from pallas_kernels.gpu.state_bwd import reverse_pass as triton_reverse_pass

C = mc.CHUNK


def _prepared(ks, B, T, H, K, V, reset_at, dtype):
    """Padded random inputs (L = 1, L2-normalised keys, v zero: the passes here do not read it) with
    `reset_at` starting a new segment; ks: at least 4 PRNG keys."""
    q = jax.random.normal(ks[0], (B, T, H, K), dtype)
    k = jax.random.normal(ks[1], (B, T, H, 1, K))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = jnp.zeros((B, T, H, 1, V), dtype)
    g = -jax.random.uniform(ks[2], (B, T, H)) * 0.2
    beta = jax.random.uniform(ks[3], (B, T, H, 1)).astype(dtype)
    seg = None if reset_at is None else jnp.zeros((B, T), jnp.int32).at[:, reset_at:].set(1)
    return prepare(q, k, v, beta, g, None, seg, C)


def _pullback_inputs(*, B=1, T=101, H=2, K=64, V=64, reset_at=None, seed=0, dtype=jnp.bfloat16):
    """(p, ek 16-bit [B, H, N, C, K], a [B, H, N], y [B, H, N, K, V], dfinal [B, H, K, V]) float32 from
    the XLA state pullback of random (bf16) inputs with `reset_at` starting a new segment."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    x = _prepared(ks, B, T, H, K, V, reset_at, dtype)
    Tp = x.q.shape[1]
    do = jax.random.normal(ks[4], (B, Tp, H, V), dtype)
    rc = lambda t: jnp.broadcast_to(t.reshape(B, 1, Tp // C, C), (B, H, Tp // C, C))
    pull = _over_chunks(functools.partial(_state_pullback, scale=K ** -0.5, mm_dtype=jnp.bfloat16))
    p, ek, a, y = pull(_chunked(x.q, C), _chunked(x.k, C)[..., 0, :], _chunked(x.beta, C)[..., 0],
                       _chunked(x.g, C), rc(x.r), rc(x.rm1), _chunked(do, C))
    dfinal = jax.random.normal(ks[5], (B, H, K, V))
    return p.astype(dtype), ek.astype(dtype), a, y, dfinal


def _reference(p, ek, a, y, dfinal):
    # on the CPU: the GPU has no float64 matmul
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        f64 = lambda t: jnp.asarray(np.asarray(t.astype(jnp.float32)), jnp.float64)
        cot, ds0 = reverse_scan(*(f64(t) for t in (p, ek, a, y, dfinal)))
        return np.asarray(cot), np.asarray(ds0)


def _rel(a, b):
    return np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()


@pytest.mark.parametrize("K, V, block_v, T, reset_at, compare_triton", [
    (64, 128, 64, 150, 100, True),  # a reset in the second of 3 chunks
    (64, 64, 32, 101, None, False),
    (128, 64, 64, 101, 40, False),
])
def test_interpreter_matches_float64_reference(K, V, block_v, T, reset_at, compare_triton):
    _check_against_reference(K, V, block_v, T, reset_at, compare_triton, also_16bit=compare_triton)


def _check_against_reference(K, V, block_v, T, reset_at, compare_triton, *, registers=None, also_16bit=False):
    inputs = _pullback_inputs(K=K, V=V, T=T, reset_at=reset_at, seed=K + V)
    if reset_at is not None:
        assert float(jnp.min(inputs[2])) == 0.0  # the reset chunk's decay is zero
    cot, ds0 = reverse_pass(*inputs, block_v=block_v, registers=registers, interpret=True)
    ref_cot, ref_ds0 = _reference(*inputs)
    assert cot.shape == ref_cot.shape and ds0.shape == ref_ds0.shape
    assert _rel(cot, ref_cot) < 1e-2
    assert _rel(ds0, ref_ds0) < 1e-2
    if also_16bit:  # cot_dtype="bfloat16": cot_end written in bf16 (X float32 inside), ds0 float32
        cot16, ds0_16 = reverse_pass(*inputs, block_v=block_v, registers=registers, cot_dtype="bfloat16",
                                     interpret=True)
        assert cot16.dtype == jnp.bfloat16 and ds0_16.dtype == jnp.float32
        assert _rel(cot16, ref_cot) < 1e-2
        assert _rel(ds0_16, ref_ds0) < 1e-2
        # the float32 pass's values rounded (X is float32 in both)
        np.testing.assert_array_equal(np.asarray(cot.astype(jnp.bfloat16), np.float32), np.asarray(cot16, np.float32))
        np.testing.assert_array_equal(np.asarray(ds0), np.asarray(ds0_16))
    if compare_triton:
        p, ek, a, y, dfinal = inputs
        tri_cot, tri_ds0 = triton_reverse_pass(p.astype(jnp.float32), ek.astype(jnp.float32), a, y, dfinal,
                                               mm_dtype=jnp.bfloat16, interpret=True)
        assert _rel(cot, np.asarray(tri_cot, np.float64)) < 1e-2
        assert _rel(ds0, np.asarray(tri_ds0, np.float64)) < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("K, block_v, registers", [(128, 64, None), (64, 32, None), (64, 64, False)])
def test_16bit_cot_end_staged_and_wide(K, block_v, registers):
    """cot_dtype="bfloat16" on the staged kernels (block_v 32 / 64) and the register kernel at K = 128."""
    _check_against_reference(K, 128, block_v, 150, 100, False, registers=registers, also_16bit=True)


@pytest.mark.parametrize("K, V, block_v, registers, cot_dtype", [
    (64, 64, 64, None, None), (128, 128, 64, None, None), (128, 64, 32, None, None), (128, 128, 64, False, None),
    (64, 64, 64, None, "bfloat16"), (128, 128, 64, None, "bfloat16"), (128, 64, 32, None, "bfloat16"),
    (128, 128, 64, False, "bfloat16")])
def test_lowers_for_cuda(K, V, block_v, registers, cot_dtype):
    B, H, N = 1, 2, 3
    args = (jnp.zeros((B, H, N, C, K), jnp.bfloat16), jnp.zeros((B, H, N, C, K), jnp.bfloat16),
            jnp.zeros((B, H, N)), jnp.zeros((B, H, N, K, V)), jnp.zeros((B, H, K, V)))
    fn = jax.jit(lambda *a: reverse_pass(*a, block_v=block_v, registers=registers, cot_dtype=cot_dtype))
    lowered = fn.trace(*args).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
    assert lowered.out_info[0].dtype == (jnp.float32 if cot_dtype is None else jnp.dtype(cot_dtype))


def test_lowers_for_cuda_with_16bit_y():
    """Y in the inputs' dtype (the pull-back's y_dtype), read transposed by the register kernel."""
    B, H, N, K, V = 1, 2, 3, 128, 128
    args = (jnp.zeros((B, H, N, C, K), jnp.bfloat16), jnp.zeros((B, H, N, C, K), jnp.bfloat16),
            jnp.zeros((B, H, N)), jnp.zeros((B, H, N, K, V), jnp.bfloat16), jnp.zeros((B, H, K, V)))
    lowered = jax.jit(lambda *a: reverse_pass(*a, cot_dtype="bfloat16")).trace(*args).lower(
        lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("K, block_v, registers", [(64, 64, None), (64, 32, None)])
def test_16bit_y_matches_the_rounded_float32_y(K, block_v, registers):
    """Y given in bf16 (register kernel: read as it is; staged: cast in XLA) gives the float32 pass's
    result on the bf16-rounded Y, and stays within the float64 reference's tolerance."""
    p, ek, a, y, dfinal = _pullback_inputs(K=K, V=64, T=150, reset_at=100, seed=5)
    y16 = y.astype(jnp.bfloat16)
    run = lambda y_: reverse_pass(p, ek, a, y_, dfinal, block_v=block_v, registers=registers, interpret=True)
    (cot16, ds16), (cot_r, ds_r) = run(y16), run(y16.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(cot16), np.asarray(cot_r), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ds16), np.asarray(ds_r), rtol=1e-6, atol=1e-6)
    ref_cot, ref_ds0 = _reference(p, ek, a, y, dfinal)
    assert _rel(cot16, ref_cot) < 1e-2 and _rel(ds16, ref_ds0) < 1e-2


def test_rejects_unsupported_inputs():
    B, H, N, K, V = 1, 2, 2, 64, 64
    p = jnp.zeros((B, H, N, C, K), jnp.bfloat16)
    a, y, dfinal = jnp.zeros((B, H, N)), jnp.zeros((B, H, N, K, V)), jnp.zeros((B, H, K, V))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        reverse_pass(p.astype(jnp.float32), p.astype(jnp.float32), a, y, dfinal)
    with pytest.raises(ValueError, match="chunk size"):
        reverse_pass(p[..., :32, :], p[..., :32, :], a, y, dfinal)
    with pytest.raises(ValueError, match="`ek`"):
        reverse_pass(p, p.astype(jnp.float16), a, y, dfinal)
    with pytest.raises(ValueError, match="`y`"):
        reverse_pass(p, p, a, y[:, :, :1], dfinal)
    with pytest.raises(ValueError, match="`y`"):
        reverse_pass(p, p, a, y.astype(jnp.float16), dfinal)
    with pytest.raises(ValueError, match="registers=True needs block_v=64"):
        reverse_pass(p, p, a, y, dfinal, block_v=32, registers=True)
    with pytest.raises(ValueError, match="`cot_dtype`"):
        reverse_pass(p, p, a, y, dfinal, cot_dtype="float16")
    with pytest.raises(ValueError, match="`cot_dtype`"):
        reverse_pass(p, p, a, y, dfinal, cot_dtype="not_a_dtype")


@pytest.mark.gpu
@pytest.mark.parametrize("block_v, registers, cot_dtype, y16", [
    (64, None, None, False), (64, False, None, False), (32, None, None, False), (64, None, "bfloat16", False),
    (64, False, "bfloat16", False), (32, None, "bfloat16", False), (64, None, "bfloat16", True)])
def test_gpu_matches_float64_reference(block_v, registers, cot_dtype, y16):
    inputs = _pullback_inputs(B=2, T=500, H=4, K=128, V=128, reset_at=300, seed=3)
    p, ek, a, y, dfinal = inputs
    cot, ds0 = reverse_pass(p, ek, a, y.astype(jnp.bfloat16) if y16 else y, dfinal, block_v=block_v,
                            registers=registers, cot_dtype=cot_dtype)
    assert cot.dtype == (jnp.float32 if cot_dtype is None else jnp.dtype(cot_dtype))
    ref_cot, ref_ds0 = _reference(*inputs)
    assert _rel(cot, ref_cot) < 1e-2
    assert _rel(ds0, ref_ds0) < 1e-2


def test_lowers_for_cuda_float16():
    B, H, N, K, V = 1, 2, 3, 128, 128
    args = (jnp.zeros((B, H, N, C, K), jnp.float16), jnp.zeros((B, H, N, C, K), jnp.float16),
            jnp.zeros((B, H, N)), jnp.zeros((B, H, N, K, V)), jnp.zeros((B, H, K, V)))
    lowered = jax.jit(reverse_pass).trace(*args).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def _factor_inputs(*, B=1, T=150, H=2, K=64, V=64, reset_at=None, seed=0, dtype=jnp.bfloat16):
    """(x, tv, p, qf, do, dfinal) for `reverse_from_factors` (P and Qf random: the pass only multiplies
    them) and the float64 reference (cot_end, ds0) of `reverse_scan` on the pull-back terms they stand
    for: ek = diag(end_m1) k0, a = all, Y = Qf^T do per chunk."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    x = _prepared(ks, B, T, H, K, V, reset_at, dtype)
    tv = mc.token_vectors(x)
    Tp = x.q.shape[1]
    p = (0.3 * jax.random.normal(ks[4], (B, Tp, H, K))).astype(dtype)
    qf = (0.3 * jax.random.normal(ks[5], (B, Tp, H, K))).astype(dtype)
    do = jax.random.normal(ks[6], (B, Tp, H, V), dtype)
    dfinal = jax.random.normal(ks[7], (B, H, K, V))
    N = Tp // C
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        f64 = lambda t: jnp.asarray(np.asarray(t.astype(jnp.float32)), jnp.float64)
        heads = lambda t: jnp.moveaxis(f64(t).reshape(B, N, C, H, -1), 3, 1)  # [B, H, N, C, .]
        end = f64(tv.end_m1).reshape(B, H, N, C)
        ek = heads(x.k[..., 0, :]) * end[..., None]
        y = jnp.einsum("bhnck,bhncv->bhnkv", heads(qf), heads(do))
        cot, ds0 = reverse_scan(heads(p), ek, f64(tv.all), y, f64(dfinal))
    return (x, tv, p, qf, do, dfinal), (np.asarray(cot), np.asarray(ds0))


@pytest.mark.parametrize("K, V, reset_at, cot_dtype", [(64, 128, 100, None), (128, 64, None, "bfloat16")])
def test_reverse_from_factors_matches_float64(K, V, reset_at, cot_dtype):
    args, (cot_ref, ds0_ref) = _factor_inputs(K=K, V=V, reset_at=reset_at, seed=K + V)
    cot, ds0 = reverse_from_factors(*args, cot_dtype=cot_dtype, interpret=True)
    assert cot.dtype == (jnp.float32 if cot_dtype is None else jnp.dtype(cot_dtype))
    assert _rel(cot.astype(jnp.float32), cot_ref) < 1e-2 and _rel(ds0, ds0_ref) < 1e-2


def test_reverse_from_factors_lowers_for_cuda():
    args, _ = _factor_inputs(K=128, V=128)
    fn = functools.partial(reverse_from_factors, cot_dtype="bfloat16")
    assert "mosaic_gpu" in jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_reverse_from_factors_rejects():
    (x, tv, p, qf, do, dfinal), _ = _factor_inputs()
    with pytest.raises(ValueError, match="`qf`"):
        reverse_from_factors(x, tv, p, qf[..., :32], do, dfinal)
    with pytest.raises(ValueError, match="`dfinal`"):
        reverse_from_factors(x, tv, p, qf, do, dfinal.astype(jnp.bfloat16))


@pytest.mark.gpu
def test_reverse_from_factors_on_gpu():
    args, (cot_ref, ds0_ref) = _factor_inputs(B=2, T=500, H=4, K=128, V=128, reset_at=300, seed=5)
    cot, ds0 = reverse_from_factors(*args, cot_dtype="bfloat16")
    assert _rel(cot.astype(jnp.float32), cot_ref) < 1e-2 and _rel(ds0, ds0_ref) < 1e-2
