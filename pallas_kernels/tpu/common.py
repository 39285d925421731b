"""What the TPU kernels share: per-token vectors as 2-D columns, the chunk's decay factors, the
triangular inverse, and the head-major layouts and block specs of their (B*H, N) grids.

Mosaic TPU works on 2-D vregs, so per-token scalars are columns [C, 1] and rows [1, C] (a row is
made from a column by a masked sublane sum, `to_row`; a column from a row by a masked lane sum,
`to_col`), never 1-D arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import Prepared, _masked_exp, mm

f32 = jnp.float32


def iotas(C):
    return (jax.lax.broadcasted_iota(jnp.int32, (C, C), 0),
            jax.lax.broadcasted_iota(jnp.int32, (C, C), 1))


def to_row(col, rows, cols):
    """[C, 1] -> [1, C] without a transpose."""
    return jnp.sum(jnp.where(rows == cols, col, 0.0), axis=0, keepdims=True)


def to_col(row, rows, cols):
    """[1, C] -> [C, 1] without a transpose."""
    return jnp.sum(jnp.where(rows == cols, row, 0.0), axis=1, keepdims=True)


def decays(g, r, rm1):
    """g, r, rm1: [C, 1] float32 columns (r, rm1: reset counts). Returns a dict of decay factors:
    [C, C] matrices, [C, 1] columns and [1, 1] scalars (see pallas_kernels.common.ChunkDecays)."""
    C = g.shape[0]
    rows, cols = iotas(C)
    g_row = to_row(g, rows, cols)
    G = jnp.sum(jnp.where(cols <= rows, g_row, 0.0), axis=1, keepdims=True)  # [C, 1] cumsum
    Gm1 = G - g
    G_row, Gm1_row = to_row(G, rows, cols), to_row(Gm1, rows, cols)
    r_row, rm1_row = to_row(r, rows, cols), to_row(rm1, rows, cols)
    GC = jnp.sum(g, axis=0, keepdims=True)  # [1, 1]
    r_prev = jnp.min(rm1, axis=0, keepdims=True)
    rC = jnp.max(r, axis=0, keepdims=True)
    strict, incl = cols < rows, cols <= rows
    same = lambda a, b: (a == b).astype(f32)
    return dict(
        m1m1=_masked_exp(Gm1 - Gm1_row, strict & (rm1 == rm1_row)),
        m1_0=_masked_exp(Gm1 - G_row, strict & (rm1 == r_row)),
        t_m1=_masked_exp(G - Gm1_row, incl & (r == rm1_row)),
        t_0=_masked_exp(G - G_row, incl & (r == r_row)),
        start_m1=jnp.exp(Gm1) * same(rm1, r_prev),
        start=jnp.exp(G) * same(r, r_prev),
        end_m1=jnp.exp(GC - Gm1) * same(rm1, rC),
        end=jnp.exp(GC - G) * same(r, rC),
        all=jnp.exp(GC) * same(rC, r_prev),
    )


def unit_lower_inverse(m):
    """(I + m)^{-1} for m [C, C] strictly lower (C a power of two), float32, by doubling the solved
    diagonal blocks: with X_s the block-diagonal inverse of I + m's s x s diagonal blocks and M_s
    the lower-left s x s quadrants of m's 2s x 2s diagonal blocks, X_2s = X_s - X_s M_s X_s
    ([[X11, 0], [-X22 m21 X11, X22]] in every 2s block). log2(C) levels of two products each, every
    factor an inverse of a principal block (bounded where I + m is well conditioned); no powers of m,
    whose entries grow binomially."""
    C = m.shape[0]
    if C & (C - 1):
        raise ValueError(f"unit_lower_inverse: C = {C} must be a power of two")
    rows, cols = iotas(C)
    x = (rows == cols).astype(f32)
    s = 1
    while s < C:
        # Same 2s block (equal bits above s), row in its lower half, column in its upper half (bit
        # operations: integer division lowers through a sign op that needs to know the TPU).
        same_block = (rows & -2 * s) == (cols & -2 * s)
        quadrant = same_block & ((rows & s) != 0) & ((cols & s) == 0)
        x = x - mm(x, mm(jnp.where(quadrant, m, 0.0), x, dtype=f32), dtype=f32)
        s *= 2
    return x


def right_hand_side(q, ks, vws, beta0, k0s, d, dot):
    """The chunk's raw products and E's right-hand side, as the forward and the backward kernel both
    form them: (q k_l^T L x [C, C], k0 k_l^T L x [C, C], rhs [C, V] = diag(beta0) (start_m1 . k0 S
    + sum_l (k0 k_l^T . m1_0) vw_l)); k0s = k0 S, d = `decays`, dot the kernels' product."""
    qk_raw = [dot(q, kl, trans_b=True) for kl in ks]  # l = 0 also gives QK0; k0 k0^T gives m
    kk_raw = [dot(ks[0], kl, trans_b=True) for kl in ks]
    rhs = d["start_m1"] * k0s
    for kk, vw in zip(kk_raw, vws):
        rhs = rhs + dot(kk * d["m1_0"], vw)
    return qk_raw, kk_raw, beta0 * rhs


def heads_first(t):
    """[B, Tp, H, ...] -> [B*H, Tp, ...]."""
    t = jnp.moveaxis(t, 2, 1)
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def grid_operands(x: Prepared):
    """The kernels' head-major operands: q [BH, Tp, K], k [BH, L, Tp, K], v [BH, L, Tp, V],
    beta [BH, Tp, L], g, r, rm1 [BH, Tp, 1] float32 (r, rm1 reset counts)."""
    B, Tp, H, _ = x.q.shape
    per_head = lambda t: jnp.broadcast_to(t[:, None, :, None].astype(f32), (B, H, Tp, 1)).reshape(B * H, Tp, 1)
    return dict(q=heads_first(x.q), k=jnp.moveaxis(heads_first(x.k), 2, 1), v=jnp.moveaxis(heads_first(x.v), 2, 1),
                beta=heads_first(x.beta), g=heads_first(x.g[..., None]), r=per_head(x.r), rm1=per_head(x.rm1))


def heads_last(t, B, H):
    """[B*H, Tp, ...] -> [B, Tp, H, ...]."""
    return jnp.moveaxis(t.reshape(B, H, *t.shape[1:]), 1, 2)


class Specs:
    """Block specs of a (B*H, N) grid whose step n visits chunk `chunk(n)` (n, or N - 1 - n for a
    reverse walk): per-token blocks [C, width], per-write blocks [L, C, width], per-head [K, V] ones
    and per-chunk [K, V] and [C, C] ones."""

    def __init__(self, C, L, K, V, chunk):
        self.C, self.L, self.K, self.V, self._chunk = C, L, K, V, chunk

    def tok(self, width):
        return pl.BlockSpec((None, self.C, width), lambda i, n: (i, self._chunk(n), 0))

    def writes(self, width):
        return pl.BlockSpec((None, self.L, self.C, width), lambda i, n: (i, 0, self._chunk(n), 0))

    def state(self):
        return pl.BlockSpec((None, self.K, self.V), lambda i, n: (i, 0, 0))

    def chunk_state(self):
        return pl.BlockSpec((None, None, self.K, self.V), lambda i, n: (i, self._chunk(n), 0, 0))

    def chunk_square(self):
        return pl.BlockSpec((None, None, self.C, self.C), lambda i, n: (i, self._chunk(n), 0, 0))
