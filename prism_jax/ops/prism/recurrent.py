"""One token step of the PRISM recurrence: the decoding form and the definition the other forms match.

Per head, with state S (K x V):

    S_t = exp(g_t) (I - beta_t^0 k_t^0 k_t^0T) S_{t-1} + sum_l beta_t^l k_t^l v_t^lT
    o_t = scale * S_t^T q_t
"""

from __future__ import annotations

import jax.numpy as jnp


def prism_step(q, k, v, beta, g, state, *, scale, reset=None):
    """Advance the state by one token.

    Args:
      q: [B, H, K]; k: [B, H, L, K]; v: [B, H, L, V]; beta: [B, H, L]; g: [B, H].
      state: [B, H, K, V] float32 (or float64).
      scale: output scale.
      reset: optional [B] bool; where True the state is zeroed before this token (document start).
    Returns:
      (o [B, H, V], new state [B, H, K, V]), float32 (float64 for a float64 state).
    """
    dt = jnp.result_type(jnp.float32, state.dtype)  # float32, or float64 under x64 tests
    q, k, v, beta, g = (x.astype(dt) for x in (q, k, v, beta, g))
    state = state.astype(dt)
    if reset is not None:
        state = jnp.where(reset[:, None, None, None], 0.0, state)
    k0, b0 = k[:, :, 0], beta[:, :, 0]
    erased = jnp.einsum("bhk,bhkv->bhv", k0, state)  # k^T S
    state = state - (b0[..., None, None] * k0[..., :, None]) * erased[..., None, :]
    state = jnp.exp(g)[..., None, None] * state
    state = state + jnp.einsum("bhlk,bhlv->bhkv", k * beta[..., None], v)
    o = scale * jnp.einsum("bhkv,bhk->bhv", state, q)
    return o, state
