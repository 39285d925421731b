"""First step of the backward (each chunk's state map and output cotangent pulled back to its start
state) on Mosaic GPU: a drop-in for `gpu.pullback.state_pullback` at chunk 64 with the saved inverse.

Grid (B, N / chunks_per_cta, H, V / block_v): one CTA (one warpgroup) walks `chunks_per_cta`
consecutive chunks of one (batch, head) and block of Y's value columns (every value block forms P
and ek; the first writes them). Per chunk (prism-math.md section 3; reference
`pallas_kernels.backward._state_pullback`):

    P  = Ainv diag(beta0 start_m1) k0                          [C, K]
    ek = diag(end_m1) k0                                       [C, K]
    Y  = scale ((diag(start) q)^T do - P^T ((q k0^T . T_m1)^T do))   [K, V]

Pipelining. q, k0 [C, K], do [C, bv] (the caller's layout) and the per-token vectors (from
`token_vectors`, one SMEM buffer per register layout) come by TMA into one of two SMEM slots: while
chunk j computes, chunk j + 1's tiles load into the other slot. Ainv [C, C] float32 (the forward's
save) has one SMEM buffer outside the slots: it is converted to a 16-bit wgmma operand as the chunk
starts, and the next chunk's Ainv loads into the float32 buffer right after (its own barrier). The
stores (P, ek in the input dtype, Y float32) are left in flight; a buffer is rewritten only after
its store has read it (`wait_smem_to_gmem(0, wait_read_only=True)`, by then long done).

Products: P is formed as (Ainv diag(beta0 start_m1)) k0 (the gate scales Ainv's columns as it is
converted to 16 bits), so P and q k0^T read the loaded k0 tile and are issued back to back while
the decay matrix T_m1 forms in registers; Z = (q k0^T . T_m1)^T do and (diag(start) q)^T do are
issued together, then P^T Z chains into the same Y accumulator: three waits per chunk.
SMEM reuse within a chunk: the slot's k0 buffer takes ek (stored from there), the 16-bit Ainv
buffer takes the decay product, the slot's q buffer diag(start) q and its do buffer Z once the
products reading them are done. So a chunk needs beyond its slot only Ainv float32 and 16-bit
[C, C], P [C, K] and Y [K, bv] float32.

SMEM (`smem_bytes`) at K = V = 128 with all columns per CTA (the default where it fits): two slots
~100 KiB + ~104 KiB shared = ~204 KiB, one CTA per SM; at K = V = 64 ~90 KiB.

Cost per (chunk, head) at K = V = 128: wgmma [C,C]x[C,K], [C,K]x[K,C], [K,C]x[C,V], [C,C]^T x[C,V],
[K,C]x[C,V] (~7 MFLOP: ~60 GFLOP at B*T = 32K, H = 16, ~0.1 ms of tensor-core time); bytes in
3 x 16 KiB (q, k0, do) + 16 KiB (Ainv f32), out 2 x 16 KiB (P, ek) + 64 KiB (Y f32): ~176 KiB,
1.4 GB at B*T = 32K, H = 16, ~0.3 ms at 4.8 TB/s; bandwidth-bound once loads overlap compute (the
float32 Y write dominates). Phase 1 (one chunk per CTA, nothing overlapped) measured 0.83 ms at
L = 1. `chunks_per_cta` (default: the most chunks that still leave >= 2 x 132 CTAs) is the knob to
sweep on the device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.common import Prepared
from pallas_kernels.gpu.mosaic import common as mc
from pallas_kernels.gpu.mosaic.outputs import default_chunks_per_cta
from pallas_kernels.gpu.mosaic.state import out_dtype

C = mc.CHUNK
f32 = jnp.float32
SIZES = (64, 128)  # supported K and V
SMEM_LIMIT = 220 * 1024  # bytes of SMEM a CTA may use (an H200 gives 227 KiB; some slack)


def smem_bytes(K, bv, slots=2, itemsize=2):
    """SMEM one CTA uses: per slot 16-bit q, k0 [C, K], do [C, bv] and 7 vector rows of C; once:
    Ainv float32 and 16-bit [C, C], P 16-bit [C, K], Y [K, bv] counted as float32 (a 16-bit
    `y_dtype` takes half: the plan that fits with float32 fits with it)."""
    slot = (2 * C * K + C * bv) * itemsize + 7 * C * 4
    return slots * slot + C * C * (4 + itemsize) + C * K * itemsize + K * bv * 4


def default_block_v(K, V):
    """The first of (V columns, two slots), (64, two slots), (V, one slot) that fits, else 64."""
    for bv, slots in ((V, 2), (64, 2), (V, 1)):
        if smem_bytes(K, bv, slots) <= SMEM_LIMIT:
            return bv
    return 64


def _check(x: Prepared, do, ainv, block_v, chunks_per_cta):
    B, Tp, H, K = x.q.shape
    if x.q.dtype not in mc.DTYPES:
        raise ValueError(f"mosaic state_pullback: q has dtype {x.q.dtype}; supported: bfloat16, float16")
    for name, t in (("k", x.k), ("do", do)):
        if t.dtype != x.q.dtype:
            raise ValueError(f"mosaic state_pullback: `{name}` has dtype {t.dtype}, expected q's {x.q.dtype}")
    if Tp % C:
        raise ValueError(f"mosaic state_pullback: padded T = {Tp} must be a multiple of the chunk {C}")
    if do.ndim != 4 or do.shape[:3] != (B, Tp, H):
        raise ValueError(f"mosaic state_pullback: `do` has shape {do.shape}, expected {(B, Tp, H)} + (V,)")
    V = do.shape[-1]
    if K not in SIZES or V not in SIZES:
        raise ValueError(f"mosaic state_pullback: K = {K}, V = {V}; supported sizes {SIZES}")
    if ainv is None or ainv.shape != (B, H, Tp // C, C, C) or ainv.dtype != jnp.float32:
        got = None if ainv is None else (ainv.shape, ainv.dtype)
        raise ValueError(f"mosaic state_pullback: `ainv` is {got}, expected float32 {(B, H, Tp // C, C, C)} "
                         f"(the forward's saved inverses at chunk {C})")
    if block_v not in (64, V):
        raise ValueError(f"mosaic state_pullback: block_v = {block_v}; supported 64 or V = {V}")
    if chunks_per_cta < 1 or (Tp // C) % chunks_per_cta:
        raise ValueError(f"mosaic state_pullback: chunks_per_cta = {chunks_per_cta} must be >= 1 and divide "
                         f"the number of chunks N = {Tp // C}")


def _body(q_ref, k_ref, do_ref, ainv_ref, fr_ref, fc_ref, ir_ref, ic_ref, p_ref, ek_ref, y_ref,
          q_s, k_s, do_s, ai32_s, x16_s, p_s, y_s, fr_s, fc_s, ir_s, ic_s, bar, ai_bar, *,
          scale, bv, cpc, slots):
    b, nb, h, vb = (lax.axis_index(a) for a in ("b", "n", "h", "v"))
    cols = pl.ds(vb * bv, bv)
    first = vb == 0  # P and ek are formed by every value block, written by the first
    dt = q_s.dtype
    chunk_of = lambda j: nb * cpc + j

    def issue(j, slot):  # the TMA loads of this CTA's chunk j into `slot`
        rows = pl.ds(chunk_of(j) * C, C)
        copy = lambda src, dst: plgpu.copy_gmem_to_smem(src, dst, bar.at[slot])
        copy(q_ref.at[b, rows, h], q_s.at[slot])
        copy(k_ref.at[b, rows, h, 0], k_s.at[slot])
        copy(do_ref.at[b, rows, h, cols], do_s.at[slot])
        # rows: start, end_m1, G; cols: Gm1, beta0 * start_m1; int rows: r; int cols: rm1
        for i in range(3):
            copy(fr_ref.at[i, b, h, rows], fr_s.at[slot * 3 + i])
        for i in range(2):
            copy(fc_ref.at[i, b, h, rows], fc_s.at[slot * 2 + i])
        copy(ir_ref.at[0, b, rows], ir_s.at[slot])
        copy(ic_ref.at[0, b, rows], ic_s.at[slot])

    def issue_ainv(j):
        plgpu.copy_gmem_to_smem(ainv_ref.at[b, h, chunk_of(j)], ai32_s, ai_bar)

    def chunk(j, slot):
        n = chunk_of(j)
        q, k, do = q_s.at[slot], k_s.at[slot], do_s.at[slot]
        row = lambda i: plgpu.load(fr_s.at[slot * 3 + i], layout=mc.ROWS)
        col = lambda i: plgpu.load(fc_s.at[slot * 2 + i], layout=mc.COLS)
        K = k.shape[-1]
        sq = (C, C)
        plgpu.barrier_wait(ai_bar)
        # Ainv diag(beta0 start_m1) as the A operand of P = Ainv diag(beta0 start_m1) k0
        x16_s[...] = (plgpu.load(ai32_s, layout=mc.WGMMA) * mc.cols_of(col(1), sq)).astype(dt)
        plgpu.commit_smem()

        @pl.when(j + 1 < cpc)
        def _prefetch_ainv():  # Ainv's float32 buffer has been read: the next one loads meanwhile
            issue_ainv(j + 1)

        def meanwhile():  # while q k0^T and P compute
            return mc.decay_matrix(row(2), plgpu.load(ir_s.at[slot], layout=mc.ROWS), col(0),
                                   plgpu.load(ic_s.at[slot], layout=mc.COLS), sq, strict=False)

        (qk, p), t_m1 = mc.products([(q, k.T, sq), (x16_s, k, (C, K))], meanwhile)
        k[...] = (mc.rows_of(row(1), (C, K)) * plgpu.load(k, layout=mc.WGMMA).astype(f32)).astype(dt)  # ek
        x16_s[...] = (qk * t_m1).astype(dt)  # the decay product over Ainv (read by the P product)
        q[...] = (mc.rows_of(row(0), (C, K)) * plgpu.load(q, layout=mc.WGMMA).astype(f32)).astype(dt)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's P and Y have left SMEM
        p_s[...] = p.astype(dt)
        plgpu.commit_smem()

        @pl.when(first)
        def _store_p_ek():
            plgpu.copy_smem_to_gmem(k, ek_ref.at[b, h, n])
            plgpu.copy_smem_to_gmem(p_s, p_ref.at[b, h, n])

        def y_products(acc_y, acc_z):  # Y = (diag(start) q)^T do + P^T Z in one accumulator
            plgpu.wgmma(acc_z, x16_s.T, do)
            plgpu.wgmma(acc_y, q.T, do)
            z = acc_z[...]  # waits for both products: do is free
            do[...] = (-z).astype(dt)
            plgpu.commit_smem()
            plgpu.wgmma(acc_y, p_s.T, do)
            return acc_y[...]

        y = lax.optimization_barrier(pl.run_scoped(y_products, plgpu.ACC((K, bv), f32), plgpu.ACC((C, bv), f32)))
        y_s[...] = (scale * y).astype(y_s.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_s, y_ref.at[b, h, n, :, cols])  # left in flight

    def refill(j, slot):  # the slot's last readers are done; its ek store (older than the last
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # store, Y's) must have read it too
        plgpu.commit_smem()
        issue(j, slot)

    issue_ainv(0)
    issue(0, 0)

    mc.walk_chunks(cpc, slots, bar, chunk, refill)

    plgpu.wait_smem_to_gmem(0)


def state_pullback(x: Prepared, tv: mc.TokenVectors, do, *, scale, ainv, block_v=None, chunks_per_cta=None,
                   slots=None, y_dtype=None, interpret=False):
    """x: the padded inputs (q [B, Tp, H, K], k [B, Tp, H, L, K] in bf16 / f16); tv =
    `token_vectors(x)`; do [B, Tp, H, V] (q's dtype); ainv [B, H, N, C, C] float32 the chunks'
    (I + m)^{-1} saved by the forward (required). K, V in (64, 128).
    block_v: value columns of Y per CTA, 64 or V (default `default_block_v`: all columns where two
    slots fit); every value block forms P and ek, the first writes them.
    chunks_per_cta: consecutive chunks one CTA walks, a divisor of N (default
    `outputs.default_chunks_per_cta`: >= 2 x 132 CTAs). slots: 1 or 2 SMEM slots for the chunk
    tiles (default 2 when chunks_per_cta > 1 and they fit). y_dtype: None / float32, or q's 16-bit
    dtype: Y (a float32 accumulator) is rounded once on its way out, half the bytes written here and
    read by the reverse pass (`reverse.reverse_pass` takes either; the pipeline asks for 16 bits when
    the reverse pass is Mosaic).
    Returns p, ek [B, H, N, C, K] in q's dtype, a [B, H, N] float32, y [B, H, N, K, V] float32 or
    `y_dtype`.
    Grid (B, N / chunks_per_cta, H, V / block_v)."""
    B, Tp, H, K = x.q.shape
    V = do.shape[-1]
    N = Tp // C
    block_v = default_block_v(K, V) if block_v is None else block_v
    if chunks_per_cta is None and not Tp % C and V in SIZES and block_v in (64, V):
        chunks_per_cta = default_chunks_per_cta(B, N, H, V // block_v)
    chunks_per_cta = 1 if chunks_per_cta is None else chunks_per_cta
    _check(x, do, ainv, block_v, chunks_per_cta)
    if slots is None:
        slots = 2 if chunks_per_cta > 1 and smem_bytes(K, block_v, 2) <= SMEM_LIMIT else 1
    if slots not in (1, 2) or smem_bytes(K, block_v, slots) > SMEM_LIMIT:
        raise ValueError(f"mosaic state_pullback: slots = {slots} must be 1 or 2 and fit in {SMEM_LIMIT} bytes "
                         f"of SMEM (it needs {smem_bytes(K, block_v, slots)} at K = {K}, block_v = {block_v})")
    dt = x.q.dtype
    ydt = out_dtype("state_pullback", "y_dtype", y_dtype, dt)
    bv = block_v
    fr = jnp.stack([tv.start, tv.end_m1, tv.G])
    fc = jnp.stack([tv.Gm1, tv.beta[:, :, 0] * tv.start_m1])
    ir, ic = tv.r[None], tv.rm1[None]
    scratch = dict(
        q_s=mc.smem((slots, C, K), dt), k_s=mc.smem((slots, C, K), dt), do_s=mc.smem((slots, C, bv), dt),
        ai32_s=mc.smem((C, C), f32), x16_s=mc.smem((C, C), dt), p_s=mc.smem((C, K), dt),
        y_s=mc.smem((K, bv), ydt),
        fr_s=plgpu.SMEM((slots * 3, C), f32), fc_s=plgpu.SMEM((slots * 2, C), f32),
        ir_s=plgpu.SMEM((slots, C), jnp.int32), ic_s=plgpu.SMEM((slots, C), jnp.int32),
        bar=plgpu.Barrier(num_arrivals=3 + 3 + 2 + 2, num_barriers=slots), ai_bar=plgpu.Barrier(num_arrivals=1))
    out_type = (jax.ShapeDtypeStruct((B, H, N, C, K), dt), jax.ShapeDtypeStruct((B, H, N, C, K), dt),
                jax.ShapeDtypeStruct((B, H, N, K, V), ydt))
    body = functools.partial(_body, scale=scale, bv=bv, cpc=chunks_per_cta, slots=slots)
    p, ek, y = mc.kernel(body, name="prism_mosaic_state_pullback",
                         out_type=out_type, scratch=scratch, grid=(B, N // chunks_per_cta, H, V // bv),
                         grid_names=("b", "n", "h", "v"), interpret=interpret)(
        x.q, x.k, do, ainv, fr, fc, ir, ic)
    return p, ek, tv.all, y
