"""Chunkwise backward for TPU: one Pallas Mosaic TPU kernel that walks the chunks in reverse.

Grid (B*H "parallel", N "arbitrary"), step n visiting chunk N - 1 - n. The cotangent of the chunk's
end state, dS' [K, V] float32, lives in a VMEM scratch buffer between steps (dfinal at the first).
One step recomputes the chunk's quantities (decays, E) from its inputs and the start state S and
inverse (I + m)^{-1} that the forward saved, writes the chunk's input cotangents and passes the
start state's cotangent to the step before it. The three stages of the GPU backward (pull-back,
reverse state pass, per-chunk gradients; `pallas_kernels/backward.py`) are thus one kernel, and
nothing per chunk but the forward's saved tiles travels through HBM. On a TPU core the grid runs
in order anyway, so the walk costs no parallelism the chunk-parallel form would have had; megacore
splits the heads.

The math is `grads.py`'s (notation there), on the whole value width, with per-token vectors as
[C, 1] columns (`tpu/common.py`), plus the start state's cotangent

    dS = (start q)^T dO + (beta0 start_m1 k0)^T dR + all dS',

dR being the cotangent of E's right-hand side (whose only state term is beta0 start_m1 k0 S).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import Prepared, matmul_dtype, mm
from pallas_kernels.tpu.common import (Specs, decays, grid_operands, heads_first, heads_last, iotas,
                                       right_hand_side, to_col, to_row, unit_lower_inverse)

f32 = jnp.float32


def _rowsum(x):
    return jnp.sum(x, axis=1, keepdims=True)


def _kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, r_ref, rm1_ref, s_ref, do_ref, dfinal_ref, *refs, n_writes, scale,
            mm_dtype, saved_inverse):
    ainv_ref, dq_ref, dk_ref, dv_ref, dbeta_ref, dg_ref, ds0_ref, x_scr = refs if saved_inverse else (None, *refs)
    n = pl.program_id(1)

    @pl.when(n == 0)
    def _():
        x_scr[...] = dfinal_ref[...]

    L = n_writes
    dot = functools.partial(mm, dtype=mm_dtype)
    C = q_ref.shape[0]
    rows, cols = iotas(C)
    colsum = lambda w: to_col(jnp.sum(w, axis=0, keepdims=True), rows, cols)
    s, x = s_ref[...], x_scr[...]  # start state, end-state cotangent [K, V]
    d = decays(g_ref[...], r_ref[...], rm1_ref[...])
    q = q_ref[...]
    ks = [k_ref[l] for l in range(L)]
    k0 = ks[0]
    betas = [beta_ref[:, l:l + 1].astype(f32) for l in range(L)]  # [C, 1]
    beta0 = betas[0]
    vls = [v_ref[l].astype(f32) for l in range(L)]
    vws = [b * v for b, v in zip(betas, vls)]

    # ---- the chunk's forward quantities
    k0s = dot(k0, s)
    qk_raw, kk_raw, rhs = right_hand_side(q, ks, vws, beta0, k0s, d, dot)
    kk_m = kk_raw[0] * d["m1m1"]
    xinv = ainv_ref[...] if saved_inverse else unit_lower_inverse(beta0 * kk_m)
    qk0 = qk_raw[0] * d["t_m1"]
    qks = [qk * d["t_0"] for qk in qk_raw]
    bs = [kk * d["m1_0"] for kk in kk_raw]
    e = dot(xinv, rhs)

    # ---- value-side cotangents
    dout = scale * do_ref[...].astype(f32)
    kxs = [dot(kl, x) for kl in ks]  # k_l dS'
    de = -dot(qk0, dout, trans_a=True) - d["end_m1"] * kxs[0]
    dr = dot(xinv, de, trans_a=True)
    b0dr = beta0 * dr
    dbetas, rend = [], 0.0
    for l in range(L):
        dvw = dot(bs[l], b0dr, trans_a=True) + dot(qks[l], dout, trans_a=True) + d["end"] * kxs[l]
        dv_ref[l] = (betas[l] * dvw).astype(dv_ref.dtype)
        dbetas.append(_rowsum(dvw * vls[l]))
        rend = rend + _rowsum(vws[l] * kxs[l])
    rs, re = _rowsum(dr * k0s), _rowsum(e * kxs[0])

    # ---- the start state's cotangent, for the chunk before
    ds = (dot(d["start"] * q.astype(f32), dout, trans_a=True)
          + dot(beta0 * d["start_m1"] * k0.astype(f32), dr, trans_a=True) + d["all"] * x)
    x_scr[...] = ds

    # ---- [C, C] cotangents -> [C, K] ones, and the decay cotangents
    dm = -dot(dr, e, trans_b=True)
    dbeta0 = _rowsum(dm * kk_m) + d["start_m1"] * rs
    dkk = beta0 * dm * d["m1m1"]
    w_m1m1 = beta0 * dm * kk_m
    dq_state = dot(dout, s, trans_b=True)
    dqk0 = -dot(dout, e, trans_b=True)
    w_tm1 = dqk0 * qk0
    dqk0 = dqk0 * d["t_m1"]
    dq = d["start"] * dq_state + dot(dqk0, k0)
    dk0 = dot(dkk, k0) + dot(dkk, k0, trans_a=True) + dot(dqk0, q, trans_a=True)
    dk0 = dk0 + dot(beta0 * d["start_m1"] * dr, s, trans_b=True) - dot(d["end_m1"] * e, x, trans_b=True)
    w_t0 = jnp.zeros_like(dm)
    w_m10 = jnp.zeros_like(dm)
    dks = []
    for l, kl in enumerate(ks):
        dqks = dot(dout, vws[l], trans_b=True)
        drvs = dot(dr, vws[l], trans_b=True)
        w_t0 = w_t0 + dqks * qks[l]
        dqkl = dqks * d["t_0"]
        dq = dq + dot(dqkl, kl)
        dbeta0 = dbeta0 + _rowsum(drvs * bs[l])
        dbl = beta0 * drvs  # cotangent of B_l
        w_m10 = w_m10 + dbl * bs[l]
        da = dbl * d["m1_0"]
        dk0 = dk0 + dot(da, kl)
        dks.append(dot(dqkl, q, trans_a=True) + dot(da, k0, trans_a=True)
                   + dot(d["end"] * vws[l], x, trans_b=True))
    dks[0] = dks[0] + dk0
    dbetas[0] = dbetas[0] + dbeta0
    dq_ref[...] = dq.astype(dq_ref.dtype)
    for l in range(L):
        dk_ref[l] = dks[l].astype(dk_ref.dtype)
    lane = jax.lax.broadcasted_iota(jnp.int32, (C, L), 1)  # one store of [C, L], not L column stores
    dbeta_ref[...] = sum(jnp.where(lane == l, dbetas[l], 0.0) for l in range(L)).astype(dbeta_ref.dtype)

    # A pair factor exp(ga_i - gb_j) gives +rowsum to ga and -colsum to gb; G = cumsum(g), Gm1 = G - g,
    # GC = sum(g): dg = reverse cumsum(dG + dGm1) - dGm1 + dGC.
    dG = (_rowsum(w_tm1 + w_t0) - colsum(w_t0 + w_m10) + _rowsum(dq_state * q.astype(f32)) * d["start"]
          - rend * d["end"])
    dGm1 = (_rowsum(w_m1m1 + w_m10) - colsum(w_m1m1 + w_tm1) + beta0 * rs * d["start_m1"]
            + re * d["end_m1"])
    dGC = (d["all"] * jnp.sum(s * x, keepdims=True)
           + jnp.sum(rend * d["end"] - re * d["end_m1"], axis=0, keepdims=True))  # [1, 1]
    total = to_row(dG + dGm1, rows, cols)
    reverse_cumsum = jnp.sum(jnp.where(cols >= rows, total, 0.0), axis=1, keepdims=True)
    dg_ref[...] = (reverse_cumsum - dGm1 + dGC).astype(dg_ref.dtype)

    @pl.when(n == pl.num_programs(1) - 1)
    def _():
        ds0_ref[...] = ds


def backward(x: Prepared, starts, do, dfinal, *, scale, chunk_size, ainv=None, interpret=False):
    """Gradients (dq, dk, dv, dbeta, dg, ds0) float32 of the padded inputs, `backward.backward`'s
    contract: starts [B, H, N, K, V] the chunks' start states from the forward (float32), do
    [B, Tp, H, V] the output cotangent, dfinal [B, H, K, V] the final state's; ainv [B, H, N, C, C] the
    forward's (I + m)^{-1} (`tpu/forward.py`; used in the matmul dtype), or None: solved again."""
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    C, N, BH = chunk_size, Tp // chunk_size, B * H
    mm_dtype = matmul_dtype(x.q.dtype)
    if ainv is not None and ainv.shape != (B, H, N, C, C):
        raise ValueError(f"tpu backward: `ainv` must be None or [B, H, N, C, C] = {(B, H, N, C, C)}, got {ainv.shape}")
    sp = Specs(C, L, K, V, chunk=lambda n: N - 1 - n)
    tok = lambda width: jax.ShapeDtypeStruct((BH, Tp, width), f32)
    writes = lambda width: jax.ShapeDtypeStruct((BH, L, Tp, width), f32)
    dq, dk, dv, dbeta, dg, ds0 = pl.pallas_call(
        functools.partial(_kernel, n_writes=L, scale=scale, mm_dtype=mm_dtype, saved_inverse=ainv is not None),
        grid=(BH, N),
        in_specs=[sp.tok(K), sp.writes(K), sp.writes(V), sp.tok(L), sp.tok(1), sp.tok(1), sp.tok(1),
                  sp.chunk_state(), sp.tok(V), sp.state(), *([sp.chunk_square()] if ainv is not None else [])],
        out_specs=[sp.tok(K), sp.writes(K), sp.writes(V), sp.tok(L), sp.tok(1), sp.state()],
        out_shape=(tok(K), writes(K), writes(V), tok(L), tok(1), jax.ShapeDtypeStruct((BH, K, V), f32)),
        scratch_shapes=[pltpu.VMEM((K, V), f32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="prism_bwd_tpu",
    )(*grid_operands(x).values(), starts.astype(f32).reshape(BH, N, K, V),
      heads_first(do), dfinal.astype(f32).reshape(BH, K, V),
      *([ainv.astype(mm_dtype).reshape(BH, N, C, C)] if ainv is not None else []))
    writes_last = lambda t: heads_last(jnp.moveaxis(t, 1, 2), B, H)  # [BH, L, Tp, .] -> [B, Tp, H, L, .]
    return (heads_last(dq, B, H), writes_last(dk), writes_last(dv), heads_last(dbeta, B, H),
            heads_last(dg, B, H)[..., 0], ds0.reshape(B, H, K, V))
