"""Helpers shared by the forms of the op."""

from __future__ import annotations

import jax.numpy as jnp


def resets_from_segments(segment_ids, batch: int, length: int):
    """[B, T] bool: True at t >= 1 where segment_ids[t] != segment_ids[t - 1] (state zeroed before t)."""
    if segment_ids is None:
        return jnp.zeros((batch, length), dtype=bool)
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros((batch, 1), dtype=bool), change], axis=1)
