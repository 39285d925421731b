"""Hand-scheduled per-chunk backward as one Pallas (Triton-lowered) kernel (bwd="explicit").

Grid (B*H, N, v_split): a program owns one chunk of one head and V / v_split value columns, which
it walks in steps of block_v. It recomputes the value-independent chunk tiles once (decays,
QK0 = q k0^T . t_m1, QK_l, B_l = k0 k_l^T . m1_0, the saved (I + m)^{-1}), then per value block
runs `grads.block_step` (E, dE, dR, dv_l written at once; the block's share added to the [C, C]
and [C, K] accumulators), then `grads.finish` ([C, C] -> [C, K] products, dbeta, dg). Nothing
[C, C, K] and nothing autodiff-generated: the live set is the tiles and accumulators below.

Why the value blocks are looped inside one program per chunk (v_split = 1, the default) rather
than given a program each (v_split = V / block_v, partial dq / dk / dbeta / dg written per block and
summed by XLA): every program recomputes the value-independent tiles (1 + 2L [C, K] x [K, C]
products before the loop, as many again in `finish`), so splitting V over v_split programs
multiplies that work by v_split. K = V = 128, L = 2, block_v = 32, bf16 operands, per chunk and
head: C = 32 about 17 MFLOP with v_split = 1 (11 of them the four value blocks) and 35 with
v_split = 4; C = 64 about 55 against 127 (L = 3: 23 / 47 and 72 / 170). The price of the loop is registers: what `block_step`
reads stays live across it (`finish` recomputes its own [C, C] tiles from reloaded inputs). With
f32 = 1 register and a bf16 pair = 1 register per thread:

    live across the value loop         C = 32, 8 warps          C = 64, 16 warps
    [C, C] f32: X, QK0, QK_l, B_l,     (4 + 4L) x 1024 / 256    (4 + 4L) x 4096 / 512
      and 2 + 2L accumulators          = 48 regs / thread       = 96 regs / thread
    [C, K] f32 accumulators dq, dk_l   (1 + L) x 16 = 48        (1 + L) x 16 = 48
    q, k_l bf16 operands               (1 + L) x 8 = 24         (1 + L) x 8 = 24
    per block: S, dS' [K, bv] f32 16 / 8 each; ~10 [C, bv] f32 4 each; one [C, K] product at a
      time 16
    total                              ~ 190 of 255             ~ 220 of 255

At C = 64 with 8 warps the same live set is ~ 430 registers per thread (spills), hence 16 warps
there by default; v_split = V / block_v (no accumulators carried across blocks) is the fallback if
16 warps do not compile well. Shared memory holds the dot operands Triton stages through it: at
C = 32 about (1 + L) [C, K] bf16 (8 KiB each) plus [C, C] / [C, bv] tiles (2-4 KiB), ~40 KiB; at
C = 64 about twice that (of 227 KiB on an H200). All three defaults are estimates for the GPU sweep
to settle (block_v, v_split, num_warps; chunk 32 and 64; L = 2 and 3).

Plain-JAX reference beside it: `grads.chunk_grads` vmapped over chunks (backward chunk="explicit-xla").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import call_chunk_backward, matmul_dtype, triton_params
from pallas_kernels.grads import block_step, chunk_tiles, finish, zero_acc

f32 = jnp.float32


def _kernel(*refs, heads, n_writes, chunk, block_v, n_inner, scale, mm_dtype, has_ainv):
    (q_ref, k_ref, v_ref, beta_ref, g_ref, r_ref, rm1_ref, starts_ref, do_ref, cot_ref), refs = refs[:10], refs[10:]
    ainv_ref, refs = (refs[0], refs[1:]) if has_ainv else (None, refs)
    dq_ref, dk_ref, dv_ref, dbeta_ref, dg_ref = refs
    bh, n, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = bh // heads, bh % heads
    ts = pl.ds(n * chunk, chunk)
    L = range(n_writes)
    def tiles(**kw):
        return chunk_tiles(q_ref[b, ts, h, :], [k_ref[b, ts, h, l, :] for l in L],
                           [beta_ref[b, ts, h, l] for l in L], g_ref[b, ts, h], r_ref[b, ts], rm1_ref[b, ts],
                           mm_dtype=mm_dtype, **kw)

    t = tiles(a_inv=None if ainv_ref is None else ainv_ref[b, h, n])

    def body(i, acc):
        vs = pl.ds((sp * n_inner + i) * block_v, block_v)
        dvs, acc = block_step(t, acc, starts_ref[b, h, n, :, vs], do_ref[b, ts, h, vs], cot_ref[b, h, n, :, vs],
                              [v_ref[b, ts, h, l, vs] for l in L], scale=scale, mm_dtype=mm_dtype)
        for l in L:
            dv_ref[b, ts, h, l, vs] = dvs[l].astype(dv_ref.dtype)
        return acc

    acc = zero_acc(chunk, q_ref.shape[-1], n_writes)
    acc = body(0, acc) if n_inner == 1 else jax.lax.fori_loop(0, n_inner, body, acc)
    # `finish` reloads its inputs and recomputes its [C, C] tiles (decay matrices, QK0, QK_l, B_l: a few
    # exp and C x C x K products per chunk) so that the loop carries only what block_step reads.
    dq, dks, dbetas, dg = finish(tiles(with_inverse=False), acc, mm_dtype=mm_dtype)
    dq_ref[sp, b, ts, h, :] = dq
    dg_ref[sp, b, ts, h] = dg
    for l in L:
        dk_ref[sp, b, ts, h, l, :] = dks[l]
        dbeta_ref[sp, b, ts, h, l] = dbetas[l]


def default_blocks(chunk_size, V, block_v=None, v_split=None, num_warps=None, n_writes=2):
    """(block_v, v_split, num_warps) with the defaults filled in. Warps from H200 sweeps (docs/benchmarks.md,
    bf16, K = V = 128, T = 2K, fwd+bwd ms): chunk 32, L = 2: 4 warps 14.1, 8 warps 15.4-15.5; chunk 32,
    L = 3: 4 warps 65.8 (spills), 8 warps 24.5, 16 warps 91.9; chunk 64: 16 warps (L = 2 36.8, L = 3 46.3)."""
    block_v = min(V, 32) if block_v is None else block_v
    v_split = 1 if v_split is None else v_split
    if num_warps is None:
        num_warps = 16 if chunk_size > 32 else (4 if n_writes <= 2 else 8)
    return block_v, v_split, num_warps


def chunk_grads_backward(q, k, v, beta, g, r, rm1, starts, do, cot_end, *, scale, chunk_size, ainv=None,
                         block_v=None, v_split=None, num_warps=None, num_stages=None, interpret=False):
    """Input cotangents of every chunk, all chunks in parallel; shapes as `chunk_bwd.chunk_backward`:

    q [B, Tp, H, K], k [B, Tp, H, L, K], v [B, Tp, H, L, V], beta [B, Tp, H, L] (input dtypes);
    g [B, Tp, H] f32; r, rm1 [B, Tp] int32; starts, cot_end [B, H, N, K, V] f32; do [B, Tp, H, V];
    ainv [B, H, N, C, C] f32 or None (solved again in the kernel).
    block_v: value columns per step; v_split: programs per chunk along V (V / v_split a multiple of
    block_v; partial dq / dk / dbeta / dg summed by XLA when > 1).
    Returns (dq, dk, dbeta, dg) float32 and dv in v's dtype, shaped like the inputs.
    """
    B, Tp, H, K = q.shape
    L, V = v.shape[-2:]
    block_v, v_split, num_warps = default_blocks(chunk_size, V, block_v, v_split, num_warps, n_writes=L)
    if V % (block_v * v_split):
        raise ValueError(f"chunk_grads_backward: `block_v` = {block_v} times `v_split` = {v_split} must "
                         f"divide V = {V}")
    n_inner, N = V // (block_v * v_split), Tp // chunk_size
    kernel = functools.partial(_kernel, heads=H, n_writes=L, chunk=chunk_size, block_v=block_v,
                               n_inner=n_inner, scale=scale, mm_dtype=matmul_dtype(q.dtype),
                               has_ainv=ainv is not None)
    return call_chunk_backward(
        kernel, (q, k, v, beta, g, r, rm1, starts, do, cot_end, *([] if ainv is None else [ainv])),
        name="prism_chunk_grads", grid=(B * H, N, v_split), parts=v_split, q=q, k=k, v=v,
        params=triton_params(interpret, num_warps, num_stages), interpret=interpret)
