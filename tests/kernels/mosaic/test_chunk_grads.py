"""The Mosaic GPU per-chunk backward (`pallas_kernels/gpu/mosaic/chunk_grads.py`): in the Mosaic GPU
interpreter against `grads.chunk_grads` vmapped over chunks in float64 and against the Triton kernel
(interpret mode, chunk 64); lowered for CUDA on CPU; a GPU test at a larger shape for the device."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.backward import _chunked, _over_chunks, _unchunked, _xla_inverse
from pallas_kernels.common import chunk_decays, mm, prepare
from pallas_kernels.grads import chunk_grads
from pallas_kernels.gpu.mosaic import common as mc
from pallas_kernels.gpu.mosaic.chunk_grads import chunk_grads_backward, chunk_inverses, supported

C = mc.CHUNK


def _inputs(T=100, H=2, K=64, V=64, L=1, B=1, init=True, reset=True, seed=0, dtype=jnp.bfloat16):
    """Prepared bf16 inputs plus starts / cot_end / do / ainv (float32, forward's inverse)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 9)
    nrm = lambda t: t / jnp.linalg.norm(t, axis=-1, keepdims=True)
    q = nrm(jax.random.normal(ks[0], (B, T, H, K))).astype(dtype)
    k = nrm(jax.random.normal(ks[1], (B, T, H, L, K))).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, L, V), dtype)
    beta = jax.random.uniform(ks[3], (B, T, H, L)).astype(dtype)
    g = -jax.random.uniform(ks[4], (B, T, H)) * 0.2
    seg = jnp.zeros((B, T), jnp.int32).at[:, T - 30:].set(1) if reset else None
    s0 = jax.random.normal(ks[5], (B, H, K, V)) if init else None
    x = prepare(q, k, v, beta, g, s0, seg, C)
    Tp, N = x.q.shape[1], x.q.shape[1] // C
    starts = jax.random.normal(ks[6], (B, H, N, K, V))
    cot_end = jax.random.normal(ks[7], (B, H, N, K, V))
    do = jax.random.normal(ks[8], (B, Tp, H, V), dtype)
    ainv = _forward_inverse(x)
    return x, starts, do, cot_end, ainv


def _forward_inverse(x):
    """(I + m)^{-1} per chunk in float32, standing in for the forward's saved one [B, H, N, C, C]
    (the float64 reference solves its own)."""
    return chunk_inverses(x)


def _reference(x, starts, do, cot_end, *, scale):
    """`grads.chunk_grads` vmapped over chunks, everything float64 (the same bf16 inputs), on the CPU
    (float64 GEMMs do not run on the GPU: "not supported by cublasLt")."""
    cpu = jax.devices("cpu")[0]
    x, starts, do, cot_end = jax.device_put((x, starts, do, cot_end), cpu)
    with jax.enable_x64(True), jax.default_device(cpu):
        f64 = jnp.float64
        B, Tp, H, K = x.q.shape
        L = x.k.shape[3]
        q, k, v, beta, g, dc = (_chunked(t.astype(f64), C) for t in (x.q, x.k, x.v, x.beta, x.g, do))
        rc = lambda t: jnp.broadcast_to(t.reshape(B, 1, Tp // C, C), (B, H, Tp // C, C))
        mm64 = lambda a, b, dtype, trans_a=False, trans_b=False: mm(a, b, dtype=f64, trans_a=trans_a,
                                                                    trans_b=trans_b).astype(f64)

        def one(q, k, v, beta, g, r, rm1, s, do, xc):
            ks = [k[:, l] for l in range(L)]
            betas = [beta[:, l] for l in range(L)]
            d = chunk_decays(g, r, rm1)
            m = betas[0][:, None] * (ks[0] @ ks[0].T) * d.m1m1
            a_inv = _xla_inverse(m)
            dq, dks, dvs, dbetas, dg = chunk_grads(q, ks, [v[:, l] for l in range(L)], betas, g, r, rm1, s, do,
                                                   xc, a_inv, scale=scale, mm_dtype=f64, matmul=mm64)
            return dq, jnp.stack(dks, 1), jnp.stack(dvs, 1), jnp.stack(dbetas, 1), dg

        out = _over_chunks(one)(q, k, v, beta, g, rc(x.r), rc(x.rm1), starts.astype(f64), dc,
                                cot_end.astype(f64))
        return [np.asarray(_unchunked(t)) for t in out]


def _mosaic(x, starts, do, cot_end, ainv, *, scale, interpret, **kw):
    fn = jax.jit(functools.partial(chunk_grads_backward, scale=scale, interpret=interpret, **kw))
    return fn(x, mc.token_vectors(x), starts, do, cot_end, ainv=ainv)


def _assert_close(got, want, tol=1e-2):
    names = ("dq", "dk", "dv", "dbeta", "dg")
    for name, a, b in zip(names, got, want):
        a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
        b = np.asarray(b, np.float64)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
        assert err < tol, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("L,K,V,init,reset,kw", [
    (1, 128, 64, True, True, {}),  # K = 128: the [C, 64] output slices
    # two value blocks: the partial sums; ainv=None (solved in XLA); raw tiles one pair per write
    (2, 64, 128, True, True, {}),
    pytest.param(2, 64, 128, True, True, {"per_write": False}, marks=pytest.mark.slow),
    pytest.param(1, 64, 64, False, False, {}, marks=pytest.mark.slow),
    pytest.param(3, 64, 64, False, True, {"per_write": False}, marks=pytest.mark.slow),
    pytest.param(3, 64, 64, True, True, {}, marks=pytest.mark.slow),
    pytest.param(2, 64, 64, True, True, {"per_write": "split"}, marks=pytest.mark.slow),
    pytest.param(2, 128, 128, True, False, {"fold": False}, marks=pytest.mark.slow),
    (1, 64, 128, True, False, {"order": "values"}),  # value blocks of one chunk in adjacent CTAs
    pytest.param(1, 128, 128, True, False, {}, marks=pytest.mark.slow)])
def test_interpret_matches_float64_reference(L, K, V, init, reset, kw):
    x, starts, do, cot_end, ainv = _inputs(L=L, K=K, V=V, init=init, reset=reset, seed=L + V)
    scale = 0.125
    got = _mosaic(x, starts, do, cot_end, None if (L, V) == (2, 128) else ainv, scale=scale, interpret=True,
                  **kw)
    _assert_close(got, _reference(x, starts, do, cot_end, scale=scale))


@pytest.mark.slow
@pytest.mark.parametrize("K,init,reset", [(64, True, True), (64, False, False), (128, True, True)])
# (These deadlocked in the interpreter on 2 cores until tests/conftest.py set NPROC: session 11.)
def test_interpret_two_warpgroups_matches_float64_reference(K, init, reset):
    """warpgroups=2: both warpgroups of one CTA, the value halves shared through SMEM; K = 128: the
    two warpgroups take turns in one output slot."""
    x, starts, do, cot_end, ainv = _inputs(L=1, K=K, V=128, init=init, reset=reset, seed=7)
    got = _mosaic(x, starts, do, cot_end, ainv if init else None, scale=0.125, interpret=True, warpgroups=2)
    _assert_close(got, _reference(x, starts, do, cot_end, scale=0.125))


@pytest.mark.slow
@pytest.mark.parametrize("L,K,V,init,reset", [(2, 64, 128, True, True), (1, 64, 64, False, False),
                                              (3, 64, 64, True, True), (2, 128, 64, True, False)])
def test_interpret_work_split_matches_float64_reference(L, K, V, init, reset):
    """warpgroups=2, split="work": one value block of 64 per CTA, E by one warpgroup and dR by the
    other, the writes alternating; V = 128: the two value blocks' dq / dk partials summed."""
    x, starts, do, cot_end, ainv = _inputs(L=L, K=K, V=V, init=init, reset=reset, seed=3 + L)
    got = _mosaic(x, starts, do, cot_end, ainv if init else None, scale=0.125, interpret=True, warpgroups=2,
                  split="work")
    _assert_close(got, _reference(x, starts, do, cot_end, scale=0.125))


@pytest.mark.parametrize("L,K,V,init,reset", [(3, 64, 64, True, True),
                                              pytest.param(1, 128, 32, False, False, marks=pytest.mark.slow),
                                              pytest.param(3, 128, 64, True, False, marks=pytest.mark.slow)])
def test_interpret_narrow_work_split_matches_float64_reference(L, K, V, init, reset):
    """The work split at 32 value columns per CTA (where nothing fits at 64: L = 3 at K = 128): the
    64-byte swizzle, <S, dS'> over key-row blocks, V / 32 value blocks' dq / dk partials summed."""
    x, starts, do, cot_end, ainv = _inputs(L=L, K=K, V=V, init=init, reset=reset, seed=11 + L)
    got = _mosaic(x, starts, do, cot_end, ainv if init else None, scale=0.125, interpret=True, warpgroups=2,
                  split="work", block_v=32)
    _assert_close(got, _reference(x, starts, do, cot_end, scale=0.125))


@pytest.mark.parametrize("K,V,init,reset,kw", [(64, 64, True, True, {}), (128, 128, True, True, {}),
                                            (64, 128, False, False, {}), (128, 64, True, False, {}),
                                            (64, 64, True, True, {"paired_decays": False}),
                                            (128, 128, True, True, {"vw_by": "keys"}),
                                            (128, 128, True, True, {"vw_by": "forward"}),
                                            (128, 64, True, True, {"loads_by": "each"}),
                                            (128, 128, True, True, {"block_loops": False}),
                                            (128, 64, False, True, {"block_loops": False})])
def test_interpret_three_warpgroups_matches_float64_reference(K, V, init, reset, kw):
    """warpgroups=3 (L = 1): the forward / backward / key warpgroups handing tiles over through SMEM
    barriers, one CTA over all value columns; ainv=None: solved in XLA. paired: the decay matrices one
    column step apart from one exp (documents inside the chunk check the zeroed reset columns);
    vw_by: vw formed by the key-side or forward-side warpgroup; loads_by "each": every warpgroup issues the
    copies of its own operands; block_loops (the default) False: the per-block stretches unrolled (two value
    and two key blocks; one value block and two key blocks)."""
    x, starts, do, cot_end, ainv = _inputs(L=1, K=K, V=V, init=init, reset=reset, seed=K + V + init)
    got = _mosaic(x, starts, do, cot_end, ainv if init else None, scale=0.125, interpret=True, warpgroups=3, **kw)
    assert got[0].dtype == got[1].dtype == jnp.bfloat16  # one CTA holds every value column: 16-bit dq / dk
    _assert_close(got, _reference(x, starts, do, cot_end, scale=0.125))


@pytest.mark.parametrize("scale", [-0.125, 0.0])
def test_interpret_three_warpgroups_without_a_positive_scale_matches_float64_reference(scale):
    """The query scale rides in the decays' exponent only when positive; otherwise it multiplies."""
    x, starts, do, cot_end, ainv = _inputs(L=1, K=64, V=64, init=True, reset=True, seed=5)
    got = _mosaic(x, starts, do, cot_end, ainv, scale=scale, interpret=True, warpgroups=3)
    _assert_close(got, _reference(x, starts, do, cot_end, scale=scale))


@pytest.mark.parametrize("L,K,V,init,reset,block_v", [
    (2, 128, 128, True, True, 32),  # K = 128: 32 value columns fit (64 do not with float32 output slots)
    (3, 128, 128, True, True, 32),  # four value blocks: the dq / dk shares summed in XLA
    (2, 64, 64, False, False, 64),  # one value block: 16-bit dq / dk
    (4, 64, 64, True, False, 32),
    (3, 64, 128, False, True, 64)])
def test_interpret_three_warpgroups_at_several_writes_matches_float64_reference(L, K, V, init, reset, block_v):
    """warpgroups=3 at L >= 2 (`chunk_grads_wg3w`): each write's tiles kept apart, one CTA per value block
    (block_v: the widest that fits, its default); ainv=None: solved in XLA."""
    x, starts, do, cot_end, ainv = _inputs(L=L, K=K, V=V, init=init, reset=reset, seed=L + K + V + init)
    got = _mosaic(x, starts, do, cot_end, ainv if init else None, scale=0.125, interpret=True, warpgroups=3)
    assert got[0].dtype == (jnp.bfloat16 if V == block_v else jnp.float32)
    _assert_close(got, _reference(x, starts, do, cot_end, scale=0.125))


@pytest.mark.parametrize("L,K,V,kw", [(2, 128, 128, {}), (3, 128, 128, {"dqk_sum": "add16"}), (4, 64, 64, {})])
def test_three_warpgroups_at_several_writes_lower_for_cuda(L, K, V, kw):
    from pallas_kernels.gpu.mosaic import chunk_grads_wg3w

    x, starts, do, cot_end, ainv = _inputs(L=L, K=K, V=V)
    fn = functools.partial(chunk_grads_backward, scale=0.1, interpret=False, warpgroups=3, **kw)
    text = jax.jit(fn).trace(x, mc.token_vectors(x), starts, do, cot_end, ainv=ainv).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "prism_chunk_grads_mgpu_wg3w" in text
    assert chunk_grads_wg3w.block_v_for(K, L, V, x.q.dtype) == 32  # SMEM: 64 value columns do not fit here


@pytest.mark.parametrize("kw,L,match", [({"vw_by": "keys"}, 2, "L >= 2 takes no"), ({"out_slots": 1}, 2, "L >= 2"),
                                        ({"block_v": 48}, 2, "`block_v`"), ({}, 5, "2 <= L <= 4"),
                                        ({"registers": (168, 170, 160)}, 2, "multiples of 8")])
def test_three_warpgroups_at_several_writes_reject(kw, L, match):
    x, starts, do, cot_end, ainv = _inputs(L=L, K=64, V=64)
    with pytest.raises(ValueError, match=match):
        chunk_grads_backward(x, mc.token_vectors(x), starts, do, cot_end, scale=0.1, ainv=ainv, warpgroups=3,
                             interpret=False, **kw)


@pytest.mark.parametrize("kw,L,match", [({"dqk_sum": "add"}, 1, "takes no"),
                                        ({"out_slots": 1}, 1, "takes no"),
                                        ({"registers": (176, 184, 152)}, 1, "at most 504"),  # 512: would hang
                                        ({"registers": (168, 170, 160)}, 1, "multiples of 8"),
                                        ({"registers": (168, 168)}, 1, "registers"),
                                        ({"paired_decays": "yes"}, 1, "paired_decays"),
                                        ({"vw_by": "wg1"}, 1, "vw_by"), ({"loads_by": "keys"}, 1, "loads_by"),
                                        ({"block_loops": 1}, 1, "block_loops")])
def test_three_warpgroups_reject(kw, L, match):
    x, starts, do, cot_end, ainv = _inputs(L=L, K=64, V=64)
    with pytest.raises(ValueError, match=match):
        chunk_grads_backward(x, mc.token_vectors(x), starts, do, cot_end, scale=0.1, ainv=ainv, warpgroups=3,
                             interpret=False, **kw)


@pytest.mark.slow
def test_interpret_unfolded_matches_float64_reference():
    """fold=False: the state terms' row scalings applied to the float32 products."""
    x, starts, do, cot_end, ainv = _inputs(L=2, K=128, V=64, seed=5)
    got = _mosaic(x, starts, do, cot_end, ainv, scale=0.125, interpret=True, fold=False, out_slots=1)
    _assert_close(got, _reference(x, starts, do, cot_end, scale=0.125))


@pytest.mark.slow
def test_interpret_float16_matches_float64_reference():
    x, starts, do, cot_end, ainv = _inputs(L=2, K=64, V=64, seed=21, dtype=jnp.float16)
    got = _mosaic(x, starts, do, cot_end, ainv, scale=0.125, interpret=True)
    assert got[2].dtype == jnp.float16
    _assert_close(got, _reference(x, starts, do, cot_end, scale=0.125))


@pytest.mark.slow
def test_interpret_matches_triton_kernel():
    from pallas_kernels.gpu.chunk_grads import chunk_grads_backward as triton_chunk_grads

    x, starts, do, cot_end, ainv = _inputs(L=1, V=64, seed=3)
    got = _mosaic(x, starts, do, cot_end, ainv, scale=0.3, interpret=True)
    dq, dk, dv, dbeta, dg = triton_chunk_grads(x.q, x.k, x.v, x.beta, x.g, x.r, x.rm1, starts, do, cot_end,
                                               scale=0.3, chunk_size=C, ainv=ainv, interpret=True)
    _assert_close(got, [np.asarray(jnp.asarray(t, jnp.float32)) for t in (dq, dk, dv, dbeta, dg)])


def test_bad_inputs_raise():
    x, starts, do, cot_end, ainv = _inputs(K=64, V=64)
    tv = mc.token_vectors(x)
    with pytest.raises(ValueError, match="16-bit"):
        chunk_grads_backward(x._replace(q=x.q.astype(jnp.float32)), tv, starts, do, cot_end, scale=1.0,
                             ainv=ainv)
    with pytest.raises(ValueError, match="ainv"):
        chunk_grads_backward(x, tv, starts, do, cot_end, scale=1.0, ainv=ainv[:, :1])
    with pytest.raises(ValueError, match="out_slots"):
        chunk_grads_backward(x, tv, starts, do, cot_end, scale=1.0, ainv=ainv, out_slots=3)
    with pytest.raises(ValueError, match="per_write"):
        chunk_grads_backward(x, tv, starts, do, cot_end, scale=1.0, ainv=ainv, per_write="pairs")
    with pytest.raises(ValueError, match="warpgroups"):
        chunk_grads_backward(x, tv, starts, do, cot_end, scale=1.0, ainv=ainv, warpgroups=4)
    with pytest.raises(ValueError, match="ainv"):  # the three-warpgroup kernel checks the same
        chunk_grads_backward(x, tv, starts, do, cot_end, scale=1.0, ainv=ainv[:, :1], warpgroups=3)
    with pytest.raises(ValueError, match="V = 128"):  # the value split: two value blocks of 64
        chunk_grads_backward(x, tv, starts, do, cot_end, scale=1.0, ainv=ainv, warpgroups=2, split="values")
    with pytest.raises(ValueError, match="split"):
        chunk_grads_backward(x, tv, starts, do, cot_end, scale=1.0, ainv=ainv, warpgroups=2, split="keys")
    xk = _inputs(K=128, V=128, L=2)
    with pytest.raises(ValueError, match="SMEM"):  # both value halves at L = 2: ~283 KiB
        chunk_grads_backward(xk[0], mc.token_vectors(xk[0]), *xk[1:4], scale=1.0, ainv=xk[4], warpgroups=2,
                             split="values")
    xk = _inputs(K=128, V=64, L=3)
    with pytest.raises(ValueError, match="SMEM"):  # the work split at L = 3, K = 128: ~245 KiB
        chunk_grads_backward(xk[0], mc.token_vectors(xk[0]), *xk[1:4], scale=1.0, ainv=xk[4], warpgroups=2)
    with pytest.raises(ValueError, match="block_v"):
        chunk_grads_backward(x, tv, starts, do, cot_end, scale=1.0, ainv=ainv, block_v=32)
    with pytest.raises(ValueError, match="block_v"):  # blocks of 32: the work split only
        chunk_grads_backward(x, tv, starts, do, cot_end, scale=1.0, ainv=ainv, block_v=32, warpgroups=2,
                             split="values")
    assert supported(128, 2) and supported(64, 3) and supported(128, 3)  # L = 3, K = 128: blocks of 32 (default)
    assert not supported(128, 3, narrow=False)  # narrow=False leaves the blocks of 32 out
    assert not supported(128, 4, narrow=True) and not supported(128, 1, jnp.float32)
    x4 = _inputs(K=128, V=64, L=4)
    with pytest.raises(ValueError, match="SMEM"):  # nothing fits at L = 4, K = 128
        chunk_grads_backward(x4[0], mc.token_vectors(x4[0]), *x4[1:4], scale=1.0, ainv=x4[4])


@pytest.mark.parametrize("L,K,V,kw", [
    pytest.param(1, 64, 128, {}, marks=pytest.mark.slow),
    (2, 128, 128, {}),  # per_write, two output slots at 224 KiB
    (1, 128, 64, {"out_slots": 1, "fold": False, "approx_math": False, "reduction_scratch": 6144}),
    pytest.param(2, 128, 128, {"per_write": False, "out_slots": 1}, marks=pytest.mark.slow),
    (1, 128, 128, {"warpgroups": 2}),  # one CTA over V = 128, two warpgroups, one shared output slot
    (1, 128, 128, {"warpgroups": 3, "vw_by": "keys"}),  # the three-warpgroup default plus vw on the key side
    (1, 128, 128, {"warpgroups": 3, "vw_by": "forward"}),
    (1, 128, 128, {"warpgroups": 3, "paired_decays": False}),
    (1, 128, 128, {"warpgroups": 3, "loads_by": "each"}),
    (2, 128, 128, {"warpgroups": 2}),  # L = 2: the work split (the value split does not fit)
    pytest.param(1, 64, 128, {"warpgroups": 2}, marks=pytest.mark.slow),  # an output slot per warpgroup
    (2, 128, 128, {"per_write": "split", "out_slots": 1}),
    pytest.param(2, 128, 64, {"fold": False, "out_slots": 1}, marks=pytest.mark.slow),
    pytest.param(3, 64, 64, {}, marks=pytest.mark.slow),
    pytest.param(3, 64, 64, {"per_write": False}, marks=pytest.mark.slow),
    (3, 128, 128, {}),  # the default there: the work split at 32 value columns (~211 KiB with two slots)
    pytest.param(3, 64, 128, {"warpgroups": 2, "split": "work", "block_v": 32}, marks=pytest.mark.slow)])
def test_lowers_for_cuda(L, K, V, kw):
    x, starts, do, cot_end, ainv = _inputs(L=L, K=K, V=V)
    fn = functools.partial(chunk_grads_backward, scale=0.1, interpret=False, **kw)
    lowered = jax.jit(fn).trace(x, mc.token_vectors(x), starts, do, cot_end, ainv=ainv).lower(
        lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("V,kw,summed_in_kernel", [
    (128, {}, True), (128, {"warpgroups": 1}, True), (128, {"dqk_sum": "xla"}, False),
    (64, {}, False), (128, {"order": "values", "warpgroups": 2, "split": "work"}, True),
    (128, {"dqk_sum": "add16"}, True), (128, {"dqk_sum": "add16", "warpgroups": 1}, True)])
def test_value_block_shares_are_added_by_tma_when_compiled(V, kw, summed_in_kernel):
    """dqk_sum=None on the GPU: with two value blocks dq / dk are zeroed refs the kernel adds into
    (aliased in the lowered module), with one block or dqk_sum="xla" plain outputs."""
    x, starts, do, cot_end, ainv = _inputs(L=2, K=64, V=V)
    fn = functools.partial(chunk_grads_backward, scale=0.1, interpret=False, **kw)
    text = jax.jit(fn).trace(x, mc.token_vectors(x), starts, do, cot_end, ainv=ainv).lower(
        lowering_platforms=("cuda",)).as_text()
    assert ("output_operand_alias" in text) == summed_in_kernel


@pytest.mark.parametrize("L,V,kw,dtype", [
    (1, 64, {}, jnp.bfloat16), (2, 64, {"warpgroups": 2}, jnp.bfloat16), (1, 128, {}, jnp.bfloat16),
    (2, 128, {"dqk_sum": "xla"}, jnp.float32), (2, 128, {}, jnp.bfloat16), (2, 128, {"dqk_sum": "add"}, jnp.float32),
    (1, 128, {"warpgroups": 1}, jnp.bfloat16),
    (1, 64, {"dqk_sum": "add"}, jnp.float32), (2, 128, {"dqk_sum": "add16"}, jnp.bfloat16),
    (3, 128, {"dqk_sum": "add16", "warpgroups": 2, "split": "work", "block_v": 32}, jnp.bfloat16)])
def test_defaults_write_dq_dk_in_16_bits_only_where_nothing_is_summed(L, V, kw, dtype):
    """One CTA over all value columns (V = 64, or the value split at L = 1, V = 128) writes dq / dk in
    q's dtype; shares that are summed (two value blocks of 64) are added by TMA into a 16-bit output by
    default ("add16"), and stay float32 where "add" or "xla" asks for float32 sums."""
    x, starts, do, cot_end, ainv = _inputs(L=L, K=64, V=V)
    fn = functools.partial(chunk_grads_backward, scale=0.1, interpret=False, **kw)
    dq, dk, dv, dbeta, dg = jax.eval_shape(fn, x, mc.token_vectors(x), starts, do, cot_end, ainv=ainv)
    assert (dq.dtype, dk.dtype) == (dtype, dtype)
    assert (dv.dtype, dbeta.dtype, dg.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)


def test_defaults_add_16_bit_shares_wherever_blocks_are_summed(monkeypatch):
    """L = 3 at K = V = 128 (four blocks of 32 value columns) and L = 2 (two blocks of 64): dq / dk come back
    in 16 bits, added by TMA into a 16-bit output (`ADD16_MIN_BLOCKS`); below that threshold float32 sums."""
    for L, K, min_blocks, dtype in ((3, 128, None, jnp.bfloat16), (2, 128, None, jnp.bfloat16),
                                    (2, 128, 3, jnp.float32)):
        x, starts, do, cot_end, ainv = _inputs(L=L, K=K, V=128, T=64)
        fn = functools.partial(chunk_grads_backward, scale=0.1, interpret=False)
        if min_blocks is not None:
            from pallas_kernels.gpu.mosaic import chunk_grads as cg

            monkeypatch.setattr(cg, "ADD16_MIN_BLOCKS", min_blocks)
        dq, dk, *_ = jax.eval_shape(fn, x, mc.token_vectors(x), starts, do, cot_end, ainv=ainv)
        assert (dq.dtype, dk.dtype) == (dtype, dtype), L


def test_bad_order_and_sum_options_raise():
    x, starts, do, cot_end, ainv = _inputs(L=1, K=64, V=128)
    tv = mc.token_vectors(x)
    with pytest.raises(ValueError, match="`order`"):
        chunk_grads_backward(x, tv, starts, do, cot_end, scale=1.0, ainv=ainv, order="rows")
    with pytest.raises(ValueError, match="`dqk_sum`"):
        chunk_grads_backward(x, tv, starts, do, cot_end, scale=1.0, ainv=ainv, dqk_sum="atomic")
    for dqk_sum in ("add", "add16"):
        with pytest.raises(ValueError, match="interpret"):
            chunk_grads_backward(x, tv, starts, do, cot_end, scale=1.0, ainv=ainv, dqk_sum=dqk_sum, interpret=True)


@pytest.mark.parametrize("L,V,kw,kernel", [(1, 128, {}, "wg3"), (1, 64, {}, "wg3"), (2, 128, {}, "wg2_work"),
                                           # an explicit sum keeps the split
                                           pytest.param(2, 128, {"dqk_sum": "add16"}, "wg2_work", marks=pytest.mark.slow),
                                           (1, 128, {"warpgroups": 2}, "wg2"),
                                           pytest.param(1, 64, {"warpgroups": 2}, "wg2_work", marks=pytest.mark.slow),
                                           (1, 128, {"fold": False}, None), (1, 128, {"warpgroups": 1}, None)])
def test_defaults_pick_several_warpgroups_where_they_apply(L, V, kw, kernel):
    """warpgroups=None compiles the three-warpgroup kernel at L = 1, else a two-warpgroup kernel wherever
    a split fits (the work split at L = 2), at the default options: checked on the CUDA lowering's kernel
    name."""
    x, starts, do, cot_end, ainv = _inputs(L=L, K=64, V=V)
    fn = functools.partial(chunk_grads_backward, scale=0.1, interpret=False, **kw)
    text = jax.jit(fn).trace(x, mc.token_vectors(x), starts, do, cot_end, ainv=ainv).lower(
        lowering_platforms=("cuda",)).as_text()
    found = set(re.findall(r"prism_chunk_grads_mgpu(_wg3|_wg2(?:_work)?)?_mosaic_gpu", text))
    assert found == {"_" + kernel if kernel else ""}, found


# CUDA lowerings of ~30 s each on 2 cores: the two narrow cases run with the slow Mosaic tests (.ci/run).
@pytest.mark.parametrize("L,K,block_v", [pytest.param(3, 128, 32, marks=pytest.mark.slow), (2, 128, 64),
                                         pytest.param(4, 64, 32, marks=pytest.mark.slow)])
def test_defaults_take_narrow_value_blocks_only_where_nothing_else_fits(L, K, block_v, monkeypatch):
    """warpgroups=None: the work split at 32 value columns per CTA where neither one warpgroup nor a
    split fits at 64 (L = 3 at K = 128, L = 4 at K = 64), not elsewhere; also interpreted (the
    one-warpgroup kernel would refuse the shape)."""
    from pallas_kernels.gpu.mosaic import chunk_grads as cg

    seen = []
    real = cg._two_warpgroups
    monkeypatch.setattr(cg, "_two_warpgroups", lambda *a, **kw: seen.append(kw["block_v"]) or real(*a, **kw))
    x, starts, do, cot_end, ainv = _inputs(L=L, K=K, V=128, T=64)
    for interpret in (False, True):
        fn = functools.partial(chunk_grads_backward, scale=0.1, interpret=interpret)
        seen.clear()
        traced = jax.jit(fn).trace(x, mc.token_vectors(x), starts, do, cot_end, ainv=ainv)
        if interpret and block_v == 64:
            assert seen == []  # the interpreter takes one warpgroup unless asked
        else:
            assert seen == [block_v], seen
        if not interpret:
            assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("L,kw", [(1, {}), (1, {"warpgroups": 1}), (2, {}), (2, {"out_slots": 2, "fold": False, "approx_math": False}),
                                  (2, {"per_write": False}), (1, {"per_write": False}), (2, {"per_write": "split"}),
                                  (2, {"dqk_sum": "xla"}), (2, {"order": "values"}), (2, {"warpgroups": 1, "dqk_sum": "add"}),
                                  (2, {"dqk_sum": "add16"}), (3, {"dqk_sum": "add16"})],
                         ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v))
def test_gpu_matches_float64_reference(L, kw):
    x, starts, do, cot_end, ainv = _inputs(B=2, T=500, H=4, K=128, V=128, L=L, seed=11)
    got = _mosaic(x, starts, do, cot_end, ainv, scale=128 ** -0.5, interpret=False, **kw)
    _assert_close(got, _reference(x, starts, do, cot_end, scale=128 ** -0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("K,L,split", [(64, 1, "values"), (128, 1, "values"), (128, 1, "work"), (128, 2, "work"),
                                       (64, 3, "work")])
def test_gpu_two_warpgroups_matches_float64_reference(K, L, split):
    x, starts, do, cot_end, ainv = _inputs(B=2, T=500, H=4, K=K, V=128, L=L, seed=13)
    got = _mosaic(x, starts, do, cot_end, ainv, scale=K ** -0.5, interpret=False, warpgroups=2, split=split)
    _assert_close(got, _reference(x, starts, do, cot_end, scale=K ** -0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("L,K,V,init,reset", [(3, 128, 128, True, True), (3, 128, 64, False, False),
                                              (2, 64, 64, True, True)])
def test_gpu_narrow_work_split_matches_float64_reference(L, K, V, init, reset):
    """The work split at 32 value columns per CTA: the default at L = 3, K = 128 (no kw), asked for
    elsewhere; the value blocks' dq / dk shares added by TMA."""
    x, starts, do, cot_end, ainv = _inputs(B=2, T=500, H=4, K=K, V=V, L=L, init=init, reset=reset, seed=17)
    kw = {} if (L, K) == (3, 128) else {"warpgroups": 2, "split": "work", "block_v": 32}
    got = _mosaic(x, starts, do, cot_end, ainv if init else None, scale=K ** -0.5, interpret=False, **kw)
    _assert_close(got, _reference(x, starts, do, cot_end, scale=K ** -0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("K,V,registers,kw", [(64, 128, None, {}), (128, 128, None, {}), (128, 64, None, {}),
                                              (128, 128, (152, 208, 144), {}), (128, 128, (152, 192, 160), {}),
                                              (128, 128, None, {"paired_decays": False}),
                                              (128, 128, None, {"vw_by": "keys"}),
                                              (128, 128, None, {"vw_by": "forward"}),
                                              (128, 128, None, {"loads_by": "each"}),
                                              (128, 128, None, {"block_loops": True}),
                                              (128, 128, (152, 208, 144), {"block_loops": True})])
def test_gpu_three_warpgroups_matches_float64_reference(K, V, registers, kw):
    x, starts, do, cot_end, ainv = _inputs(B=2, T=500, H=4, K=K, V=V, L=1, seed=17, reset=True)
    got = _mosaic(x, starts, do, cot_end, ainv, scale=K ** -0.5, interpret=False, warpgroups=3, registers=registers,
                  **kw)
    _assert_close(got, _reference(x, starts, do, cot_end, scale=K ** -0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("L,K,V,kw", [(2, 128, 128, {}), (3, 128, 128, {}), (2, 128, 128, {"dqk_sum": "add16"}),
                                      (3, 64, 128, {}), (2, 128, 64, {"registers": (152, 208, 144)})])
def test_gpu_three_warpgroups_at_several_writes_matches_float64_reference(L, K, V, kw):
    x, starts, do, cot_end, ainv = _inputs(B=2, T=500, H=4, K=K, V=V, L=L, seed=19, reset=True)
    got = _mosaic(x, starts, do, cot_end, ainv, scale=K ** -0.5, interpret=False, warpgroups=3, **kw)
    _assert_close(got, _reference(x, starts, do, cot_end, scale=K ** -0.5))


@pytest.mark.gpu
def test_gpu_matches_triton_kernel():
    from pallas_kernels.gpu.chunk_grads import chunk_grads_backward as triton_chunk_grads

    x, starts, do, cot_end, ainv = _inputs(B=2, T=500, H=4, K=128, V=128, L=2, seed=12)
    got = _mosaic(x, starts, do, cot_end, ainv, scale=0.1, interpret=False)
    want = triton_chunk_grads(x.q, x.k, x.v, x.beta, x.g, x.r, x.rm1, starts, do, cot_end, scale=0.1,
                              chunk_size=C, ainv=ainv)
    _assert_close(got, [np.asarray(jnp.asarray(t, jnp.float32)) for t in want])


@pytest.mark.parametrize("kw", [{"registers": (168, 168, 168)}, {"paired_decays": False}, {"vw_by": "keys"},
                                {"block_loops": True}])
def test_registers_reject_without_three_warpgroups(kw):
    x, starts, do, cot_end, ainv = _inputs(L=1, K=64, V=64)
    with pytest.raises(ValueError, match="warpgroups` = 3 only"):
        chunk_grads_backward(x, mc.token_vectors(x), starts, do, cot_end, scale=0.1, ainv=ainv, warpgroups=2,
                             interpret=False, **kw)
