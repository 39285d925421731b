"""Forward kernel 3 (the chunk outputs) on Mosaic GPU: a drop-in for `split.outputs` at chunk 64.

Grid (B, N / chunks_per_cta, H, V / block_v): one CTA (one warpgroup) walks `chunks_per_cta`
consecutive chunks of one (batch, head) and block of value columns. Per chunk
(`pallas_kernels.common.chunk_output`, prism-math.md section 3):

    E = P S + Qe                                            [C, bv]
    o = scale * (diag(start) q S - (q k0^T . T_m1) E + sum_l (q k_l^T . T_0 . beta_l^cols) v_l)

Pipelining. The chunk tiles (q, p, k_l [C, K], qe, v_l [C, bv] of the caller's layout) and the
per-token vectors (G, Gm1, start, beta_l, r, rm1 from `token_vectors`, one SMEM buffer per register
layout) come by TMA into one of two SMEM slots: while chunk j computes, chunk j + 1's tiles load
into the other slot. S = starts[b, h, n] [K, bv] float32 has ONE SMEM buffer outside the slots: it
is converted to a 16-bit wgmma operand (`s16`) as soon as the chunk starts, and the next chunk's S
is loaded into the float32 buffer right after (its own barrier), so it is in flight during the rest
of the chunk. The output o is staged in its own buffer and leaves by TMA while the next chunk
computes (the buffer is rewritten a chunk later, after that store has read it), so a slot is
refilled without waiting on any store. With 16-bit starts (`starts` in q's dtype: the state pass
can write them so) S is TMA-loaded straight into the 16-bit operand buffer: no float32 buffer, no
conversion through registers, half of S's bytes; the next chunk's S then loads once the products
reading S have been waited for (after the first group, or after o's chain with `fold_start`).

Products per chunk: P S, q S and q k0^T are issued back to back while T_m1 forms in registers
(one wait); E = P S + Qe is written over the slot's Qe tile (a wgmma B operand); then o's products
chain in one accumulator: -(q k0^T . T_m1) E, issued first, while T_0 forms, then
(q k_l^T . T_0 . beta_l^cols) v_l through two alternating [C, C] 16-bit buffers (the gate folds
into the columns of the product, v_l is read as loaded); diag(start) q S is added at the end.
`fold_start=True` instead stages diag(start) q (16-bit) over P's tile and chains (diag(start) q) S
into o's accumulator: one [C, bv] float32 accumulator (32 registers a thread) less live across
o's chain and one wgmma fewer in the first group. `qk_first=True` issues every q k_l^T in the
first group (at L > 1 the later ones otherwise each wait for o's chain so far: a dependent wait per
write); with fold_start the first group at L = 2 holds as many accumulators as the default one.

SMEM (`smem_bytes`): slots * (q, p, k_l [C, K] + qe, v_l [C, bv] 16-bit + vectors) + S float32
[K, bv] + S 16-bit + two [C, C] + o [C, bv]: at K = V = 128, L = 1 two slots of 64 columns take
~204 KiB (one CTA per SM); at L = 2 two slots do not fit and the kernel uses one slot of 64
columns (~162 KiB: the next chunk's tiles load after this chunk's last read, S still prefetched).
At K = V = 64 two slots of all columns take ~132 KiB at L = 1. 16-bit starts drop the float32 S
buffer (32 KiB at K = 128, bv = 64): two slots then fit at L = 2 too (~220 KiB), and at L = 1 one
slot takes ~106 KiB (`slots=1`: two CTAs per SM, each CTA's loads and waits overlapping the other's
compute; the A/B against two slots in one CTA is for the device).

Cost: per (chunk, head) 2 [C,K]x[K,V] + (L+1) [C,K]x[K,C] + (L+1) [C,C]x[C,V] wgmmas (~6 MFLOP at
K = V = 128, L = 1: ~50 GFLOP at B*T = 32K, H = 16, under 0.1 ms of tensor-core time); bytes per
(chunk, head) q, k_l, p, v_l, qe, o 16-bit (16 KiB each at 128) + S 64 KiB float32: ~160 KiB at
L = 1, 1.3 GB at B*T = 32K, H = 16, ~0.3 ms at 4.8 TB/s: bandwidth-bound once the loads overlap the
compute (q, k, p are read by both column halves, the second read mostly from L2 as the two halves'
CTAs run side by side). Phase 1 (one chunk per CTA, nothing overlapped) measured 1.01 ms at L = 1.
`chunks_per_cta` (default `default_chunks_per_cta`: the most chunks that still leave >= 2 x 132
CTAs) is the knob to sweep on the device. Phase 2 measured ~1.0 ms at L = 2, T = 2K whatever
chunks_per_cta (so latency hiding across chunks is not the limit): the suspects addressed here are
S's float32 read and conversion (16-bit starts) and the register pressure of the extra live
accumulator (fold_start); both are keywords / input dtypes, the float32 path is unchanged.
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

C = mc.CHUNK
f32 = jnp.float32
SIZES = (64, 128)  # supported K and V (wgmma rows / columns, one register tile each)
SMEM_LIMIT = 220 * 1024  # bytes of SMEM a CTA may use (an H200 gives 227 KiB; some slack)
SMS = 132  # H200 streaming multiprocessors
MAX_CHUNKS_PER_CTA = 64


def _check(x: Prepared, p, qe, starts, block_v, chunks_per_cta):
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    if x.q.dtype not in mc.DTYPES:
        raise ValueError(f"mosaic outputs: q has dtype {x.q.dtype}; supported: bfloat16, float16")
    for name, t in (("k", x.k), ("v", x.v), ("p", p), ("qe", qe)):
        if t.dtype != x.q.dtype:
            raise ValueError(f"mosaic outputs: `{name}` has dtype {t.dtype}, expected q's {x.q.dtype}")
    if K not in SIZES or V not in SIZES:
        raise ValueError(f"mosaic outputs: K = {K}, V = {V}; supported sizes {SIZES}")
    if Tp % C:
        raise ValueError(f"mosaic outputs: padded T = {Tp} must be a multiple of the chunk {C}")
    N = Tp // C
    expect = dict(p=(B, Tp, H, K), qe=(B, Tp, H, V), starts=(B, H, N, K, V))
    for name, t in (("p", p), ("qe", qe), ("starts", starts)):
        if t.shape != expect[name]:
            raise ValueError(f"mosaic outputs: `{name}` has shape {t.shape}, expected {expect[name]} "
                             f"(chunk {C})")
    if starts.dtype not in (jnp.dtype(jnp.float32), x.q.dtype):
        raise ValueError(f"mosaic outputs: `starts` has dtype {starts.dtype}, expected float32 or q's "
                         f"{x.q.dtype}")
    if block_v not in (64, V) or V % block_v:
        raise ValueError(f"mosaic outputs: block_v = {block_v}; supported 64 or V = {V}")
    if chunks_per_cta < 1 or N % chunks_per_cta:
        raise ValueError(f"mosaic outputs: chunks_per_cta = {chunks_per_cta} must be >= 1 and divide the "
                         f"number of chunks N = {N}")


def smem_bytes(K, bv, L, slots=2, itemsize=2, starts16=False):
    """SMEM one CTA uses: per slot 16-bit q, p, k_l [C, K], qe, v_l [C, bv] and the vectors (3 + L
    float32, 3 int32 rows of C); once: S 16-bit [K, bv] (and its float32 load buffer unless the
    starts come in 16 bits), two 16-bit [C, C] products, o 16-bit [C, bv]."""
    slot = ((2 + L) * C * K + (1 + L) * C * bv) * itemsize + (6 + L) * C * 4
    s_bytes = K * bv * (itemsize if starts16 else 4 + itemsize)
    return slots * slot + s_bytes + (2 * C * C + C * bv) * itemsize


def default_block_v(K, V, L, starts16=False):
    """The first of (V columns, two slots), (64, two slots), (V, one slot) that fits the SMEM
    limit, else 64."""
    for bv, slots in ((V, 2), (64, 2), (V, 1)):
        if smem_bytes(K, bv, L, slots, starts16=starts16) <= SMEM_LIMIT:
            return bv
    return 64


def default_slots(K, bv, L, chunks_per_cta, starts16=False):
    """2 SMEM slots (the next chunk's tiles load during this chunk) when a CTA walks several
    chunks and they fit, else 1."""
    return 2 if chunks_per_cta > 1 and smem_bytes(K, bv, L, 2, starts16=starts16) <= SMEM_LIMIT else 1


def default_chunks_per_cta(B, N, H, n_vblocks, *, min_ctas=2 * SMS, max_chunks=MAX_CHUNKS_PER_CTA):
    """The largest divisor of N (<= max_chunks) that still leaves >= min_ctas CTAs (1 if none)."""
    best = 1
    for d in range(1, min(N, max_chunks) + 1):
        if N % d == 0 and B * H * n_vblocks * (N // d) >= min_ctas:
            best = d
    return best


def _body(q_ref, k_ref, v_ref, p_ref, qe_ref, s_ref, fr_ref, fc_ref, ir_ref, ic_ref, o_ref,
          q_s, k_s, v_s, p_s, qe_s, s32_s, s16_s, a_s, o_s, fr_s, fc_s, ir_s, ic_s, bar, s_bar, *,
          L, bv, scale, cpc, slots, fold_start, qk_first):
    b, nb, h, vb = (lax.axis_index(a) for a in ("b", "n", "h", "v"))
    cols = pl.ds(vb * bv, bv)
    dt = q_s.dtype
    chunk_of = lambda j: nb * cpc + j

    def issue(j, slot):  # the TMA loads of this CTA's chunk j into `slot`
        rows = pl.ds(chunk_of(j) * C, C)
        copy = lambda src, dst: plgpu.copy_gmem_to_smem(src, dst, bar.at[slot])
        copy(q_ref.at[b, rows, h], q_s.at[slot])
        copy(p_ref.at[b, rows, h], p_s.at[slot])
        copy(qe_ref.at[b, rows, h, cols], qe_s.at[slot])
        for l in range(L):
            copy(k_ref.at[b, rows, h, l], k_s.at[slot * L + l])
            copy(v_ref.at[b, rows, h, l, cols], v_s.at[slot * L + l])
        # rows layout: G, start; cols layout: G, Gm1, beta_l; int rows: r; int cols: r, rm1
        for i in range(2):
            copy(fr_ref.at[i, b, h, rows], fr_s.at[slot * 2 + i])
        for i in range(2 + L):
            copy(fc_ref.at[i, b, h, rows], fc_s.at[slot * (2 + L) + i])
        copy(ir_ref.at[0, b, rows], ir_s.at[slot])
        for i in range(2):
            copy(ic_ref.at[i, b, rows], ic_s.at[slot * 2 + i])

    def issue_s(j):
        plgpu.copy_gmem_to_smem(s_ref.at[b, h, chunk_of(j), :, cols], s16_s if s32_s is None else s32_s, s_bar)

    def chunk(j, slot):
        rows = pl.ds(chunk_of(j) * C, C)
        plgpu.barrier_wait(s_bar)
        prefetch_s = lambda: pl.when(j + 1 < cpc)(lambda: issue_s(j + 1))
        if s32_s is not None:
            s16_s[...] = s32_s[...].astype(dt)
            plgpu.commit_smem()
            prefetch_s()  # S's float32 buffer has been read: the next chunk's S loads meanwhile

        q, p, qe = q_s.at[slot], p_s.at[slot], qe_s.at[slot]
        k_l = lambda l: k_s.at[slot * L + l]
        load = lambda ref, i, layout: plgpu.load(ref.at[i], layout=layout)
        G_r, start_r = load(fr_s, slot * 2, mc.ROWS), load(fr_s, slot * 2 + 1, mc.ROWS)
        fc = lambda i: load(fc_s, slot * (2 + L) + i, mc.COLS)
        r_r = load(ir_s, slot, mc.ROWS)
        r_c, rm1_c = load(ic_s, slot * 2, mc.COLS), load(ic_s, slot * 2 + 1, mc.COLS)
        sq = (C, C)

        def meanwhile():  # while P S, q S and q k0^T compute
            return mc.decay_matrix(G_r, r_r, fc(1), rm1_c, sq, strict=False)

        n_qk = L if qk_first else 1
        first = ([(p, s16_s, (C, bv))] + ([] if fold_start else [(q, s16_s, (C, bv))])
                 + [(q, k_l(l).T, sq) for l in range(n_qk)])
        outs, t_m1 = mc.products(first, meanwhile)
        ps, qs, qks = outs[0], (None if fold_start else outs[1]), outs[len(outs) - n_qk:]
        qk0 = qks[0]
        e = ps + plgpu.load(qe, layout=mc.WGMMA).astype(f32)
        qe[...] = e.astype(dt)  # E over Qe: the B operand of the erase term
        a_s.at[0][...] = (-(qk0 * t_m1)).astype(dt)
        if fold_start:  # diag(start) q over P (read only by P S, done): o's chain takes it with S
            q_rows = plgpu.load(q, layout=mc.WGMMA).astype(f32)
            p[...] = (mc.rows_of(start_r, q_rows.shape) * q_rows).astype(dt)
        plgpu.commit_smem()
        if s32_s is None and not fold_start:
            prefetch_s()  # the 16-bit S was read only by the products just waited for

        def o_products(acc):  # one accumulator: [(diag(start) q) S] - (q k0^T . T_m1) E + sum_l (...) v_l
            if fold_start:
                plgpu.wgmma(acc, p, s16_s)
            plgpu.wgmma(acc, a_s.at[0], qe)
            t_0 = mc.decay_matrix(G_r, r_r, fc(0), r_c, sq, strict=False)  # while the first product runs
            for l in range(L):
                # q k_l^T for l > 0 waits for the products in flight, so the buffer is free again
                qk = qks[l] if l < n_qk else mc.matmul(q, k_l(l).T, sq)
                buf = a_s.at[(1 + l) % 2]
                buf[...] = (qk * t_0 * mc.cols_of(fc(2 + l), sq)).astype(dt)
                plgpu.commit_smem()
                plgpu.wgmma(acc, buf, v_s.at[slot * L + l])
            return acc[...]

        o = lax.optimization_barrier(pl.run_scoped(o_products, plgpu.ACC((C, bv), f32)))
        if fold_start:
            if s32_s is None:
                prefetch_s()  # o's chain (the last reader of the 16-bit S) is done
        else:
            o = o + mc.rows_of(start_r, (C, bv)) * qs
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's o has left o_s
        o_s[...] = (scale * o).astype(dt)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s, o_ref.at[b, rows, h, cols])  # left in flight

    def refill(j, slot):  # the slot's last readers are done (no store reads from a slot)
        plgpu.commit_smem()
        issue(j, slot)

    issue_s(0)
    issue(0, 0)

    mc.walk_chunks(cpc, slots, bar, chunk, refill)

    plgpu.wait_smem_to_gmem(0)


def outputs(x: Prepared, tv: mc.TokenVectors, p, qe, starts, *, scale, block_v=None, chunks_per_cta=None,
            slots=None, fold_start=None, qk_first=None, interpret=False):
    """o [B, Tp, H, V] in v's dtype: `split.outputs` at chunk_size = 64 on Mosaic GPU.

    x: the padded inputs (q [B, Tp, H, K], k [B, Tp, H, L, K], v [B, Tp, H, L, V] in bf16 / f16);
    tv = `token_vectors(x)`; p [B, Tp, H, K], qe [B, Tp, H, V] from the intra kernel (q's dtype);
    starts [B, H, N, K, V] every chunk's start state, float32 or q's 16-bit dtype (16-bit starts are
    TMA-loaded straight into the wgmma operand: half the bytes of S, no conversion, less SMEM).
    K, V in (64, 128).
    block_v: value columns per CTA, 64 or V (default `default_block_v`: all V columns where two
    slots fit, else 64 where they do, else V with one slot; 32 is not supported).
    chunks_per_cta: consecutive chunks one CTA walks, a divisor of N (default
    `default_chunks_per_cta`: >= 2 x 132 CTAs). slots: 1 or 2 SMEM slots for the chunk tiles
    (default 2 when chunks_per_cta > 1 and they fit, `default_slots`).
    qk_first: every q k_l^T in the first group of products (L - 1 dependent waits fewer in o's chain,
    (L - 1) [C, C] float32 accumulators more live until o's chain uses them).
    fold_start: diag(start) q S as one more wgmma in o's accumulator ((diag(start) q) rounded to
    16 bits, staged over P's tile) instead of a separate q S accumulator scaled in registers.
    fold_start / qk_first None: both on with 16-bit starts, off with float32 ones (H200, L = 2,
    T = 2K: 16-bit starts 0.76 ms with both, 1.11 without; float32 starts 1.16 ms without, 1.13
    with both; docs/benchmarks.md, session 4).
    Grid (B, N / chunks_per_cta, H, V / block_v).
    """
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    N = Tp // C
    starts16 = starts.dtype == x.q.dtype
    fold_start = starts16 if fold_start is None else fold_start
    qk_first = starts16 if qk_first is None else qk_first
    block_v = default_block_v(K, V, L, starts16) if block_v is None else block_v
    if chunks_per_cta is None and not Tp % C and V in SIZES and block_v in (64, V):
        chunks_per_cta = default_chunks_per_cta(B, N, H, V // block_v)
    chunks_per_cta = 1 if chunks_per_cta is None else chunks_per_cta
    _check(x, p, qe, starts, block_v, chunks_per_cta)
    slots = default_slots(K, block_v, L, chunks_per_cta, starts16) if slots is None else slots
    need = smem_bytes(K, block_v, L, slots, starts16=starts16)
    if slots not in (1, 2) or need > SMEM_LIMIT:
        raise ValueError(f"mosaic outputs: slots = {slots} must be 1 or 2 and fit in {SMEM_LIMIT} bytes of "
                         f"SMEM (it needs {need} at K = {K}, block_v = {block_v}, L = {L})")
    dt = x.q.dtype
    # One [B, H, Tp] row per (vector, layout): see the module docstring of `common`.
    fr = jnp.stack([tv.G, tv.start])
    fc = jnp.stack([tv.G, tv.Gm1, *(tv.beta[:, :, l] for l in range(L))])
    ir = tv.r[None]
    ic = jnp.stack([tv.r, tv.rm1])
    n_copies = 3 + 2 * L + 2 + (2 + L) + 1 + 2
    bv = block_v
    scratch = dict(
        q_s=mc.smem((slots, C, K), dt), k_s=mc.smem((slots * L, C, K), dt), v_s=mc.smem((slots * L, C, bv), dt),
        p_s=mc.smem((slots, C, K), dt), qe_s=mc.smem((slots, C, bv), dt),
        s16_s=mc.smem((K, bv), dt), a_s=mc.smem((2, C, C), dt), o_s=mc.smem((C, bv), dt),
        fr_s=plgpu.SMEM((slots * 2, C), f32), fc_s=plgpu.SMEM((slots * (2 + L), C), f32),
        ir_s=plgpu.SMEM((slots, C), jnp.int32), ic_s=plgpu.SMEM((slots * 2, C), jnp.int32),
        bar=plgpu.Barrier(num_arrivals=n_copies, num_barriers=slots), s_bar=plgpu.Barrier(num_arrivals=1))
    if starts16:  # S lands in s16_s directly
        body = functools.partial(_body, s32_s=None)
    else:
        scratch["s32_s"] = mc.smem((K, bv), f32)
        body = _body
    body = functools.partial(body, L=L, bv=bv, scale=scale, cpc=chunks_per_cta, slots=slots,
                             fold_start=fold_start, qk_first=qk_first)
    out_type = jax.ShapeDtypeStruct((B, Tp, H, V), x.v.dtype)
    return mc.kernel(body, name="prism_mosaic_outputs", out_type=out_type, scratch=scratch,
                     grid=(B, N // chunks_per_cta, H, V // bv), grid_names=("b", "n", "h", "v"),
                     interpret=interpret)(x.q, x.k, x.v, p, qe, starts, fr, fc, ir, ic)
