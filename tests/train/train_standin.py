"""A tiny stand-in language model for the training-stack tests (not the project's model).

It has the PrismLM call signature and logically-partitioned parameters, and it honours
`segment_ids`: each position mixes in the previous token only inside the same document.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

STANDIN_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class StandinConfig:
    vocab_size: int = 256
    d_model: int = 32
    mlp_hidden_dim: int = 64
    num_layers: int = 2


def standin_fields(**overrides) -> dict:
    return dataclasses.asdict(StandinConfig(**overrides))


class StandinLM(nn.Module):
    config: StandinConfig

    @nn.compact
    def __call__(self, tokens, segment_ids=None, positions=None):
        c = self.config
        init = nn.initializers.normal(0.02)
        embed = self.param("embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
                           (c.vocab_size, c.d_model))
        x = embed[tokens]
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        same = (segment_ids[:, 1:] == segment_ids[:, :-1])[..., None]
        for i in range(c.num_layers):
            prev = jnp.pad(x[:, :-1] * same, ((0, 0), (1, 0), (0, 0)))
            h = jnp.concatenate([x, prev], -1)
            h = nn.LayerNorm(name=f"norm_{i}")(h)
            h = nn.Dense(c.mlp_hidden_dim, name=f"up_{i}",
                         kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))(h)
            x = x + nn.Dense(c.d_model, name=f"down_{i}",
                             kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")))(nn.gelu(h))
        x = nn.LayerNorm(name="final_norm")(x)
        return jnp.einsum("btd,vd->btv", x, embed).astype(jnp.float32)


def small_run(config, data_dir, overrides, **settings):
    """`config` set up for a few quick steps on `data_dir` (T = 32, 4 rows, no bar, no TensorBoard), then
    `settings` and the test's own `overrides` on top."""
    config.data.data_dir = str(data_dir)
    config.data.seq_len = 32
    config.batch_size = 4
    config.warmup_steps = 2
    config.learning_rate = 1e-2
    config.log_every_steps = 1
    config.eval_batches = 1
    config.progress_bar = False
    config.tensorboard = False
    for key, value in {**settings, **overrides}.items():
        config[key] = value
    return config
