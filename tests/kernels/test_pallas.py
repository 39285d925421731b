"""prism_pallas (interpret mode on CPU; real kernels with -m gpu) against a float64 NumPy token loop.

Shapes are tiny so that the interpret-mode runs stay within the area's test budget.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import prism_pallas
from prism_jax.ops import prism_recurrence


def numpy_prism(q, k, v, beta, g, scale, s0=None, segment_ids=None):
    """The recurrence, token by token, in float64 NumPy (prism-math.md section 1)."""
    q, k, v, beta, g = (np.asarray(x, np.float64) for x in (q, k, v, beta, g))
    B, T, H, L, K = k.shape
    V = v.shape[-1]
    S = np.zeros((B, H, K, V)) if s0 is None else np.array(s0, np.float64)
    o = np.zeros((B, T, H, V))
    for t in range(T):
        if segment_ids is not None and t > 0:
            reset = np.asarray(segment_ids)[:, t] != np.asarray(segment_ids)[:, t - 1]
            S[reset] = 0.0
        k0 = k[:, t, :, 0]  # [B, H, K]
        erase = np.einsum("bh,bhk,bhkv->bhv", beta[:, t, :, 0], k0, S)
        S = np.exp(g[:, t])[..., None, None] * (S - np.einsum("bhk,bhv->bhkv", k0, erase))
        S = S + np.einsum("bhl,bhlk,bhlv->bhkv", beta[:, t], k[:, t], v[:, t])
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


def make_inputs(seed, B, T, H, L, K, V, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, L, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, H, L, V))
    beta = jax.random.uniform(ks[3], (B, T, H, L))
    g = jnp.log(jax.random.uniform(ks[4], (B, T, H), minval=0.5, maxval=1.0))
    s0 = jax.random.normal(ks[5], (B, H, K, V))
    return tuple(x.astype(dtype) for x in (q, k, v, beta)) + (g, s0)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# Boundaries (chunk 16): inside a chunk (5), at a chunk's last (15) and first (16) token, a segment of
# length 1 (31), and one in the last, partial chunk.
SEGMENTS = np.repeat(np.arange(7), np.diff([0, 5, 15, 16, 31, 32, 45, 70]))[None]


@pytest.mark.parametrize("L,T,K,V,with_state,with_segments,kernel", [
    (1, 37, 16, 32, False, False, "split"),
    (2, 70, 32, 16, True, True, "split"),
    (3, 45, 16, 32, True, True, "fused"),  # L = 3 of the split kernels: GPU tests and benchmark
])
def test_forward_matches_float64_loop(L, T, K, V, with_state, with_segments, kernel):
    q, k, v, beta, g, s0 = make_inputs(L, 1, T, 2, L, K, V)
    s0 = s0 if with_state else None
    seg = jnp.asarray(SEGMENTS[:, :T], jnp.int32) if with_segments else None
    if L == 1:  # also covers the dispatch of prism_recurrence(impl="pallas")
        o, final = prism_recurrence(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                                    impl="pallas", chunk_size=16, segment_ids=seg)
    else:
        o, final = prism_pallas(q, k, v, beta, g, scale=K ** -0.5, initial_state=s0, chunk_size=16,
                                segment_ids=seg, kernel=kernel, block_v=16 if L == 3 else None)
    o_ref, final_ref = numpy_prism(q, k, v, beta, g, K ** -0.5, s0, seg)
    assert o.shape == (1, T, 2, V) and final.dtype == jnp.float32
    assert rel(o, o_ref) < 1e-5
    assert rel(final, final_ref) < 1e-5


@pytest.mark.parametrize("block_v", [16, None])  # None: the automatic choice (16 here: few programs)
def test_reverse_state_kernel_matches_scan(block_v):
    from pallas_kernels.backward import reverse_scan
    from pallas_kernels.gpu.state_bwd import reverse_pass

    B, H, N, C, K, V = 1, 2, 5, 16, 16, 32
    ks = jax.random.split(jax.random.PRNGKey(4), 5)
    p, ek = (jax.random.normal(kk, (B, H, N, C, K)) / 4 for kk in ks[:2])
    a = jax.random.uniform(ks[2], (B, H, N))
    y = jax.random.normal(ks[3], (B, H, N, K, V))
    dfinal = jax.random.normal(ks[4], (B, H, K, V))
    cot, ds0 = reverse_pass(p, ek, a, y, dfinal, block_v=block_v, interpret=True)
    cot_ref, ds0_ref = reverse_scan(p, ek, a, y, dfinal)
    assert rel(cot, cot_ref) < 1e-6 and rel(ds0, ds0_ref) < 1e-6


@pytest.mark.parametrize("L,T,K,V,kernel,bwd,bwd_block_v,chunk", [
    (1, 37, 32, 16, "split", "fused", None, 16),
    (2, 40, 16, 32, "split", "fused", 16, 16),  # two value blocks: dq / dk / dbeta / dg summed over blocks
    (3, 21, 16, 16, "fused", "fused", None, 16),  # no saved inverses: the backward kernels solve again
    (2, 70, 16, 16, "split", "fused", None, 64),  # the fused backward at chunk 64
    pytest.param(2, 40, 16, 32, "split", "xla", None, 16, marks=pytest.mark.slow),  # bwd="xla" (vmapped jax.vjp)
])
def test_gradients_match_reference_and_float64_directional_derivative(L, T, K, V, kernel, bwd, bwd_block_v,
                                                                      chunk):
    q, k, v, beta, g, s0 = make_inputs(7 + L, 1, T, 2, L, K, V)
    seg = jnp.asarray(SEGMENTS[:, :T], jnp.int32)
    wo = jax.random.normal(jax.random.PRNGKey(8), (1, T, 2, V))
    wf = jax.random.normal(jax.random.PRNGKey(9), (1, 2, K, V))
    args = (q, k, v, beta, g, s0)

    def loss(impl):
        def f(q, k, v, beta, g, s0):
            if impl == "pallas":
                o, fin = prism_pallas(q, k, v, beta, g, scale=K ** -0.5, initial_state=s0, chunk_size=chunk,
                                      segment_ids=seg, kernel=kernel, bwd=bwd, bwd_block_v=bwd_block_v)
            else:
                o, fin = prism_recurrence(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                                          impl=impl, segment_ids=seg)
            return jnp.sum(o * wo) + jnp.sum(fin * wf)
        return f

    check_gradients(loss("pallas"), loss("reference"), args, seg, wo, wf, K, dir_seed=20)


def check_gradients(loss_pallas, loss_reference, args, seg, wo, wf, K, dir_seed, s0_used=True):
    """Gradients of `loss_pallas` (jitted) vs `loss_reference` within 1e-5 relative, and, independently,
    <grad, d> against a float64 central difference of the NumPy loop along random directions d.
    Losses: sum(o * wo) + sum(final * wf) of (q, k, v, beta, g, s0) = args; s0_used=False: the losses
    start from a zero state whatever s0 is (its gradient is zero, and the loop starts from zero)."""
    grads = jax.jit(jax.grad(loss_pallas, argnums=range(6)))(*args)
    grads_ref = jax.grad(loss_reference, argnums=range(6))(*args)
    for name, gp, gr in zip("q k v beta g s0".split(), grads, grads_ref):
        if name == "s0" and not s0_used:
            assert gp.shape == gr.shape and not np.any(np.asarray(gp)), name
            continue
        assert gp.shape == gr.shape and rel(gp, gr) < 1e-5, (name, rel(gp, gr))
    dirs = [np.asarray(jax.random.normal(jax.random.PRNGKey(dir_seed + i), x.shape), np.float64)
            for i, x in enumerate(args)]

    def np_loss(eps):
        xs = [np.asarray(x, np.float64) + eps * d for x, d in zip(args, dirs)]
        o, fin = numpy_prism(*xs[:5], K ** -0.5, xs[5] if s0_used else None, seg)
        return np.sum(o * np.asarray(wo)) + np.sum(fin * np.asarray(wf))

    eps = 1e-5
    fd = (np_loss(eps) - np_loss(-eps)) / (2 * eps)
    analytic = sum(np.sum(np.asarray(gp, np.float64) * d) for gp, d in zip(grads, dirs))
    assert abs(analytic - fd) < 1e-4 * max(1.0, abs(fd))


@pytest.mark.slow  # the default gradient tests run this kernel too (~20 s in interpret mode)
def test_state_pullback_kernel_matches_xla():
    from pallas_kernels.backward import _chunked, _over_chunks, _state_pullback
    from pallas_kernels.common import prepare
    from pallas_kernels.gpu.pullback import state_pullback

    B, T, H, L, K, V, C = 1, 32, 2, 2, 16, 32, 16
    q, k, v, beta, g, _ = make_inputs(11, B, T, H, L, K, V)
    do = jax.random.normal(jax.random.PRNGKey(12), (B, T, H, V))
    seg = jnp.asarray(np.repeat([0, 1], [20, T - 20])[None], jnp.int32)  # chunk 1 has a reset
    x = prepare(q, k, v, beta, g, None, seg, C)
    got = state_pullback(x.q, x.k, x.beta, x.g, x.r, x.rm1, do, scale=0.3, chunk_size=C, interpret=True)
    rc = lambda t: jnp.broadcast_to(t.reshape(B, 1, T // C, C), (B, H, T // C, C))
    want = _over_chunks(functools.partial(_state_pullback, scale=0.3, mm_dtype=jnp.float32))(
        _chunked(x.q, C), _chunked(x.k, C)[..., 0, :], _chunked(x.beta, C)[..., 0], _chunked(x.g, C),
        rc(x.r), rc(x.rm1), _chunked(do, C))
    for name, a, b in zip(("p", "ek", "a", "y"), got, want):
        assert a.shape == b.shape and rel(a, b) < 1e-5, name


def test_bf16_inputs_forward_and_gradients_within_tolerance():
    """bf16 operands on the matrix units with float32 accumulation: stated tolerance 2e-2 (relative
    L2) against float64 (forward) and against the float32 reference on the same rounded inputs."""
    L, T, K, V = 2, 48, 32, 32
    q, k, v, beta, g, _ = make_inputs(3, 1, T, 2, L, K, V, dtype=jnp.bfloat16)
    wo = jax.random.normal(jax.random.PRNGKey(5), (1, T, 2, V))

    def run(impl, *a):
        o, final = prism_recurrence(*a, output_final_state=True, impl=impl, chunk_size=16)
        return o, final, jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(final)

    (o, final, _), pull = jax.vjp(lambda *a: run("pallas", *a), q, k, v, beta, g)
    grads = jax.jit(pull)((jnp.zeros_like(o), jnp.zeros_like(final), jnp.float32(1.0)))
    o_ref, final_ref = numpy_prism(q, k, v, beta, g, K ** -0.5)
    assert o.dtype == jnp.bfloat16
    assert rel(o, o_ref) < 2e-2 and rel(final, final_ref) < 2e-2
    up = [x.astype(jnp.float32) for x in (q, k, v, beta)] + [g]
    grads_ref = jax.grad(lambda *a: run("reference", *a)[2], argnums=range(5))(*up)
    for name, gp, gr in zip("q k v beta g".split(), grads, grads_ref):
        assert gp.dtype == (jnp.float32 if name == "g" else jnp.bfloat16)
        assert rel(gp, gr) < 2e-2, name


@pytest.mark.parametrize("change,match", [
    (dict(K=24), "`K`"),
    (dict(V=8), "`V`"),
    (dict(chunk_size=8), "`chunk_size`"),
    (dict(block_v=32), "`block_v`"),
    (dict(bad_g=True), "`g`"),
    (dict(bad_segments=True), "`segment_ids`"),
    (dict(kernel="triton"), "`kernel`"),
    (dict(K=128, V=128, chunk_size=64, platform="gpu"), "`chunk_size`"),  # f32 tiles over smem
    (dict(platform="metal"), "impl='chunk'"),
    (dict(float64=True), "`q` has dtype float64"),
])
def test_unsupported_shapes_raise_named_errors(change, match):
    K, V = change.get("K", 16), change.get("V", 16)
    q, k, v, beta, g, s0 = make_inputs(0, 1, 8, 1, 1, K, V)
    if change.get("bad_g"):
        g = g[..., None]
    seg = jnp.zeros((1, 7), jnp.int32) if change.get("bad_segments") else None
    if change.get("float64"):
        q = np.asarray(q, np.float64)  # a NumPy array keeps float64 without enabling x64
    with pytest.raises(ValueError, match=match):
        prism_pallas(q, k, v, beta, g, scale=1.0, chunk_size=change.get("chunk_size", 16),
                     block_v=change.get("block_v"), segment_ids=seg,
                     kernel=change.get("kernel", "split"), platform=change.get("platform"))


# ---- the TPU kernel: TPU interpret mode on CPU, and lowering to Mosaic for a TPU ----

def test_tpu_kernel_interpret_matches_float64_loop():
    L, T, K, V = 2, 40, 16, 32
    q, k, v, beta, g, s0 = make_inputs(12, 1, T, 2, L, K, V)
    seg = jnp.asarray(SEGMENTS[:, :T], jnp.int32)
    o, final = prism_pallas(q, k, v, beta, g, scale=K ** -0.5, initial_state=s0, chunk_size=16,
                            segment_ids=seg, platform="tpu-interpret")
    o_ref, final_ref = numpy_prism(q, k, v, beta, g, K ** -0.5, s0, seg)
    assert rel(o, o_ref) < 1e-5 and rel(final, final_ref) < 1e-5


@pytest.mark.parametrize("L,T,K,V,chunk,with_state,with_segments", [
    (2, 37, 16, 32, 16, True, True),  # odd T (a padded last chunk), K < V, documents
    (1, 21, 32, 16, 16, False, False),  # K > V, no initial state
    (3, 40, 16, 16, 32, True, True),  # chunk 32 (three levels of the doubled inverse more)
])
def test_tpu_backward_matches_reference_and_float64_directional_derivative(L, T, K, V, chunk, with_state,
                                                                           with_segments):
    """The TPU backward kernel (`tpu/backward.py`, bwd="auto" on a TPU) in TPU interpret mode."""
    q, k, v, beta, g, s0 = make_inputs(50 + L, 1, T, 2, L, K, V)
    seg = jnp.asarray(SEGMENTS[:, :T], jnp.int32) if with_segments else None
    wo = jax.random.normal(jax.random.PRNGKey(51), (1, T, 2, V))
    wf = jax.random.normal(jax.random.PRNGKey(52), (1, 2, K, V))

    def loss(impl):
        def f(q, k, v, beta, g, s0):
            s0 = s0 if with_state else jnp.zeros_like(s0)
            if impl == "pallas":
                o, fin = prism_pallas(q, k, v, beta, g, scale=K ** -0.5, initial_state=s0, chunk_size=chunk,
                                      segment_ids=seg, platform="tpu-interpret")
            else:
                o, fin = prism_recurrence(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                                          impl=impl, segment_ids=seg)
            return jnp.sum(o * wo) + jnp.sum(fin * wf)
        return f

    check_gradients(loss("pallas"), loss("reference"), (q, k, v, beta, g, s0), seg, wo, wf, K, dir_seed=53,
                    s0_used=with_state)


def test_tpu_backward_with_the_forward_inverse_matches_solving_again():
    """The backward kernel reads the forward's saved (I + m)^{-1}; with ainv=None it solves again."""
    from pallas_kernels.common import prepare
    from pallas_kernels.tpu.backward import backward
    from pallas_kernels.tpu.forward import forward

    L, T, K, V, C = 2, 32, 16, 16, 16
    q, k, v, beta, g, s0 = make_inputs(70, 1, T, 2, L, K, V)
    x = prepare(q, k, v, beta, g, s0, jnp.asarray(SEGMENTS[:, :T], jnp.int32), C)
    o, final, starts, ainv = forward(x, scale=0.3, chunk_size=C, interpret=True)
    assert ainv.shape == (1, 2, T // C, C, C) and ainv.dtype == jnp.float32
    do = jax.random.normal(jax.random.PRNGKey(71), o.shape)
    dfinal = jax.random.normal(jax.random.PRNGKey(72), final.shape)
    saved = backward(x, starts, do, dfinal, scale=0.3, chunk_size=C, ainv=ainv, interpret=True)
    again = backward(x, starts, do, dfinal, scale=0.3, chunk_size=C, interpret=True)
    for name, a, b in zip("dq dk dv dbeta dg ds0".split(), saved, again):
        assert a.shape == b.shape and rel(a, b) < 1e-6, (name, rel(a, b))


def test_tpu_backward_bf16_within_1e2_of_float32_reference():
    L, T, K, V = 2, 48, 32, 32
    args = make_inputs(60, 1, T, 2, L, K, V)
    wo = jax.random.normal(jax.random.PRNGKey(61), (1, T, 2, V))

    def loss(impl, dtype):
        def f(q, k, v, beta, g, s0):
            q, k, v, beta = (t.astype(dtype) for t in (q, k, v, beta))
            if impl == "pallas":
                o, _ = prism_pallas(q, k, v, beta, g, scale=K ** -0.5, initial_state=s0, chunk_size=16,
                                    platform="tpu-interpret")
            else:
                o, _ = prism_recurrence(q, k, v, beta, g, initial_state=s0, impl=impl)
            return jnp.sum(o.astype(jnp.float32) * wo)
        return f

    got = jax.jit(jax.grad(loss("pallas", jnp.bfloat16), argnums=range(6)))(*args)
    want = jax.grad(loss("reference", jnp.float32), argnums=range(6))(*args)
    for name, a, b in zip("q k v beta g s0".split(), got, want):
        assert rel(a, b) < 1e-2, (name, rel(a, b))


def test_tpu_inverse_matches_float64_on_an_ill_conditioned_chunk():
    """The doubled block inverse (`tpu/common.py`) where the powers of m blow up: beta = 1 and
    nearly parallel keys, so m is close to the all-ones strictly lower matrix."""
    from pallas_kernels.tpu.common import unit_lower_inverse

    C = 64
    rng = np.random.default_rng(0)
    k = np.ones((C, 16)) + 0.05 * rng.standard_normal((C, 16))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    m = np.tril(k @ k.T * np.exp(-0.01 * np.subtract.outer(np.arange(C), np.arange(C))), -1)
    want = np.linalg.inv(np.eye(C) + m)
    assert np.abs(np.linalg.matrix_power(m, 8)).max() > 1e6  # a power series would cancel badly here
    got = jax.jit(unit_lower_inverse)(jnp.asarray(m, jnp.float32))
    assert rel(got, want) < 1e-5, rel(got, want)


@pytest.mark.parametrize("L,K,V", [(3, 128, 128), (1, 64, 256), (2, 256, 64)])
def test_tpu_kernel_lowers_to_mosaic_with_gradients(L, K, V):
    """Lowering (jaxpr -> Mosaic) runs here; Mosaic's own compile needs a TPU and is not covered."""
    B, T, H = 1, 256, 2
    S = jax.ShapeDtypeStruct
    args = (S((B, T, H, K), jnp.bfloat16), S((B, T, H, L, K), jnp.bfloat16),
            S((B, T, H, L, V), jnp.bfloat16), S((B, T, H, L), jnp.bfloat16), S((B, T, H), jnp.float32))

    def loss(*a):
        return prism_pallas(*a, scale=0.1, platform="tpu")[0].astype(jnp.float32).sum()  # chunk 64 by default

    text = jax.jit(jax.grad(loss, argnums=range(5))).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 2 and "prism_fwd_tpu" in text and "prism_bwd_tpu" in text
    starts = f"{B * H}x{T // 64}x{K}x{V}xf32"  # the chunk start states [B*H, N, K, V]
    assert starts in text
    forward_only = jax.jit(loss).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert forward_only.count("tpu_custom_call") == 1 and starts not in forward_only


def lower_for_h200(fn, args, monkeypatch):
    """jit(fn) lowered for CUDA without a GPU: the Pallas -> Triton IR lowering runs in Python here
    (Triton's own compile to PTX is not covered). The lowering asks the runtime for the GPU's compute
    capability; an H200's is supplied instead (private JAX module: if it moves, update this)."""
    from jax._src.pallas.triton import gpu_info, pallas_call_registration

    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info",
                        lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200))
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("kernel,bwd,dtype,L,n_kernels", [
    ("split", "fused", jnp.bfloat16, 2, 6),  # intra, state, output; pullback, reverse, chunk_bwd
    ("split", "xla", jnp.float32, 3, 4),  # the default backward: intra, state, output; reverse
    ("fused", "fused", jnp.bfloat16, 1, 4),  # fused forward (no saved inverses); the three bwd kernels
    ("fused", "xla", jnp.bfloat16, 1, 2),  # fused forward; reverse (the rest is XLA)
])
def test_gpu_kernels_lower_to_triton_with_gradients(kernel, bwd, dtype, L, n_kernels, monkeypatch):
    B, T, H, K, V = 1, 128, 2, 128, 128
    S = jax.ShapeDtypeStruct
    args = (S((B, T, H, K), dtype), S((B, T, H, L, K), dtype), S((B, T, H, L, V), dtype),
            S((B, T, H, L), dtype), S((B, T, H), jnp.float32))

    def loss(*a):
        o = prism_pallas(*a, scale=0.1, chunk_size=32, platform="gpu", kernel=kernel, bwd=bwd)[0]
        return o.astype(jnp.float32).sum()

    text = lower_for_h200(jax.grad(loss, argnums=range(5)), args, monkeypatch)
    assert text.count("xla.gpu.triton") == n_kernels


def test_gpu_lowering_check_catches_a_primitive_triton_lacks(monkeypatch):
    """The check above can fail: the fused backward's trace with `jnp.cumsum` in place of
    `masked_cumsum` transposes to a reverse cumsum, which the Triton lowering refuses."""
    from jax.experimental import pallas as pl

    from pallas_kernels.common import masked_cumsum
    from pallas_kernels.gpu.chunk_bwd import chunk_vjp

    C, K, V = 16, 16, 16

    def kernel(g_ref, o_ref, cumsum):
        z = jnp.zeros((C, K), jnp.float32)
        zv = jnp.zeros((C, V), jnp.float32)
        r = jnp.zeros((C,), jnp.int32)
        *_, dg = chunk_vjp(z, [z], [zv], [g_ref[...]], g_ref[...], r, r, jnp.zeros((K, V)), zv,
                           jnp.zeros((K, V)), scale=1.0, mm_dtype=jnp.float32, cumsum=cumsum)
        o_ref[...] = dg

    def call(cumsum):
        return pl.pallas_call(functools.partial(kernel, cumsum=cumsum),
                              out_shape=jax.ShapeDtypeStruct((C,), jnp.float32))

    args = (jax.ShapeDtypeStruct((C,), jnp.float32),)
    assert "xla.gpu.triton" in lower_for_h200(call(masked_cumsum), args, monkeypatch)
    with pytest.raises(NotImplementedError, match="[Rr]everse cumsum"):
        lower_for_h200(call(jnp.cumsum), args, monkeypatch)


# ---- on the GPU (run on the device machine: pytest -m gpu tests/kernels) ----

gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def _grads(impl, args, seg, w, chunk_size=32, **kw):
    """Gradients of <o, w> + sum(final) w.r.t. (q, k, v, beta, g, s0); impl "pallas" (kwargs go to
    prism_pallas) or a prism_recurrence impl in float32 at full matmul precision."""
    K = args[0].shape[-1]

    def f(q, k, v, beta, g, s0):
        if impl == "pallas":
            o, fin = prism_pallas(q, k, v, beta, g, scale=K ** -0.5, initial_state=s0, segment_ids=seg,
                                  chunk_size=chunk_size, **kw)
        else:
            with jax.default_matmul_precision("highest"):
                o, fin = prism_recurrence(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                                          impl=impl, segment_ids=seg, chunk_size=chunk_size)
        return jnp.sum(o.astype(jnp.float32) * w) + jnp.sum(fin)

    return jax.jit(jax.grad(f, argnums=range(6)))(*args)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("L,K,V,block_v,bwd", [(2, 128, 128, 64, "xla"), (3, 64, 128, 32, "xla"),
                                               (1, 64, 64, 32, "fused"), (3, 64, 32, 32, "fused")])
def test_gpu_kernel_float32_forward_and_gradients(L, K, V, block_v, bwd):
    T = 200
    q, k, v, beta, g, s0 = make_inputs(L, 2, T, 2, L, K, V)
    seg = jnp.asarray(np.repeat(np.arange(4), [50, 64, 1, 85])[None].repeat(2, 0), jnp.int32)
    o, final = jax.jit(lambda *a: prism_pallas(*a, scale=K ** -0.5, initial_state=s0, segment_ids=seg,
                                               chunk_size=32, block_v=block_v))(q, k, v, beta, g)
    o_ref, final_ref = numpy_prism(q, k, v, beta, g, K ** -0.5, s0, seg)
    assert rel(o, o_ref) < 1e-5 and rel(final, final_ref) < 1e-5
    w = jnp.asarray(o_ref, jnp.float32)
    gp = _grads("pallas", (q, k, v, beta, g, s0), seg, w, block_v=block_v, bwd=bwd)
    gr = _grads("reference", (q, k, v, beta, g, s0), seg, w)
    for name, a, b in zip("q k v beta g s0".split(), gp, gr):
        assert rel(a, b) < 1e-5, name


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("L", [1, 3])
def test_gpu_kernel_bf16(L):
    K, V, T = 128, 128, 300
    q, k, v, beta, g, s0 = make_inputs(5, 1, T, 4, L, K, V, dtype=jnp.bfloat16)
    o, final = jax.jit(lambda *a: prism_pallas(*a, scale=K ** -0.5, chunk_size=64))(q, k, v, beta, g)
    o_ref, final_ref = numpy_prism(q, k, v, beta, g, K ** -0.5)
    assert rel(o, o_ref) < 1e-2 and rel(final, final_ref) < 1e-2
    # Gradients of the fused backward (chunk 32, the default) against the float32 reference on the
    # same bf16-rounded inputs.
    w = jax.random.normal(jax.random.PRNGKey(6), o.shape)
    gp = _grads("pallas", (q, k, v, beta, g, s0), None, w)
    up = [x.astype(jnp.float32) for x in (q, k, v, beta)] + [g, s0]
    gr = _grads("reference", up, None, w)
    for name, a, b in zip("q k v beta g s0".split(), gp, gr):
        assert rel(a, b) < 1e-2, name


def test_fused_backward_float32_large_tiles_raise_on_gpu():
    """float32 K = V = 128 tiles of the fused backward overflow an H200's shared memory (seen on the
    device): a clear error before compiling, not a runtime failure."""
    q, k, v, beta, g, s0 = make_inputs(0, 1, 32, 1, 1, 128, 128)
    with pytest.raises(ValueError, match="bwd='fused' in float32"):
        prism_pallas(q, k, v, beta, g, scale=1.0, bwd="fused", platform="gpu")
