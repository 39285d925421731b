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


# Default: chunk 16 and 32, K < V and K > V, both inverse sources (L = 1 runs in the op tests below);
# the rest is slow.
@pytest.mark.parametrize("L,C,K,V,reset_at,saved_inverse", [
    (2, 32, 32, 16, (0, 17, 31), True),  # a reset at the chunk's first and last token
    (3, 16, 16, 32, (5,), False),
    pytest.param(1, 16, 16, 32, (3, 9), False, marks=pytest.mark.slow),
    pytest.param(1, 32, 32, 16, (3, 9), True, marks=pytest.mark.slow),
    pytest.param(2, 32, 32, 16, (0, 17, 31), False, marks=pytest.mark.slow),
    pytest.param(3, 16, 16, 16, (), True, marks=pytest.mark.slow),
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


# ---- prism_pallas(..., bwd="explicit"): interpret mode on CPU ----

from test_pallas import SEGMENTS, check_gradients, lower_for_h200, make_inputs, rel  # noqa: E402

from pallas_kernels import prism_pallas  # noqa: E402
from prism_jax.ops import prism_recurrence  # noqa: E402


def _loss(impl, K, seg, wo, wf, chunk=16, **kw):
    def f(q, k, v, beta, g, s0):
        if impl == "pallas":
            o, fin = prism_pallas(q, k, v, beta, g, scale=K ** -0.5, initial_state=s0, chunk_size=chunk,
                                  segment_ids=seg, bwd="explicit", platform="cpu", **kw)
        else:
            o, fin = prism_recurrence(q, k, v, beta, g, initial_state=s0, output_final_state=True,
                                      impl=impl, segment_ids=seg)
        return jnp.sum(o * wo) + jnp.sum(fin * wf)
    return f


@pytest.mark.parametrize("L,T,K,V,chunk,kw", [
    # odd T, saved inverses of the split forward; two programs per chunk along V (partials summed),
    # each looping over two value blocks
    (2, 37, 16, 64, 16, dict(bwd_block_v=16, bwd_v_split=2)),
    pytest.param(1, 37, 16, 32, 16, dict(bwd_block_v=16, bwd_v_split=2), marks=pytest.mark.slow),
    # no saved inverses (fused forward): solved in-kernel
    pytest.param(3, 21, 16, 32, 16, dict(bwd_block_v=16, kernel="fused"), marks=pytest.mark.slow),
    pytest.param(2, 70, 32, 16, 32, {}, marks=pytest.mark.slow),  # chunk 32, K > V, one value block
])
def test_explicit_gradients_match_reference_and_float64_directional_derivative(L, T, K, V, chunk, kw):
    q, k, v, beta, g, s0 = make_inputs(30 + L, 1, T, 2, L, K, V)
    seg = jnp.asarray(SEGMENTS[:, :T], jnp.int32)
    wo = jax.random.normal(jax.random.PRNGKey(31), (1, T, 2, V))
    wf = jax.random.normal(jax.random.PRNGKey(32), (1, 2, K, V))
    args = (q, k, v, beta, g, s0)
    check_gradients(_loss("pallas", K, seg, wo, wf, chunk, **kw), _loss("reference", K, seg, wo, wf), args,
                    seg, wo, wf, K, dir_seed=40)


@pytest.mark.parametrize("dtype,L,chunk,kw", [
    (jnp.bfloat16, 2, 32, {}),  # the defaults: one program per chunk loops over the value blocks
    (jnp.bfloat16, 3, 64, {}),
    (jnp.float32, 1, 32, dict(bwd_block_v=64, bwd_v_split=2, bwd_num_warps=4)),  # a program per block
])
def test_explicit_kernels_lower_to_triton_with_gradients(dtype, L, chunk, kw, monkeypatch):
    """Forward + gradient lowered for an H200 (no GPU): split forward (intra, state, output) and the
    explicit backward (state pull-back, reverse pass, chunk_grads) are six Triton calls."""
    B, T, H, K, V = 1, 128, 2, 128, 128
    S = jax.ShapeDtypeStruct
    args = (S((B, T, H, K), dtype), S((B, T, H, L, K), dtype), S((B, T, H, L, V), dtype),
            S((B, T, H, L), dtype), S((B, T, H), jnp.float32))

    def loss(*a):
        o = prism_pallas(*a, scale=0.1, chunk_size=chunk, platform="gpu", bwd="explicit", **kw)[0]
        return o.astype(jnp.float32).sum()

    text = lower_for_h200(jax.grad(loss, argnums=range(5)), args, monkeypatch)
    assert text.count("xla.gpu.triton") == 6
    assert "prism_chunk_grads" in text


@pytest.mark.slow  # ~11 s of XLA compiles; a TPU's bwd="explicit"
def test_explicit_xla_backward_matches_autodiff_backward():
    """chunk="explicit-xla" (a TPU's bwd="explicit": `chunk_grads` vmapped in XLA) against chunk="xla" (`jax.vjp`
    of the chunk map), both linear in (do, dfinal) given any chunk-start states: random ones here."""
    from pallas_kernels.backward import backward
    from pallas_kernels.common import prepare

    B, T, H, L, K, V, C = 1, 45, 2, 2, 16, 32, 16
    q, k, v, beta, g, s0 = make_inputs(50, B, T, H, L, K, V)
    x = prepare(q, k, v, beta, g, s0, jnp.asarray(SEGMENTS[:, :T], jnp.int32), C)
    N = x.q.shape[1] // C
    ks = jax.random.split(jax.random.PRNGKey(51), 3)
    starts = jax.random.normal(ks[0], (B, H, N, K, V))
    do = jax.random.normal(ks[1], (B, N * C, H, V))
    dfinal = jax.random.normal(ks[2], (B, H, K, V))
    run = lambda chunk: jax.jit(functools.partial(backward, scale=0.25, chunk_size=C, chunk=chunk))(
        x, starts, do, dfinal)
    for name, a, b in zip("q k v beta g s0".split(), run("explicit-xla"), run("xla")):
        assert a.shape == b.shape and rel(a, b) < 1e-5, (name, rel(a, b))


def test_unknown_backward_paths_raise_named_errors():
    q, k, v, beta, g, _ = make_inputs(0, 1, 8, 1, 1, 16, 32)
    with pytest.raises(ValueError, match="`bwd`"):
        prism_pallas(q, k, v, beta, g, scale=1.0, chunk_size=16, bwd="explicit-gpu")
    with pytest.raises(ValueError, match="`bwd_v_split`"):
        prism_pallas(q, k, v, beta, g, scale=1.0, chunk_size=16, bwd="explicit", bwd_block_v=16, bwd_v_split=4)


# ---- on the GPU (run on the device machine: pytest -m gpu tests/kernels/test_explicit_bwd.py) ----

gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,K,V,chunk,kw", [
    (jnp.float32, 64, 64, 32, {}),
    (jnp.float32, 128, 128, 32, {}),
    (jnp.float32, 128, 128, 32, dict(bwd_block_v=32, bwd_v_split=4)),
    (jnp.bfloat16, 64, 64, 32, {}),
    (jnp.bfloat16, 128, 128, 32, {}),
    (jnp.bfloat16, 128, 128, 64, {}),
    (jnp.bfloat16, 128, 128, 64, dict(bwd_v_split=1, bwd_num_warps=8)),
])
def test_gpu_explicit_backward_matches_reference(dtype, K, V, chunk, kw):
    """float32 < 1e-5 and bf16 < 1e-2 (relative L2) against the float32 reference on the same inputs."""
    from test_pallas import _grads

    L, T = 2, 200
    q, k, v, beta, g, s0 = make_inputs(60, 2, T, 2, L, K, V, dtype=dtype)
    seg = jnp.asarray(np.repeat(np.arange(4), [50, 64, 1, 85])[None].repeat(2, 0), jnp.int32)
    w = jax.random.normal(jax.random.PRNGKey(61), (2, T, 2, V))
    gp = _grads("pallas", (q, k, v, beta, g, s0), seg, w, chunk_size=chunk, bwd="explicit", **kw)
    up = [x.astype(jnp.float32) for x in (q, k, v, beta)] + [g, s0]
    gr = _grads("reference", up, seg, w, chunk_size=chunk)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for name, a, b in zip("q k v beta g s0".split(), gp, gr):
        assert rel(a, b) < tol, (name, rel(a, b))


@pytest.mark.slow
def test_explicit_bf16_gradients_within_tolerance():
    """bf16 operands, float32 accumulation (interpret mode): 2e-2 relative L2 against the float32
    reference on the same rounded inputs, and the input dtypes kept."""
    L, T, K, V = 2, 48, 32, 32
    q, k, v, beta, g, _ = make_inputs(3, 1, T, 2, L, K, V, dtype=jnp.bfloat16)
    wo = jax.random.normal(jax.random.PRNGKey(5), (1, T, 2, V))

    def loss(impl, **kw):
        def f(*a):
            if impl == "pallas":
                o, fin = prism_pallas(*a, scale=K ** -0.5, chunk_size=16, platform="cpu", bwd="explicit", **kw)
            else:
                o, fin = prism_recurrence(*a, output_final_state=True, impl=impl)
            return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(fin)
        return f

    grads = jax.jit(jax.grad(loss("pallas", bwd_block_v=16), argnums=range(5)))(q, k, v, beta, g)
    up = [x.astype(jnp.float32) for x in (q, k, v, beta)] + [g]
    grads_ref = jax.grad(loss("reference"), argnums=range(5))(*up)
    for name, gp, gr in zip("q k v beta g".split(), grads, grads_ref):
        assert gp.dtype == (jnp.float32 if name == "g" else jnp.bfloat16), name
        assert rel(gp, gr) < 2e-2, (name, rel(gp, gr))
