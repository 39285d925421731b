"""Hand-derived per-chunk gradients of the chunk map (`common.chunk_step`), plain `jnp` on values.

One chunk, one head (notation of `common.chunk_step` / `common.chunk_decays`; X = (I + m)^{-1},
m = diag(beta0) (k0 k0^T . m1m1), B_l = k0 k_l^T . m1_0, QK0 = q k0^T . t_m1, QK_l = q k_l^T . t_0):

    rhs = diag(beta0 start_m1) k0 S + diag(beta0) sum_l B_l vw_l,   E = X rhs
    o   = diag(start) q S - QK0 E + sum_l QK_l vw_l
    S'  = all S - (diag(end_m1) k0)^T E + sum_l (diag(end) k_l)^T vw_l

Given dO (= scale * do) and dS' (the end-state cotangent X_{n+1} of the reverse pass):

    dE = -QK0^T dO - diag(end_m1) k0 dS',   dR = X^T dE,   dm = -(dR E^T) (strictly lower by m1m1)
    dvw_l = B_l^T diag(beta0) dR + QK_l^T dO + diag(end) k_l dS'

Every [C, C] and [C, K] cotangent is a sum over value columns, so the work splits in two:

    `block_step`   one block of value columns [C, BV]: E, dE, dR, dv_l, and adds the block's share
                   to the accumulators (`Acc`: 2 + 2L [C, C], 1 + L [C, K], a few [C] and a scalar);
    `finish`       after all blocks: [C, C] -> [C, K] products for dq / dk, dbeta0 and the decay
                   cotangents, then dg by a reverse cumulative sum (a masked column sum; lowers to
                   Triton, which has no reverse cumsum).

`chunk_grads` runs them on the whole value width; the Triton kernel (`gpu/chunk_grads.py`) loops
`block_step` over value blocks inside one program. Every decay factor's cotangent is taken as
(cotangent . factor) (the factor's derivative in its log-decay argument is the factor itself), so
masked entries (zero factors) carry no gradient. Elementwise work is in float32 (float64 when the
start state is float64: the tests), products through `common.mm` in the matmul dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.common import ChunkDecays, chunk_decays, mm, unit_lower_inverse


class Tiles(NamedTuple):
    """The value-independent quantities of one chunk (recomputed from the inputs, never saved).

    q, k0 [C, K] and ks (L x [C, K]) in their input dtype (matmul operands); betas L x [C] and beta0
    [C] float; d the decays; xinv = (I + m)^{-1}, qk0 = QK0, qks L x QK_l, bs L x B_l, all [C, C].
    """

    q: jax.Array
    k0: jax.Array
    ks: list
    betas: list
    beta0: jax.Array
    d: ChunkDecays
    xinv: jax.Array
    qk0: jax.Array
    qks: list
    bs: list


class Acc(NamedTuple):
    """Sums over value blocks. [C, C]: dm = sum dR E^T, dqk0 = sum dO E^T, dqks[l] = sum dO vw_l^T,
    drvs[l] = sum dR vw_l^T. [C, K]: dq = sum dO S^T (not yet scaled by start), dks[l] the direct
    (state) terms of dk_l. [C]: dbetas[l] through vw_l, rs = rowsum(dR . k0 S),
    re = rowsum(E . k0 dS'), rend = sum_l rowsum(vw_l . k_l dS'). []: dall = <S, dS'>."""

    dm: jax.Array
    dqk0: jax.Array
    dqks: list
    drvs: list
    dq: jax.Array
    dks: list
    dbetas: list
    rs: jax.Array
    re: jax.Array
    rend: jax.Array
    dall: jax.Array


def _rowsum(x):
    return jnp.sum(x, axis=1)


def _colsum(x):
    return jnp.sum(x, axis=0)


def chunk_tiles(q, ks, betas, g, r, rm1, a_inv=None, *, mm_dtype, wdtype=jnp.float32,
                cumsum=jnp.cumsum, matmul=mm, with_inverse=True) -> Tiles:
    """q [C, K]; ks L x [C, K]; betas L x [C]; g [C]; r, rm1 [C] int32; a_inv [C, C] or None (then
    solved here, unless `with_inverse` is False: `finish` needs no inverse, xinv is None)."""
    dot = lambda a, b, **kw: matmul(a, b, dtype=mm_dtype, **kw)
    betas = [b.astype(wdtype) for b in betas]
    beta0, k0 = betas[0], ks[0]
    d = chunk_decays(g.astype(wdtype), r, rm1, cumsum=cumsum)
    if a_inv is None and with_inverse:
        a_inv = unit_lower_inverse(beta0[:, None] * dot(k0, k0, trans_b=True) * d.m1m1)
    return Tiles(q=q, k0=k0, ks=list(ks), betas=betas, beta0=beta0, d=d,
                 xinv=None if a_inv is None else a_inv.astype(wdtype),
                 qk0=dot(q, k0, trans_b=True) * d.t_m1,
                 qks=[dot(q, kl, trans_b=True) * d.t_0 for kl in ks],
                 bs=[dot(k0, kl, trans_b=True) * d.m1_0 for kl in ks])


def zero_acc(C, K, L, wdtype=jnp.float32) -> Acc:
    z = lambda *shape: jnp.zeros(shape, wdtype)
    return Acc(dm=z(C, C), dqk0=z(C, C), dqks=[z(C, C) for _ in range(L)],
               drvs=[z(C, C) for _ in range(L)], dq=z(C, K), dks=[z(C, K) for _ in range(L)],
               dbetas=[z(C) for _ in range(L)], rs=z(C), re=z(C), rend=z(C), dall=z())


def block_step(t: Tiles, acc: Acc, s, do, x, vls, *, scale, mm_dtype, matmul=mm):
    """One block of value columns: s, x [K, BV] start state and end-state cotangent, do [C, BV]
    (cotangent of the scaled output), vls L x [C, BV]. Returns (dvs L x [C, BV] float, new acc)."""
    dot = lambda a, b, **kw: matmul(a, b, dtype=mm_dtype, **kw)
    wdtype = t.beta0.dtype
    d, k0, beta0 = t.d, t.k0, t.beta0
    vls = [v.astype(wdtype) for v in vls]
    vws = [b[:, None] * v for b, v in zip(t.betas, vls)]
    k0s = dot(k0, s)  # k0 S [C, BV]
    rhs = (beta0 * d.start_m1)[:, None] * k0s
    for bl, vw in zip(t.bs, vws):
        rhs = rhs + beta0[:, None] * dot(bl, vw)
    e = dot(t.xinv, rhs)
    dout = scale * do.astype(wdtype)
    kxs = [dot(kl, x) for kl in t.ks]  # k_l dS' [C, BV]; kxs[0] is also the erase key's
    de = -dot(t.qk0, dout, trans_a=True) - d.end_m1[:, None] * kxs[0]
    dr = dot(t.xinv, de, trans_a=True)
    b0dr = beta0[:, None] * dr
    dvs, dbetas = [], []
    for l, (bl, qkl, vl, kx) in enumerate(zip(t.bs, t.qks, vls, kxs)):
        dvw = dot(bl, b0dr, trans_a=True) + dot(qkl, dout, trans_a=True) + d.end[:, None] * kx
        dvs.append(t.betas[l][:, None] * dvw)
        dbetas.append(acc.dbetas[l] + _rowsum(dvw * vl))
    # State terms of dk: dk0 += diag(beta0 start_m1) dR S^T - diag(end_m1) E dS'^T, dk_l += diag(end)
    # vw_l dS'^T (one product per state operand); their row sums against the keys, needed for the
    # decays, are taken on [C, BV] tiles: rowsum(dR S^T . k0) = rowsum(dR . k0 S), and so on.
    dks = list(acc.dks)
    rend = acc.rend
    for l, (kx, vw) in enumerate(zip(kxs, vws)):
        rend = rend + _rowsum(vw * kx)
        xcoef = d.end[:, None] * vw - (d.end_m1[:, None] * e if l == 0 else 0.0)
        dks[l] = dks[l] + dot(xcoef, x, trans_b=True)
    dks[0] = dks[0] + dot((beta0 * d.start_m1)[:, None] * dr, s, trans_b=True)
    acc = Acc(
        dm=acc.dm + dot(dr, e, trans_b=True),
        dqk0=acc.dqk0 + dot(dout, e, trans_b=True),
        dqks=[a + dot(dout, vw, trans_b=True) for a, vw in zip(acc.dqks, vws)],
        drvs=[a + dot(dr, vw, trans_b=True) for a, vw in zip(acc.drvs, vws)],
        dq=acc.dq + dot(dout, s, trans_b=True),
        dks=dks, dbetas=dbetas,
        rs=acc.rs + _rowsum(dr * k0s), re=acc.re + _rowsum(e * kxs[0]), rend=rend,
        dall=acc.dall + jnp.sum(s * x))
    return dvs, acc


def reverse_cumsum(x):
    """y[j] = sum_{i >= j} x[i] of x [C], as a masked column sum (lowers to Triton)."""
    C = x.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    return _colsum(jnp.where(rows >= cols, x[:, None], 0.0))


def finish(t: Tiles, acc: Acc, *, mm_dtype, matmul=mm):
    """(dq [C, K], dks L x [C, K], dbetas L x [C], dg [C]) from the accumulated sums."""
    dot = lambda a, b, **kw: matmul(a, b, dtype=mm_dtype, **kw)
    d, q, k0, beta0 = t.d, t.q, t.k0, t.beta0
    # Through m = diag(beta0) (k0 k0^T . m1m1) (m1m1 is zero on and above the diagonal).
    kk_m = dot(k0, k0, trans_b=True) * d.m1m1
    dm = -acc.dm
    dbeta0 = _rowsum(dm * kk_m) + d.start_m1 * acc.rs
    dkk = beta0[:, None] * dm * d.m1m1
    w_m1m1 = beta0[:, None] * dm * kk_m
    dk0 = dot(dkk, k0) + dot(dkk, k0, trans_a=True)
    # Through QK0 = q k0^T . t_m1 (o's erase term).
    dqk0 = -acc.dqk0
    w_tm1 = dqk0 * t.qk0
    dqk0 = dqk0 * d.t_m1
    dq = d.start[:, None] * acc.dq + dot(dqk0, k0)
    dk0 = dk0 + dot(dqk0, q, trans_a=True)
    dks = list(acc.dks)
    w_t0 = jnp.zeros_like(dm)
    w_m10 = jnp.zeros_like(dm)
    for l, kl in enumerate(t.ks):
        w_t0 = w_t0 + acc.dqks[l] * t.qks[l]
        dqkl = acc.dqks[l] * d.t_0
        dq = dq + dot(dqkl, kl)
        dkl = dot(dqkl, q, trans_a=True)
        dbeta0 = dbeta0 + _rowsum(acc.drvs[l] * t.bs[l])
        dbl = beta0[:, None] * acc.drvs[l]  # cotangent of B_l
        w_m10 = w_m10 + dbl * t.bs[l]
        da = dbl * d.m1_0
        dk0 = dk0 + dot(da, kl)
        dks[l] = dks[l] + dkl + dot(da, k0, trans_a=True)
    dks[0] = dks[0] + dk0
    dbetas = list(acc.dbetas)
    dbetas[0] = dbetas[0] + dbeta0
    # Decay cotangents: a pair factor exp(ga_i - gb_j) gives +rowsum to ga, -colsum to gb.
    dG = _rowsum(w_tm1) + _rowsum(w_t0) - _colsum(w_t0) - _colsum(w_m10)
    dG = dG + _rowsum(acc.dq * q.astype(dm.dtype)) * d.start - acc.rend * d.end
    dGm1 = (_rowsum(w_m1m1) - _colsum(w_m1m1) + _rowsum(w_m10) - _colsum(w_tm1)
            + beta0 * acc.rs * d.start_m1 + acc.re * d.end_m1)
    dGC = acc.dall * d.all + jnp.sum(acc.rend * d.end) - jnp.sum(acc.re * d.end_m1)
    # G = cumsum(g), Gm1 = G - g, GC = sum(g).
    dg = reverse_cumsum(dG + dGm1) - dGm1 + dGC
    return dq, dks, dbetas, dg


def chunk_grads(q, ks, vls, betas, g, r, rm1, s, do, x, a_inv=None, *, scale, mm_dtype, cumsum=jnp.cumsum,
                matmul=mm):
    """Cotangents of one chunk's inputs, hand-derived (no `jax.vjp`); conventions of
    `gpu/chunk_bwd.py::chunk_vjp`.

    q [C, K]; ks: L keys [C, K]; vls: L values [C, BV]; betas: L gates [C]; g [C]; r, rm1 [C] int32;
    s [K, BV] start state; do [C, BV] cotangent of the scaled output; x [K, BV] end-state cotangent;
    a_inv [C, C] the forward's saved (I + m)^{-1} or None (solved here); `matmul` the 2-D product
    (`common.mm`: float32 accumulation; the float64 tests pass a float64 one).
    Returns (dq [C, K], dks L x [C, K], dvs L x [C, BV], dbetas L x [C], dg [C]) in s's float dtype
    (float32, or float64 for float64 inputs).
    """
    wdtype = jnp.result_type(s.dtype, jnp.float32)
    t = chunk_tiles(q, ks, betas, g, r, rm1, a_inv, mm_dtype=mm_dtype, wdtype=wdtype, cumsum=cumsum,
                    matmul=matmul)
    acc = zero_acc(q.shape[0], q.shape[1], len(ks), wdtype)
    dvs, acc = block_step(t, acc, s.astype(wdtype), do, x.astype(wdtype), vls, scale=scale,
                          mm_dtype=mm_dtype, matmul=matmul)
    dq, dks, dbetas, dg = finish(t, acc, mm_dtype=mm_dtype, matmul=matmul)
    return dq, dks, dvs, dbetas, dg
