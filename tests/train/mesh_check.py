"""Subprocess for test_mesh.py: train a few steps on 8 fake CPU devices (2x2x2 mesh) and on 1 device.

Usage: python mesh_check.py {standin|prism} OUT.json   (sets XLA_FLAGS itself, before importing jax)
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train import config_lib, loop, optim  # noqa: E402
from train import mesh as mesh_lib  # noqa: E402


def build(kind):
    if kind == "standin":
        from train_standin import STANDIN_RULES, StandinConfig, StandinLM

        return StandinLM(StandinConfig()), STANDIN_RULES
    from prism_jax.models import PrismLM, get_preset

    cfg = get_preset("tiny", d_model=32, num_heads=2, head_k_dim=16, mlp_hidden_dim=64, chunk_size=16)
    return PrismLM(cfg), mesh_lib.logical_axis_rules()


def main(kind, out_path):
    assert jax.device_count() == 8, jax.devices()
    model, rules = build(kind)
    config = config_lib.base_config(model={})
    config.learning_rate, config.warmup_steps, config.total_steps = 1e-2, 1, 10
    optimizer = optim.make_optimizer(config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (8, 32)).astype(np.int32)
    seg = np.sort(rng.integers(1, 4, (8, 32)), axis=1).astype(np.int32)
    # The same packed batch three times: the loss must fall, identically on both meshes.
    batches = [{"tokens": tokens[None], "segment_ids": seg[None], "positions": np.zeros_like(tokens)[None]}] * 3
    result = {}
    for name, shape, devices in (("one", (1, 1, 1, 1), jax.devices()[:1]), ("mesh", (2, 2, 2, 1), jax.devices())):
        mesh = mesh_lib.make_mesh(shape, devices)
        state, shardings = loop.create_train_state(model, optimizer, mesh, rules, jax.random.key(0), 32)
        sharding = mesh_lib.batch_sharding(mesh, leading_dims=1)
        with loop.sharding_context(mesh, rules):
            step = jax.jit(loop.make_train_step(model, optimizer), in_shardings=(shardings, sharding),
                           out_shardings=(shardings, None))
            losses = []
            for batch in batches:
                state, metrics = step(state, {k: jax.device_put(v, sharding) for k, v in batch.items()})
                losses.append(float(metrics["loss"]))
        if name == "mesh":  # the fresh state made on the host and placed shard by shard: same values and shardings
            fresh, _ = loop.create_train_state(model, optimizer, mesh, rules, jax.random.key(0), 32, "device")
            hosted, _ = loop.create_train_state(model, optimizer, mesh, rules, jax.random.key(0), 32, "host")
            pairs = list(zip(jax.tree.leaves(fresh), jax.tree.leaves(hosted)))
            result["host_init"] = {
                "leaves": len(pairs),
                "same_values": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs),
                "same_shardings": all(a.sharding == b.sharding for a, b in pairs),
                "sharded_leaves": sum(not b.sharding.is_fully_replicated for _, b in pairs)}
        sharded = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.params)})
        result[name] = {"losses": losses, "specs": sharded,
                        "param_norm": float(optax_norm(state.params))}
    with open(out_path, "w") as f:
        json.dump(result, f)


def optax_norm(tree):
    return np.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in jax.tree.leaves(tree)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
