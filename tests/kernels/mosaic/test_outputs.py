"""Mosaic GPU output kernel (`pallas_kernels/gpu/mosaic/outputs.py`): in the interpreter against
`common.chunk_output` vmapped over chunks in float64 and against the Triton `split.outputs` (interpret
mode, chunk 64); lowered for CUDA on CPU; on the GPU at a larger shape."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import chunk_decays, chunk_output, prepare
from pallas_kernels.gpu import split
from pallas_kernels.gpu.mosaic import common as mc
from pallas_kernels.gpu.mosaic.output_factors import output_factors
from pallas_kernels.gpu.mosaic.outputs import (SMEM_LIMIT, default_block_v, default_chunks_per_cta,
                                               default_slots, outputs, smem_bytes)
from pallas_kernels.gpu.mosaic.state import state_pass

C = mc.CHUNK
SCALE = 0.3


def _inputs(T, H, K, V, L, *, with_s0, resets, dtype=jnp.bfloat16, seed=0, B=1):
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = jax.random.normal(ks[0], (B, T, H, K), dtype)
    k = jax.random.normal(ks[1], (B, T, H, L, K))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, L, V), dtype)
    beta = jax.random.uniform(ks[3], (B, T, H, L)).astype(dtype)
    g = -jax.random.uniform(ks[4], (B, T, H)) * 0.2
    s0 = jax.random.normal(ks[5], (B, H, K, V)) if with_s0 else None
    seg = None
    if resets:
        seg = jnp.zeros((B, T), jnp.int32).at[:, T // 3:].set(1).at[:, T - 5:].set(2)
    return prepare(q, k, v, beta, g, s0, seg, C)


def _intra_and_starts(x):
    p, qe, _ = split.intra(x, chunk_size=C, inverse="rows", save_inverse=False, interpret=True)
    starts, _, _ = split.state_pass(x, p, qe, chunk_size=C, interpret=True)
    return p, qe, starts


def _reference64(x, p, qe, starts):
    """`chunk_output` per chunk in float64 on the same (16-bit) inputs: o [B, Tp, H, V] float64."""
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    N = Tp // C
    cpu = jax.devices("cpu")[0]  # float64 matmuls do not run on the GPU
    x, p, qe, starts = jax.device_put((x, p, qe, starts), cpu)
    with jax.enable_x64(True), jax.default_device(cpu):
        f64 = lambda t: jnp.asarray(np.asarray(t.astype(jnp.float32), np.float64))
        chunked = lambda t: jnp.moveaxis(f64(t).reshape(B, N, C, *t.shape[2:]), 3, 1)  # [B, H, N, C, ...]
        q, k, v, beta, p6, qe6 = map(chunked, (x.q, x.k, x.v, x.beta, p, qe))
        g = chunked(x.g)
        rc = lambda t: jnp.broadcast_to(jnp.asarray(t).reshape(B, 1, N, C), (B, H, N, C))

        def one(s, p, qe, q, k, v, beta, g, r, rm1):
            ks = [k[:, l] for l in range(L)]
            vws = [beta[:, l, None] * v[:, l] for l in range(L)]
            d = chunk_decays(g, r, rm1)
            return chunk_output(s, p, qe, q, ks[0], ks, vws, d, mm_dtype=jnp.float64)

        fn = jax.vmap(jax.vmap(jax.vmap(one)))
        o = fn(f64(starts), p6, qe6, q, k, v, beta, g, rc(x.r), rc(x.rm1))  # [B, H, N, C, V]
        return SCALE * np.asarray(jnp.moveaxis(o, 1, 3).reshape(B, Tp, H, V))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


CASES = [  # (T, V, L, with_s0, resets, block_v, chunks_per_cta, slots, starts16, fold_start); fold_start
    # cases also set qk_first (every q k_l^T in the first group)
    (150, 64, 1, True, True, None, 3, None, False, False),  # three chunks through two slots (0, 1, 0)
    pytest.param(99, 128, 2, True, True, 64, 2, 1, False, False, marks=pytest.mark.slow),  # one slot
    (150, 64, 2, True, True, None, 3, 2, True, True),  # 16-bit starts, start folded, two slots
    pytest.param(150, 128, 2, True, True, 64, 3, 2, True, True, marks=pytest.mark.slow),
    pytest.param(99, 64, 1, True, True, None, 2, 1, True, False, marks=pytest.mark.slow),  # 16-bit, one slot
    pytest.param(99, 64, 1, False, False, None, 1, None, False, False, marks=pytest.mark.slow),  # one chunk per CTA
    pytest.param(99, 128, 3, True, True, 64, 2, 2, False, False, marks=pytest.mark.slow),
    pytest.param(150, 128, 2, False, True, None, None, None, False, False, marks=pytest.mark.slow),  # defaults
    pytest.param(150, 64, 1, True, True, None, 3, None, False, True, marks=pytest.mark.slow),  # fold, f32 S
    pytest.param(150, 128, 3, True, True, None, 3, 1, True, False, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("T,V,L,with_s0,resets,block_v,chunks_per_cta,slots,starts16,fold_start", CASES)
def test_outputs_interpreter_matches_float64_and_triton(T, V, L, with_s0, resets, block_v, chunks_per_cta,
                                                        slots, starts16, fold_start):
    x = _inputs(T, 2, 64, V, L, with_s0=with_s0, resets=resets)
    p, qe, starts = _intra_and_starts(x)
    s_in = starts.astype(x.q.dtype) if starts16 else starts
    tv = mc.token_vectors(x)
    got = outputs(x, tv, p, qe, s_in, scale=SCALE, block_v=block_v, chunks_per_cta=chunks_per_cta,
                  slots=slots, fold_start=fold_start, qk_first=fold_start, interpret=True)
    assert got.shape == x.q.shape[:3] + (V,) and got.dtype == x.v.dtype
    got = np.asarray(got.astype(jnp.float32))
    assert _rel(got, _reference64(x, p, qe, s_in)) < 1e-2
    if starts16:
        return  # the Triton kernel reads float32 starts: compared on the float32 cases
    triton = split.outputs(x, p, qe, starts, scale=SCALE, chunk_size=C, interpret=True)
    assert _rel(got, triton.astype(jnp.float32)) < 1e-2


# (K, V, L, block_v, chunks_per_cta, slots, starts16, fold_start): the default configurations at
# K = V = 128 (float32 starts, L = 1: 64 columns, two slots; L = 2: 64 columns, one slot; 16-bit
# starts: two slots at L = 1 and 2), K = 64 (two slots), one chunk per CTA, the settings to time.
LOWERING = [(128, 128, 1, None, 3, None, False, False), (128, 128, 2, None, 3, None, False, False),
            (64, 128, 2, None, 3, None, False, False),
            (128, 128, 2, None, 3, None, True, False), (128, 128, 2, None, 3, None, True, True),
            (128, 128, 1, None, 3, 1, True, True), (128, 128, 3, None, 3, None, True, "qk_first"),
            pytest.param(128, 128, 1, None, 3, None, True, False, marks=pytest.mark.slow),
            pytest.param(128, 128, 2, None, 3, None, False, True, marks=pytest.mark.slow),
            pytest.param(128, 128, 1, 64, 1, None, False, False, marks=pytest.mark.slow),
            pytest.param(128, 128, 3, None, 3, None, False, False, marks=pytest.mark.slow)]


@pytest.mark.parametrize("K,V,L,block_v,chunks_per_cta,slots,starts16,fold_start", LOWERING)
def test_outputs_lower_for_cuda(K, V, L, block_v, chunks_per_cta, slots, starts16, fold_start):
    x = _inputs(150, 2, K, V, L, with_s0=True, resets=True)
    p = jnp.zeros(x.q.shape, x.q.dtype)
    qe = jnp.zeros(x.q.shape[:3] + (V,), x.q.dtype)
    starts = jnp.zeros((1, 2, x.q.shape[1] // C, K, V), x.q.dtype if starts16 else jnp.float32)
    tv = mc.token_vectors(x)
    fn = functools.partial(outputs, scale=SCALE, block_v=block_v, chunks_per_cta=chunks_per_cta, slots=slots,
                           fold_start=bool(fold_start), qk_first=fold_start == "qk_first", interpret=False)
    lowered = jax.jit(fn).trace(x, tv, p, qe, starts).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def test_outputs_defaults():
    assert default_block_v(128, 128, 1) == 64 and default_slots(128, 64, 1, 8) == 2
    assert default_block_v(128, 128, 2) == 64 and default_slots(128, 64, 2, 8) == 1
    assert default_block_v(64, 64, 3) == 64 and default_slots(64, 64, 3, 8) == 2
    assert default_slots(128, 64, 1, 1) == 1  # one chunk per CTA: nothing to prefetch
    # B * T = 32K, H = 16, two value blocks: 32 chunks per CTA leaves 512 CTAs
    assert default_chunks_per_cta(16, 32, 16, 2) == 32 and default_chunks_per_cta(1, 512, 16, 2) == 32
    assert default_chunks_per_cta(1, 3, 2, 1) == 1  # too few chunks to share out
    # 16-bit starts: no float32 S buffer, so two slots fit at L = 2 as well (64 columns)
    assert default_block_v(128, 128, 2, True) == 64 and default_slots(128, 64, 2, 8, True) == 2
    assert smem_bytes(128, 64, 1, 1, starts16=True) <= 113 * 1024  # one slot: two CTAs per SM
    for K, V, L in ((64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 128, 2), (128, 128, 3)):
        for s16 in (False, True):
            bv = default_block_v(K, V, L, s16)
            assert smem_bytes(K, bv, L, default_slots(K, bv, L, 2, s16), starts16=s16) <= SMEM_LIMIT


def test_outputs_reject_unsupported_inputs():
    x = _inputs(64, 1, 64, 64, 1, with_s0=False, resets=False)
    p, qe = jnp.zeros(x.q.shape, x.q.dtype), jnp.zeros(x.q.shape, x.q.dtype)
    starts = jnp.zeros((1, 1, 1, 64, 64), jnp.float32)
    tv = None  # the checks come before the token vectors are read
    x32 = x._replace(q=x.q.astype(jnp.float32))
    with pytest.raises(ValueError, match="dtype"):
        outputs(x32, tv, p, qe, starts, scale=1.0)
    with pytest.raises(ValueError, match="starts"):
        outputs(x, tv, p, qe, starts[:, :, :, :32], scale=1.0)
    with pytest.raises(ValueError, match="starts"):  # 16-bit starts must be q's dtype
        outputs(x, tv, p, qe, starts.astype(jnp.float16), scale=1.0)
    with pytest.raises(ValueError, match="block_v"):
        outputs(x, tv, p, qe, starts, scale=1.0, block_v=32)
    with pytest.raises(ValueError, match="chunks_per_cta"):
        outputs(x, tv, p, qe, starts, scale=1.0, chunks_per_cta=2)
    with pytest.raises(ValueError, match="slots"):
        outputs(x, tv, p, qe, starts, scale=1.0, chunks_per_cta=1, slots=3)


@pytest.mark.gpu
@pytest.mark.parametrize("L,chunks_per_cta,starts16,fold_start,slots", [
    (1, None, False, False, None), (1, 4, False, False, None), (2, 4, False, False, None),
    (1, 1, False, False, None), (1, None, True, False, None), (2, None, True, False, None),
    (2, None, True, True, None), (1, None, True, True, 1), (2, None, False, True, None),
    (2, None, True, "qk_first", None), (2, None, False, "qk_first", None)])
def test_outputs_on_gpu_match_float64(L, chunks_per_cta, starts16, fold_start, slots):
    ks = jax.random.split(jax.random.PRNGKey(3), 6)
    B, T, H, K, V = 2, 512, 4, 128, 128
    q = jax.random.normal(ks[0], (B, T, H, K), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, H, L, K))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, H, L, V), jnp.bfloat16)
    beta = jax.random.uniform(ks[3], (B, T, H, L)).astype(jnp.bfloat16)
    g = -jax.random.uniform(ks[4], (B, T, H)) * 0.2
    seg = jnp.zeros((B, T), jnp.int32).at[:, 300:].set(1)
    x = prepare(q, k, v, beta, g, jax.random.normal(ks[5], (B, H, K, V)), seg, C)
    p, qe, _ = split.intra(x, chunk_size=C, inverse="rows", save_inverse=False)
    starts, _, _ = split.state_pass(x, p, qe, chunk_size=C)
    s_in = starts.astype(x.q.dtype) if starts16 else starts
    got = outputs(x, mc.token_vectors(x), p, qe, s_in, scale=SCALE, chunks_per_cta=chunks_per_cta,
                  fold_start=bool(fold_start), qk_first=fold_start == "qk_first", slots=slots)
    assert _rel(got.astype(jnp.float32), _reference64(x, p, qe, s_in)) < 1e-2
    triton = split.outputs(x, p, qe, starts, scale=SCALE, chunk_size=C)
    assert _rel(got.astype(jnp.float32), triton.astype(jnp.float32)) < 1e-2


# The outputs written by the state pass from the per-chunk factors (`output_factors`: o = Qf S + Of).
FUSED = [  # (T, K, V, L, with_s0, resets)
    (150, 64, 64, 1, True, True),
    (101, 64, 128, 2, False, True),  # K != V: two value blocks
    pytest.param(99, 128, 64, 3, True, False, marks=pytest.mark.slow),
    pytest.param(200, 128, 128, 1, True, True, marks=pytest.mark.slow),
]


def _factors_times_starts(qf, of, starts):
    """Qf S + Of per chunk in float64: [B, Tp, H, V]."""
    B, Tp, H, K = qf.shape
    N = Tp // C
    f64 = lambda t: np.asarray(t.astype(jnp.float32), np.float64)
    qf6 = f64(qf).reshape(B, N, C, H, K)
    o = np.einsum("bnthk,bhnkv->bnthv", qf6, f64(starts))
    return o.reshape(B, Tp, H, -1) + f64(of)


@pytest.mark.parametrize("T,K,V,L,with_s0,resets", FUSED)
def test_output_factors_give_the_outputs(T, K, V, L, with_s0, resets):
    """Qf S + Of from the XLA factors is the float64 chunk output (each factor rounded to 16 bits once);
    leaving out any term of a factor is far off."""
    x = _inputs(T, 2, K, V, L, with_s0=with_s0, resets=resets, B=2)
    p, qe, starts = _intra_and_starts(x)
    want = _reference64(x, p, qe, starts)
    qf, of = output_factors(x, mc.token_vectors(x), p, qe, scale=SCALE)
    assert qf.shape == x.q.shape and of.shape == x.q.shape[:3] + (V,) and qf.dtype == of.dtype == x.q.dtype
    assert _rel(_factors_times_starts(qf, of, starts), want) < 1e-2
    x0 = x._replace(q=jnp.zeros_like(x.q).at[:, :, 1:].set(x.q[:, :, 1:]))  # head 0's q zeroed: o too
    qf0, of0 = output_factors(x0, mc.token_vectors(x0), p, qe, scale=SCALE)
    assert not np.asarray(qf0[:, :, 0]).any() and not np.asarray(of0[:, :, 0]).any()
    assert _rel(_factors_times_starts(qf, jnp.zeros_like(of), starts), want) > 5e-2
    assert _rel(_factors_times_starts(jnp.zeros_like(qf), of, starts), want) > 5e-2


@pytest.mark.parametrize("T,K,V,L,with_s0,resets", FUSED)
def test_state_pass_writes_the_outputs(T, K, V, L, with_s0, resets):
    """state_pass(factors=...) in the interpreter: o against the float64 chunk outputs, and its start
    states and final state exactly those of the pass without outputs."""
    x = _inputs(T, 2, K, V, L, with_s0=with_s0, resets=resets)
    p, qe, starts = _intra_and_starts(x)
    tv = mc.token_vectors(x)
    factors = output_factors(x, tv, p, qe, scale=SCALE)
    s16, final, o = state_pass(x, tv, p, qe, factors=factors, starts_dtype=x.q.dtype, interpret=True)
    assert o.shape == x.q.shape[:3] + (V,) and o.dtype == x.v.dtype
    assert _rel(o.astype(jnp.float32), _reference64(x, p, qe, starts)) < 1e-2
    s_plain, final_plain = state_pass(x, tv, p, qe, starts_dtype=x.q.dtype, interpret=True)
    np.testing.assert_array_equal(np.asarray(s16.astype(jnp.float32)), np.asarray(s_plain.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(final), np.asarray(final_plain))


@pytest.mark.parametrize("L,slots,starts16", [(1, None, True), (2, None, True), (3, None, True), (1, 1, True),
                                              pytest.param(1, None, False, marks=pytest.mark.slow)])
def test_state_pass_with_outputs_lowers_for_cuda(L, slots, starts16):
    x = _inputs(150, 2, 128, 128, L, with_s0=True, resets=True)
    p = jnp.zeros(x.q.shape, x.q.dtype)
    factors = (p, jnp.zeros(x.q.shape[:3] + (128,), x.q.dtype))
    fn = functools.partial(state_pass, factors=factors, slots=slots, starts_dtype=x.q.dtype if starts16 else None)
    lowered = jax.jit(fn).trace(x, mc.token_vectors(x), p, factors[1]).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text() and len(lowered.out_info) == 3


def test_state_pass_with_outputs_rejects():
    x = _inputs(64, 1, 64, 64, 1, with_s0=False, resets=False)
    tv = mc.token_vectors(x)
    p = jnp.zeros(x.q.shape, x.q.dtype)
    with pytest.raises(ValueError, match="factors"):
        state_pass(x, tv, p, p, factors=(p,))
    with pytest.raises(ValueError, match=r"factors\[1\] \(Of\)"):
        state_pass(x, tv, p, p, factors=(p, p[..., :32]))
    with pytest.raises(ValueError, match="register kernel"):
        state_pass(x, tv, p, p, factors=(p, p), block_v=32)


@pytest.mark.gpu
@pytest.mark.parametrize("L", [1, 2, 3])
def test_state_pass_writes_the_outputs_on_gpu(L):
    x = _inputs(500, 4, 128, 128, L, with_s0=True, resets=True, B=2, seed=3)
    p, qe, _ = split.intra(x, chunk_size=C, inverse="rows", save_inverse=False)
    starts, _, _ = split.state_pass(x, p, qe, chunk_size=C)
    tv = mc.token_vectors(x)
    factors = output_factors(x, tv, p, qe, scale=SCALE)
    _, _, o = state_pass(x, tv, p, qe, factors=factors, starts_dtype=x.q.dtype)
    assert _rel(o.astype(jnp.float32), _reference64(x, p, qe, starts)) < 1e-2
