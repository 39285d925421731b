"""Mosaic GPU reverse state-gradient pass of the backward (Hopper: TMA, wgmma).

Drop-in for `pallas_kernels.gpu.state_bwd.reverse_pass` at chunk 64 with 16-bit p and ek. For
chunks n = N-1 .. 0, with X [K, bv] the cotangent of chunk n's end state (X = dfinal for the last):

    cot_end[n] = X;    W = -(ek_n X)  [C, bv]  (wgmma: M = C = 64, contraction K)
                       X <- Y_n + a_n X + P_n^T W  [K, bv]  (wgmma: M = K, contraction C, P_n^T a
                                                             transposed SMEM view)

One CTA (one warpgroup) per (b, h, value block) walks the chunks backwards; grid (B, H, V / bv).
- X stays in float32 registers; each step stages it once as a 16-bit SMEM operand (B of ek X), and
  W = -(ek X) goes from its accumulator to a 16-bit SMEM operand (B of P^T W), the sign folded in.
- Y_n + a_n X is formed while ek X computes (`state.overlapped`).
- a_n comes broadcast from XLA to a [K] row per chunk (a vector in the accumulator's row layout).
- Pipelined: chunk n-1's tiles (P, ek 16-bit; Y float32; the a row) are fetched by TMA into the
  other of two SMEM slots while chunk n computes; cot_end[n] leaves by TMA from a float32 SMEM tile
  while the chunk computes.

Expected cost (H200, bf16, K = V = 128, bv = 64): per step two dependent small wgmmas (~1 MFLOP
each) plus two register -> SMEM round trips: latency-bound like the forward state pass; traffic per
step 32 KiB of P / ek (16-bit), 32 KiB of Y in and 32 KiB of cot_end out (float32), prefetched /
overlapped. B * H * V / bv CTAs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.gpu.mosaic import common as mc
from pallas_kernels.gpu.mosaic.state import accumulate, check_inputs, operand_smem, overlapped

f32 = jnp.float32
C = mc.CHUNK


def reverse_pass(p, ek, a, y, dfinal, *, block_v=64, interpret=False):
    """(cot_end [B, H, N, K, V] float32, ds0 [B, H, K, V] float32).

    p, ek [B, H, N, C, K] 16-bit (bf16 / f16, the same); a [B, H, N] float32; y [B, H, N, K, V]
    float32; dfinal [B, H, K, V] float32. Grid (B, H, V / block_v), sequential over the N chunks
    (last first) in each CTA. block_v: value columns per CTA, 32 or 64 (32: twice the CTAs).
    """
    B, H, N, Cp, K = p.shape
    V = y.shape[-1]
    check_inputs("reverse_pass", dtype=p.dtype, chunk=Cp, K=K, V=V, block_v=block_v)
    for name, t, shape, dtype in (("ek", ek, p.shape, p.dtype), ("a", a, (B, H, N), f32),
                                  ("y", y, (B, H, N, K, V), f32), ("dfinal", dfinal, (B, H, K, V), f32)):
        if t.shape != shape or t.dtype != dtype:
            raise ValueError(f"reverse_pass: `{name}` must be {shape} {jnp.dtype(dtype)} "
                             f"(got {t.shape} {t.dtype})")
    dt = p.dtype
    bv = block_v
    a_rows = jnp.broadcast_to(a[..., None], (B, H, N, K))

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

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous cot_end has left x_f
            x_f[...] = xs
            x_b[...] = xs.astype(dt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(x_f, cot_ref.at[b, h, n, :, vs])

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
    out_type = (jax.ShapeDtypeStruct((B, H, N, K, V), f32), jax.ShapeDtypeStruct((B, H, K, V), f32))
    return mc.kernel(body, name="prism_mosaic_reverse", out_type=out_type, scratch=scratch,
                     grid=(B, H, V // bv), grid_names=("b", "h", "v"), interpret=interpret)(
        p, ek, a_rows, y, dfinal)
