"""The chunk backward at L = 1 as three specialised warpgroups (`chunk_grads_backward(warpgroups=3)`).

One CTA per (chunk, head, batch) over all V value columns (K, V in {64, 128}). Where the two-warpgroup
kernels run the same phase on two value halves between CTA-wide barriers, here each warpgroup owns a
stream of products and hands results to the others through SMEM, one single-use barrier per hand-over,
so the tensor cores see one warpgroup's products while another does its elementwise work.

At L = 1 the write key is the erase key k, and every [C, C] cotangent that multiplies the same
[C, K] operand is one tile: the o-side cotangents W = dQK0 . t_m1 + dQK . t_0 (dq gets W k, dk gets
W^T q) and the key-side D = dkk + dA (dk gets D k + D^T k): 3 [C, C] x [C, K] products for dk where
the two-warpgroup kernels chain 6.

    WG0 (forward)   q k^T -> -scale QK0, scale QK (qk_ready); [wait B, vw] rhs = beta start_m1 k S
                    + diag(beta) B vw, E = X rhs (e_ready); dO E^T, dO vw^T -> W over X once dR is
                    formed (w_ready); its decay cotangents; dq = start scale dO S^T + W k (its row sums
                    against q give the start-state share of dG).
    WG1 (backward)  k k^T -> diag(beta) B, vw = beta v (b_ready); [wait QK0] k dS', dE = -QK0^T dO
                    - end_m1 k dS', dR = X^T dE (dr_ready); dvw = B^T beta dR + QK^T dO + end k dS',
                    dv, dbeta; [wait E] dR E^T, dR vw^T -> D over QK0 (d_ready); its decay cotangents.
    WG2 (keys)      the state terms of dk, each its own [C, K] product whose row sums against k are
                    the decay vectors: vw dS'^T (rend), [wait E] E dS'^T (re), [wait dR] dR S^T (rs);
                    then [wait W, D] dk = end vw dS'^T - end_m1 E dS'^T + beta start_m1 dR S^T
                    + W^T q + D k + D^T k; <S, dS'> by rows.
With `vw_by` "keys" (or "forward"), WG2 (or WG0) forms vw instead of WG1, as soon as v is in (WG0:
once QK0 and QK are out), and arrives at vw_ready; WG1 waits for it before dv takes v's bytes, WG0
before rhs and WG2 before its first product with vw. With `paired_decays` (default) t_m1 and m1m1
are t_0 and m1_0 scaled by exp(g_j) per column.
The [C, K] dq / dk leave in the inputs' 16-bit dtype through dS''s SMEM (x_free: its last reader is
done); dv through v's. The column sums of the decay cotangents (cross-warp reductions through Pallas'
one reduction scratch) are taken by WG0, then WG1 (cs_turn). Each warpgroup writes its own partial
per-token outputs (three parts, summed in XLA by `chunk_grads._token_grads`).

Rounding against the two-warpgroup kernels: re, rs, rend are row sums of [C, K] products of the
16-bit E, dR, vw (not of float32 [C, V] ones), and W, D are rounded to 16 bits once as sums.

Registers: 384 threads get 168 registers each at launch, and WG1 holds the most [C, C] float32 tiles
(32 registers per thread each), so each warpgroup first moves its budget by setmaxnreg (`registers`,
default (152, 208, 144) at K = V = 128: 7-13% off the kernel's time on the H100). The per-token vectors
arrive in four TMA copies (one [n, C] box per array), issued with the tiles by WG0's one thread.

SMEM at K = V = 128, bf16: q, k 32 KiB, v, vw, dO, E, dR 80, S, dS' 64, X, QK0, QK, B 32, vectors
~8, reduction scratch 2: ~218 KiB (one CTA per SM).

Code size: the kernel is straight-line code run once per CTA, and its phases take about the same time per
instruction whatever the instructions (`benchmarks/mosaic_diag.py phases`), so instructions are a cost of
their own. A positive query scale rides in the t decays' exponent (`mc.decay_matrix(row_log2=...)`),
beta0 leaves WG1's row sums as a factor, and with `block_loops` the stretches that repeat per 64-column
block and keep nothing per block in registers run as loops (WG1 then forms k dS' again for dv rather than
holding it): at K = V = 128 ptxas makes 8,880 instructions (139 KiB) of b5ad8e0's kernel, 8,688 of this
one and 7,240 (113 KiB) with `block_loops` at its default budget, the launch share.
"""

from __future__ import annotations

import functools
import math
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

f32 = jnp.float32
C = mc.CHUNK
SIZES = (64, 128)
_PARTS = 3  # per-token output parts: one per warpgroup
# setmaxnreg moves registers only within the CTA's launch allocation: 384 threads get 168 registers
# each (65536 / 384, rounded down to a multiple of 8), so the three budgets may sum to 3 * 168 at most;
# a warpgroup whose increase cannot be met waits for registers forever.
LAUNCH_REGISTERS = 168
# (WG0, WG1, WG2) at registers=None and K = V = 128. WG1 (the backward side) is the critical path and
# holds the most [C, C] tiles. H100, L = 1, the chunk backward alone (benchmarks/mosaic_diag.py time,
# session 12, two runs on one machine): 2.23 / 2.15 ms against 2.40 / 2.43-2.51 at the launch share;
# (144, 216, 144) 2.21, (136, 232, 136) 2.32, (160, 200, 144) 2.32.
DEFAULT_REGISTERS = (152, 208, 144)
# With `block_loops` the launch share (no setmaxnreg): of the 280 budgets summing to 504, ptxas (deviceless, a
# sweep of an earlier form of session 24's kernel) serializes the wgmmas at 241, the default above among them
# (260 bytes of spills); the launch share does not, with the fewest spills (116 bytes).
VW_BY = ("backward", "keys", "forward")  # the warpgroup that forms vw = beta v
# Who issues the input copies: "forward" (WG0's one thread, all eleven) or "each" (every warpgroup those of
# its own operands, before it moves its register budget). Session 23's profile (H100, L = 1): WG1 waited
# ~9 us for the first group, of which ~4 us passed before WG0 had issued the last copy; yet the kernel alone
# timed the same either way (2.118 / 1.983 ms "each" against 2.064 / 2.051, one run), so "forward" stays.
LOADS_BY = ("forward", "each")


# Hand-over helpers shared with `chunk_grads_wg3w` (the same dataflow at L > 1).
def put(buf, value):
    buf[...] = value.astype(buf.dtype)


def ready(bar):
    """Makes this warpgroup's SMEM writes visible, then arrives at the single-use barrier `bar`."""
    plgpu.commit_smem()
    plgpu.barrier_arrive(bar)


def wait(*bars):
    for bar in bars:
        plgpu.barrier_wait(bar)


def colsum(cs_s, i, w):
    """Column sums of w [C, C] in the ROWS layout (reduced as COLS, read back through SMEM row cs_s[i])."""
    cs_s[i] = jnp.sum(w, axis=0)
    plgpu.commit_smem()
    return plgpu.load(cs_s.at[i], layout=mc.ROWS)


def set_registers(registers, w):
    """Warpgroup w moves its register budget to registers[w] by setmaxnreg (None: the launch share)."""
    if registers is not None and registers[w] != LAUNCH_REGISTERS:
        grow = registers[w] > LAUNCH_REGISTERS
        plgpu.set_max_registers(registers[w], action="increase" if grow else "decrease")


def check_registers(registers):
    """ValueError unless `registers` is three setmaxnreg budgets within the launch share."""
    if (len(registers) != 3 or any(not isinstance(r, int) or r % 8 or not 24 <= r <= 256 for r in registers)
            or sum(registers) > 3 * LAUNCH_REGISTERS):
        raise ValueError(f"chunk_grads_backward: `registers` = {registers} must be None or three multiples of "
                         f"8 in [24, 256] (WG0, WG1, WG2) summing to at most {3 * LAUNCH_REGISTERS} "
                         f"(3 x {LAUNCH_REGISTERS}, the launch share of 384 threads)")


def smem_bytes(K, V, dtype, reduction_scratch=2048):
    """SMEM bytes of the kernel at key width K and V value columns (for the check before compiling)."""
    it = jnp.dtype(dtype).itemsize
    tiles = (2 * C * K + 5 * C * V + 2 * K * V + 4 * C * C) * it  # q, k; v, vw, dO, E, dR; S, dS'; X, QK0, QK, B
    vecs = 4 * C * ((_N_ROW_VECS + 1) + 2 + 4 + 4 + _PARTS * (1 + _N_OUT_VECS))
    return tiles + vecs + reduction_scratch + 1024  # + barriers and alignment


def supported(K: int, L: int, V: int, dtype=jnp.bfloat16, reduction_scratch=2048) -> bool:
    """Whether `chunk_grads_wg3` takes this shape: L = 1, K and V in {64, 128}, 16-bit inputs."""
    return (L == 1 and K in SIZES and V in SIZES and jnp.dtype(dtype) in mc.DTYPES
            and smem_bytes(K, V, dtype, reduction_scratch) <= SMEM_LIMIT)


def _body(q_ref, k_ref, v_ref, do_ref, s_ref, x_ref, ainv_ref, rvec_ref, cvec_ref, ri_ref,
          dq_ref, dk_ref, dv_ref, dvec_ref,
          q_s, k_s, v_s, vw_s, do_s, s_s, x_out, xinv_s, qk0_s, qk_s, b_s, e_s, dr_s,
          rv_s, cv_s, ri_s, cs_s, ovec_s,
          in_a, in_b, in_c, qk_ready, b_ready, vw_ready, e_ready, dr_ready, w_ready, d_ready, x_free, cs_turn,
          done, *, scale, registers, order, add, paired, vw_by, loads_by, block_loops):
    """SMEM reuse: xinv_s holds X, then W (after dr_ready: X's last reader is WG1's dR); qk0_s -scale
    QK0, then D (written by WG1 after its own last read); x_out dS', then the dq / dk staging tiles
    (after x_free); v_s v, then dv (WG1 only)."""
    (x_s,), (dq_s, dk_s) = x_out
    n, h, b, _ = _coords(1, order)
    wg = lax.axis_index("wg")
    K, V = q_s.shape[-1], v_s.shape[-1]
    rows = pl.ds(n * C, C)
    vblocks = [pl.ds(i * 64, 64) for i in range(V // 64)]
    kblocks = [pl.ds(i * 64, 64) for i in range(K // 64)]

    unrolled = lambda blocks: not block_loops or len(blocks) == 1

    def each(blocks, step, carry=None):
        """carry = step(block, carry) over 64-column `blocks`: unrolled, or with `block_loops` as a loop
        (one copy of the code for every block: straight-line code is fetched afresh for every CTA)."""
        if unrolled(blocks):
            for blk in blocks:
                carry = step(blk, carry)
            return carry
        return lax.fori_loop(0, len(blocks), lambda i, c: step(pl.ds(pl.multiple_of(i * 64, 64), 64), c), carry)

    def left_multiply(a, buf):
        """buf[:, blk] <- a @ buf[:, blk] for every value block: unrolled, all products issued together."""
        if unrolled(vblocks):
            for blk, prod in zip(vblocks, _issue(*[(s64, [(a, buf.at[:, blk])]) for blk in vblocks])):
                put(buf.at[:, blk], prod)
        else:
            each(vblocks, lambda blk, _: put(buf.at[:, blk], _issue((s64, [(a, buf.at[:, blk])]))[0]))
    sq, s64 = (C, C), (C, 64)
    vx = _ChunkVectors(rv_s, cv_s, ri_s, hold=False)
    # A positive query scale rides in the t decays' exponent (`mc.decay_matrix(row_log2=...)`).
    if paired:  # one exp per pair of decay matrices (`_ChunkVectors.t_pair`, `m_pair`)
        decays = lambda kind, f=None: vx.t_pair(f) if kind == "t" else vx.m_pair(f)
    else:
        decays = lambda kind, f=None: (vx.t_m1(f), vx.t_0(f)) if kind == "t" else (vx.m1m1(f), vx.m1_0(f))
    if scale > 0:
        scaled_t, tscale = (lambda: decays("t", math.log2(scale))), 1.0
    else:
        scaled_t, tscale = (lambda: decays("t")), scale
    R = lambda vec, shape=s64: mc.rows_of(vec, shape)
    load = lambda ref: plgpu.load(ref, layout=mc.WGMMA).astype(f32)
    zero = lambda: 0.0 * vx.start  # a ROWS-layout zero (Mosaic GPU stores no splat of C elements)
    total = lambda xs: functools.reduce(operator.add, xs)

    def rowsum_k(accs):
        """sum over the key slices of rowsum(acc . k): a [C, K] product's row sums against the key."""
        return total([jnp.sum(a * load(k_s.at[:, kc]), axis=1) for a, kc in zip(accs, kblocks)])

    def out_vectors(w, *vecs):
        for i, vec in enumerate(vecs):
            ovec_s[w, i] = vec
        plgpu.commit_smem()
        for i in range(len(vecs)):
            plgpu.copy_smem_to_gmem(ovec_s.at[w, i], dvec_ref.at[w, b, h, i, rows])

    def form_vw():
        each(vblocks, lambda blk, _: put(vw_s.at[:, blk], R(vx.beta0) * load(v_s.at[:, blk])))

    # The input copies in the order one thread issues them (loads_by="forward"), each with the warpgroup
    # that issues it under loads_by="each" (the barriers count copies, whoever issues them).
    copies = [(0, q_ref.at[b, rows, h], q_s, in_a), (1, k_ref.at[b, rows, h, 0], k_s, in_a),
              (1, v_ref.at[b, rows, h, 0], v_s, in_a), (1, ainv_ref.at[b, h, n], xinv_s, in_a),
              # One copy per array of per-token vectors ([n, C] boxes), not one per vector.
              (0, rvec_ref.at[b, h, :, rows], rv_s, in_a), (0, cvec_ref.at[b, h, :, rows], cv_s, in_a),
              # r, rm1 as rows; r, rm1 as columns
              *[(0, ri_ref.at[b, :, rows], ri_s.at[pl.ds(i, 2)], in_a) for i in (0, 2)],
              (2, s_ref.at[b, h, n], s_s, in_b), (0, do_ref.at[b, rows, h], do_s, in_b),
              (2, x_ref.at[b, h, n], x_s, in_c)]

    def issue_copies(w):
        for by, src, dst, bar in copies:
            if (by if loads_by == "each" else 0) == w:
                plgpu.copy_gmem_to_smem(src, dst, bar)

    @pl.when(wg == 0)
    def _forward():
        if loads_by == "each":
            issue_copies(0)
        set_registers(registers, 0)
        if loads_by != "each":
            issue_copies(0)
        phase = _Phases()
        phase("w0.wait_loads")
        wait(in_a)
        phase("w0.qk")
        (qk_raw,) = _issue((sq, [(q_s, k_s.T)]))
        t_m1, t_0 = scaled_t()
        put(qk0_s, -tscale * (qk_raw * t_m1))
        put(qk_s, tscale * (qk_raw * t_0))
        ready(qk_ready)
        if vw_by == "forward":
            phase("w0.vw")
            form_vw()
            ready(vw_ready)
        phase("w0.wait_b")
        wait(in_b, b_ready, *([vw_ready] if vw_by == "keys" else []))
        phase("w0.rhs_e")
        def rhs(blk, _):
            ks, bvw = _issue((s64, [(k_s, s_s.at[:, blk])]), (s64, [(b_s, vw_s.at[:, blk])]))
            put(e_s.at[:, blk], R(vx.beta0 * vx.start_m1) * ks + bvw)

        each(vblocks, rhs)
        plgpu.commit_smem()
        left_multiply(xinv_s, e_s)  # E = X rhs
        ready(e_ready)
        phase("w0.dqk")
        dqk0_raw, dqk_raw = _issue((sq, [(do_s, e_s.T)]), (sq, [(do_s, vw_s.T)]))
        t_m1, t_0 = scaled_t()
        dqk0 = -tscale * (dqk0_raw * t_m1)
        dqk = tscale * (dqk_raw * t_0)
        phase("w0.wait_dr")
        wait(dr_ready)  # X's last reader (WG1's dR) is done
        put(xinv_s, dqk0 + dqk)  # W
        ready(w_ready)
        phase("w0.sums")
        w_tm1, w_t0 = dqk0 * qk_raw, dqk * qk_raw
        dG = jnp.sum(w_tm1 + w_t0, axis=1) - colsum(cs_s, 0, w_t0)
        dGm1 = -colsum(cs_s, 1, w_tm1)
        plgpu.barrier_arrive(cs_turn)  # the reduction scratch is WG1's now
        phase("w0.wait_x")
        wait(x_free)  # dS' read for the last time: its bytes take dq
        phase("w0.dq")
        def dq(kc, dG_state):
            ds, wk = _issue((s64, [(do_s, s_s.at[kc].T)]), (s64, [(xinv_s, k_s.at[:, kc])]))
            put(dq_s.at[:, kc], R(vx.start * scale) * ds + wk)
            return dG_state + jnp.sum(ds * load(q_s.at[:, kc]), axis=1)

        dG_state = each(kblocks, dq, zero())
        plgpu.commit_smem()
        _store_share(dq_s, dq_ref, add, 0, b, rows, h)
        phase("w0.out")
        out_vectors(0, zero(), dG + scale * vx.start * dG_state, dGm1, zero())
        plgpu.wait_smem_to_gmem(0)
        phase()

    @pl.when(wg == 1)
    def _backward():
        issue_copies(1)
        set_registers(registers, 1)
        phase = _Phases()
        phase("w1.wait_loads")
        wait(in_a)
        phase("w1.kk")
        (kk_raw,) = _issue((sq, [(k_s, k_s.T)]))
        put(b_s, R(vx.beta0, sq) * kk_raw * vx.m1_0())  # diag(beta) B (beta0 as a factor: any sign)
        if vw_by == "backward":
            form_vw()
        ready(b_ready)
        phase("w1.wait_qk")
        wait(in_b, in_c, qk_ready)
        phase("w1.de_dr")
        keep_kx = unrolled(vblocks)  # in loops k dS' is formed again for dv

        def d_e(blk, kxs):
            kx, qdo = _issue((s64, [(k_s, x_s.at[:, blk])]), (s64, [(qk0_s.T, do_s.at[:, blk])]))
            put(dr_s.at[:, blk], qdo - R(vx.end_m1) * kx)  # dE
            return kxs + [kx] if keep_kx else None

        kxs = each(vblocks, d_e, [] if keep_kx else None)
        left_multiply(xinv_s.T, dr_s)  # dR = X^T dE
        ready(dr_ready)
        phase("w1.dvw")
        if vw_by != "backward":
            wait(vw_ready)  # v has been read: its bytes take dv
        def dv(blk, kx, dbeta):
            if kx is None:
                kx, dvw = _issue((s64, [(k_s, x_s.at[:, blk])]),
                                 (s64, [(b_s.T, dr_s.at[:, blk]), (qk_s.T, do_s.at[:, blk])]))
            else:
                (dvw,) = _issue((s64, [(b_s.T, dr_s.at[:, blk]), (qk_s.T, do_s.at[:, blk])]))
            dvw = dvw + R(vx.end) * kx
            dbeta = dbeta + jnp.sum(dvw * load(v_s.at[:, blk]), axis=1)
            put(v_s.at[:, blk], R(vx.beta0) * dvw)  # dv
            return dbeta

        if not keep_kx:
            dbeta = each(vblocks, lambda blk, c: dv(blk, None, c), zero())
        else:
            dbeta = zero()
            for blk, kx in zip(vblocks, kxs):
                dbeta = dv(blk, kx, dbeta)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(v_s, dv_ref.at[b, rows, h, 0])
        phase("w1.wait_e")
        wait(e_ready)
        phase("w1.dm")
        dm_raw, drv = _issue((sq, [(dr_s, e_s.T)]), (sq, [(dr_s, vw_s.T)]))
        d_m1m1, m1_0 = decays("m")
        # dkk = diag(beta0) a and dA = diag(beta0) v with a = -dm_raw . m1m1, v = dR vw^T . m1_0; beta0 is
        # a row factor, so it leaves the row sums: dbeta0 = rowsum((a + v) . kk) and the row-sum share of
        # dGm1, rowsum((dkk + dA) . kk), is beta0 dbeta0.
        drv_m = drv * m1_0
        dkv = drv_m - dm_raw * d_m1m1  # a + v
        put(qk0_s, R(vx.beta0, sq) * dkv)  # D = dkk + dA (both strictly lower: disjoint from D^T)
        ready(d_ready)
        bkk = R(vx.beta0, sq) * kk_raw
        w_m1m1, w_m10 = -(dm_raw * d_m1m1) * bkk, drv_m * bkk
        dbeta0 = jnp.sum(dkv * kk_raw, axis=1)
        phase("w1.wait_cs")
        wait(cs_turn)
        phase("w1.sums")
        dG = -colsum(cs_s, 2, w_m10)
        dGm1 = vx.beta0 * dbeta0 - colsum(cs_s, 3, w_m1m1)
        out_vectors(1, dbeta + dbeta0, dG, dGm1, zero())
        plgpu.wait_smem_to_gmem(0)
        phase()

    @pl.when(wg == 2)
    def _keys():
        issue_copies(2)
        set_registers(registers, 2)
        phase = _Phases()
        phase("w2.wait_loads")
        if vw_by == "keys":
            wait(in_a)
            phase("w2.vw")
            form_vw()
            ready(vw_ready)
            phase("w2.wait_loads_bc")
        wait(*([] if vw_by == "keys" else [in_a]), in_b, in_c)  # a barrier is waited on once per phase
        phase("w2.sx")
        sx = each(kblocks, lambda kc, sx: sx + jnp.sum(load(s_s.at[kc]) * load(x_s.at[kc]), axis=1), zero())  # <S, dS'> by rows
        if vw_by != "keys":
            phase("w2.wait_vw")
            wait(vw_ready if vw_by == "forward" else b_ready)
        phase("w2.vwx")
        acc = _issue(*[(s64, [(vw_s, x_s.at[kc].T)]) for kc in kblocks])
        rend = rowsum_k(acc)
        dk = [R(vx.end) * a for a in acc]
        phase("w2.wait_e")
        wait(e_ready)
        phase("w2.ex")
        acc = _issue(*[(s64, [(e_s, x_s.at[kc].T)]) for kc in kblocks])
        re = rowsum_k(acc)
        dk = [d - R(vx.end_m1) * a for d, a in zip(dk, acc)]
        phase("w2.wait_dr")
        wait(dr_ready)  # WG1's k dS' came before dR: dS' is read for the last time
        plgpu.barrier_arrive(x_free)
        phase("w2.drs")
        acc = _issue(*[(s64, [(dr_s, s_s.at[kc].T)]) for kc in kblocks])
        rs = rowsum_k(acc)
        dk = [d + R(vx.beta0 * vx.start_m1) * a for d, a in zip(dk, acc)]
        phase("w2.wait_wd")
        wait(w_ready, d_ready)
        phase("w2.dk")
        acc = _issue(*[(s64, [(xinv_s.T, q_s.at[:, kc]), (qk0_s, k_s.at[:, kc]), (qk0_s.T, k_s.at[:, kc])])
                       for kc in kblocks])
        for kc, d, a in zip(kblocks, dk, acc):
            put(dk_s.at[:, kc], d + a)
        plgpu.commit_smem()
        _store_share(dk_s, dk_ref, add, 0, b, rows, h, 0)
        out_vectors(2, vx.start_m1 * rs, -rend * vx.end, vx.beta0 * rs * vx.start_m1 + re * vx.end_m1,
                    rend * vx.end - re * vx.end_m1 + sx * vx.all)
        plgpu.wait_smem_to_gmem(0)
        phase()

    # A warpgroup must not exit while another still issues wgmma.
    plgpu.barrier_arrive(done)
    plgpu.barrier_wait(done)


def chunk_grads_wg3(x: Prepared, tv: mc.TokenVectors, starts, do, cot_end, *, scale, ainv, approx_math=True,
                    reduction_scratch=2048, registers=None, order="chunks", paired_decays=True, vw_by="backward",
                    loads_by="forward", block_loops=True, profile=None, interpret=False):
    """`chunk_grads_backward(warpgroups=3)` (module docstring): L = 1, K and V in {64, 128}.

    registers: (WG0, WG1, WG2) registers per thread that each warpgroup sets by `setmaxnreg` as it
    starts: multiples of 8 in [24, 256] summing to at most 3 * LAUNCH_REGISTERS (504; 168 each: no
    setmaxnreg), or None: DEFAULT_REGISTERS at K = V = 128 (where they were measured) without
    `block_loops`, else the launch share; ignored in the interpreter. paired_decays: each pair of decay matrices that differ by one
    step in their columns ((t_m1, t_0) and (m1m1, m1_0)) from one exp, the other by a column scaling
    (`_ChunkVectors.t_pair`): two exps of [C, C] fewer on WG0's path and one on WG1's; False forms each
    by its own exp. vw_by: the warpgroup that forms vw = beta v: "backward" (WG1, with B), "keys" (WG2,
    which waits for all loads anyway, as soon as v is in) or "forward" (WG0, once QK0 and QK are out,
    while WG1 forms B). WG1 is the critical path (session 11's profile: WG1 ~54 us per CTA against
    WG2's ~51 and WG0's ~38); off it, WG1 waits for vw before dv takes v's bytes. loads_by: who issues
    the input copies (`LOADS_BY`): "forward" (WG0's one thread) or "each" (every warpgroup its own operands
    as it starts). block_loops (default; H100, the kernel alone, session 24: 1.476 / 1.386 ms against
    2.043 / 2.038 unrolled, its GPU tests against float64 passed): the stretches that repeat per 64-column block of the values or keys and keep
    nothing per block in registers (vw, the right-hand side and E, dR, dq, <S, dS'>) run as loops over the
    blocks, one copy of their code, not one per block; each block's products are then waited on before the
    next block's are issued.

    Shapes and returns as `chunk_grads_backward`; dq / dk in q's 16-bit dtype."""
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    dt = x.q.dtype
    if not supported(K, L, V, dt, reduction_scratch):
        raise ValueError(f"chunk_grads_backward: `warpgroups` = 3 takes L = 1 with K, V in {SIZES} and 16-bit "
                         f"inputs within {SMEM_LIMIT // 1024} KiB of SMEM; got L = {L}, K = {K}, V = {V}, {dt}")
    _check(x, starts, cot_end, ainv, 64, 1, reduction_scratch)
    if registers is None:  # the budgets were measured at K = V = 128 only
        registers = DEFAULT_REGISTERS if K == V == 128 and not block_loops else (LAUNCH_REGISTERS,) * 3
    registers = tuple(registers)
    check_registers(registers)
    if ainv is None:
        ainv = chunk_inverses(x)
    rvec, cvec, rint = _token_operands(tv)
    add, out_dt = _sum_mode(1, "xla", interpret, dt)
    sq, sv, sk = (C, C), (C, V), (C, K)
    one = plgpu.Barrier(num_arrivals=1)
    scratch = dict(
        q_s=mc.smem(sk, dt), k_s=mc.smem(sk, dt), v_s=mc.smem(sv, dt), vw_s=mc.smem(sv, dt), do_s=mc.smem(sv, dt),
        s_s=mc.smem((K, V), dt), x_out=plgpu.RefUnion([mc.smem((K, V), dt)], [mc.smem(sk, dt), mc.smem(sk, dt)]),
        xinv_s=mc.smem(sq, dt), qk0_s=mc.smem(sq, dt), qk_s=mc.smem(sq, dt), b_s=mc.smem(sq, dt),
        e_s=mc.smem(sv, dt), dr_s=mc.smem(sv, dt),
        rv_s=plgpu.SMEM((_N_ROW_VECS + 1, C), f32), cv_s=plgpu.SMEM((2, C), f32),
        ri_s=plgpu.SMEM((4, C), jnp.int32), cs_s=plgpu.SMEM((4, C), f32),
        ovec_s=plgpu.SMEM((_PARTS, 1 + _N_OUT_VECS, C), f32),
        in_a=plgpu.Barrier(num_arrivals=4 + 2 + 2),  # q, k, v, X; rvec, cvec; ri twice
        in_b=plgpu.Barrier(num_arrivals=2),
        in_c=one, qk_ready=one, b_ready=one, vw_ready=one, e_ready=one, dr_ready=one, w_ready=one, d_ready=one, x_free=one,
        cs_turn=one, done=plgpu.Barrier(num_arrivals=3))
    if not isinstance(paired_decays, bool):
        raise ValueError(f"chunk_grads_backward: `paired_decays` = {paired_decays!r} must be True or False")
    if vw_by not in VW_BY:
        raise ValueError(f"chunk_grads_backward: `vw_by` = {vw_by!r} must be one of {VW_BY}")
    if not isinstance(block_loops, bool):
        raise ValueError(f"chunk_grads_backward: `block_loops` = {block_loops!r} must be True or False")
    if loads_by not in LOADS_BY:
        raise ValueError(f"chunk_grads_backward: `loads_by` = {loads_by!r} must be one of {LOADS_BY}")
    body = functools.partial(_body, scale=scale, registers=None if interpret else registers, paired=paired_decays,
                             vw_by=vw_by, loads_by=loads_by, block_loops=block_loops)
    dq, dk, dv, dvec = _launch(body, x, (do, starts, cot_end, ainv, rvec, cvec, rint), nvb=1, n_vec_parts=_PARTS,
                               order=order, add=add, dqk_dtype=out_dt, kernel_name="prism_chunk_grads_mgpu_wg3",
                               scratch_types=scratch, num_threads=3, thread_name="wg", approx_math=approx_math,
                               reduction_scratch=reduction_scratch, interpret=interpret, profile=profile)
    return (dq, dk, dv, *_token_grads(dvec, L, Tp // C))
