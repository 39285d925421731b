"""The optimizer: AdamW with linear warmup + cosine decay, global-norm clipping, decay mask."""

from __future__ import annotations

import jax
import optax

# Parameters whose path holds one of these names are never weight-decayed (norm gains, biases).
_NO_DECAY_NAMES = ("bias", "scale", "norm", "gain")


def learning_rate_schedule(config) -> optax.Schedule:
    """0 -> learning_rate over warmup_steps, then cosine down to learning_rate * min_lr_ratio."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.total_steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.min_lr_ratio,
    )


def _path_names(path) -> list[str]:
    names = []
    for key in path:
        name = getattr(key, "key", None) or getattr(key, "name", None)
        if isinstance(name, str):
            names.append(name.lower())
    return names


def weight_decay_mask(params):
    """True for matrices (ndim >= 2) outside norms; False for norms, gains and biases.

    Under `scan_layers` the blocks' params carry a leading layer axis (module `SCANNED_NAME`), which
    does not count: a per-layer vector stays undecayed, as in the unrolled layout."""
    from prism_jax.models.layer_params import SCANNED_NAME  # noqa: PLC0415

    def decays(path, leaf):
        names = _path_names(path)
        if any(bad in name for name in names for bad in _NO_DECAY_NAMES):
            return False
        return getattr(leaf, "ndim", 0) - (1 if SCANNED_NAME in names else 0) >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config) -> optax.GradientTransformation:
    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(
        optax.adamw(
            learning_rate_schedule(config),
            b1=config.adam_b1,
            b2=config.adam_b2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask,
        )
    )
    return optax.chain(*parts)
