"""Sequence-mixing ops."""

from prism_jax.ops.prism import IMPLS, prism_recurrence, prism_step

__all__ = ["IMPLS", "prism_recurrence", "prism_step"]
