"""Mosaic GPU forward state pass (`pallas_kernels/gpu/mosaic/state.py`): in the Mosaic GPU interpreter
against `common.chunk_state_update` looped in float64 and against the Triton state pass (interpret
mode, chunk 64), lowered for CUDA on CPU, and a GPU test for the device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import chunk_end_decays, chunk_state_update, prepare
from pallas_kernels.gpu import split
from pallas_kernels.gpu.mosaic import common as mc
from pallas_kernels.gpu.mosaic.state import state_pass

C = mc.CHUNK


def _inputs(*, B=1, T=101, H=2, K=64, V=64, L=1, initial=True, reset_at=None, seed=0, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (B, T, H, K), dtype)
    k = jax.random.normal(ks[1], (B, T, H, L, K))
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, L, V), dtype)
    g = -jax.random.uniform(ks[3], (B, T, H)) * 0.2
    beta = jax.random.uniform(ks[4], (B, T, H, L)).astype(dtype)
    s0 = jax.random.normal(ks[5], (B, H, K, V)) if initial else None
    seg = None if reset_at is None else jnp.zeros((B, T), jnp.int32).at[:, reset_at:].set(1)
    return prepare(q, k, v, beta, g, s0, seg, C)


def _intra(x):
    p, qe, _ = split.intra(x, chunk_size=C, inverse="rows", save_inverse=False, interpret=True)
    return p, qe


def _reference(x, p, qe):
    """(starts [B, H, N, K, V], final [B, H, K, V]) float64: `chunk_state_update` chunk by chunk on
    float64 casts of the same (16-bit) inputs."""
    B, Tp, H, K = x.q.shape
    L = x.k.shape[3]

    def update(s, p, qe, k, v, beta, g, r, rm1):  # one head: s [K, V], p [C, K], k [C, L, K], ...
        ks = [k[:, l] for l in range(L)]
        vws = [beta[:, l, None] * v[:, l] for l in range(L)]
        return chunk_state_update(s, p, qe, ks[0], ks, vws, chunk_end_decays(g, r, rm1), mm_dtype=jnp.float64)

    over_heads = jax.vmap(update, in_axes=(0, 1, 1, 1, 1, 1, 1, None, None))
    over_batch = jax.jit(jax.vmap(over_heads))
    # on the CPU: the GPU has no float64 matmul
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        f64 = lambda t: jnp.asarray(np.asarray(t.astype(jnp.float32)), jnp.float64)
        p, qe, k, v, beta, g, s = (f64(t) for t in (p, qe, x.k, x.v, x.beta, x.g, x.s0))
        r, rm1 = jnp.asarray(np.asarray(x.r)), jnp.asarray(np.asarray(x.rm1))
        starts = []
        for n in range(Tp // C):
            sl = slice(n * C, (n + 1) * C)
            starts.append(np.asarray(s))
            s = over_batch(s, p[:, sl], qe[:, sl], k[:, sl], v[:, sl], beta[:, sl], g[:, sl], r[:, sl], rm1[:, sl])
        return np.stack(starts, axis=2), np.asarray(s)


def _rel(a, b):
    return np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()


@pytest.mark.parametrize("L, V, K, block_v, initial, reset_at, compare_triton", [
    (1, 64, 64, 64, True, 80, True),
    (2, 128, 64, 32, False, None, False),
    pytest.param(3, 64, 64, 64, True, 70, False, marks=pytest.mark.slow),  # two slots at L = 3, K = 64
    pytest.param(3, 64, 128, 64, True, 20, False, marks=pytest.mark.slow),  # K = 128, L = 3: one slot
])
def test_interpreter_matches_float64_reference(L, V, K, block_v, initial, reset_at, compare_triton):
    _check_against_reference(L, V, K, block_v, initial, reset_at, compare_triton, also_16bit=compare_triton)


@pytest.mark.slow
@pytest.mark.parametrize("L, V, K, block_v, registers, slots", [
    (2, 128, 64, 32, None, None), (2, 64, 64, 64, False, None), (1, 128, 128, 64, None, 3), (2, 64, 64, 64, None, 1)])
def test_16bit_starts_staged_and_slots(L, V, K, block_v, registers, slots):
    """starts_dtype="bfloat16" on the staged kernels (block_v 32 / 64) and the register kernel's slot rings."""
    _check_against_reference(L, V, K, block_v, True, 40, False, registers=registers, slots=slots, also_16bit=True)


def _check_against_reference(L, V, K, block_v, initial, reset_at, compare_triton, *, registers=None, slots=None,
                             also_16bit=False):
    T = 150 if L == 3 else 101  # 3 or 2 chunks, odd lengths before padding
    x = _inputs(T=T, K=K, V=V, L=L, initial=initial, reset_at=reset_at, seed=L)
    p, qe = _intra(x)
    tv = mc.token_vectors(x)
    starts, final = state_pass(x, tv, p, qe, block_v=block_v, registers=registers, slots=slots, interpret=True)
    ref_starts, ref_final = _reference(x, p, qe)
    assert starts.shape == ref_starts.shape and final.shape == ref_final.shape
    assert _rel(starts, ref_starts) < 1e-2
    assert _rel(final, ref_final) < 1e-2
    if also_16bit:  # starts_dtype = the inputs' dtype: start states written in bf16, final float32
        starts16, final16 = state_pass(x, tv, p, qe, block_v=block_v, registers=registers, slots=slots,
                                       starts_dtype="bfloat16", interpret=True)
        assert starts16.dtype == jnp.bfloat16 and final16.dtype == jnp.float32
        assert _rel(starts16, ref_starts) < 1e-2
        assert _rel(final16, ref_final) < 1e-2
        # the float32 pass's values rounded (the state is float32 in both)
        np.testing.assert_array_equal(np.asarray(starts.astype(jnp.bfloat16), np.float32),
                                      np.asarray(starts16, np.float32))
        np.testing.assert_array_equal(np.asarray(final), np.asarray(final16))
    if compare_triton:
        tri_starts, tri_final, _ = split.state_pass(x, p, qe, chunk_size=C, block_v=64, interpret=True)
        assert _rel(starts, np.asarray(tri_starts, np.float64)) < 1e-2
        assert _rel(final, np.asarray(tri_final, np.float64)) < 1e-2


@pytest.mark.parametrize("slots", [3])
def test_slot_ring_wraps_around(slots):
    """Four chunks through a ring of three slots (chunks n + 1, n + 2 in flight), a reset in chunk 2."""
    x = _inputs(T=230, L=1, V=128, reset_at=150, seed=7)
    p, qe = _intra(x)
    starts, final = state_pass(x, mc.token_vectors(x), p, qe, slots=slots, interpret=True)
    ref_starts, ref_final = _reference(x, p, qe)
    assert starts.shape[2] == 4
    assert _rel(starts, ref_starts) < 1e-2
    assert _rel(final, ref_final) < 1e-2


def test_without_starts_gives_the_same_final_state():
    x = _inputs(L=2, V=64, reset_at=30, seed=5)
    p, qe = _intra(x)
    starts, final = state_pass(x, mc.token_vectors(x), p, qe, with_starts=False, slots=1, interpret=True)
    assert starts is None
    assert _rel(final, _reference(x, p, qe)[1]) < 1e-2


@pytest.mark.parametrize("L, K, V, block_v, with_starts, slots, registers, starts_dtype", [
    (1, 64, 64, 64, True, None, None, None), (1, 128, 128, 64, True, None, None, None),
    (2, 128, 128, 64, False, None, None, None), (2, 128, 128, 64, True, 1, None, None),
    (3, 128, 128, 64, True, None, None, None), (2, 128, 64, 32, True, None, None, None),
    (2, 128, 128, 64, True, None, False, None),  # the staged kernel at block_v = 64
    # 16-bit start states: the register kernel at each slot count, the staged kernels
    (1, 128, 128, 64, True, None, None, "bfloat16"), (2, 128, 128, 64, True, None, None, "bfloat16"),
    (2, 128, 128, 64, True, 1, None, "bfloat16"), (3, 128, 128, 64, True, None, None, "bfloat16"),
    (2, 128, 64, 32, True, None, None, "bfloat16"), (2, 128, 128, 64, True, None, False, "bfloat16")])
def test_lowers_for_cuda(L, K, V, block_v, with_starts, slots, registers, starts_dtype):
    x = _inputs(K=K, V=V, L=L, reset_at=50)
    p = jnp.zeros(x.q.shape, x.q.dtype)
    qe = jnp.zeros(x.q.shape[:3] + (V,), x.q.dtype)
    fn = jax.jit(lambda x, tv, p, qe: state_pass(x, tv, p, qe, block_v=block_v, with_starts=with_starts,
                                                 slots=slots, registers=registers, starts_dtype=starts_dtype))
    lowered = fn.trace(x, mc.token_vectors(x), p, qe).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
    if with_starts:
        assert lowered.out_info[0].dtype == (jnp.float32 if starts_dtype is None else jnp.dtype(starts_dtype))


def test_rejects_unsupported_inputs():
    x = _inputs()
    tv = mc.token_vectors(x)
    p, qe = jnp.zeros(x.q.shape, x.q.dtype), jnp.zeros(x.q.shape[:3] + (64,), x.q.dtype)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        xf = x._replace(k=x.k.astype(jnp.float32))
        state_pass(xf, tv, p, qe)
    with pytest.raises(ValueError, match="block_v"):
        state_pass(x, tv, p, qe, block_v=48)
    with pytest.raises(ValueError, match="slots=4"):
        state_pass(x, tv, p, qe, slots=4)
    with pytest.raises(ValueError, match="slots=3"):  # three slots: the register kernel (block_v = 64) only
        state_pass(x, tv, p, qe, block_v=32, slots=3)
    with pytest.raises(ValueError, match="registers=True needs block_v=64"):
        state_pass(x, tv, p, qe, block_v=32, registers=True)
    with pytest.raises(ValueError, match="`starts_dtype`"):
        state_pass(x, tv, p, qe, starts_dtype="float16")
    with pytest.raises(ValueError, match="`starts_dtype`"):
        state_pass(x, tv, p, qe, starts_dtype=jnp.int8)
    with pytest.raises(ValueError, match="`qe`"):
        state_pass(x, tv, p, qe[..., :32])
    x96 = _inputs(K=96)
    with pytest.raises(ValueError, match="key size K"):
        state_pass(x96, mc.token_vectors(x96), jnp.zeros(x96.q.shape, x96.q.dtype), qe)
    with pytest.raises(ValueError, match="`acc_state` = 1 must be True or False"):
        state_pass(x, tv, p, qe, acc_state=1)
    with pytest.raises(ValueError, match="needs the register kernel"):
        state_pass(x, tv, p, qe, block_v=32, acc_state=True)


@pytest.mark.parametrize("L", [1, 3])
def test_acc_state_lowers_for_cuda(L):
    """acc_state (the update accumulator initialised from the decayed state) lowers for a GPU, with the
    outputs in the pass at L = 1; the interpreter cannot run it (its GPU test is below)."""
    x = _inputs(K=128, V=128, L=L, reset_at=50)
    p = jnp.zeros(x.q.shape, x.q.dtype)
    qe = jnp.zeros(x.q.shape[:3] + (128,), x.q.dtype)
    factors = (p, qe) if L == 1 else None
    fn = jax.jit(lambda x, tv, p, qe: state_pass(x, tv, p, qe, starts_dtype="bfloat16", factors=factors,
                                                 acc_state=True))
    assert "mosaic_gpu" in fn.trace(x, mc.token_vectors(x), p, qe).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("L, block_v, slots, registers, starts_dtype, acc_state", [
    (2, 64, None, None, None, False), (1, 64, None, None, None, False), (2, 64, 1, None, None, False),
    (3, 64, None, None, None, False), (2, 64, None, False, None, False),
    (2, 32, None, None, None, False),  # slots None: 2 at L = 2, 3 at L = 1, 1 at L = 3
    (2, 64, None, None, "bfloat16", False), (1, 64, None, None, "bfloat16", False),
    (3, 64, None, None, "bfloat16", False), (2, 64, None, False, "bfloat16", False),
    (2, 32, None, None, "bfloat16", False),
    (1, 64, None, None, "bfloat16", True), (2, 64, None, None, "bfloat16", True), (3, 64, None, None, None, True),
    (2, 64, 1, None, None, True)])
def test_gpu_matches_float64_reference(L, block_v, slots, registers, starts_dtype, acc_state):
    x = _inputs(B=2, T=500, H=4, K=128, V=128, L=L, reset_at=300, seed=11)
    p, qe, _ = split.intra(x, chunk_size=C, inverse="rows", save_inverse=False)
    starts, final = state_pass(x, mc.token_vectors(x), p, qe, block_v=block_v, slots=slots, registers=registers,
                               starts_dtype=starts_dtype, acc_state=acc_state)
    assert starts.dtype == (jnp.float32 if starts_dtype is None else jnp.dtype(starts_dtype))
    ref_starts, ref_final = _reference(x, p, qe)
    assert _rel(starts, ref_starts) < 1e-2
    assert _rel(final, ref_final) < 1e-2


def test_lowers_for_cuda_float16():
    x = _inputs(K=128, V=128, L=2, reset_at=50, dtype=jnp.float16)
    p = jnp.zeros(x.q.shape, x.q.dtype)
    qe = jnp.zeros(x.q.shape[:3] + (128,), x.q.dtype)
    fn = jax.jit(lambda x, tv, p, qe: state_pass(x, tv, p, qe))
    assert "mosaic_gpu" in fn.trace(x, mc.token_vectors(x), p, qe).lower(lowering_platforms=("cuda",)).as_text()
