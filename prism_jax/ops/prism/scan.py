"""Associative-scan form: `jax.lax.associative_scan` over per-token affine maps (A_t, B_t).

S_t = A_t S_{t-1} + B_t with A_t = exp(g_t) (I - beta_t k_t k_t^T) (K x K) and
B_t = sum_l beta_t^l k_t^l v_t^lT (K x V). Pairs compose as (A2, B2) o (A1, B1) = (A2 A1, A2 B1 + B2).
This is the paper's parallel-scan formulation made literal: it materialises a K x K matrix and a
K x V state per token, so it is for tests and small K only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prism_jax.ops.prism.common import resets_from_segments


def compose(earlier, later):
    """Compose affine maps along the leading (time) axis: apply `earlier`, then `later`."""
    a1, b1 = earlier
    a2, b2 = later
    return a2 @ a1, a2 @ b1 + b2


def prism_scan(q, k, v, beta, g, *, scale, initial_state, segment_ids=None):
    """Shapes as in `prism_recurrence`; returns (o [B, T, H, V], final state) in the compute dtype."""
    B, T, H, K = q.shape
    keep = 1.0 - resets_from_segments(segment_ids, B, T).astype(q.dtype)  # [B, T]
    k0, b0 = k[..., 0, :], beta[..., 0]
    eye = jnp.eye(K, dtype=q.dtype)
    a = eye - b0[..., None, None] * k0[..., :, None] * k0[..., None, :]
    a = (jnp.exp(g) * keep[:, :, None])[..., None, None] * a  # [B, T, H, K, K]
    b = jnp.einsum("bthlk,bthlv->bthkv", k * beta[..., None], v)
    # Fold the initial state into the first token's offset: S_1 = A_1 S_0 + B_1.
    b = b.at[:, 0].add(a[:, 0] @ initial_state)
    a_cum, states = jax.lax.associative_scan(compose, (a, b), axis=1)
    del a_cum
    o = scale * jnp.einsum("bthkv,bthk->bthv", states, q)
    return o, states[:, -1]
