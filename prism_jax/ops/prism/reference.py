"""Reference form: a token-by-token `lax.scan` of `prism_step`, in float32. The readable definition."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prism_jax.ops.prism.common import resets_from_segments
from prism_jax.ops.prism.recurrent import prism_step


def prism_reference(q, k, v, beta, g, *, scale, initial_state, segment_ids=None):
    """Shapes as in `prism_recurrence`; returns (o [B, T, H, V], final state) in the compute dtype."""
    B, T, H, _ = q.shape
    resets = resets_from_segments(segment_ids, B, T)  # [B, T] bool

    def body(state, xs):
        q_t, k_t, v_t, b_t, g_t, r_t = xs
        o_t, state = prism_step(q_t, k_t, v_t, b_t, g_t, state, scale=scale, reset=r_t)
        return state, o_t

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, g, resets))
    final, o = jax.lax.scan(body, initial_state, xs)
    return jnp.moveaxis(o, 0, 1), final
