"""Parameter counts without materialising parameters (jax.eval_shape of one block's init)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from prism_jax.models.config import PrismLMConfig
from prism_jax.models.lm import Block


def _size(tree):
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def count_params(config: PrismLMConfig) -> dict:
    """{"embedding", "head", "mixer" (all layers), "mlp" (all layers), "norms", "total"} parameter counts."""
    x = jax.ShapeDtypeStruct((1, 1, config.d_model), jnp.float32)
    shapes = jax.eval_shape(lambda: Block(config).init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))
    params = shapes["params"]
    D, N = config.d_model, config.num_layers
    counts = {
        "embedding": config.vocab_size * D,
        "head": 0 if config.tie_embeddings else config.vocab_size * D,
        "mixer": N * _size(params["mixer"]),
        "mlp": N * _size(params["mlp"]),
        "norms": N * (_size(params["mixer_norm"]) + _size(params["mlp_norm"])) + D,
    }
    counts["total"] = sum(counts.values())
    return counts


def with_mixer(config: PrismLMConfig, mixer: str) -> PrismLMConfig:
    return dataclasses.replace(config, mixer=mixer)
