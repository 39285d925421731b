"""Shared pieces of the Mosaic GPU (Hopper: TMA, wgmma, warpgroups) PRISM kernels.

The Mosaic kernels work on 64-token chunks (one wgmma row tile per warpgroup) and 16-bit inputs.
Everything that is a per-token vector is formed once in XLA (`token_vectors`): within-chunk decay
cumsums, the chunk-level decay factors of prism-math.md section 3 and beta, all head-major
([B, H, Tp] float32) so that one chunk's values are one contiguous TMA copy. Only the C x C decay
matrices (exp of masked differences) are formed in the kernels (`decay_matrix`).

Matrix tiles are read from the caller's layout (q [B, Tp, H, K], k [B, Tp, H, L, K], ...) by TMA:
`ref.at[b, rows, h]` is a [C, K] tile with a strided leading axis.

Two rules learnt the hard way (jax 0.11.2):
- layout inference gives each SMEM buffer one register layout: a vector needed both as ROWS and as
  COLS is copied into two SMEM buffers (or two rows of one [2, C] buffer) and each loaded with one
  layout; otherwise lowering fails ("Failed to infer a possible set of layouts") after minutes;
- the CPU interpreter (`plgpu.InterpretGPUParams`) takes wgmma operands from SMEM only: a register
  operand (a C x C product formed in registers) is stored to an SMEM buffer first
  (`buf[...] = value; plgpu.commit_smem()`), which the GPU needs for the B operand anyway;
  nor can it continue an accumulator (`matmul(..., init=...)`: "wgmma not found for platform cpu"):
  kernels that chain products into one accumulator on the GPU add them in registers when interpreted;
- wgmma takes one swizzle for both operands: with N = 32 columns (64-byte rows of a 16-bit B tile)
  the A tile needs the 64-byte swizzle too, not the 128-byte one `smem` would give it.
Float64 references in GPU tests run on the CPU: float64 GEMMs are not supported on the GPU
("GEMM is not supported by cublasLt").
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.common import Prepared

f32 = jnp.float32
CHUNK = 64
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

WGMMA = plgpu.Layout.WGMMA
ROWS = plgpu.Layout.WGMMA.reduce(1)  # a [C] vector laid out as the rows of a WGMMA tile
COLS = plgpu.Layout.WGMMA.reduce(0)  # ... as its columns


class TokenVectors(NamedTuple):
    """Per-token float32 vectors of the chunk algorithm, head-major; Tp = N * CHUNK.

    G, Gm1 [B, H, Tp]: within-chunk inclusive cumsum of g and G - g (the decay exponents);
    r, rm1 [B, Tp] int32: reset counts up to / before each token (as `Prepared`);
    start_m1, start, end_m1, end [B, H, Tp]: exp(G_{t-1}), exp(G_t), exp(G_C - G_{t-1}),
    exp(G_C - G_t), each zeroed where a reset separates t from the chunk's start / end;
    all [B, H, N]: exp(G_C) (zero if the chunk holds a reset); beta [B, H, L, Tp].
    """

    G: jax.Array
    Gm1: jax.Array
    r: jax.Array
    rm1: jax.Array
    start_m1: jax.Array
    start: jax.Array
    end_m1: jax.Array
    end: jax.Array
    all: jax.Array
    beta: jax.Array


def token_vectors(x: Prepared, chunk: int = CHUNK) -> TokenVectors:
    """The per-token vectors of `x` (padded to whole chunks) as the Mosaic kernels read them."""
    B, Tp, H = x.g.shape
    N = Tp // chunk
    g = jnp.moveaxis(x.g.astype(f32), 2, 1).reshape(B, H, N, chunk)
    G = jnp.cumsum(g, axis=-1)
    Gm1 = G - g
    GC = G[..., -1:]
    r = x.r.reshape(B, 1, N, chunk)
    rm1 = x.rm1.reshape(B, 1, N, chunk)
    r_prev = rm1[..., :1]  # counts never decrease: the count before the chunk
    rC = r[..., -1:]
    on = lambda mask: mask.astype(f32)
    flat = lambda t: t.reshape(B, H, Tp)
    return TokenVectors(
        G=flat(G), Gm1=flat(Gm1), r=x.r, rm1=x.rm1,
        start_m1=flat(jnp.exp(Gm1) * on(rm1 == r_prev)),
        start=flat(jnp.exp(G) * on(r == r_prev)),
        end_m1=flat(jnp.exp(GC - Gm1) * on(rm1 == rC)),
        end=flat(jnp.exp(GC - G) * on(r == rC)),
        all=(jnp.exp(GC) * on(rC == r_prev))[..., 0],
        beta=jnp.transpose(x.beta.astype(f32), (0, 2, 3, 1)),
    )


def smem(shape, dtype, max_swizzle=128):
    """An SMEM buffer tiled and swizzled for TMA and wgmma operands (minor dim = last dim), with the
    widest swizzle its minor dim allows, at most `max_swizzle` bytes (64 for the operands of a
    kernel whose wgmma B operands are 32 16-bit columns wide: wgmma takes one swizzle for both)."""
    dtype = jnp.dtype(dtype)
    swizzle = min(plgpu.find_swizzle(shape[-1] * dtype.itemsize * 8), max_swizzle)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // dtype.itemsize)),
                                                plgpu.SwizzleTransform(swizzle)))


def kernel(body, *, name, out_type, scratch, grid, grid_names, interpret=False, profile=None, **threads):
    """`plgpu.kernel` with this package's compiler parameters; interpret=True runs it on CPU
    (`plgpu.InterpretGPUParams`). profile: None, or the in-kernel profiler's settings
    ({"profile_space": ..., "profile_dir": ...}; ignored by the interpreter), which time the body's
    `jax.named_scope` regions."""
    return plgpu.kernel(
        body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=grid_names,
        compiler_params=plgpu.CompilerParams(**({} if interpret or not profile else profile)), kernel_name=name,
        interpret=plgpu.InterpretGPUParams() if interpret else False, **threads)


def iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=WGMMA)


def rows_of(vec, shape):
    """`vec[i]` along row i of a `shape` tile (vec in the ROWS layout)."""
    return lax.broadcast_in_dim(vec, shape, [0])


def cols_of(vec, shape):
    """`vec[j]` along column j (vec in the COLS layout)."""
    return lax.broadcast_in_dim(vec, shape, [1])


LOG2E = 1.4426950408889634


def decay_matrix(g_rows, r_rows, g_cols, r_cols, shape, *, strict, row_log2=None):
    """exp(g_rows[i] - g_cols[j]) where j < i (strict) or j <= i and the reset counts agree, else 0;
    times 2**row_log2[i] (a ROWS vector, -inf for a zero factor) where given.

    Formed as exp2 of the masked difference of the vectors in base-2 units, -inf where masked: one select
    and one ex2 per element (exp would multiply every element by log2(e) and select twice), and a row
    factor folded into the exponent costs two adds per thread, not a multiply per element. The exponent
    of a kept entry is <= 0 (decays <= 1, factors <= 1 where folded), so nothing overflows."""
    rows, cols = iota(shape, 0), iota(shape, 1)
    keep = (rows > cols if strict else rows >= cols) & (rows_of(r_rows, shape) == cols_of(r_cols, shape))
    g_rows = g_rows * LOG2E if row_log2 is None else g_rows * LOG2E + row_log2
    return jnp.exp2(jnp.where(keep, rows_of(g_rows, shape) - cols_of(g_cols * LOG2E, shape), -jnp.inf))


def matmul(a, b, shape, init=None):
    """`init + a @ b` [M, N] float32 on the tensor cores; a: SMEM ref (or `.T` of one) or 16-bit
    registers in the WGMMA layout, b: SMEM ref (or `.T`).

    The result passes through an optimization barrier: reading a wgmma accumulator waits on the
    wgmma group without a data dependency LLVM can see, so arithmetic on the result could otherwise
    be scheduled before the wait."""
    if init is None:
        def scoped(acc):
            plgpu.wgmma(acc, a, b)
            return acc[...]

        out = pl.run_scoped(scoped, plgpu.ACC(shape, f32))
    else:
        def body(acc):
            plgpu.wgmma(acc, a, b)

        out = pl.run_state(body)(plgpu.ACC.init(init))
    return lax.optimization_barrier(out)


def walk_chunks(n, slots, bar, chunk, refill):
    """`chunk(j, slot)` for j = 0 .. n - 1 of a CTA's consecutive chunks, their tiles TMA-loaded into
    `slots` (1 or 2) SMEM slots whose load barriers are `bar`: with two slots chunk j + 1's loads
    (`refill(j + 1, other slot)`) are issued before chunk j computes, with one after it. The caller
    issues chunk 0's loads into slot 0 first."""

    @pl.loop(0, n)
    def _walk(j):
        slot = lax.rem(j, 2) if slots == 2 else j * 0  # traced: a static 0 breaks run_state lowering
        plgpu.barrier_wait(bar.at[slot])
        if slots == 2:
            pl.when(j + 1 < n)(lambda: refill(j + 1, 1 - slot))
        chunk(j, slot)
        if slots == 1:
            pl.when(j + 1 < n)(lambda: refill(j + 1, 0))


def products(operands, meanwhile):
    """([a_i @ b_i float32 for (a_i, b_i, shape_i) in operands], meanwhile()): the wgmmas are issued
    back to back, `meanwhile` (register work not touching them) runs while the tensor cores compute,
    then the accumulators are read (one wait; through an optimization barrier as `matmul`)."""
    def scoped(*accs):
        for acc, (a, b, _) in zip(accs, operands):
            plgpu.wgmma(acc, a, b)
        other = meanwhile()
        return tuple(acc[...] for acc in accs), other

    outs, other = pl.run_scoped(scoped, *(plgpu.ACC(shape, f32) for _, _, shape in operands))
    return lax.optimization_barrier(outs), other
