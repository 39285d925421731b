"""Mosaic GPU reverse state-gradient pass of the backward (Hopper: TMA, wgmma).

Drop-in for `pallas_kernels.gpu.state_bwd.reverse_pass` at chunk 64 with 16-bit p and ek. For
chunks n = N-1 .. 0, with X [K, bv] the cotangent of chunk n's end state (X = dfinal for the last):

    cot_end[n] = X;    W = -(ek_n X)  [C, bv]  (wgmma: M = C = 64, contraction K)
                       X <- Y_n + a_n X + P_n^T W  [K, bv]  (wgmma: M = K, contraction C, P_n^T a
                                                             transposed SMEM view)

One CTA (one warpgroup) per (b, h, value block) walks the chunks backwards; grid (B, H, V / bv).
Two implementations, picked by block_v (as the forward state pass, `state.py`):

block_v = 64 (default; `_register_pass`): X held TRANSPOSED, X^T [bv, K], in float32 registers, so
both products take their dependent operand from registers as the wgmma A operand (M = bv = 64):
    W^T = -(X^T ek^T)             A = bf16(X^T) registers, B = ek^T (transposed view of ek's tile)
    X^T <- Y^T + a X^T + W^T P    A = bf16(W^T) registers, B = P's TMA tile as it is
- Chain per step: cast -> wgmma -> wait -> cast -> wgmma -> wait -> subtract (W's sign folded into
  the last step: X^T <- (Y^T + a X^T) - (X^T ek^T) P); no register -> SMEM
  -> fence round trip on it (the staged path has two per step).
- While (ek X)^T computes: cot_end[n] leaves by TMA (X^T switched to the WGMMA_TRANSPOSED layout,
  stored through a transposed view of one of two alternating float32 SMEM tiles, so the store never
  waits), and Y^T + a X^T is formed (Y read transposed from its swizzled float32 TMA tile).
- On the CPU interpreter the register operands are staged in SMEM (`state.a_operand`).
- SMEM (bf16, K = V = 128): 2 x 32 KiB (P, ek) + 2 x 32 KiB (Y) + 2 x 32 KiB (staging) = 192 KiB.

block_v = 32 (the phase-1 kernel, twice the CTAs): X [K, bv] in float32 registers; each step
stages it once as a 16-bit SMEM operand (B of ek X), and W = -(ek X) goes from its accumulator to a
16-bit SMEM operand (B of P^T W), the sign folded in. Y_n + a_n X is formed while ek X computes
(`state.overlapped`).

Both: a_n comes broadcast from XLA to a [K] vector per chunk; chunk n-1's tiles (P, ek 16-bit; Y
float32; the a row) are fetched by TMA into the other of two SMEM slots while chunk n computes.

Expected cost (H200, bf16, K = V = 128, bv = 64): per step two dependent small wgmmas (~1 MFLOP
each): latency-bound like the forward state pass; traffic per step 32 KiB of P / ek (16-bit), 32 KiB
of Y in and 32 KiB of cot_end out (float32), prefetched / overlapped. B * H * V / bv CTAs. Phase 1
(staged, bv = 64) measured 1.9 us per step at T = 32K; the register path removes the two SMEM round
trips and fences from the chain (expected ~1 us per step; ~96 KiB moved per step per CTA puts a
per-SM bandwidth floor near ~0.8 us). Knobs for the GPU A/B: registers=False (the staged kernel at
block_v = 64), block_v=32 (staged, twice the CTAs, a third less traffic per CTA and step).

Without the pull-back (`reverse_from_factors`, the pipeline's path when the forward wrote its outputs
from the factors Qf, Of and kept P and Qf): Y = Qf^T do is one more wgmma per step into X's accumulator
(off the chain), ek = diag(end_m1) k0 a column scaling of (k0 X)^T; P, k0, Qf and do are read in the
caller's layout. The pull-back kernel and its per-chunk P, ek, Y in HBM go away.

16-bit cot_end (`cot_dtype` = p's dtype): X stays float32 in registers and is rounded only on the way
out (bit-identical to XLA's cast of the float32 cot_end, tested); the chunk backward uses cot_end only
as a 16-bit wgmma operand. Register kernel: two 16-bit staging tiles plus one float32 tile for dfinal
in / ds0 out (the same 192 KiB at K = V = 128), 16 KiB out per step instead of 32 (the whole
pass writes 256 instead of 512 MiB at B*T = 32K, H = 16). Staged kernel: X's 16-bit operand copy
(x_b) goes out by TMA itself; no float32 copy is written per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.gpu.mosaic import common as mc
from pallas_kernels.gpu.mosaic.state import (a_operand, accumulate, check_inputs, operand_smem, out_dtype,
                                             overlapped, send_last_state, store_transposed)

f32 = jnp.float32
C = mc.CHUNK


def reverse_pass(p, ek, a, y, dfinal, *, block_v=64, registers=None, cot_dtype=None, interpret=False):
    """(cot_end [B, H, N, K, V] float32 (or `cot_dtype`), ds0 [B, H, K, V] float32).

    p, ek [B, H, N, C, K] 16-bit (bf16 / f16, the same); a [B, H, N] float32; y [B, H, N, K, V]
    float32 or p's 16-bit dtype (the pull-back's `y_dtype`: read as it is by the register kernel,
    half the bytes; cast to float32 in XLA for the staged one); dfinal [B, H, K, V] float32.
    Grid (B, H, V / block_v), sequential over the N chunks (last first) in each CTA. block_v: value
    columns per CTA, 32 or 64 (32: twice the CTAs).
    registers: X transposed in registers (`_register_pass`, block_v = 64 only) or the staged kernel;
    None = registers at block_v = 64.
    cot_dtype: None / float32, or p's 16-bit dtype (also as a string, "bfloat16"): cot_end is rounded to
    it on the way out (X stays float32 in registers; ds0 is float32). Its consumer (the chunk backward)
    uses it only as a 16-bit wgmma operand: half the bytes written and read.
    """
    B, H, N, Cp, K = p.shape
    V = y.shape[-1]
    check_inputs("reverse_pass", dtype=p.dtype, chunk=Cp, K=K, V=V, block_v=block_v)
    for name, t, shape, dtypes in (("ek", ek, p.shape, (p.dtype,)), ("a", a, (B, H, N), (f32,)),
                                   ("y", y, (B, H, N, K, V), (f32, p.dtype)),
                                   ("dfinal", dfinal, (B, H, K, V), (f32,))):
        if t.shape != shape or t.dtype not in dtypes:
            raise ValueError(f"reverse_pass: `{name}` must be {shape} "
                             f"{' or '.join(str(jnp.dtype(d)) for d in dtypes)} (got {t.shape} {t.dtype})")
    dt = p.dtype
    cdt = out_dtype("reverse_pass", "cot_dtype", cot_dtype, dt)
    low = cdt != jnp.dtype(f32)  # 16-bit cot_end: leaves from the 16-bit copy of X
    bv = block_v
    a_rows = jnp.broadcast_to(a[..., None], (B, H, N, K))
    registers = bv == 64 if registers is None else registers
    if registers and bv != 64:
        raise ValueError(f"reverse_pass: registers=True needs block_v=64 (got block_v={bv})")
    if registers:
        return _register_pass(p, ek, a_rows, y, dfinal, cot_dtype=cdt, interpret=interpret)
    y = y.astype(f32)  # the staged kernel reads Y as float32

    def body(p_ref, ek_ref, a_ref, y_ref, dfinal_ref, cot_ref, ds0_ref, p_s, ek_s, y_s, a_s, x_b, w_s, x_f,
             bar, x_bar):
        b, h, vb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
        vs = pl.ds(vb * bv, bv)

        def issue(n, slot):
            plgpu.copy_gmem_to_smem(p_ref.at[b, h, n], p_s.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(ek_ref.at[b, h, n], ek_s.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(y_ref.at[b, h, n, :, vs], y_s.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(a_ref.at[b, h, n], a_s.at[slot], bar.at[slot])

        plgpu.copy_gmem_to_smem(dfinal_ref.at[b, h, :, vs], x_f, x_bar)
        issue(N - 1, 0)
        plgpu.barrier_wait(x_bar)
        x0 = plgpu.load(x_f, layout=mc.WGMMA)

        def step(i, xs):
            n = N - 1 - i
            slot = lax.rem(i, 2)
            plgpu.barrier_wait(bar.at[slot])

            @pl.when(n > 0)
            def _prefetch():
                plgpu.commit_smem()
                issue(n - 1, 1 - slot)

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous cot_end has left x_f / x_b
            if not low:
                x_f[...] = xs
            x_b[...] = xs.astype(dt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(x_b if low else x_f, cot_ref.at[b, h, n, :, vs])

            def meanwhile():  # while ek X computes: Y + a X
                a_x = mc.rows_of(plgpu.load(a_s.at[slot], layout=mc.ROWS), (K, bv)) * xs
                return plgpu.load(y_s.at[slot], layout=mc.WGMMA) + a_x

            ekx, init = overlapped(ek_s.at[slot], x_b, (C, bv), meanwhile)
            w_s[...] = (-ekx).astype(dt)
            plgpu.commit_smem()
            return accumulate(init, [(p_s.at[slot].T, w_s)], (K, bv))

        xs = lax.fori_loop(0, N, step, x0)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        x_f[...] = xs
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(x_f, ds0_ref.at[b, h, :, vs])
        plgpu.wait_smem_to_gmem(0)

    operand = lambda shape: operand_smem(shape, dt, bv)
    scratch = dict(
        p_s=operand((2, C, K)), ek_s=operand((2, C, K)), y_s=plgpu.SMEM((2, K, bv), f32),
        a_s=plgpu.SMEM((2, K), f32), x_b=operand((K, bv)), w_s=operand((C, bv)),
        x_f=plgpu.SMEM((K, bv), f32), bar=plgpu.Barrier(num_arrivals=4, num_barriers=2),
        x_bar=plgpu.Barrier(num_arrivals=1))
    out_type = (jax.ShapeDtypeStruct((B, H, N, K, V), cdt), jax.ShapeDtypeStruct((B, H, K, V), f32))
    return mc.kernel(body, name="prism_mosaic_reverse", out_type=out_type, scratch=scratch,
                     grid=(B, H, V // bv), grid_names=("b", "h", "v"), interpret=interpret)(
        p, ek, a_rows, y, dfinal)


def _register_pass(p, ek, a_rows, y, dfinal, *, cot_dtype, interpret):
    """The reverse pass at block_v = 64 with X held transposed in registers (module docstring):

        W^T = -(X^T ek^T)  [bv, C]    (A = X^T from registers, B = ek^T: transposed view of ek's tile)
        X^T <- Y^T + a X^T + W^T P  [bv, K]   (A = W^T from registers, B = P's tile as it is)
    """
    B, H, N, _, K = p.shape
    V = y.shape[-1]
    dt = p.dtype
    bv = 64

    def body(p_ref, ek_ref, a_ref, y_ref, dfinal_ref, cot_ref, ds0_ref, p_s, ek_s, y_s, a_s, bar, w_b=None, **walk):
        b, h, vb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
        vs = pl.ds(vb * bv, bv)

        def issue(n, slot):
            plgpu.copy_gmem_to_smem(p_ref.at[b, h, n], p_s.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(ek_ref.at[b, h, n], ek_s.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(y_ref.at[b, h, n, :, vs], y_s.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(a_ref.at[b, h, n], a_s.at[slot], bar.at[slot])

        def chunk(slot, xt, xt_lo, acc_w, acc_x, send):
            plgpu.wgmma(acc_w, xt_lo, ek_s.at[slot].T)  # (ek X)^T: the dependent product, first
            send()  # while it computes: chunk n - 1's loads, cot_end[n] out; and Y^T + a X^T
            init = (plgpu.load(y_s.at[slot].T, layout=mc.WGMMA).astype(f32)
                    + mc.cols_of(plgpu.load(a_s.at[slot], layout=mc.COLS), (bv, K)) * xt)
            ekx = lax.optimization_barrier(plgpu.wgmma_accumulator_load(acc_w, wait_n=0))
            plgpu.wgmma(acc_x, a_operand(ekx.astype(dt), w_b, interpret), p_s.at[slot])  # -(W^T P)
            return init - lax.optimization_barrier(plgpu.wgmma_accumulator_load(acc_x, wait_n=0))

        _walk(N, issue, chunk, bar=bar, dfinal_ref=dfinal_ref, cot_ref=cot_ref, ds0_ref=ds0_ref, b=b, h=h, vs=vs,
              dt=dt, interpret=interpret, **walk)

    scratch = dict(
        p_s=mc.smem((2, C, K), dt), ek_s=mc.smem((2, C, K), dt), y_s=mc.smem((2, K, bv), y.dtype),
        a_s=plgpu.SMEM((2, K), f32), bar=plgpu.Barrier(num_arrivals=4, num_barriers=2),
        **_walk_scratch(K, bv, dt, cot_dtype, interpret))
    out_type = (jax.ShapeDtypeStruct((B, H, N, K, V), cot_dtype), jax.ShapeDtypeStruct((B, H, K, V), f32))
    return mc.kernel(body, name="prism_mosaic_reverse_registers", out_type=out_type, scratch=scratch,
                     grid=(B, H, V // bv), grid_names=("b", "h", "v"), interpret=interpret)(
        p, ek, a_rows, y, dfinal)


def _walk_scratch(K, bv, dt, cot_dtype, interpret):
    """The SMEM `_walk` takes (`x_f`, `x_bar`, `x_o`, `xt_b`) and the interpreter's staging of W^T (`w_b`)."""
    low = jnp.dtype(cot_dtype) != f32  # 16-bit cot_end: staged in x_o, x_f keeps dfinal / ds0
    scratch = dict(x_f=mc.smem((1 if low else 2, K, bv), f32), x_bar=plgpu.Barrier(num_arrivals=1))
    if low:
        scratch.update(x_o=mc.smem((2, K, bv), cot_dtype))
    if interpret:  # SMEM copies of the register operands (the interpreter's wgmma reads SMEM only)
        scratch.update(xt_b=mc.smem((bv, K), dt), w_b=mc.smem((bv, C), dt))
    return scratch


def _walk(N, issue, chunk, *, bar, x_f, x_bar, dfinal_ref, cot_ref, ds0_ref, b, h, vs, dt, interpret, x_o=None,
          xt_b=None):
    """The register kernels' walk over the chunks, last first, X^T [bv, K] float32 in registers: dfinal in,
    per chunk `chunk(slot, xt, xt_lo, acc_w, acc_x, send)` -> the next X^T (its tiles waited for; xt_lo:
    X^T as a 16-bit wgmma A operand; acc_w [bv, C], acc_x [bv, K] float32 accumulators; `send()`, to be
    called right after the chunk's first wgmma, issues chunk n - 1's loads and sends cot_end[n] = X out
    through one of two alternating staging tiles), ds0 out. SMEM: `_walk_scratch`."""
    stage = x_o if x_o is not None else x_f
    K = x_f.shape[-2]
    bv = x_f.shape[-1]
    plgpu.copy_gmem_to_smem(dfinal_ref.at[b, h, :, vs], x_f.at[0], x_bar)
    issue(N - 1, 0)
    plgpu.barrier_wait(x_bar)
    xt0 = plgpu.load(x_f.at[0].T, layout=mc.WGMMA)  # X^T [bv, K]

    def step(i, xt):
        n = N - 1 - i
        slot = lax.rem(i, 2)
        plgpu.barrier_wait(bar.at[slot])

        def send():  # while the first product computes: off the chain
            @pl.when(n > 0)
            def _prefetch():
                plgpu.commit_smem()
                issue(n - 1, 1 - slot)

            plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # stage[slot] has left (step i - 2)
            store_transposed(stage.at[slot], xt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(stage.at[slot], cot_ref.at[b, h, n, :, vs])

        xt_lo = a_operand(xt.astype(dt), xt_b, interpret)
        return pl.run_scoped(lambda acc_w, acc_x: chunk(slot, xt, xt_lo, acc_w, acc_x, send),
                             plgpu.ACC((bv, C), f32), plgpu.ACC((bv, K), f32))

    xt = lax.fori_loop(0, N, step, xt0)
    send_last_state(x_f.at[0], xt, ds0_ref.at[b, h, :, vs])


def reverse_from_factors(x, tv: mc.TokenVectors, p, qf, do, dfinal, *, cot_dtype=None, interpret=False):
    """The reverse pass without the pull-back kernel: (cot_end [B, H, N, K, V] float32 or `cot_dtype`,
    ds0 [B, H, K, V] float32) as `reverse_pass(*state_pullback(...), dfinal)`, from what the forward
    with fused outputs keeps (`pipeline.Residuals`).

    x: the padded inputs (k0 = x.k[..., 0, :], the erase key: the writes do not depend on the state); tv: `token_vectors(x)`; p [B, Tp, H, K] the
    intra kernel's P, qf [B, Tp, H, K] the output factor Qf (`output_factors`, scale folded in), do
    [B, Tp, H, V], all 16-bit in the caller's layout; dfinal [B, H, K, V] float32.
    The pull-back's per-chunk terms are formed in the pass: Y = Qf^T do (o = Qf S + Of, so Qf^T do is
    o's cotangent pulled back to the chunk's start state), one wgmma per chunk that does not depend on
    X and goes into X's accumulator; ek = diag(end_m1) k0 scales the columns of (k0 X)^T in registers.
    Per chunk, X^T [bv, K] in float32 registers (block_v = 64):

        W^T = -(X^T k0^T) diag(end_m1)        A = bf16(X^T) registers, B = k0^T (k0's tile, transposed)
        X^T <- a X^T + do^T Qf + W^T P        A = do^T (do's tile, transposed) / bf16(W^T) registers

    Nothing per chunk goes through HBM but the inputs' tiles (no P, ek, Y written and read again).
    """
    B, Tp, H, K = x.q.shape
    V = x.v.shape[-1]
    N = Tp // C
    dt = x.k.dtype
    bv = 64
    check_inputs("reverse_from_factors", dtype=dt, chunk=C, K=K, V=V, block_v=bv)
    for name, t, shape, dtype in (("p", p, (B, Tp, H, K), dt), ("qf", qf, (B, Tp, H, K), dt),
                                  ("do", do, (B, Tp, H, V), dt), ("dfinal", dfinal, (B, H, K, V), f32)):
        if t.shape != shape or t.dtype != dtype:
            raise ValueError(f"reverse_from_factors: `{name}` must be {shape} {jnp.dtype(dtype)} "
                             f"(got {t.shape} {t.dtype})")
    cdt = out_dtype("reverse_from_factors", "cot_dtype", cot_dtype, dt)
    a_rows = jnp.broadcast_to(tv.all[..., None], (B, H, N, K))

    def body(p_ref, k_ref, qf_ref, do_ref, end_ref, a_ref, dfinal_ref, cot_ref, ds0_ref, p_s, k_s, qf_s, do_s,
             end_s, a_s, bar, w_b=None, **walk):
        b, h, vb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
        vs = pl.ds(vb * bv, bv)

        def issue(n, slot):
            rows = pl.ds(n * C, C)
            copy = lambda src, dst: plgpu.copy_gmem_to_smem(src, dst, bar.at[slot])
            copy(p_ref.at[b, rows, h], p_s.at[slot])
            copy(k_ref.at[b, rows, h, 0], k_s.at[slot])
            copy(qf_ref.at[b, rows, h], qf_s.at[slot])
            copy(do_ref.at[b, rows, h, vs], do_s.at[slot])
            copy(end_ref.at[b, h, rows], end_s.at[slot])
            copy(a_ref.at[b, h, n], a_s.at[slot])

        def chunk(slot, xt, xt_lo, acc_w, acc_x, send):
            plgpu.wgmma(acc_w, xt_lo, k_s.at[slot].T)  # (k0 X)^T: the dependent product, first
            plgpu.wgmma(acc_x, do_s.at[slot].T, qf_s.at[slot])  # Y^T = do^T Qf: off the chain
            send()
            decayed = mc.cols_of(plgpu.load(a_s.at[slot], layout=mc.COLS), (bv, K)) * xt
            neg_end = -mc.cols_of(plgpu.load(end_s.at[slot], layout=mc.COLS), (bv, C))
            kx = lax.optimization_barrier(plgpu.wgmma_accumulator_load(acc_w, wait_n=1))
            plgpu.wgmma(acc_x, a_operand((kx * neg_end).astype(dt), w_b, interpret), p_s.at[slot])  # W^T P
            return decayed + lax.optimization_barrier(plgpu.wgmma_accumulator_load(acc_x, wait_n=0))

        _walk(N, issue, chunk, bar=bar, dfinal_ref=dfinal_ref, cot_ref=cot_ref, ds0_ref=ds0_ref, b=b, h=h, vs=vs,
              dt=dt, interpret=interpret, **walk)

    scratch = dict(
        p_s=mc.smem((2, C, K), dt), k_s=mc.smem((2, C, K), dt), qf_s=mc.smem((2, C, K), dt),
        do_s=mc.smem((2, C, bv), dt), end_s=plgpu.SMEM((2, C), f32), a_s=plgpu.SMEM((2, K), f32),
        bar=plgpu.Barrier(num_arrivals=6, num_barriers=2), **_walk_scratch(K, bv, dt, cdt, interpret))
    out_type = (jax.ShapeDtypeStruct((B, H, N, K, V), cdt), jax.ShapeDtypeStruct((B, H, K, V), f32))
    return mc.kernel(body, name="prism_mosaic_reverse_factors", out_type=out_type, scratch=scratch,
                     grid=(B, H, V // bv), grid_names=("b", "h", "v"), interpret=interpret)(
        p, x.k, qf, do, tv.end_m1, a_rows, dfinal)
