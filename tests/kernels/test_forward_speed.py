"""The faster forward's options: the blocked triangular inverse (`forward_inverse`), the
piece-parallel state pass (`state_pieces`) and the automatic state-pass block_v.

Each option must give the same outputs, final state, chunk start states and chunk inverses as the
old path (within float32 rounding) and match the float64 token loop; on CPU the kernels run in
interpret mode, and their forward and gradient lower to Triton for an H200.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import prism_pallas
from pallas_kernels.common import (blocked_unit_lower_inverse, chunk_decays, lower_inverse, prepare,
                                   unit_lower_inverse)
from pallas_kernels.gpu import split
from prism_jax.ops import prism_recurrence
from test_pallas import SEGMENTS, lower_for_h200, make_inputs, numpy_prism, rel


# ---- the blocked inverse ----

def prism_form_m(seed, C, K=32):
    """m = beta0 (k0 k0^T) o exp(G_{t-1} - G_{i-1}) (strictly lower), keys L2-normalised, built by
    the kernels' own `chunk_decays` (with a reset in the middle of the chunk)."""
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(C, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = rng.uniform(size=C)
    g = np.log(rng.uniform(0.9, 1.0, size=C)).astype(np.float32)
    r = (np.arange(C) >= C // 2).astype(np.int32)
    rm1 = (np.arange(C) > C // 2).astype(np.int32)
    m1m1 = np.asarray(jax.jit(lambda *a: chunk_decays(*a).m1m1)(g, r, rm1), np.float64)
    return beta[:, None] * (k @ k.T) * m1m1


def adversarial_m(seed, C, sign):
    """Entries near 1 in size. sign -1: all near -1, (I + m)^{-1} grows like 2^C (2^126 at C = 128);
    "alt": (-1)^{t-i}, the keys k_i = (-1)^i k of a PRISM chunk with beta = 1 and no decay."""
    rng = np.random.default_rng(seed)
    t = np.arange(C)
    base = (-1.0) ** (t[:, None] - t[None, :]) if sign == "alt" else sign * np.ones((C, C))
    return np.tril(base * (1 - 1e-3 * rng.uniform(size=(C, C))), -1)


_INVERSES = {"rows": jax.jit(unit_lower_inverse),
             16: jax.jit(functools.partial(blocked_unit_lower_inverse, block=16)),
             8: jax.jit(functools.partial(blocked_unit_lower_inverse, block=8))}


@pytest.mark.parametrize("C", [16, 32, 64, 128])
def test_blocked_inverse_matches_float64_and_row_substitution(C):
    for kind in ("prism", "alt", "neg", "pos"):
        m = (prism_form_m(C, C) if kind == "prism"
             else adversarial_m(C, C, {"alt": "alt", "neg": -1.0, "pos": 1.0}[kind]))
        want = np.linalg.inv(np.eye(C) + m)
        m32 = jnp.asarray(m, jnp.float32)
        rows = _INVERSES["rows"](m32)
        for block in (16, 8):
            got = _INVERSES[block](m32)
            assert got.dtype == jnp.float32
            assert rel(got, want) < 1e-6, (kind, block)
            assert rel(got, rows) < 1e-6, (kind, block)


def test_blocked_inverse_can_fail_and_checks_its_block():
    """A doubling step that drops the X_s Off X_s term is caught by the comparison above."""
    m = prism_form_m(0, 32)
    x16 = np.asarray(blocked_unit_lower_inverse(jnp.asarray(m, jnp.float32), block=16), np.float64)
    wrong = np.where(np.equal.outer(np.arange(32) // 16, np.arange(32) // 16), x16, 0.0)
    assert rel(wrong, np.linalg.inv(np.eye(32) + m)) > 1e-3
    with pytest.raises(ValueError, match="power of two"):
        blocked_unit_lower_inverse(jnp.zeros((48, 48)), block=16)
    with pytest.raises(ValueError, match="'rows', 'blocked' or 'blocked8'"):
        lower_inverse("lu")


# ---- the state pass: block_v rule and pieces ----

def test_state_block_v_rule_and_piece_split():
    assert split.state_block_v(16, 16, 128, sm_count=132) == 64  # T = 2K, B = 16: 512 programs
    assert split.state_block_v(4, 16, 128, sm_count=132) == 16  # 128 -> 256 -> 512 programs
    assert split.state_block_v(1, 16, 128, sm_count=132) == 16  # the floor (128 programs)
    assert split.state_block_v(1, 16, 128, pieces=16, sm_count=132) == 64
    assert split.state_block_v(1, 1, 32, sm_count=132) == 16
    assert split.state_pieces_for(5, 2) == (2, 3)
    assert split.state_pieces_for(4, 3) == (2, 2)  # pieces of 2 chunks cover 4 chunks in 2
    assert split.state_pieces_for(3, 8) == (3, 1)
    assert split.state_pieces_for(1024, 16) == (16, 64)
    # "auto" at the benchmark's shapes (H = 16, V = 128, chunk 32): T = 2K / 8K / 32K, B = 16 / 4 / 1
    assert [split.auto_state_pieces(B, 16, 128, N, sm_count=132)
            for B, N in ((16, 64), (4, 256), (1, 1024))] == [1, 4, 16]
    assert split.auto_state_pieces(1, 1, 16, 20, sm_count=132) == 2  # >= 8 chunks per piece


# (L, T, K, V, chunk, pieces, inverse, block_v, outputs in the state walk, segments, initial state,
# seed): odd T (a partial last chunk), pieces of unequal length, pieces of one chunk, resets inside /
# at the edge of a piece.
CASES = [
    pytest.param(1, 37, 16, 32, 16, 2, "blocked", None, False, False, True, 0,  # N = 3: pieces 2 + 1
                 marks=pytest.mark.slow),  # L = 1 in the default run: the prism_pallas test below
    (2, 40, 32, 16, 16, 2, "blocked8", 16, True, True, True, 1),  # N = 3: 2 + 1, resets
    (3, 75, 16, 16, 32, 3, "blocked", None, False, False, False, 2),  # chunk 32 (one doubling); 1 + 1 + 1
]


@pytest.mark.parametrize("L,T,K,V,chunk,pieces,inverse,block_v,in_state,with_segments,with_state,seed",
                         CASES)
def test_split_forward_options_match_the_old_path_and_float64(L, T, K, V, chunk, pieces, inverse, block_v,
                                                            in_state, with_segments, with_state, seed):
    q, k, v, beta, g, s0 = make_inputs(30 + seed, 1, T, 1, L, K, V)
    s0 = s0 if with_state else None
    seg = jnp.asarray(SEGMENTS[:, :T], jnp.int32) if with_segments else None
    x = prepare(q, k, v, beta, g, s0, seg, chunk)
    run = jax.jit(lambda x, **kw: split.forward(x, scale=K ** -0.5, chunk_size=chunk, interpret=True, **kw),
                  static_argnames=("inverse", "state_pieces", "block_v", "outputs_in_state"))
    old = run(x, block_v=min(V, 64))
    new = run(x, inverse=inverse, state_pieces=pieces, block_v=block_v, outputs_in_state=in_state)
    for name, a, b in zip(("o", "final", "starts", "ainv"), new, old):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel(a, b) < 2e-6, name
    o_ref, final_ref = numpy_prism(q, k, v, beta, g, K ** -0.5, s0, seg)
    assert rel(new[0][:, :T], o_ref) < 1e-5 and rel(new[1], final_ref) < 1e-5


def test_prism_pallas_passes_the_options_through_bf16():
    """prism_pallas(forward_inverse=, state_pieces=, forward_outputs=) in bf16 (L = 1, chunk 32, odd
    T, 3 pieces of 1 + 1 + 1 chunks; outputs from the state walk, no start states saved) against
    float64."""
    L, T, K, V = 1, 85, 32, 32
    q, k, v, beta, g, s0 = make_inputs(40, 1, T, 1, L, K, V, dtype=jnp.bfloat16)
    o, final = jax.jit(lambda *a: prism_pallas(*a, scale=K ** -0.5, initial_state=s0, chunk_size=32,
                                               forward_inverse="blocked", state_pieces=3,
                                               forward_outputs="state"))(q, k, v, beta, g)
    o_ref, final_ref = numpy_prism(q, k, v, beta, g, K ** -0.5, s0)
    assert o.dtype == jnp.bfloat16
    assert rel(o, o_ref) < 1e-2 and rel(final, final_ref) < 1e-2


@pytest.mark.parametrize("change,match", [
    (dict(forward_inverse="lu"), "`forward_inverse`"),
    (dict(state_pieces=0), "`state_pieces`"),
    (dict(state_pieces=2.0), "`state_pieces`"),
    (dict(state_pieces=2, kernel="fused"), "`state_pieces`"),
    (dict(state_pieces="many"), "`state_pieces`"),
    (dict(forward_outputs="fused"), "`forward_outputs`"),
    (dict(forward_outputs="state", kernel="fused"), "`forward_outputs`"),
])
def test_bad_forward_options_raise_named_errors(change, match):
    q, k, v, beta, g, _ = make_inputs(0, 1, 8, 1, 1, 16, 16)
    with pytest.raises(ValueError, match=match):
        prism_pallas(q, k, v, beta, g, scale=1.0, chunk_size=16, **change)


# ---- lowering to Triton for an H200 (forward and gradient) ----

@pytest.mark.parametrize("kernel,bwd,kw,n_kernels,chunk", [
    # intra, piece maps, compose, state, output; reverse (the rest of bwd="xla" is XLA)
    ("split", "xla", dict(forward_inverse="blocked", state_pieces=4), 6, 32),
    # B * H = 2: "auto" cuts 16 chunks into 2 pieces; no output kernel
    ("split", "xla", dict(forward_inverse="blocked8", state_pieces="auto", forward_outputs="state"), 5, 32),
    ("split", "fused", dict(forward_inverse="blocked", state_pieces=3), 8, 64),  # + pullback, chunk_bwd
    ("fused", "xla", dict(forward_inverse="blocked"), 2, 64),
])
def test_forward_options_lower_to_triton_with_gradients(kernel, bwd, kw, n_kernels, chunk, monkeypatch):
    B, T, H, L, K, V = 1, 512, 2, 2, 128, 128
    dtype = jnp.bfloat16
    S = jax.ShapeDtypeStruct
    args = (S((B, T, H, K), dtype), S((B, T, H, L, K), dtype), S((B, T, H, L, V), dtype),
            S((B, T, H, L), dtype), S((B, T, H), jnp.float32))

    def loss(*a):
        o = prism_pallas(*a, scale=0.1, chunk_size=chunk, platform="gpu", kernel=kernel, bwd=bwd, **kw)[0]
        return o.astype(jnp.float32).sum()

    text = lower_for_h200(jax.grad(loss, argnums=range(5)), args, monkeypatch)
    assert text.count("xla.gpu.triton") == n_kernels


@pytest.mark.slow  # ~30 s in interpret mode; the backward itself is the default tests' (test_pallas.py)
@pytest.mark.parametrize("bwd", ["xla", "fused", "explicit"])
def test_gradients_through_the_new_forward_options(bwd):
    """Gradients with every new forward option on (the backward reads their starts / inverses)."""
    L, T, K, V = 2, 45, 16, 16
    q, k, v, beta, g, s0 = make_inputs(50, 1, T, 1, L, K, V)
    seg = jnp.asarray(SEGMENTS[:, :T], jnp.int32)
    w = jax.random.normal(jax.random.PRNGKey(51), (1, T, 1, V))

    def loss(impl):
        def f(*a):
            if impl == "pallas":
                o, fin = prism_pallas(*a[:5], scale=K ** -0.5, initial_state=a[5], chunk_size=16,
                                      segment_ids=seg, bwd=bwd, forward_inverse="blocked8", state_pieces=2,
                                      forward_outputs="state")
            else:
                o, fin = prism_recurrence(*a[:5], initial_state=a[5], output_final_state=True,
                                          impl="reference", segment_ids=seg)
            return jnp.sum(o * w) + jnp.sum(fin)
        return f

    args = (q, k, v, beta, g, s0)
    got = jax.jit(jax.grad(loss("pallas"), argnums=range(6)))(*args)
    want = jax.grad(loss("reference"), argnums=range(6))(*args)
    for name, a, b in zip("q k v beta g s0".split(), got, want):
        assert rel(a, b) < 1e-5, name


# ---- on the GPU (device machine: pytest -m gpu tests/kernels/test_forward_speed.py) ----

OPTIONS = [dict(forward_inverse="blocked"), dict(forward_inverse="blocked8", state_pieces=3),
           dict(state_pieces=4, forward_outputs="state"), dict(forward_inverse="blocked", state_pieces="auto"),
           dict(kernel="fused", forward_inverse="blocked")]


def check_options_against_old_path(dtype, chunk, L, K, V, T, segment_lengths):
    """Every entry of OPTIONS against the old path (rows, one piece, block_v 64, output kernel) and
    float64 (2 sequences, 2 heads, an initial state): float32 within 1e-5, bf16 within 1e-2."""
    q, k, v, beta, g, s0 = make_inputs(60, 2, T, 2, L, K, V, dtype=dtype)
    seg = jnp.asarray(np.repeat(np.arange(len(segment_lengths)), segment_lengths)[None].repeat(2, 0), jnp.int32)
    o_ref, final_ref = numpy_prism(q, k, v, beta, g, K ** -0.5, s0, seg)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2

    def run(**kw):
        return jax.jit(lambda *a: prism_pallas(*a, scale=K ** -0.5, initial_state=s0, segment_ids=seg,
                                               chunk_size=chunk, **kw))(q, k, v, beta, g)

    old = run(block_v=min(V, 64), forward_inverse="rows")
    assert rel(old[0], o_ref) < tol and rel(old[1], final_ref) < tol
    for kw in OPTIONS:
        o, final = run(**(dict(kw, block_v=min(V, 64)) if kw.get("kernel") == "fused" else kw))
        assert rel(o, o_ref) < tol and rel(final, final_ref) < tol, kw
        assert rel(o, old[0]) < tol and rel(final, old[1]) < tol, kw


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype,chunk", [(jnp.float32, 32), (jnp.bfloat16, 32), (jnp.bfloat16, 64)])
def test_gpu_forward_options_match_the_old_path(dtype, chunk):
    """K = V = 128, L = 2, odd T = 1000 with resets (one a segment of length 1)."""
    check_options_against_old_path(dtype, chunk, 2, 128, 128, 1000, [250, 320, 1, 429])
