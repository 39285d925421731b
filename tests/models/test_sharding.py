"""The model under a device mesh with THE logical-axis rules (8 host CPU devices, in a subprocess)."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    import flax.linen as nn
    from jax.sharding import Mesh
    from prism_jax.models import PrismLM, get_preset
    from prism_jax.sharding import LOGICAL_AXIS_RULES, MESH_AXES

    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2, 1), MESH_AXES)
    tokens = jax.random.randint(jax.random.key(0), (4, 16), 0, 64)
    # (mixer, scan_layers, gate kernel path, expected spec): under scan_layers the stacked "layers"
    # axis stays replicated and the rest shards as in the unrolled model
    cases = [("prism", False, "blocks_0", ("fsdp", "tensor")), ("attention", False, "blocks_0", ("fsdp", "tensor")),
             ("prism", True, "blocks", (None, "fsdp", "tensor"))]
    for mixer, scan, block, want in cases:
        model = PrismLM(get_preset("tiny", mixer=mixer, num_layers=2 if scan else 1, vocab_size=64,
                                   tie_embeddings=False, scan_layers=scan))
        reference = jax.jit(model.apply)(model.init(jax.random.key(1), tokens), tokens)
        with mesh, nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            abstract = jax.eval_shape(model.init, jax.random.key(1), tokens)
            shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, LOGICAL_AXIS_RULES)
            params = jax.jit(model.init, out_shardings=shardings)(jax.random.key(1), tokens)
            logits = jax.jit(model.apply)(params, tokens)
        spec = params["params"][block]["mlp"]["gate"]["kernel"].value.sharding.spec
        assert tuple(spec) == want, (mixer, scan, spec)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), rtol=1e-4, atol=1e-5)
    # bfloat16 compute: finite float32 logits close to the float32 model
    model16 = PrismLM(get_preset("tiny", num_layers=1, vocab_size=64, dtype="bfloat16"))
    model32 = PrismLM(get_preset("tiny", num_layers=1, vocab_size=64))
    params = model32.init(jax.random.key(1), tokens)
    l16, l32 = jax.jit(model16.apply)(params, tokens), jax.jit(model32.apply)(params, tokens)
    assert l16.dtype == jnp.float32 and bool(jnp.isfinite(l16).all())
    assert float(jnp.abs(l16 - l32).max()) < 0.05 * float(jnp.abs(l32).max()) + 0.05
    print("OK")
""")


@pytest.mark.slow
def test_sharded_model_matches_single_device_and_bf16_runs():
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-4000:]
