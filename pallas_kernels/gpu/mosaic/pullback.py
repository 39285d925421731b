"""First step of the backward (each chunk's state map and output cotangent pulled back to its start
state) on Mosaic GPU: a drop-in for `gpu.pullback.state_pullback` at chunk 64 with the saved inverse.

Grid (B, N, H, V / block_v): one CTA (one warpgroup) per chunk, head and block of Y's value
columns, all independent (every value block forms P and ek; the first writes them). Per chunk
(prism-math.md section 3; reference `pallas_kernels.backward._state_pullback`):

    P  = Ainv diag(beta0 start_m1) k0                          [C, K]
    ek = diag(end_m1) k0                                       [C, K]
    Y  = scale ((diag(start) q)^T do - P^T ((q k0^T . T_m1)^T do))   [K, V]

q, k0, do [C, K | V] come by TMA from the caller's layout, Ainv [C, C] float32 from the forward's
save (re-staged in SMEM as a 16-bit wgmma operand), the per-token vectors from `token_vectors` as
rows of two small SMEM buffers (one row per register layout). The row-scaled k0 and q, the decay
product and Z = (q k0^T . T_m1)^T do are formed in registers and staged in SMEM as 16-bit wgmma
operands; the transposed products read `ref.T` views. P and ek are written in the input dtype (the
reverse pass reads them so); a = exp(G_C) (zeroed across a reset) is `token_vectors`' `all`, no
kernel work.

Cost per (chunk, head) at K = V = 128: wgmma [C,C]x[C,K], [C,K]x[K,C], [K,C]x[C,V], [C,C]^T x[C,V],
[K,C]x[C,V] (~7 MFLOP: ~60 GFLOP at B*T = 32K, H = 16, ~0.1 ms of tensor-core time); bytes in
3 x 16 KiB (q, k0, do) + 16 KiB (Ainv f32), out 2 x 16 KiB (P, ek) + 64 KiB (Y f32): ~176 KiB,
1.4 GB at B*T = 32K, H = 16, ~0.3 ms at 4.8 TB/s; bandwidth-bound, the float32 Y write dominates.
SMEM (`smem_bytes`) ~210 KiB at K = V = 128 with all columns (the default), one CTA per SM; a V
split (block_v=64, ~162 KiB) does not give two per SM and repeats the P product. Nothing is
pipelined inside a CTA, so each CTA's TMA load latency is exposed; the next step if timing shows
it: several chunks per CTA with the next chunk's q, k0, do, Ainv prefetched (needs the SMEM cut,
e.g. Y stored in two column halves through one buffer).
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
SIZES = (64, 128)  # supported K and V


# Bytes of SMEM a CTA may use (an H200 gives 227 KiB). Splitting V buys no occupancy here (one CTA
# per SM either way at K = V = 128) and repeats the P product, so all of V up to ~210 KiB.
SMEM_LIMIT = 216 * 1024


def smem_bytes(K, bv, itemsize=2):
    """SMEM one CTA uses: 16-bit q, k0, w, P, ek [C, K], do, Z [C, bv], Ainv and the decay product
    [C, C]; float32 Ainv [C, C] and Y [K, bv]; the vectors."""
    return (itemsize * (5 * C * K + 2 * C * bv + 2 * C * C) + 4 * (C * C + K * bv) + 7 * C * 4)


def default_block_v(K, V):
    """All V columns in one CTA when that fits the SMEM limit, else 64."""
    return V if smem_bytes(K, V) <= SMEM_LIMIT else 64


def _check(x: Prepared, do, ainv, block_v):
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


def _body(q_ref, k_ref, do_ref, ainv_ref, gf_ref, gi_ref, p_ref, ek_ref, y_ref,
          q_s, k_s, do_s, ai32_s, ai16_s, w_s, p_s, ek_s, a_s, z_s, y_s, vf_s, vi_s, bar, *, scale, bv):
    b, n, h, vb = (lax.axis_index(a) for a in ("b", "n", "h", "v"))
    rows, cols = pl.ds(n * C, C), pl.ds(vb * bv, bv)
    first = vb == 0  # P and ek are formed by every value block, written by the first
    copies = [(q_ref.at[b, rows, h], q_s), (k_ref.at[b, rows, h, 0], k_s),
              (do_ref.at[b, rows, h, cols], do_s),
              (ainv_ref.at[b, h, n], ai32_s)]
    # float vectors: 0 beta0 * start_m1, 1 start, 2 end_m1, 3 G (all rows), 4 Gm1 (cols)
    copies += [(gf_ref.at[i, b, h, rows], vf_s.at[i]) for i in range(5)]
    # int vectors: 0 r (rows), 1 rm1 (cols)
    copies += [(gi_ref.at[i, b, rows], vi_s.at[i]) for i in range(2)]
    for src, dst in copies:
        plgpu.copy_gmem_to_smem(src, dst, bar)
    plgpu.barrier_wait(bar)

    vec = lambda ref, i, layout: plgpu.load(ref.at[i], layout=layout)
    K = k_s.shape[-1]
    k0 = plgpu.load(k_s, layout=mc.WGMMA).astype(jnp.float32)
    ai16_s[...] = ai32_s[...].astype(ai16_s.dtype)
    w_s[...] = (mc.rows_of(vec(vf_s, 0, mc.ROWS), (C, K)) * k0).astype(w_s.dtype)
    ek_s[...] = (mc.rows_of(vec(vf_s, 2, mc.ROWS), (C, K)) * k0).astype(ek_s.dtype)
    plgpu.commit_smem()
    pl.when(first)(lambda: plgpu.copy_smem_to_gmem(ek_s, ek_ref.at[b, h, n]))
    p_s[...] = mc.matmul(ai16_s, w_s, (C, K)).astype(p_s.dtype)
    plgpu.commit_smem()
    pl.when(first)(lambda: plgpu.copy_smem_to_gmem(p_s, p_ref.at[b, h, n]))

    sq = (C, C)
    t_m1 = mc.decay_matrix(vec(vf_s, 3, mc.ROWS), vec(vi_s, 0, mc.ROWS), vec(vf_s, 4, mc.COLS),
                           vec(vi_s, 1, mc.COLS), sq, strict=False)
    a_s[...] = (mc.matmul(q_s, k_s.T, sq) * t_m1).astype(a_s.dtype)
    # w_s is free again (the P product above has been waited for): it holds diag(start) q now.
    q = plgpu.load(q_s, layout=mc.WGMMA).astype(jnp.float32)
    w_s[...] = (mc.rows_of(vec(vf_s, 1, mc.ROWS), (C, K)) * q).astype(w_s.dtype)
    plgpu.commit_smem()
    z_s[...] = (-mc.matmul(a_s.T, do_s, (C, bv))).astype(z_s.dtype)
    plgpu.commit_smem()
    y = mc.matmul(w_s.T, do_s, (K, bv)) + mc.matmul(p_s.T, z_s, (K, bv))
    y_s[...] = scale * y
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(y_s, y_ref.at[b, h, n, :, cols])
    plgpu.wait_smem_to_gmem(0)


def state_pullback(x: Prepared, tv: mc.TokenVectors, do, *, scale, ainv, block_v=None,
                   interpret=False):
    """x: the padded inputs (q [B, Tp, H, K], k [B, Tp, H, L, K] in bf16 / f16); tv =
    `token_vectors(x)`; do [B, Tp, H, V] (q's dtype); ainv [B, H, N, C, C] float32 the chunks'
    (I + m)^{-1} saved by the forward (required). K, V in (64, 128).
    block_v: value columns of Y per CTA, 64 or V (default: V when the CTA's SMEM fits,
    `default_block_v`); every value block forms P and ek, the first writes them.
    Returns p, ek [B, H, N, C, K] in q's dtype, a [B, H, N] float32, y [B, H, N, K, V] float32.
    Grid (B, N, H, V / block_v)."""
    B, Tp, H, K = x.q.shape
    V = do.shape[-1]
    block_v = default_block_v(K, V) if block_v is None else block_v
    _check(x, do, ainv, block_v)
    N = Tp // C
    dt = x.q.dtype
    gf = jnp.stack([tv.beta[:, :, 0] * tv.start_m1, tv.start, tv.end_m1, tv.G, tv.Gm1])
    gi = jnp.stack([tv.r, tv.rm1])
    scratch = dict(
        q_s=mc.smem((C, K), dt), k_s=mc.smem((C, K), dt), do_s=mc.smem((C, block_v), dt),
        ai32_s=mc.smem((C, C), jnp.float32), ai16_s=mc.smem((C, C), dt), w_s=mc.smem((C, K), dt),
        p_s=mc.smem((C, K), dt), ek_s=mc.smem((C, K), dt), a_s=mc.smem((C, C), dt),
        z_s=mc.smem((C, block_v), dt), y_s=mc.smem((K, block_v), jnp.float32),
        vf_s=plgpu.SMEM((5, C), jnp.float32),
        vi_s=plgpu.SMEM((2, C), jnp.int32), bar=plgpu.Barrier(num_arrivals=4 + 5 + 2))
    out_type = (jax.ShapeDtypeStruct((B, H, N, C, K), dt), jax.ShapeDtypeStruct((B, H, N, C, K), dt),
                jax.ShapeDtypeStruct((B, H, N, K, V), jnp.float32))
    body = functools.partial(_body, scale=scale, bv=block_v)
    p, ek, y = mc.kernel(body, name="prism_mosaic_state_pullback",
                         out_type=out_type, scratch=scratch, grid=(B, N, H, V // block_v),
                         grid_names=("b", "n", "h", "v"), interpret=interpret)(x.q, x.k, do, ainv, gf, gi)
    return p, ek, tv.all, y
