"""scan_layers=True (one block under nn.scan, params stacked on a "layers" axis) computes the same
function as the unrolled model given the same weights: logits and gradients with packed documents,
prefill + decode, and a training step through train.loop.

Each mixer's checks run inside one jitted function to keep compilation cheap.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax.models import MIXERS, PrismLM, PrismLMConfig, stack_layer_params, unstack_layer_params
from prism_jax.sharding import LOGICAL_AXIS_RULES, MESH_AXES, PARAM_AXES

TINY = PrismLMConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=2, head_k_dim=16, mlp_hidden_dim=64,
                     solver_steps=2, chunk_size=4, ttt_mini_batch=3, max_seq_len=16, op_impl="reference")
B, T, PREFIX = 2, 11, 5
# row 0: a length-1 document and two more; row 1: one document (so its logits are also the plain forward)
SEGMENTS = np.array([[3] * 1 + [13] * 4 + [23] * 6, [7] * 11], np.int32)


def _models(mixer, **overrides):
    unrolled = dataclasses.replace(TINY, mixer=mixer, **overrides)
    return PrismLM(unrolled), PrismLM(dataclasses.replace(unrolled, scan_layers=True))


def _loss(model, params, tokens, seg):
    logits = model.apply({"params": params}, tokens, seg)
    return jnp.sum(jnp.sin(3.0 * logits)), logits  # touches every logit with varied weights


def _assert_trees_close(got, want, what, rtol=1e-4):
    assert jax.tree.structure(got) == jax.tree.structure(want), what
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        atol = rtol * max(1.0, float(np.abs(b).max()))  # float32 sums of O(100) terms
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"{what} {jax.tree_util.keystr(path)}")


@functools.lru_cache(maxsize=None)
def _unrolled_vs_scanned(mixer):
    unrolled, scanned = _models(mixer)
    tokens = jax.random.randint(jax.random.key(0), (B, T), 0, TINY.vocab_size)
    seg = jnp.asarray(SEGMENTS)

    @jax.jit
    def run(params):
        stacked = stack_layer_params(params)
        grad = lambda model, p: jax.grad(lambda p: _loss(model, p, tokens, seg), has_aux=True)(p)
        gu, logits_u = grad(unrolled, params)
        gs, logits_s = grad(scanned, stacked)
        # generation under scan (row 1, one document): prefill PREFIX tokens, then decode the rest
        prefix_logits, cache = scanned.apply({"params": stacked}, tokens[1:, :PREFIX], TINY.max_seq_len,
                                             method=scanned.prefill)

        def step(cache, token):
            out, cache = scanned.apply({"params": stacked}, token, cache, method=scanned.decode)
            return cache, out

        cache, decoded = jax.lax.scan(step, cache, tokens[1:, PREFIX:].T)
        decoded = jnp.concatenate([prefix_logits, jnp.swapaxes(decoded, 0, 1)], axis=1)
        return logits_u, logits_s, gu, unstack_layer_params(gs), decoded, cache["index"], cache["layers"]

    params = nn.unbox(jax.jit(unrolled.init)(jax.random.key(1), tokens[:, :1])["params"])
    return jax.device_get(run(params))


# prism runs by default; the other mixers share the scan code path and run with -m slow (compile time)
@pytest.mark.parametrize("mixer", [m if m == "prism" else pytest.param(m, marks=pytest.mark.slow) for m in MIXERS])
def test_scanned_equals_unrolled_logits_gradients_and_decode(mixer):
    logits_u, logits_s, gu, gs, decoded, index, cache_layers = _unrolled_vs_scanned(mixer)
    np.testing.assert_allclose(logits_s, logits_u, rtol=1e-5, atol=1e-5, err_msg=f"{mixer}: logits")
    _assert_trees_close(gs, gu, f"{mixer}: gradient")
    # every layer gets its own gradient (the scan neither dropped nor repeated a layer)
    per_layer = [jax.tree.leaves(gs[f"blocks_{i}"]) for i in range(TINY.num_layers)]
    assert all(max(float(np.abs(g).max()) for g in leaves) > 0 for leaves in per_layer)
    assert float(np.abs(per_layer[0][0] - per_layer[1][0]).max()) > 0
    # prefill + decode under scan equals the full forward; the cache is stacked on the layer axis
    np.testing.assert_allclose(decoded, logits_u[1:], rtol=1e-4, atol=2e-5, err_msg=f"{mixer}: decode")
    assert int(index) == T
    assert {leaf.shape[0] for leaf in jax.tree.leaves(cache_layers)} == {TINY.num_layers}


@pytest.mark.slow
def test_remat_full_gives_the_same_gradients():
    config = dataclasses.replace(TINY, num_layers=2, scan_layers=True)
    plain, remat = PrismLM(config), PrismLM(dataclasses.replace(config, remat_policy="full"))
    tokens = jax.random.randint(jax.random.key(4), (B, T), 0, TINY.vocab_size)
    seg = jnp.asarray(SEGMENTS)

    @jax.jit
    def run(params):
        return (jax.grad(lambda p: _loss(plain, p, tokens, seg)[0])(params),
                jax.grad(lambda p: _loss(remat, p, tokens, seg)[0])(params))

    params = nn.unbox(jax.jit(plain.init)(jax.random.key(5), tokens[:, :1])["params"])
    g_plain, g_remat = jax.device_get(run(params))
    _assert_trees_close(g_remat, g_plain, "remat gradient", rtol=1e-5)


# -- layout: logical axes and the conversion helpers ----------------------------------------------------

@pytest.mark.parametrize("mixer", MIXERS)
def test_stacked_params_carry_the_layers_axis_and_convert_both_ways(mixer):
    config = dataclasses.replace(TINY, mixer=mixer, tie_embeddings=False, solver_rank=4)
    unrolled, scanned = PrismLM(config), PrismLM(dataclasses.replace(config, scan_layers=True))
    tokens = jnp.zeros((1, 3), jnp.int32)
    shapes_u = jax.eval_shape(unrolled.init, jax.random.key(0), tokens)
    shapes_s = jax.eval_shape(scanned.init, jax.random.key(0), tokens)
    is_box = lambda x: isinstance(x, nn.Partitioned)
    describe = lambda tree: jax.tree.map(lambda b: (b.value.shape, b.names), tree, is_leaf=is_box)
    assert set(shapes_s["params"]) == {"embed", "blocks", "final_norm", "lm_head"}
    for leaf in jax.tree.leaves(shapes_s["params"]["blocks"], is_leaf=is_box):
        assert is_box(leaf) and leaf.names[0] == "layers" and leaf.value.shape[0] == TINY.num_layers
    # every name is known and mapped by THE rules table; the layer axis stays unsharded
    for leaf in jax.tree.leaves(shapes_s["params"], is_leaf=is_box):
        assert len(leaf.names) == leaf.value.ndim and all(n is None or n in PARAM_AXES for n in leaf.names)
        mesh_axes = nn.logical_to_mesh_axes(leaf.names, LOGICAL_AXIS_RULES)
        assert set(a for m in mesh_axes if m is not None for a in (m if isinstance(m, tuple) else (m,))) <= set(MESH_AXES)
    assert tuple(nn.logical_to_mesh_axes(("layers", "embed", "mlp"), LOGICAL_AXIS_RULES)) == (None, "fsdp", "tensor")
    # the helpers map one layout onto the other, boxes and logical names included
    assert describe(stack_layer_params(shapes_u)) == describe(shapes_s)
    assert describe(unstack_layer_params(shapes_s)) == describe(shapes_u)
    assert describe(stack_layer_params(shapes_u["params"], TINY.num_layers)) == describe(shapes_s["params"])


def test_conversion_values_and_bad_input():
    params = {"embed": jnp.ones((2, 2)),
              "blocks_0": {"w": jnp.full((2, 3), 0.0)}, "blocks_1": {"w": jnp.full((2, 3), 1.0)},
              "blocks_2": {"w": jnp.full((2, 3), 2.0)}}
    stacked = stack_layer_params(params)
    assert set(stacked) == {"embed", "blocks"} and stacked["blocks"]["w"].shape == (3, 2, 3)
    np.testing.assert_array_equal(stacked["blocks"]["w"][:, 0, 0], [0.0, 1.0, 2.0])
    back = unstack_layer_params(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="already"):
        stack_layer_params(stacked)
    with pytest.raises(ValueError, match="num_layers"):
        stack_layer_params(params, num_layers=2)
    with pytest.raises(ValueError, match="layer keys"):
        stack_layer_params({"embed": 1, "blocks_0": {"w": 0}, "blocks_2": {"w": 0}})
    with pytest.raises(ValueError, match="scan_layers layout"):
        unstack_layer_params(params)


@pytest.mark.parametrize("overrides, field", [
    (dict(scan_layers=1), "scan_layers"),
    (dict(remat_policy="dots"), "remat_policy"),
])
def test_bad_scan_fields_raise(overrides, field):
    with pytest.raises(ValueError, match=rf"PrismLMConfig\.{field}"):
        dataclasses.replace(TINY, **overrides)


# -- the training stack -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_step_with_scan_layers_equals_the_unrolled_step():
    """train.loop.create_train_state + make_train_step (AdamW, clipping, decay mask) on the tiny
    config: two steps of the scanned model equal two steps of the unrolled one from the same weights."""
    from train import config_lib, loop, optim  # noqa: PLC0415
    from train import mesh as mesh_lib  # noqa: PLC0415

    config = config_lib.tiny_config()
    config.model.update(num_layers=2, d_model=32, mlp_hidden_dim=64, head_k_dim=16)
    seq_len, rows = 12, 4
    mesh = mesh_lib.make_mesh((1, 1, 1, 1), jax.devices()[:1])
    rules = mesh_lib.logical_axis_rules()
    optimizer = optim.make_optimizer(config)
    results = {}
    for scan in (False, True):
        config.model.scan_layers = scan
        model = loop.build_model(config)
        state, _ = loop.create_train_state(model, optimizer, mesh, rules, jax.random.key(0), seq_len)
        if scan:  # start from the unrolled weights (and the matching zero optimizer state)
            params = stack_layer_params(results[False][0])
            state = state.replace(params=params, opt_state=optimizer.init(params))
        step = jax.jit(loop.make_train_step(model, optimizer))
        losses = []
        for i in range(2):
            tokens = jax.random.randint(jax.random.key(10 + i), (1, rows, seq_len), 0, 256)
            seg = jnp.broadcast_to(jnp.repeat(jnp.arange(1, 4), 4)[None, None], tokens.shape)
            positions = jnp.broadcast_to(jnp.tile(jnp.arange(4), 3)[None, None], tokens.shape)
            if i == 0:
                initial = state.params
            with loop.sharding_context(mesh, rules):
                state, metrics = step(state, {"tokens": tokens, "segment_ids": seg, "positions": positions})
            losses.append(float(metrics["loss"]))
        results[scan] = (jax.device_get(initial), jax.device_get(state.params), losses)
    assert all(np.isfinite(results[True][2]))
    np.testing.assert_allclose(results[True][2], results[False][2], rtol=1e-5)
    _assert_trees_close(unstack_layer_params(results[True][1]), results[False][1], "params after 2 steps")
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(results[False][1]),
                                                           jax.tree.leaves(results[False][0])))
    assert moved > 1e-4
