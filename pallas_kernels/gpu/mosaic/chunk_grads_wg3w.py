"""The chunk backward at L > 1 as three specialised warpgroups (`chunk_grads_backward(warpgroups=3)`, L >= 2).

The dataflow of `chunk_grads_wg3` (L = 1) for several writes. There every [C, C] cotangent that
multiplies the one key merges into one tile; here the write keys k_l (l >= 1) differ from the erase
key k0 = k_0, so each write keeps its own tiles, and the SMEM of all L writes over V = 128 value columns
does not fit: one CTA per (chunk, head, batch, block of BV value columns), BV = 64 or 32, its dq / dk
shares summed over the value blocks as the other multi-block kernels sum them (`chunk_grads._sum_mode`).

Per CTA (notation of `grads`; W0 = dQK0 . t_m1 + dQK_0 . t_0 multiplies k0 on the o side, W_l = dQK_l
. t_0 multiplies k_l; D0 = dkk + dA_0 multiplies k0 on both sides, dA_l the cotangent of k0 k_l^T . m1_0):

    WG0 (forward)   q k_l^T -> -scale QK0, scale QK_l (qk_ready); [wait B, vw] k0 S, rhs = beta0 start_m1
                    k0 S + sum_l diag(beta0) B_l vw_l, E = X rhs and k0 dS' (e_ready; re); dO E^T, dO vw_0^T
                    -> W0 over X once dR is formed (rs against k0 S); dO vw_l^T -> W_l over QK_l once WG1
                    has read them (w_ready); its decay cotangents; dq = start scale dO S^T + W0 k0 + sum W_l k_l.
    WG1 (backward)  k0 k_l^T -> diag(beta0) B_l, vw_l = beta_l v_l (b_ready); [wait QK] k0 dS', dE = -QK0^T
                    dO - end_m1 k0 dS', dR = X^T dE (dr_ready); per write dvw_l = B_l^T beta0 dR + QK_l^T dO
                    + end k_l dS', dv_l, dbeta_l and rend (dvw_done); [wait E] dR E^T, dR vw_0^T -> D0 over QK0,
                    per write l >= 1 dR vw_l^T (and k0 k_l^T again) -> dA_l over B_l (d_ready); its decay
                    cotangents.
    WG2 (keys)      the state terms of dk_0 as they become ready (vw_0 dS'^T, E dS'^T, dR S^T: held in
                    registers), then [wait W, D] dk_0 = ... + W0^T q + D0 k0 + D0^T k0 + sum_l dA_l k_l and
                    dk_l = end vw_l dS'^T + W_l^T q + dA_l^T k0, each [C, 64] slice one chain.

The row sums that give the decay vectors are taken on [C, BV] tiles where the operands meet (re =
rowsum(E . k0 dS') and rs = rowsum(dR . k0 S) by WG0, rend = sum_l rowsum(vw_l . k_l dS') by WG1), so
WG2 holds no [C, K] product beyond dk_0's. The decay-matrix cotangents of QK_l (l >= 1) are taken
against the 16-bit QK_l tiles (dQK_l^raw . QK_l), those of B_l against k0 k_l^T formed again.

SMEM (16-bit): q, k_l (1 + L) C K; v_l, vw_l 2 L C BV; dO, E, dR 3 C BV; S, dS' 2 K BV; X, QK0, QK_l,
B_l (2 + 2L) C^2; two [C, 64] output slots (WG0's dq, WG2's dk; float32 where shares are summed), the
vectors and the reduction scratch (`smem_bytes`, float32 slots). K = 128: L = 2 at BV = 64 227.5 KiB (just
over the 227 KiB limit), at BV = 32 183.5; L = 3 at BV = 32 224.5; K = 64, L = 4 at BV = 32 217.5. The
default BV is the widest that fits (`block_v_for`): 32 at K = 128 for every L >= 2.

Measured (H100, B * T = 32K, H = 16, K = V = 128, whole op fwd+bwd, session 22; docs/benchmarks.md): slower
than the two-warpgroup work split it would replace, L = 2 11.30 against 7.83 ms, L = 3 17.35 against
13.56 (16-bit dq / dk sums: 10.24 and 15.48), so it is not the default; `warpgroups=3` asks for it.
"""

from __future__ import annotations

import functools
import operator

import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.common import Prepared
from pallas_kernels.gpu.mosaic import common as mc
from pallas_kernels.gpu.mosaic.chunk_grads import (_ChunkVectors, _N_OUT_VECS, _N_ROW_VECS, _Phases, _check, _coords,
                                                   _issue, _launch, _store_share, _sum_mode, _token_grads,
                                                   _token_operands, chunk_inverses, SMEM_LIMIT)
from pallas_kernels.gpu.mosaic.chunk_grads_wg3 import (LAUNCH_REGISTERS, SIZES, check_registers, colsum, put, ready,
                                                       set_registers, wait)

f32 = jnp.float32
C = mc.CHUNK
_PARTS = 3  # per-token output parts per value block: one per warpgroup
BLOCKS_V = (64, 32)  # value columns per CTA, widest first
MAX_WRITES = 4


def smem_bytes(K, L, BV, dtype, out_dtype=f32, reduction_scratch=2048):
    """SMEM bytes of the kernel (for the check before compiling)."""
    it = jnp.dtype(dtype).itemsize
    tiles = ((1 + L) * C * K + 2 * L * C * BV + 3 * C * BV + 2 * K * BV + (2 + 2 * L) * C * C) * it
    outs = 2 * C * 64 * jnp.dtype(out_dtype).itemsize
    vecs = 4 * C * ((_N_ROW_VECS + L) + 2 + 4 + 4 + _PARTS * (L + _N_OUT_VECS))
    return tiles + outs + vecs + reduction_scratch + 1024  # + barriers and alignment


def block_v_for(K, L, V, dtype, reduction_scratch=2048):
    """The widest value block in BLOCKS_V (dividing V) whose SMEM fits, or None."""
    for bv in BLOCKS_V:
        if V % bv == 0 and smem_bytes(K, L, bv, dtype, f32, reduction_scratch) <= SMEM_LIMIT:
            return bv
    return None


def supported(K: int, L: int, V: int, dtype=jnp.bfloat16, reduction_scratch=2048) -> bool:
    """Whether this kernel takes the shape: 2 <= L <= MAX_WRITES, K and V in {64, 128}, 16-bit inputs,
    some value block within the SMEM limit."""
    return (2 <= L <= MAX_WRITES and K in SIZES and V in SIZES and jnp.dtype(dtype) in mc.DTYPES
            and block_v_for(K, L, V, dtype, reduction_scratch) is not None)


def _body(q_ref, k_ref, v_ref, do_ref, s_ref, x_ref, ainv_ref, rvec_ref, cvec_ref, ri_ref,
          dq_ref, dk_ref, dv_ref, dvec_ref,
          q_s, k_s, v_s, vw_s, do_s, s_s, x_s, xinv_s, qk0_s, qk_s, b_s, e_s, dr_s, out_s,
          rv_s, cv_s, ri_s, cs_s, ovec_s,
          in_a, in_b, in_c, qk_ready, b_ready, e_ready, dr_ready, dvw_done, w_ready, d_ready, cs_turn, done,
          *, L, nvb, scale, registers, order, add):
    """SMEM reuse: xinv_s holds X, then W0 (after dr_ready: X's last reader is WG1's dR); qk_s[l] QK_l,
    then W_l for l >= 1 (after dvw_done); qk0_s -scale QK0, then D0; b_s[l] diag(beta0) B_l, then dA_l
    for l >= 1 (both written by WG1 after E is ready, when every reader is done); v_s[l] v_l, then dv_l."""
    n, h, b, vb = _coords(nvb, order)
    wg = lax.axis_index("wg")
    K, BV = q_s.shape[-1], v_s.shape[-1]
    rows, cols = pl.ds(n * C, C), pl.ds(vb * BV, BV)
    kblocks = [pl.ds(i * 64, 64) for i in range(K // 64)]
    sk = lambda ref, kc: ref if K == 64 else ref.at[:, kc]  # 64 columns of a [C, K] operand
    st = lambda ref, kc: (ref if K == 64 else ref.at[kc]).T  # [BV, 64]: 64 rows of a [K, BV] state, transposed
    sq, sv, so = (C, C), (C, BV), (C, 64)
    vx = _ChunkVectors(rv_s, cv_s, ri_s, hold=False)
    R = lambda vec, shape=sv: mc.rows_of(vec, shape)
    load = lambda ref: plgpu.load(ref, layout=mc.WGMMA).astype(f32)
    zero = lambda: 0.0 * vx.start  # a ROWS-layout zero
    total = lambda xs: functools.reduce(operator.add, xs)
    part = _PARTS * vb

    def out_vectors(w, vecs):
        """The warpgroup's per-token partials: dbeta_0 .. dbeta_{L-1}, dG, dGm1, the dG_C share."""
        for i, vec in enumerate(vecs):
            ovec_s[w, i] = vec
        plgpu.commit_smem()
        for i in range(len(vecs)):
            plgpu.copy_smem_to_gmem(ovec_s.at[w, i], dvec_ref.at[part + w, b, h, i, rows])

    def store_slice(slot, value, ref, *idx):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the slot's previous store has left it
        out_s[slot] = value.astype(out_s.dtype)
        plgpu.commit_smem()
        _store_share(out_s.at[slot], ref, add, vb, *idx)

    @pl.when(wg == 0)
    def _forward():
        set_registers(registers, 0)
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_s, in_a)
        for l in range(L):
            plgpu.copy_gmem_to_smem(k_ref.at[b, rows, h, l], k_s.at[l], in_a)
            plgpu.copy_gmem_to_smem(v_ref.at[b, rows, h, l, cols], v_s.at[l], in_a)
        plgpu.copy_gmem_to_smem(ainv_ref.at[b, h, n], xinv_s, in_a)
        plgpu.copy_gmem_to_smem(rvec_ref.at[b, h, :, rows], rv_s, in_a)
        plgpu.copy_gmem_to_smem(cvec_ref.at[b, h, :, rows], cv_s, in_a)
        for i in (0, 2):  # r, rm1 as rows; r, rm1 as columns
            plgpu.copy_gmem_to_smem(ri_ref.at[b, :, rows], ri_s.at[pl.ds(i, 2)], in_a)
        plgpu.copy_gmem_to_smem(s_ref.at[b, h, n, :, cols], s_s, in_b)
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h, cols], do_s, in_b)
        plgpu.copy_gmem_to_smem(x_ref.at[b, h, n, :, cols], x_s, in_c)
        phase = _Phases()
        phase("w0.wait_loads")
        wait(in_a)
        phase("w0.qk")
        raws = _issue(*[(sq, [(q_s, k_s.at[l].T)]) for l in range(L)])
        t_m1, t_0 = vx.t_pair()
        put(qk0_s, -scale * raws[0] * t_m1)
        for l in range(L):
            put(qk_s.at[l], scale * raws[l] * t_0)
        raw0 = raws[0]
        ready(qk_ready)
        phase("w0.wait_b")
        wait(in_b, in_c, b_ready)
        phase("w0.rhs_e")
        ks, bvw = _issue((sv, [(k_s.at[0], s_s)]), (sv, [(b_s.at[l], vw_s.at[l]) for l in range(L)]))
        put(e_s, R(vx.beta0 * vx.start_m1) * ks + bvw)  # rhs
        plgpu.commit_smem()
        e, kx0 = _issue((sv, [(xinv_s, e_s)]), (sv, [(k_s.at[0], x_s)]))
        put(e_s, e)
        ready(e_ready)
        re = jnp.sum(e * kx0, axis=1)
        phase("w0.dqk")
        dqk0_raw, dqk_raw = _issue((sq, [(do_s, e_s.T)]), (sq, [(do_s, vw_s.at[0].T)]))
        t_m1, t_0 = vx.t_pair()
        dqk0 = -scale * dqk0_raw * t_m1
        dqk = scale * dqk_raw * t_0
        w_tm1, w_t0 = dqk0 * raw0, dqk * raw0
        phase("w0.wait_dr")
        wait(dr_ready)  # X's last reader (WG1's dR) is done
        put(xinv_s, dqk0 + dqk)  # W0
        rs = jnp.sum(load(dr_s) * ks, axis=1)
        if L > 1:
            phase("w0.dqk_l")
            wait(dvw_done)  # WG1 has read QK_l for the last time
            for l in range(1, L):
                (dqk_raw,) = _issue((sq, [(do_s, vw_s.at[l].T)]))
                w_t0 = w_t0 + dqk_raw * load(qk_s.at[l])  # dQK_l . t_0 . raw QK_l = dQK_l^raw . QK_l
                put(qk_s.at[l], scale * dqk_raw * vx.t_0())  # W_l
        ready(w_ready)
        phase("w0.sums")
        dG = jnp.sum(w_tm1 + w_t0, axis=1) - colsum(cs_s, 0, w_t0)
        dGm1 = -colsum(cs_s, 1, w_tm1)
        plgpu.barrier_arrive(cs_turn)  # the reduction scratch is WG1's now
        phase("w0.dq")
        dG_state = []
        for kc in kblocks:
            ds, wk = _issue((so, [(do_s, st(s_s, kc))]),
                            (so, [(xinv_s, sk(k_s.at[0], kc))] + [(qk_s.at[l], sk(k_s.at[l], kc)) for l in range(1, L)]))
            dG_state.append(jnp.sum(ds * load(sk(q_s, kc)), axis=1))
            store_slice(0, R(vx.start * scale, so) * ds + wk, dq_ref, b, rows, h, kc)
        phase("w0.out")
        out_vectors(0, [vx.start_m1 * rs] + [zero() for _ in range(L - 1)]
                    + [dG + scale * vx.start * total(dG_state), dGm1 + vx.beta0 * rs * vx.start_m1 + re * vx.end_m1,
                       -re * vx.end_m1])
        plgpu.wait_smem_to_gmem(0)
        phase()

    @pl.when(wg == 1)
    def _backward():
        set_registers(registers, 1)
        phase = _Phases()
        phase("w1.wait_loads")
        wait(in_a)
        phase("w1.kk")
        raws = _issue(*[(sq, [(k_s.at[0], k_s.at[l].T)]) for l in range(L)])
        m1_0 = vx.m1_0()
        for l in range(L):
            put(b_s.at[l], R(vx.beta0, sq) * raws[l] * m1_0)  # diag(beta0) B_l
        kk0 = raws[0]
        for l in range(L):
            put(vw_s.at[l], R(vx.beta(l)) * load(v_s.at[l]))
        ready(b_ready)
        phase("w1.wait_qk")
        wait(in_b, in_c, qk_ready)
        phase("w1.de_dr")
        kx0, qdo = _issue((sv, [(k_s.at[0], x_s)]), (sv, [(qk0_s.T, do_s)]))
        put(dr_s, qdo - R(vx.end_m1) * kx0)  # dE
        plgpu.commit_smem()
        (dr,) = _issue((sv, [(xinv_s.T, dr_s)]))
        put(dr_s, dr)
        ready(dr_ready)
        phase("w1.dvw")
        dbeta, rend = [], []
        for l in range(L):
            sums = [(sv, [(b_s.at[l].T, dr_s), (qk_s.at[l].T, do_s)])]
            if l:
                sums.append((sv, [(k_s.at[l], x_s)]))
            dvw, *kx = _issue(*sums)
            kx = kx[0] if l else kx0
            dvw = dvw + R(vx.end) * kx
            dbeta.append(jnp.sum(dvw * load(v_s.at[l]), axis=1))
            rend.append(jnp.sum(load(vw_s.at[l]) * kx, axis=1))
            put(v_s.at[l], R(vx.beta(l)) * dvw)  # dv_l
        plgpu.commit_smem()
        for l in range(L):
            plgpu.copy_smem_to_gmem(v_s.at[l], dv_ref.at[b, rows, h, l, cols])
        plgpu.barrier_arrive(dvw_done)
        rend = total(rend)
        phase("w1.wait_e")
        wait(e_ready)
        phase("w1.dm")
        dm_raw, drv = _issue((sq, [(dr_s, e_s.T)]), (sq, [(dr_s, vw_s.at[0].T)]))
        d_m1m1, m1_0 = vx.m_pair()
        dm = -dm_raw
        dkk = R(vx.beta0, sq) * dm * d_m1m1
        drv_m = drv * m1_0
        da = R(vx.beta0, sq) * drv_m
        put(qk0_s, dkk + da)  # D0 (both strictly lower)
        w_m1m1, w_m10 = dkk * kk0, da * kk0
        dbeta0 = jnp.sum((dm * d_m1m1 + drv_m) * kk0, axis=1)
        for l in range(1, L):
            drv, kk = _issue((sq, [(dr_s, vw_s.at[l].T)]), (sq, [(k_s.at[0], k_s.at[l].T)]))
            drv_m = drv * vx.m1_0()
            da = R(vx.beta0, sq) * drv_m
            put(b_s.at[l], da)  # dA_l
            w_m10 = w_m10 + da * kk
            dbeta0 = dbeta0 + jnp.sum(drv_m * kk, axis=1)
        ready(d_ready)
        phase("w1.wait_cs")
        wait(cs_turn)
        phase("w1.sums")
        dG = -colsum(cs_s, 2, w_m10) - rend * vx.end
        dGm1 = jnp.sum(w_m1m1 + w_m10, axis=1) - colsum(cs_s, 3, w_m1m1)
        out_vectors(1, [dbeta[0] + dbeta0] + dbeta[1:] + [dG, dGm1, rend * vx.end])
        plgpu.wait_smem_to_gmem(0)
        phase()

    @pl.when(wg == 2)
    def _keys():
        set_registers(registers, 2)
        phase = _Phases()
        phase("w2.wait_loads")
        wait(in_a, in_b, in_c)
        phase("w2.sx")
        sx = total([jnp.sum(load(s_s.at[kc]) * load(x_s.at[kc]), axis=1) for kc in kblocks])  # <S, dS'> by rows
        phase("w2.wait_vw")
        wait(b_ready)
        phase("w2.vwx")
        dk = [R(vx.end, so) * a for a in _issue(*[(so, [(vw_s.at[0], st(x_s, kc))]) for kc in kblocks])]
        phase("w2.wait_e")
        wait(e_ready)
        phase("w2.ex")
        acc = _issue(*[(so, [(e_s, st(x_s, kc))]) for kc in kblocks])
        dk = [d - R(vx.end_m1, so) * a for d, a in zip(dk, acc)]
        phase("w2.wait_dr")
        wait(dr_ready)
        phase("w2.drs")
        acc = _issue(*[(so, [(dr_s, st(s_s, kc))]) for kc in kblocks])
        dk = [d + R(vx.beta0 * vx.start_m1, so) * a for d, a in zip(dk, acc)]
        phase("w2.wait_wd")
        wait(w_ready, d_ready)
        phase("w2.dk0")
        for kc, d in zip(kblocks, dk):
            (a,) = _issue((so, [(xinv_s.T, sk(q_s, kc)), (qk0_s, sk(k_s.at[0], kc)), (qk0_s.T, sk(k_s.at[0], kc))]
                           + [(b_s.at[l], sk(k_s.at[l], kc)) for l in range(1, L)]))
            store_slice(1, d + a, dk_ref, b, rows, h, 0, kc)
        phase("w2.dkl")
        for l in range(1, L):
            for kc in kblocks:
                vwx, a = _issue((so, [(vw_s.at[l], st(x_s, kc))]),
                                (so, [(qk_s.at[l].T, sk(q_s, kc)), (b_s.at[l].T, sk(k_s.at[0], kc))]))
                store_slice(1, R(vx.end, so) * vwx + a, dk_ref, b, rows, h, l, kc)
        out_vectors(2, [zero() for _ in range(L)] + [zero(), zero(), sx * vx.all])
        plgpu.wait_smem_to_gmem(0)
        phase()

    # A warpgroup must not exit while another still issues wgmma.
    plgpu.barrier_arrive(done)
    plgpu.barrier_wait(done)


def chunk_grads_wg3w(x: Prepared, tv: mc.TokenVectors, starts, do, cot_end, *, scale, ainv, block_v=None,
                     approx_math=True, reduction_scratch=2048, registers=None, order="chunks", dqk_sum=None,
                     profile=None, interpret=False):
    """`chunk_grads_backward(warpgroups=3)` at L >= 2 (module docstring). block_v: value columns per CTA
    (BLOCKS_V) or None: the widest that fits (`block_v_for`). registers: (WG0, WG1, WG2) setmaxnreg
    budgets as in `chunk_grads_wg3`, None: the launch share. dqk_sum, order: as `chunk_grads_backward`.
    Shapes and returns as `chunk_grads_backward`."""
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    dt = x.q.dtype
    if not supported(K, L, V, dt, reduction_scratch):
        raise ValueError(f"chunk_grads_backward: `warpgroups` = 3 at L >= 2 takes 2 <= L <= {MAX_WRITES} with K, V in "
                         f"{SIZES} and 16-bit inputs within {SMEM_LIMIT // 1024} KiB of SMEM; got L = {L}, K = {K}, "
                         f"V = {V}, {dt}")
    if block_v is None:
        block_v = block_v_for(K, L, V, dt, reduction_scratch)
    nvb = V // block_v if block_v in BLOCKS_V and V % block_v == 0 else 0
    add, out_dt = _sum_mode(nvb, dqk_sum, interpret, dt)
    if not nvb or smem_bytes(K, L, block_v, dt, out_dt, reduction_scratch) > SMEM_LIMIT:
        raise ValueError(f"chunk_grads_backward: `block_v` = {block_v} must be one of {BLOCKS_V}, divide V = {V} and "
                         f"fit in {SMEM_LIMIT // 1024} KiB of SMEM at K = {K}, L = {L}")
    _check(x, starts, cot_end, ainv, block_v, 1, reduction_scratch, one_warpgroup=False)
    registers = (LAUNCH_REGISTERS,) * 3 if registers is None else tuple(registers)
    check_registers(registers)
    if ainv is None:
        ainv = chunk_inverses(x)
    rvec, cvec, rint = _token_operands(tv)
    sq, sv, sk = (C, C), (C, block_v), (C, K)
    op = lambda shape: mc.smem(shape, dt, max_swizzle=min(128, block_v * jnp.dtype(dt).itemsize))
    one = plgpu.Barrier(num_arrivals=1)
    scratch = dict(
        q_s=op(sk), k_s=op((L, *sk)), v_s=op((L, *sv)), vw_s=op((L, *sv)), do_s=op(sv),
        s_s=op((K, block_v)), x_s=op((K, block_v)), xinv_s=op(sq), qk0_s=op(sq), qk_s=op((L, *sq)),
        b_s=op((L, *sq)), e_s=op(sv), dr_s=op(sv), out_s=mc.smem((2, C, 64), out_dt),
        rv_s=plgpu.SMEM((_N_ROW_VECS + L, C), f32), cv_s=plgpu.SMEM((2, C), f32),
        ri_s=plgpu.SMEM((4, C), jnp.int32), cs_s=plgpu.SMEM((4, C), f32),
        ovec_s=plgpu.SMEM((_PARTS, L + _N_OUT_VECS, C), f32),
        in_a=plgpu.Barrier(num_arrivals=1 + 2 * L + 1 + 2 + 2),  # q, k_l, v_l, X; rvec, cvec; ri twice
        in_b=plgpu.Barrier(num_arrivals=2),
        in_c=one, qk_ready=one, b_ready=one, e_ready=one, dr_ready=one, dvw_done=one, w_ready=one, d_ready=one,
        cs_turn=one, done=plgpu.Barrier(num_arrivals=3))
    body = functools.partial(_body, L=L, nvb=nvb, scale=scale, registers=None if interpret else registers)
    dq, dk, dv, dvec = _launch(body, x, (do, starts, cot_end, ainv, rvec, cvec, rint), nvb=nvb,
                               n_vec_parts=_PARTS * nvb, order=order, add=add, dqk_dtype=out_dt,
                               kernel_name="prism_chunk_grads_mgpu_wg3w", scratch_types=scratch, num_threads=3,
                               thread_name="wg", approx_math=approx_math, reduction_scratch=reduction_scratch,
                               interpret=interpret, profile=profile)
    return (dq, dk, dv, *_token_grads(dvec, L, Tp // C))
