"""The PRISM language model, its config and named presets."""

from prism_jax.models.config import MIXERS, PRESETS, PrismLMConfig, get_preset
from prism_jax.models.layer_params import stack_layer_params, unstack_layer_params
from prism_jax.models.lm import Block, PrismLM

__all__ = ["Block", "MIXERS", "PRESETS", "PrismLM", "PrismLMConfig", "get_preset", "stack_layer_params",
           "unstack_layer_params"]
