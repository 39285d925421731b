"""The PRISM op: every form against an independent float64 NumPy loop, gradients, edge cases, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from prism_jax.ops import prism_recurrence, prism_step

FORMS = [
    ("reference", {}),
    ("scan", {}),
    ("chunk", {}),
    ("chunk", {"inter_chunk": "associative", "chunk_size": 16}),
]
FORM_IDS = ["reference", "scan", "chunk", "chunk-assoc16"]


def numpy_prism(q, k, v, beta, g, scale, s0=None, segment_ids=None):
    """Float64 token loop, written independently of the package (row convention: S is K x V)."""
    q, k, v, beta, g = (np.asarray(x, np.float64) for x in (q, k, v, beta, g))
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = np.zeros((B, H, K, V)) if s0 is None else np.array(s0, np.float64)
    o = np.zeros((B, T, H, V))
    for b in range(B):
        for t in range(T):
            if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                S[b] = 0.0
            for h in range(H):
                k0 = k[b, t, h, 0]
                transition = np.exp(g[b, t, h]) * (np.eye(K) - beta[b, t, h, 0] * np.outer(k0, k0))
                write = sum(beta[b, t, h, l] * np.outer(k[b, t, h, l], v[b, t, h, l])
                            for l in range(k.shape[3]))
                S[b, h] = transition @ S[b, h] + write
                o[b, t, h] = scale * S[b, h].T @ q[b, t, h]
    return o, S


def make_inputs(seed, B=2, T=37, H=2, L=2, K=6, V=4, dtype=np.float32, with_state=True):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, T, H, L, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    inputs = dict(
        q=rng.standard_normal((B, T, H, K)),
        k=k,
        v=rng.standard_normal((B, T, H, L, V)),
        beta=rng.uniform(size=(B, T, H, L)),
        g=np.log(rng.uniform(0.7, 1.0, size=(B, T, H))),
    )
    inputs = {n: x.astype(dtype) for n, x in inputs.items()}
    s0 = rng.standard_normal((B, H, K, V)).astype(dtype) if with_state else None
    return inputs, s0


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


@functools.lru_cache(maxsize=None)
def jitted(impl, chunk_size=64, inter_chunk="scan"):
    def run(q, k, v, beta, g, s0, segment_ids):
        return prism_recurrence(q, k, v, beta, g, initial_state=s0, output_final_state=True, impl=impl,
                                chunk_size=chunk_size, inter_chunk=inter_chunk, segment_ids=segment_ids)
    return jax.jit(run)


def run(impl, inputs, s0=None, segment_ids=None, **kw):
    return jitted(impl, **kw)(*inputs.values(), s0, segment_ids)


# Every form at every T; L and the initial state vary with T so that the default run covers each value of
# each axis (the full product runs with `-m slow`).
COVER = [(1, 1, False), (7, 2, True), (64, 3, False), (130, 1, True), (130, 3, False), (64, 2, True)]
FULL = [(T, L, s) for T in (1, 7, 64, 130) for L in (1, 2, 3) for s in (False, True)]
FULL = [pytest.param(*case, marks=pytest.mark.slow) for case in FULL if case not in COVER]


@pytest.mark.parametrize("form,kw", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("T,L,with_state", COVER + FULL)
def test_forward_matches_float64_loop(form, kw, T, L, with_state):
    inputs, s0 = make_inputs(seed=T * 10 + L, T=T, L=L, with_state=with_state)
    o, final = run(form, inputs, s0, **kw)
    o_ref, s_ref = numpy_prism(*inputs.values(), scale=6 ** -0.5, s0=s0)
    assert o.shape == o_ref.shape and o.dtype == jnp.float32
    assert final.shape == s_ref.shape and final.dtype == jnp.float32
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(final, s_ref) < 1e-5


@pytest.mark.parametrize("chunk_size", [1, 16, 128])
@pytest.mark.parametrize("inter_chunk", ["scan", "associative"])
def test_chunk_sizes_and_inter_chunk_passes(chunk_size, inter_chunk):
    inputs, s0 = make_inputs(seed=chunk_size, T=45, L=3)
    o, final = run("chunk", inputs, s0, chunk_size=chunk_size, inter_chunk=inter_chunk)
    o_ref, s_ref = numpy_prism(*inputs.values(), scale=6 ** -0.5, s0=s0)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(final, s_ref) < 1e-5


@pytest.mark.parametrize("form,kw", FORMS, ids=FORM_IDS)
def test_bf16_inputs_accumulate_in_fp32(form, kw):
    """bf16 inputs: compared with the float64 loop run on the same (bf16-rounded) values.

    Stated tolerance: 1e-2 relative to the output's largest magnitude (the output itself is rounded to
    bf16, 2^-8 relative, and the fp32 accumulation adds far less)."""
    inputs, s0 = make_inputs(seed=3, T=70, L=2)
    inputs = {n: jnp.asarray(x, jnp.bfloat16) for n, x in inputs.items()}
    o, final = run(form, inputs, jnp.asarray(s0, jnp.bfloat16), **kw)
    assert o.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    as64 = {n: np.asarray(x.astype(jnp.float32)) for n, x in inputs.items()}
    s0_64 = np.asarray(jnp.asarray(s0, jnp.bfloat16).astype(jnp.float32))
    o_ref, s_ref = numpy_prism(*as64.values(), scale=6 ** -0.5, s0=s0_64)
    assert rel_err(o.astype(jnp.float32), o_ref) < 1e-2
    assert rel_err(final, s_ref) < 1e-4


def _loss(impl, kw, q, k, v, beta, g, s0):
    """A scalar touching every output and the final state with fixed random weights."""
    o, final = prism_recurrence(q, k, v, beta, g, initial_state=s0, output_final_state=True, impl=impl, **kw)
    wo = jnp.cos(jnp.arange(o.size, dtype=o.dtype).reshape(o.shape))
    ws = jnp.sin(jnp.arange(final.size, dtype=final.dtype).reshape(final.shape))
    return jnp.sum(o * wo) + jnp.sum(final * ws)


@pytest.mark.parametrize("form,kw,L", [("scan", {}, 1), ("chunk", {"chunk_size": 16}, 3),
                                       ("chunk", {"chunk_size": 16, "inter_chunk": "associative"}, 2)])
def test_gradients_match_reference(form, kw, L):
    inputs, s0 = make_inputs(seed=11 + L, T=37, L=L)
    args = (*inputs.values(), s0)
    grads = jax.jit(jax.grad(functools.partial(_loss, form, kw), argnums=tuple(range(6))))(*args)
    ref = jax.jit(jax.grad(functools.partial(_loss, "reference", {}), argnums=tuple(range(6))))(*args)
    for name, got, want in zip(["q", "k", "v", "beta", "g", "initial_state"], grads, ref):
        assert rel_err(got, want) < 1e-4, name


@pytest.mark.parametrize("form,kw", [("reference", {}), ("chunk", {"chunk_size": 4}), pytest.param(
    "chunk", {"chunk_size": 4, "inter_chunk": "associative"}, marks=pytest.mark.slow)])
def test_gradients_by_finite_differences(form, kw):
    with jax.enable_x64(True):
        inputs, s0 = make_inputs(seed=5, B=1, T=9, H=1, L=2, K=3, V=2, dtype=np.float64)
        f = functools.partial(_loss, form, kw)
        check_grads(f, (*inputs.values(), s0), order=1, modes=["rev"], atol=1e-6, rtol=1e-6, eps=1e-6)


def test_l1_is_gated_deltanet():
    """L = 1 against a hand-written Gated DeltaNet step in the column convention S' = S^T (V x K)."""
    inputs, s0 = make_inputs(seed=21, T=50, L=1)
    o, final = run("chunk", inputs, s0, chunk_size=16)
    q, k, v, beta, g = (np.asarray(x, np.float64) for x in inputs.values())
    St = np.transpose(np.asarray(s0, np.float64), (0, 1, 3, 2))
    B, T, H, K = q.shape
    out = np.zeros((B, T, H, v.shape[-1]))
    for t in range(T):
        kt, vt, bt = k[:, t, :, 0], v[:, t, :, 0], beta[:, t, :, 0]
        alpha = np.exp(g[:, t])[..., None, None]
        St = alpha * (St - bt[..., None, None] * np.einsum("bhvk,bhk,bhj->bhvj", St, kt, kt))
        St = St + bt[..., None, None] * np.einsum("bhv,bhk->bhvk", vt, kt)
        out[:, t] = 6 ** -0.5 * np.einsum("bhvk,bhk->bhv", St, q[:, t])
    assert rel_err(o, out) < 1e-5
    assert rel_err(final, np.transpose(St, (0, 1, 3, 2))) < 1e-5


def test_no_erase_is_gated_linear_attention():
    """Erase strength 0 with a unit write gate on a second term gives GLA: S_t = a_t S_{t-1} + k_t v_t^T."""
    inputs, _ = make_inputs(seed=22, T=40, L=2, with_state=False)
    beta = np.stack([np.zeros_like(inputs["beta"][..., 0]), np.ones_like(inputs["beta"][..., 1])], -1)
    inputs["beta"] = beta
    o, _ = run("chunk", inputs, chunk_size=16)
    q, k, v, g = (np.asarray(inputs[n], np.float64) for n in ("q", "k", "v", "g"))
    G = np.cumsum(g, axis=1)  # [B, T, H]
    decay = np.exp(G[:, :, None] - G[:, None, :]) * np.tril(np.ones((40, 40)))[None, :, :, None]
    scores = np.einsum("bthk,bshk->btsh", q, k[..., 1, :]) * decay
    gla = 6 ** -0.5 * np.einsum("btsh,bshv->bthv", scores, v[..., 1, :])
    assert rel_err(o, gla) < 1e-5
    # beta = 0 everywhere: nothing is written and the initial state only decays.
    inputs["beta"] = np.zeros_like(beta)
    _, s0 = make_inputs(seed=23, T=40, L=2)
    o, final = run("chunk", inputs, s0, chunk_size=16)
    want = np.exp(G)[..., None] * np.einsum("bhkv,bthk->bthv", s0, q) * 6 ** -0.5
    assert rel_err(o, want) < 1e-5


@pytest.mark.parametrize("form,kw", FORMS[1:], ids=FORM_IDS[1:])
def test_causality(form, kw):
    inputs, s0 = make_inputs(seed=31, T=50, L=2)
    o, _ = run(form, inputs, s0, **kw)
    rng = np.random.default_rng(0)
    changed = {n: x.copy() for n, x in inputs.items()}
    for n in ("q", "k", "v"):
        changed[n][:, 29:] = rng.standard_normal(changed[n][:, 29:].shape)
    changed["beta"][:, 29:] = rng.uniform(size=changed["beta"][:, 29:].shape)
    changed["g"][:, 29:] = -rng.uniform(size=changed["g"][:, 29:].shape)
    o2, _ = run(form, changed, s0, **kw)
    np.testing.assert_array_equal(np.asarray(o[:, :29]), np.asarray(o2[:, :29]))
    assert not np.allclose(np.asarray(o[:, 29:]), np.asarray(o2[:, 29:]))


def test_long_sequence_stays_finite_and_bounded():
    """T = 16384 with realistic gates: with ||k|| = 1 and beta, alpha in [0, 1] the transition is a
    contraction, so ||S_t||_F <= max_t sum_l ||v_t^l|| / (1 - max alpha)."""
    B, T, H, L, K, V = 1, 16384, 2, 2, 16, 16
    rng = np.random.default_rng(7)
    k = rng.standard_normal((B, T, H, L, K)).astype(np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, H, L, V)).astype(np.float32)
    beta = (1 / (1 + np.exp(-rng.standard_normal((B, T, H, L))))).astype(np.float32)
    alpha_max = 0.999
    g = np.log(rng.uniform(0.9, alpha_max, (B, T, H))).astype(np.float32)
    q = rng.standard_normal((B, T, H, K)).astype(np.float32)
    inputs = dict(q=q, k=k, v=v, beta=beta, g=g)
    o, final = run("chunk", inputs)
    bound = np.max(np.sum(np.linalg.norm(v, axis=-1), axis=-1)) / (1 - alpha_max)
    assert np.all(np.isfinite(np.asarray(o))) and np.all(np.isfinite(np.asarray(final)))
    assert np.max(np.linalg.norm(np.asarray(final), axis=(-2, -1))) <= bound
    o_bound = K ** -0.5 * np.linalg.norm(q, axis=-1) * bound
    assert np.all(np.linalg.norm(np.asarray(o), axis=-1) <= o_bound * (1 + 1e-5))
    # And it agrees with the token loop over the last stretch: restart from the state at T - 64.
    o_prefix, s_mid = run("chunk", {n: x[:, : T - 64] for n, x in inputs.items()})
    tail = {n: x[:, T - 64:] for n, x in inputs.items()}
    o_tail, s_tail = numpy_prism(*tail.values(), scale=K ** -0.5, s0=np.asarray(s_mid))
    assert rel_err(o[:, T - 64:], o_tail) < 1e-4 and rel_err(final, s_tail) < 1e-4


def test_prefill_then_step_matches_full_sequence():
    inputs, s0 = make_inputs(seed=41, T=29, L=3)
    o_full, s_full = run("chunk", inputs, s0, chunk_size=8)
    _, state = run("chunk", {n: x[:, :20] for n, x in inputs.items()}, s0, chunk_size=8)
    step = jax.jit(functools.partial(prism_step, scale=6 ** -0.5))
    for t in range(20, 29):
        o_t, state = step(*(x[:, t] for x in inputs.values()), state)
        assert rel_err(o_t, o_full[:, t]) < 1e-5
    assert rel_err(state, s_full) < 1e-5


# ---- packed documents (segment_ids) -------------------------------------------------------------

def _segments_from_lengths(lengths):
    return np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lengths)])


PACKINGS = {
    "random": None,
    "edges": [16, 16, 15, 1, 1, 31],  # boundaries at chunk starts, a chunk's last position, length-1 docs
    "one-segment": [80],
}


PACKED_CASES = [("reference", {}, "random"), ("scan", {}, "random")] + [
    ("chunk", kw, packing) for kw in ({"chunk_size": 16}, {"chunk_size": 16, "inter_chunk": "associative"})
    for packing in PACKINGS]


@pytest.mark.parametrize("form,kw,packing", PACKED_CASES)
def test_packed_row_equals_documents_alone(form, kw, packing):
    T = 80
    inputs, s0 = make_inputs(seed=51, B=2, T=T, L=2)
    if PACKINGS[packing] is None:
        rng = np.random.default_rng(5)
        seg = np.cumsum(rng.uniform(size=(2, T)) < 0.1, axis=1).astype(np.int32)
    else:
        seg = np.tile(_segments_from_lengths(PACKINGS[packing]), (2, 1))
    o, final = run(form, inputs, s0, segment_ids=jnp.asarray(seg), **kw)
    o_ref, s_ref = numpy_prism(*inputs.values(), scale=6 ** -0.5, s0=s0, segment_ids=seg)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(final, s_ref) < 1e-5
    # The same thing, document by document: the first document continues the initial state, every other
    # one starts from zero.
    for b in range(2):
        starts = [0] + [t for t in range(1, T) if seg[b, t] != seg[b, t - 1]] + [T]
        for i, (a, e) in enumerate(zip(starts[:-1], starts[1:])):
            doc = {n: x[b: b + 1, a:e] for n, x in inputs.items()}
            o_doc, _ = numpy_prism(*doc.values(), scale=6 ** -0.5, s0=s0[b: b + 1] if i == 0 else None)
            assert rel_err(o[b: b + 1, a:e], o_doc) < 1e-5


def test_packed_gradients_match_reference():
    inputs, s0 = make_inputs(seed=52, T=48, L=2)
    seg = jnp.asarray(np.tile(_segments_from_lengths([15, 1, 17, 15]), (2, 1)))

    def loss(impl, kw, *args):
        o, final = prism_recurrence(*args[:5], initial_state=args[5], output_final_state=True, impl=impl,
                                    segment_ids=seg, **kw)
        return jnp.sum(o * jnp.cos(jnp.arange(o.size).reshape(o.shape))) + jnp.sum(final ** 2)

    args = (*inputs.values(), s0)
    ref = jax.grad(functools.partial(loss, "reference", {}), argnums=tuple(range(6)))(*args)
    got = jax.grad(functools.partial(loss, "chunk", {"chunk_size": 16}), argnums=tuple(range(6)))(*args)
    for a, b in zip(got, ref):
        assert np.all(np.isfinite(np.asarray(a)))
        assert rel_err(a, b) < 1e-4


# ---- bad input ----------------------------------------------------------------------------------

def _bad(**changes):
    inputs, s0 = make_inputs(seed=0, B=2, T=5, H=3, L=2, K=4, V=6)
    kwargs = dict(initial_state=s0)
    for name, value in changes.items():
        (inputs if name in inputs else kwargs)[name] = value
    return inputs, kwargs


@pytest.mark.parametrize("changes,match", [
    ({"q": np.zeros((2, 5, 3))}, r"`q` has shape \(2, 5, 3\), expected \[B, T, H, K\]"),
    ({"k": np.zeros((2, 5, 3, 4))}, r"`k` has shape .* expected \[B, T, H, L, K\] \(rank 5\)"),
    ({"k": np.zeros((2, 5, 3, 2, 7))}, r"`k` has shape \(2, 5, 3, 2, 7\), expected .*\(2, 5, 3, 2, 4\)"),
    ({"v": np.zeros((2, 5, 3, 1, 6))}, r"`v` has shape \(2, 5, 3, 1, 6\)"),
    ({"v": np.zeros((2, 5, 3, 2))}, r"`v` has shape .* \(rank 5\)"),
    ({"beta": np.zeros((2, 5, 3))}, r"`beta` has shape \(2, 5, 3\), expected \[B, T, H, L\] = \(2, 5, 3, 2\)"),
    ({"g": np.zeros((2, 4, 3))}, r"`g` has shape \(2, 4, 3\), expected \[B, T, H\] = \(2, 5, 3\)"),
    ({"initial_state": np.zeros((2, 3, 6, 4))}, r"`initial_state` has shape \(2, 3, 6, 4\), expected .*\(2, 3, 4, 6\)"),
    ({"segment_ids": np.zeros((2, 4), np.int32)}, r"`segment_ids` has shape \(2, 4\), expected \[B, T\] = \(2, 5\)"),
    ({"segment_ids": np.zeros((2, 5), np.float32)}, r"`segment_ids` has dtype float32, expected an integer"),
    ({"impl": "fast"}, r"`impl` is 'fast', expected one of"),
    ({"chunk_size": 48}, r"`chunk_size` is 48, expected a positive power of two"),
    ({"chunk_size": 0}, r"`chunk_size` is 0"),
    ({"inter_chunk": "tree"}, r"`inter_chunk` is 'tree'"),
    ({"pallas_options": {"bwd": "xla"}}, r"`pallas_options` \['bwd'\] apply to impl='pallas' or 'auto', not 'chunk'"),
    ({"impl": "auto", "pallas_options": {"warps": 4}}, r"`pallas_options` has \['warps'\], expected some of"),
    ({"impl": "pallas", "pallas_options": {"bwd": "xla", "warps": 4}}, r"`pallas_options` has \['warps'\], expected some of"),
    ({"impl": "pallas", "pallas_options": {"chunk_size": 64}}, r"`pallas_options` has \['chunk_size'\]"),
    ({"impl": "pallas", "pallas_options": ["bwd"]}, r"`pallas_options` is \['bwd'\], expected None or a dict"),
])
def test_bad_input_errors(changes, match):
    inputs, kwargs = _bad(**changes)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(functools.partial(prism_recurrence, **kwargs), *inputs.values())


def _spy_on_prism_pallas(monkeypatch):
    """Replaces `prism_pallas` by a stub of its signature (the names pallas_options may use) that returns
    zeros; the returned dict holds the keyword arguments of its last call."""
    import pallas_kernels
    from prism_jax.ops import prism as prism_mod

    seen = {}

    @functools.wraps(pallas_kernels.prism_pallas)
    def spy(q, k, v, beta, g, **kw):
        seen.update(kw)
        B, T, H, _ = q.shape
        return jnp.zeros((B, T, H, v.shape[-1]), v.dtype), jnp.zeros((B, H, q.shape[-1], v.shape[-1]))

    monkeypatch.setattr(pallas_kernels, "prism_pallas", spy)
    # past the shared jit, whose trace cache would keep the stub (or skip it)
    monkeypatch.setattr(prism_mod, "_prism_pallas_shared", prism_mod._call_prism_pallas)
    return seen


def test_pallas_options_reach_the_kernels(monkeypatch):
    """impl="pallas" passes `pallas_options` on to `prism_pallas` beside the arguments it sets itself."""
    seen = _spy_on_prism_pallas(monkeypatch)
    inputs, kwargs = _bad()
    options = {"bwd": "xla", "mosaic_stages": ["intra", "state"]}
    jax.eval_shape(functools.partial(prism_recurrence, impl="pallas", chunk_size=16, pallas_options=options,
                                     **kwargs), *inputs.values())
    assert seen["bwd"] == "xla" and seen["mosaic_stages"] == ["intra", "state"] and seen["chunk_size"] == 16


def test_auto_takes_the_kernels_only_where_they_are_the_measured_fast_path():
    """impl="auto": "pallas" on a Hopper GPU with 16-bit inputs and K, V in (64, 128); "chunk" on CPU
    and TPU, on other GPUs, in float32, at other sizes or chunk sizes."""
    from prism_jax.ops.prism import resolve_impl

    bf16, f32 = jnp.bfloat16, jnp.float32
    gpu = functools.partial(resolve_impl, "auto", backend="gpu", hopper=True)
    assert gpu(bf16, 128, 128, 3) == gpu(jnp.float16, 64, 128, 1) == gpu(bf16, 128, 64, 2, 64) == "pallas"
    assert gpu(f32, 128, 128, 1) == gpu(bf16, 32, 128, 1) == gpu(bf16, 128, 256, 1) == "chunk"
    assert gpu(bf16, 128, 128, 1, 32) == "chunk"  # the Mosaic pipeline runs chunk 64 only
    assert resolve_impl("auto", bf16, 128, 128, 1, backend="gpu", hopper=False) == "chunk"
    assert resolve_impl("auto", bf16, 128, 128, 1, backend="tpu") == "chunk"
    assert resolve_impl("auto", bf16, 128, 128, 1, backend="cpu") == "chunk"
    assert resolve_impl("pallas", f32, 4, 4, 1, backend="cpu") == "pallas"  # other impls as given


def test_auto_on_cpu_is_the_chunk_form(monkeypatch):
    """On this CPU machine impl="auto" runs the chunk form (the same numbers), and its pallas_options
    are accepted but unused; on a GPU backend that takes the kernels it calls prism_pallas with them."""
    from prism_jax.ops import prism as prism_mod

    inputs, s0 = make_inputs(seed=3, B=2, T=37, H=2, L=2, K=8, V=6)
    want = prism_recurrence(*inputs.values(), initial_state=s0, impl="chunk")[0]
    got = prism_recurrence(*inputs.values(), initial_state=s0, impl="auto", pallas_options={"bwd": "xla"})[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    seen = _spy_on_prism_pallas(monkeypatch)
    monkeypatch.setattr(prism_mod, "resolve_impl", lambda impl, *a, **kw: "pallas" if impl == "auto" else impl)
    prism_recurrence(*inputs.values(), impl="auto", pallas_options={"bwd": "xla"})
    assert seen.get("bwd") == "xla"


@pytest.mark.gpu
def test_auto_takes_the_kernels_on_a_hopper_gpu():
    """On the device machine (H100 / H200) "auto" detects the GPU and takes the kernels, with the same
    outputs as impl="pallas"."""
    from prism_jax.ops.prism import resolve_impl

    assert resolve_impl("auto", jnp.bfloat16, 128, 128, 3) == "pallas"
    inputs, _ = make_inputs(seed=4, B=1, T=200, H=2, L=2, K=128, V=128)
    inputs = {n: (x if n == "g" else x.astype(jnp.bfloat16)) for n, x in inputs.items()}
    got = prism_recurrence(*inputs.values(), impl="auto")[0]
    want = prism_recurrence(*inputs.values(), impl="pallas")[0]
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


def test_pallas_takes_the_shared_kernel_call_only_with_a_python_scale(monkeypatch):
    """impl="pallas" calls the kernels through one module-level jit (shared by every layer) when the scale
    is a Python or NumPy number and the options are hashable once frozen; an array scale is traced in
    place. Both give the same outputs and gradients."""
    from prism_jax.ops import prism as prism_mod

    calls = []
    real = prism_mod._prism_pallas_shared
    monkeypatch.setattr(prism_mod, "_prism_pallas_shared", lambda *a: calls.append(a[-1]) or real(*a))
    inputs, s0 = make_inputs(seed=5, B=1, T=21, H=2, L=2, K=16, V=16)
    opts = dict(impl="pallas", chunk_size=16, initial_state=s0, pallas_options={"bwd": "xla"})

    def loss(scale, q):
        args = dict(inputs, q=q)
        return jnp.sum(prism_recurrence(*args.values(), scale=scale, **opts)[0] ** 2)

    shared = jax.value_and_grad(functools.partial(loss, np.float32(0.3)))(inputs["q"])
    assert calls == [("dict", (("bwd", ("value", "xla")), ("chunk_size", ("value", 16))))]
    in_place = jax.value_and_grad(functools.partial(loss, jnp.asarray(0.3, jnp.float32)))(inputs["q"])
    assert len(calls) == 1
    for a, b in zip(shared, in_place):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_pallas_through_the_shared_call_matches_the_float64_reference():
    """impl="pallas" as models call it (the shared jitted kernel call; CPU: the kernels interpreted), with
    documents, an initial state and the final state: outputs, final state and every gradient against the
    float64 reference."""
    inputs, s0 = make_inputs(seed=6, B=2, T=27, H=2, L=2, K=16, V=32)
    seg = np.repeat(np.array([[0] * 10 + [1] * 17]), 2, axis=0).astype(np.int32)

    def loss(impl, args, state):
        o, final = prism_recurrence(*args, initial_state=state, output_final_state=True, impl=impl, chunk_size=16,
                                    segment_ids=jnp.asarray(seg))
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(final ** 2), (o, final)

    grad = lambda impl, dtype: jax.grad(lambda a, s: loss(impl, a, s), argnums=(0, 1), has_aux=True)(
        tuple(jnp.asarray(x, dtype) for x in inputs.values()), jnp.asarray(s0, dtype))
    with jax.enable_x64():
        (want_grads, want_state), (want_o, want_final) = grad("reference", jnp.float64)
        want = [np.asarray(x) for x in (want_o, want_final, *want_grads, want_state)]
    (got_grads, got_state), (got_o, got_final) = grad("pallas", jnp.float32)
    for g, w in zip((got_o, got_final, *got_grads, got_state), want):
        assert rel_err(g, w) < 1e-4, rel_err(g, w)
