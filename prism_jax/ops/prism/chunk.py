"""Exact chunkwise-parallel form (docs/math.md; prism-math.md section 3).

Inside a chunk of C tokens with start state S_0, the erased rows e_t = beta_t k_t^T S_{t-1} solve a
unit lower-triangular system (I + M) E = D S_0 + R, so E = P S_0 + Q with P, Q independent of S_0.
Everything is C x C / C x K matmuls and one triangular solve per chunk; across chunks the map
S_0 -> S_C = A S_0 + B is affine and is applied either by a sequential `lax.scan` over chunks
(default, cheapest on one device) or by `lax.associative_scan` over the (A, B) pairs (log depth).

Decay ratios are always exp(G_a - G_b) with a >= b, masked before exponentiating, and a document
reset (segment change) is a mask, never a log-decay of -inf.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from prism_jax.ops.prism.common import resets_from_segments
from prism_jax.ops.prism.scan import compose


class ChunkTerms(NamedTuple):
    """Per-chunk quantities that do not depend on the chunk's start state. Leading dims [B, H, N]."""

    p: jax.Array  # [C, K]  E = P S_0 + Q
    q: jax.Array  # [C, V]
    decay_all: jax.Array  # []      exp(G_C), zero if the chunk holds a reset
    erase_keys: jax.Array  # [C, K]  exp(G_C - G_{i-1}) k_i
    writes: jax.Array  # [K, V]  sum_i exp(G_C - G_i) W_i


def _masked_decay(g_rows, g_cols, r_rows, r_cols, causal):
    """exp(g_rows[a] - g_cols[b]) where causal[a, b] and no reset lies between them; else 0."""
    mask = causal & (r_rows[..., :, None] == r_cols[..., None, :])
    diff = g_rows[..., :, None] - g_cols[..., None, :]
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def _decays(g, r, r_prev):
    """All decay factors of one chunk. g, r: [..., C]; r_prev: [...] (reset count before the chunk)."""
    C = g.shape[-1]
    G = jnp.cumsum(g, axis=-1)  # G_t
    Gm1 = G - g  # G_{t-1}
    rm1 = jnp.concatenate([r_prev[..., None], r[..., :-1]], axis=-1)
    strict = jnp.tril(jnp.ones((C, C), dtype=bool), -1)
    incl = jnp.tril(jnp.ones((C, C), dtype=bool), 0)
    same_start = lambda rr: (rr == r_prev[..., None]).astype(g.dtype)
    GC, rC = G[..., -1:], r[..., -1:]
    return dict(
        m1m1=_masked_decay(Gm1, Gm1, rm1, rm1, strict),  # exp(G_{t-1} - G_{i-1}), i < t
        m1_0=_masked_decay(Gm1, G, rm1, r, strict),  # exp(G_{t-1} - G_i), i < t
        t_m1=_masked_decay(G, Gm1, r, rm1, incl),  # exp(G_t - G_{i-1}), i <= t
        t_0=_masked_decay(G, G, r, r, incl),  # exp(G_t - G_i), i <= t
        start_m1=jnp.exp(Gm1) * same_start(rm1),  # exp(G_{t-1})
        start=jnp.exp(G) * same_start(r),  # exp(G_t)
        end_m1=jnp.exp(GC - Gm1) * (rC == rm1),  # exp(G_C - G_{i-1})
        end=jnp.exp(GC - G) * (rC == r),  # exp(G_C - G_i)
        all=jnp.exp(GC[..., 0]) * (rC[..., 0] == r_prev),  # exp(G_C)
    )


@jax.checkpoint
def _chunk_terms(k, vw, beta0, g, r, r_prev):
    """k: [..., C, L, K]; vw: [..., C, L, V] (values times their gates); beta0, g, r: [..., C]."""
    d = _decays(g, r, r_prev)
    k0 = k[..., 0, :]
    K = k.shape[-1]
    kk = jnp.einsum("...tk,...ik->...ti", k0, k0)
    m = beta0[..., :, None] * kk * d["m1m1"]
    rhs_state = (beta0 * d["start_m1"])[..., None] * k0
    kw = jnp.einsum("...tk,...ilk->...til", k0, k) * d["m1_0"][..., None]
    rhs_write = beta0[..., None] * jnp.einsum("...til,...ilv->...tv", kw, vw)
    eye = jnp.eye(m.shape[-1], dtype=m.dtype)
    pq = jax.lax.linalg.triangular_solve(
        eye + m, jnp.concatenate([rhs_state, rhs_write], axis=-1),
        left_side=True, lower=True, unit_diagonal=True)
    writes = jnp.einsum("...i,...ilk,...ilv->...kv", d["end"], k, vw)
    return ChunkTerms(pq[..., :K], pq[..., K:], d["all"], d["end_m1"][..., None] * k0, writes)


@jax.checkpoint
def _chunk_outputs(q, k, vw, g, r, r_prev, terms: ChunkTerms, s0):
    """Outputs of one chunk given its start state s0 [..., K, V]; q: [..., C, K]."""
    d = _decays(g, r, r_prev)
    e = terms.p @ s0 + terms.q  # erased rows, [..., C, V]
    qk = jnp.einsum("...tk,...ik->...ti", q, k[..., 0, :]) * d["t_m1"]
    qw = jnp.einsum("...tk,...ilk->...til", q, k) * d["t_0"][..., None]
    return (d["start"][..., None] * (q @ s0) - qk @ e
            + jnp.einsum("...til,...ilv->...tv", qw, vw))


def _apply(terms: ChunkTerms, s0):
    """Chunk end state from its start state, without forming the K x K transition."""
    e = terms.p @ s0 + terms.q
    return (terms.decay_all[..., None, None] * s0
            - jnp.einsum("...ck,...cv->...kv", terms.erase_keys, e) + terms.writes)


def _transition(terms: ChunkTerms):
    """The chunk's affine map as (A [K, K], B [K, V])."""
    K = terms.p.shape[-1]
    a = (terms.decay_all[..., None, None] * jnp.eye(K, dtype=terms.p.dtype)
         - jnp.einsum("...ck,...cj->...kj", terms.erase_keys, terms.p))
    b = terms.writes - jnp.einsum("...ck,...cv->...kv", terms.erase_keys, terms.q)
    return a, b


def chunk_start_states(terms: ChunkTerms, initial_state, inter_chunk: str):
    """Start state of every chunk [B, H, N, K, V] and the final state [B, H, K, V]."""
    if inter_chunk == "scan":
        def body(s, t):
            return _apply(t, s), s

        moved = jax.tree.map(lambda x: jnp.moveaxis(x, 2, 0), terms)
        final, starts = jax.lax.scan(body, initial_state, moved)
        return jnp.moveaxis(starts, 0, 2), final
    a, b = _transition(terms)
    b = b.at[:, :, 0].add(a[:, :, 0] @ initial_state)
    _, ends = jax.lax.associative_scan(compose, (a, b), axis=2)
    starts = jnp.concatenate([initial_state[:, :, None], ends[:, :, :-1]], axis=2)
    return starts, ends[:, :, -1]


class ChunkedInputs(NamedTuple):
    """One row's inputs split into chunks of C tokens, [B, H, N, C, ...], padded with identity steps.

    q [.., K], k [.., L, K], vw = beta * v [.., L, V], beta [.., L], g [..] (log-decay, zeroed at
    resets), r [..] int32 resets up to each token, r_prev [B, H, N] the count before each chunk.
    """

    q: jax.Array
    k: jax.Array
    vw: jax.Array
    beta: jax.Array
    g: jax.Array
    r: jax.Array
    r_prev: jax.Array


def chunk_inputs(q, k, v, beta, g, segment_ids, chunk_size) -> ChunkedInputs:
    """Pads [B, T, H, ...] inputs to N = ceil(T / C) chunks (beta = 0, g = 0, v = 0: identity steps, no
    reset) and moves them to [B, H, N, C, ...]."""
    B, T, H = q.shape[:3]
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    resets = resets_from_segments(segment_ids, B, T)
    r = jnp.cumsum(resets.astype(jnp.int32), axis=1)  # number of resets up to and including t
    g = jnp.where(resets[:, :, None], 0.0, g)  # the reset itself is carried by the masks
    if pad:
        padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, beta, g = map(padt, (q, k, v, beta, g))
        r = jnp.pad(r, [(0, 0), (0, pad)], mode="edge")

    def chunked(x):  # [B, T, H, ...] -> [B, H, N, C, ...]
        return jnp.moveaxis(x.reshape(B, N, C, H, *x.shape[3:]), 3, 1)

    q, k, v, beta, g = map(chunked, (q, k, v, beta, g))
    r = jnp.broadcast_to(r.reshape(B, 1, N, C), (B, H, N, C))
    r_prev = jnp.concatenate([jnp.zeros((B, H, 1), r.dtype), r[..., :-1, -1]], axis=-1)
    return ChunkedInputs(q, k, beta[..., None] * v, beta, g, r, r_prev)


def unchunk_outputs(o, T):
    """[B, H, N, C, V] -> [B, T, H, V] (drops the padding)."""
    B, H, N, C, V = o.shape
    return jnp.moveaxis(o, 1, 3).reshape(B, N * C, H, V)[:, :T]


def prism_chunk(q, k, v, beta, g, *, scale, initial_state, segment_ids=None, chunk_size=64,
                inter_chunk="scan"):
    """Shapes as in `prism_recurrence`; returns (o [B, T, H, V], final state) in the compute dtype."""
    x = chunk_inputs(q, k, v, beta, g, segment_ids, chunk_size)
    terms = _chunk_terms(x.k, x.vw, x.beta[..., 0], x.g, x.r, x.r_prev)
    starts, final = chunk_start_states(terms, initial_state, inter_chunk)
    o = _chunk_outputs(x.q, x.k, x.vw, x.g, x.r, x.r_prev, terms, starts)  # [B, H, N, C, V]
    return scale * unchunk_outputs(o, q.shape[1]), final
