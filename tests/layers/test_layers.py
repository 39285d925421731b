"""Layer-level tests: ShortConv, the PRISM solver and its ablation switches, GDN/GLA terms, TTT forms."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax.layers import DeltaMixer, PrismMixer, ShortConv, TTTLinearMixer
from prism_jax.layers.common import positions_in_document
from prism_jax.models import PrismLMConfig

BASE = PrismLMConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, head_k_dim=16, mlp_hidden_dim=64,
                     solver_steps=3, chunk_size=4, ttt_mini_batch=3, max_seq_len=32, op_impl="reference")


def _params(module, *inputs):
    """Parameters of `module`. Eager init: the recurrence is skipped during init, and eager primitives
    are compiled once per shape for the whole session (cheaper than one jit per config)."""
    return nn.meta.unbox(module.init(jax.random.key(0), *inputs))


def _random_segments(rng, B, T):
    """Random packings: each row a sequence of document lengths >= 1 (includes length-1 documents)."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=rng.integers(1, 4), replace=False))
        for i, c in enumerate(cuts):
            seg[b, c:] = i + 1
    return seg


# -- ShortConv ------------------------------------------------------------------------------------------

def test_short_conv_matches_float64_reference_with_documents():
    rng = np.random.default_rng(0)
    B, T, F, W = 2, 9, 5, 4
    x = rng.normal(size=(B, T, F)).astype(np.float32)
    seg = _random_segments(rng, B, T)
    conv = ShortConv(F, W)
    params = _params(conv, x)
    y = np.asarray(conv.apply(params, x, jnp.asarray(seg)))
    kernel = np.asarray(params["params"]["kernel"], np.float64)
    ref = np.zeros((B, T, F))
    for b in range(B):
        for t in range(T):
            for j in range(W):
                if t - j >= 0 and seg[b, t - j] == seg[b, t]:
                    ref[b, t] += kernel[W - 1 - j] * x[b, t - j]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # the decode form over the same (single-document) sequence
    y_full = np.asarray(conv.apply(params, x))
    window = conv.apply(params, x[:, :3], method=conv.window)
    for t in range(3, T):
        y_t, window = conv.apply(params, x[:, t], window, method=conv.step)
        np.testing.assert_allclose(np.asarray(y_t), y_full[:, t], rtol=1e-5, atol=1e-5)


def test_positions_in_document():
    seg = jnp.array([[0, 0, 0, 1, 1, 2, 3, 3]])
    np.testing.assert_array_equal(positions_in_document(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


# -- PRISM solver ---------------------------------------------------------------------------------------

def _solver(config, seed=0, T=5):
    mixer = PrismMixer(config)
    x = jax.random.normal(jax.random.key(seed), (2, T, config.d_model))
    params = _params(mixer, x)
    u = jax.random.normal(jax.random.key(seed + 1), (2, T, config.d_model))
    return mixer, params, u, mixer.apply(params, u, method=mixer.solver_terms)


def _writes(k, v, beta):
    """Per-token write matrices sum_l beta^l k^l v^lT: [B, T, H, K, V] float64."""
    return np.einsum("bthl,bthlk,bthlv->bthkv", np.asarray(beta, np.float64), np.asarray(k, np.float64),
                     np.asarray(v, np.float64))


def _ranks(w, tol=1e-6):
    s = np.linalg.svd(w, compute_uv=False)
    return (s > tol * s[..., :1]).sum(-1)


def _gelu64(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


@pytest.mark.parametrize("rank", [None, 8])
def test_prism_solver_matches_float64_reference(rank):
    config = dataclasses.replace(BASE, solver_rank=rank)
    mixer, params, u, (q, k, v, beta, g) = _solver(config)
    p = {name: {kk: np.asarray(vv, np.float64) for kk, vv in sub.items()}
         for name, sub in params["params"].items() if name != "head" and name != "conv"}
    u64 = np.asarray(u, np.float64)
    H, K, L, D = config.num_heads, config.head_k_dim, config.solver_steps, config.d_model
    lin = lambda name, z: z @ p[name]["kernel"] + p[name].get("bias", 0.0)
    norm = lambda z: z / np.sqrt((z * z).sum(-1, keepdims=True) + 1e-6)
    z = lin("solver_down", u64) if rank else u64
    keys = [lin("key_first", u64)] + [lin(f"keys_rest_{l}", z) for l in range(L - 1)]
    ref_k = norm(np.stack([kk.reshape(2, -1, H, K) for kk in keys], -2))
    r = lin("v_proj", u64) - u64
    deltas = []
    for l in range(L):
        d = _gelu64(lin(f"gains_{l}", z) * r)
        deltas.append(d)
        r = r - d
    ref_v = np.stack([d.reshape(2, -1, H, D // H) for d in deltas], -2)
    ref_beta = 1 / (1 + np.exp(-lin("gate_proj", u64))).reshape(2, -1, H, L)
    ref_g = -np.log1p(np.exp(-lin("alpha_proj", u64)))
    ref_q = norm(lin("q_proj", u64).reshape(2, -1, H, K))
    for got, want in ((q, ref_q), (k, ref_k), (v, ref_v), (beta, ref_beta), (g, ref_g)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5)
    assert (np.asarray(g) <= 0).all() and (np.asarray(beta) >= 0).all() and (np.asarray(beta) <= 1).all()
    np.testing.assert_allclose(np.linalg.norm(np.asarray(k), axis=-1), 1.0, rtol=1e-4)


def test_solver_steps_give_rank_L_writes():
    _, _, _, (q, k, v, beta, g) = _solver(dataclasses.replace(BASE, solver_steps=3))
    assert (_ranks(_writes(k, v, beta)) == 3).all()
    _, _, _, (q, k, v, beta, g) = _solver(dataclasses.replace(BASE, solver_steps=1))
    assert k.shape[-2] == 1 and (_ranks(_writes(k, v, beta)) == 1).all()


def test_identity_without_gain_collapses_to_rank_one():
    """With p = 1 and no nonlinearity, d^1 = r^1 = v - u and every later residual is zero."""
    config = dataclasses.replace(BASE, solver_steps=3, solver_nonlinearity="identity", use_gain=False)
    mixer, params, u, (q, k, v, beta, g) = _solver(config)
    v = np.asarray(v)
    assert np.abs(v[..., 1:, :]).max() == 0.0
    v_proj = np.asarray(params["params"]["v_proj"]["kernel"])
    np.testing.assert_allclose(v[..., 0, :].reshape(2, -1, config.d_model), np.asarray(u) @ v_proj - np.asarray(u),
                               rtol=1e-4, atol=1e-5)
    assert (_ranks(_writes(k, v, beta)) == 1).all()
    # with the gain (and identity) the steps are p-scaled residuals: still several directions
    _, _, _, (q, k, v2, beta, g) = _solver(dataclasses.replace(config, use_gain=True))
    assert (_ranks(_writes(k, v2, beta)) == 3).all()


def test_use_gain_false_has_no_gain_parameters():
    _, with_gain, _, _ = _solver(BASE)
    _, without, _, _ = _solver(dataclasses.replace(BASE, use_gain=False))
    assert any(name.startswith("gains_") for name in with_gain["params"])
    assert not any(name.startswith("gains_") for name in without["params"])


def test_short_conv_off_anchors_on_the_current_token_only():
    config = dataclasses.replace(BASE, use_short_conv=False)
    mixer = PrismMixer(config)
    x = jax.random.normal(jax.random.key(3), (1, 6, config.d_model))
    params = _params(mixer, x)
    assert "conv" not in params["params"]
    u = mixer.apply(params, x, method=mixer.anchor)
    x2 = x.at[:, 2].add(1.0)
    u2 = mixer.apply(params, x2, method=mixer.anchor)
    changed = np.abs(np.asarray(u2 - u)).max(axis=-1)[0]
    assert changed[2] > 0 and np.all(np.delete(changed, 2) == 0)
    # with the conv the perturbation reaches the next kernel_size - 1 tokens
    mixer_c = PrismMixer(dataclasses.replace(config, use_short_conv=True))
    params_c = _params(mixer_c, x)
    changed = np.abs(np.asarray(mixer_c.apply(params_c, x2, method=mixer_c.anchor)
                                - mixer_c.apply(params_c, x, method=mixer_c.anchor))).max(-1)[0]
    assert (changed[2:6] > 0).all() and (changed[:2] == 0).all()


def test_low_rank_solver_shrinks_the_solver():
    full = _solver(BASE)[1]
    low = _solver(dataclasses.replace(BASE, solver_rank=4))[1]
    count = lambda p: sum(x.size for x in jax.tree.leaves(p))
    assert low["params"]["solver_down"]["kernel"].shape == (BASE.d_model, 4)
    assert count(low) < count(full)


# -- GDN / GLA ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("erase", [True, False])
def test_delta_mixer_terms(erase):
    mixer = DeltaMixer(BASE, erase=erase)
    x = jax.random.normal(jax.random.key(4), (2, 5, BASE.d_model))
    params = _params(mixer, x)
    qkv = jax.random.normal(jax.random.key(5), (2, 5, 2 * BASE.num_heads * BASE.head_k_dim + BASE.d_model))
    q, k, v, beta, g = mixer.apply(params, qkv, x, method=mixer.op_terms)
    assert (np.asarray(g) <= 0).all()
    np.testing.assert_allclose(np.linalg.norm(np.asarray(k), axis=-1), 1.0, rtol=1e-4)
    if erase:  # Gated DeltaNet: one write slot, gate in (0, 1), erase = write gate
        assert k.shape[-2] == 1 and "b_proj" in params["params"]
        assert ((np.asarray(beta) > 0) & (np.asarray(beta) < 1)).all()
    else:  # GLA: slot 0 neither erases nor writes; slot 1 writes k v^T with gate 1
        assert k.shape[-2] == 2 and "b_proj" not in params["params"]
        np.testing.assert_array_equal(np.asarray(beta[..., 0]), 0.0)
        np.testing.assert_array_equal(np.asarray(beta[..., 1]), 1.0)
        plain = DeltaMixer(dataclasses.replace(BASE, gla_decay=False), erase=False)
        plain_params = _params(plain, x)
        assert "a_log" not in plain_params["params"] and "a_proj" not in plain_params["params"]
        np.testing.assert_array_equal(np.asarray(plain.apply(plain_params, qkv, x, method=plain.op_terms)[4]), 0.0)


# -- TTT-Linear -----------------------------------------------------------------------------------------

def _ttt_reference(q, k, v, eta, w0, b0, scale, bias, mini_batch):
    """Float64 definition: one explicit GD step per mini-batch (gradients by autodiff at the batch start),
    W_t = W_0 - (1/(i+1)) sum_{s<=t} eta_s grad_s. q, k, v: [T, H, Dh]; eta [T, H] (one row)."""
    def ln(z, sc, bi):
        mu = z.mean(-1, keepdims=True)
        return (z - mu) / jnp.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * sc + bi

    def loss(wb, kk, vv, sc, bi):
        return 0.5 * jnp.sum((kk + ln(kk @ wb[0] + wb[1], sc, bi) - vv) ** 2)

    grad = jax.jit(jax.grad(loss))
    T, H, _ = q.shape
    out = np.zeros(q.shape)
    for h in range(H):
        w, b = w0[h], b0[h]
        sc, bi = scale[h], bias[h]
        for start in range(0, T, mini_batch):
            gw, gb = 0.0, 0.0
            for i, t in enumerate(range(start, min(start + mini_batch, T))):
                dw, db = grad((w, b), k[t, h], v[t, h], sc, bi)
                gw, gb = gw + eta[t, h] * dw, gb + eta[t, h] * db
                wt, bt = w - gw / (i + 1), b - gb / (i + 1)
                out[t, h] = q[t, h] + ln(q[t, h] @ wt + bt, sc, bi)
            w, b = wt, bt
    return out


def test_ttt_dual_and_sequential_forms_match_float64_reference():
    config = dataclasses.replace(BASE, ttt_mini_batch=3)
    mixer = TTTLinearMixer(config)
    x = jnp.zeros((1, 2, config.d_model))
    params = _params(mixer, x)
    p = params["params"]
    p = dict(p, w0=jax.random.normal(jax.random.key(9), p["w0"].shape) * 0.3,
             ln_scale=1 + 0.1 * jax.random.normal(jax.random.key(10), p["ln_scale"].shape),
             b0=0.1 * jax.random.normal(jax.random.key(11), p["b0"].shape))
    params = {"params": p}
    B, T, H, Dh = 2, 8, config.num_heads, config.d_model // config.num_heads
    ks = jax.random.split(jax.random.key(12), 4)
    q, k, v = (jax.random.normal(kk, (B, T, H, Dh)) for kk in ks[:3])
    eta = jax.random.uniform(ks[3], (B, T, H), minval=0.0, maxval=0.2)
    seg = np.array([[0] * T, [0, 0, 0, 0, 1, 2, 2, 2]], np.int32)
    dual, _ = mixer.apply(params, q, k, v, eta, jnp.asarray(seg), method=mixer._dual)
    seq, _ = mixer.apply(params, q, k, v, eta, jnp.asarray(seg), method=mixer._sequential)
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
        args = [f64(p[n]) for n in ("w0", "b0", "ln_scale", "ln_bias")]
        for b in range(B):
            ref = np.zeros((T, H, Dh))
            for s in np.unique(seg[b]):
                idx = np.where(seg[b] == s)[0]
                ref[idx] = _ttt_reference(*(f64(a[b, idx]) for a in (q, k, v, eta)), *args, config.ttt_mini_batch)
            np.testing.assert_allclose(np.asarray(seq[b]), ref, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(np.asarray(dual[b]), ref, rtol=1e-4, atol=1e-4)


def test_ttt_dual_form_with_random_packings_matches_token_steps():
    """Chunk-parallel dual form == token-by-token form (outputs and the final inner state) for random
    packings, mini-batch sizes that do and do not divide the documents, and length-1 documents."""
    rng = np.random.default_rng(5)
    B, T, H, Dh = 3, 13, BASE.num_heads, BASE.d_model // BASE.num_heads
    for mini_batch in (1, 4):
        config = dataclasses.replace(BASE, ttt_mini_batch=mini_batch)
        mixer = TTTLinearMixer(config)
        params = _params(mixer, jnp.zeros((1, 2, config.d_model)))
        ks = jax.random.split(jax.random.key(mini_batch), 4)
        q, k, v = (jax.random.normal(kk, (B, T, H, Dh)) for kk in ks[:3])
        eta = jax.random.uniform(ks[3], (B, T, H), minval=0.0, maxval=0.3)
        seg = _random_segments(rng, B, T)
        seg[2] = 0  # one row, one document
        seg[1, -1] = 99  # a length-1 document at the last position
        dual, final = mixer.apply(params, q, k, v, eta, jnp.asarray(seg), method=mixer._dual)
        seq, seq_final = mixer.apply(params, q, k, v, eta, jnp.asarray(seg), method=mixer._sequential)
        np.testing.assert_allclose(np.asarray(dual), np.asarray(seq), rtol=1e-4, atol=1e-5)
        # the final state (decode cache: open mini-batch anchor and sums) equals the token steps' state
        for name in ("w", "b", "gw", "gb"):
            np.testing.assert_allclose(np.asarray(final[name]), np.asarray(seq_final[name]), rtol=1e-4, atol=1e-5)
