"""First step of the backward (each chunk's state map and output cotangent pulled back to its start
state) on Mosaic GPU: a drop-in for `gpu.pullback.state_pullback` at chunk 64 with the saved inverse.

Grid (B, N, H): one CTA (one warpgroup) per chunk and head, all independent. Per chunk
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

Cost per CTA (K = V = 128): wgmma [C,C]x[C,K], [C,K]x[K,C], [K,C]x[C,V], [C,C]^T x[C,V],
[K,C]x[C,V] (~7 MFLOP); bytes in 3 x 16 KiB + 16 KiB (Ainv f32), out 2 x 16 KiB + 64 KiB (Y f32):
the float32 Y write dominates, so the kernel is bandwidth-bound (~B*N*H * 176 KiB / 4.8 TB/s).
Nothing is pipelined inside a CTA; ~190 KiB of SMEM at K = V = 128 leaves one CTA per SM, so the
TMA store of Y overlaps only the next CTA's start (a V split would allow two).
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


def _check(x: Prepared, do, ainv):
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


def _body(q_ref, k_ref, do_ref, ainv_ref, gf_ref, gi_ref, p_ref, ek_ref, y_ref,
          q_s, k_s, do_s, ai32_s, ai16_s, w_s, p_s, ek_s, a_s, z_s, y_s, vf_s, vi_s, bar, *, scale):
    b, n, h = (lax.axis_index(a) for a in ("b", "n", "h"))
    rows = pl.ds(n * C, C)
    copies = [(q_ref.at[b, rows, h], q_s), (k_ref.at[b, rows, h, 0], k_s), (do_ref.at[b, rows, h], do_s),
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
    plgpu.copy_smem_to_gmem(ek_s, ek_ref.at[b, h, n])
    p_s[...] = mc.matmul(ai16_s, w_s, (C, K)).astype(p_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(p_s, p_ref.at[b, h, n])

    sq = (C, C)
    t_m1 = mc.decay_matrix(vec(vf_s, 3, mc.ROWS), vec(vi_s, 0, mc.ROWS), vec(vf_s, 4, mc.COLS),
                           vec(vi_s, 1, mc.COLS), sq, strict=False)
    a_s[...] = (mc.matmul(q_s, k_s.T, sq) * t_m1).astype(a_s.dtype)
    # w_s is free again (the P product above has been waited for): it holds diag(start) q now.
    q = plgpu.load(q_s, layout=mc.WGMMA).astype(jnp.float32)
    w_s[...] = (mc.rows_of(vec(vf_s, 1, mc.ROWS), (C, K)) * q).astype(w_s.dtype)
    plgpu.commit_smem()
    V = do_s.shape[-1]
    z_s[...] = (-mc.matmul(a_s.T, do_s, (C, V))).astype(z_s.dtype)
    plgpu.commit_smem()
    y = mc.matmul(w_s.T, do_s, (K, V)) + mc.matmul(p_s.T, z_s, (K, V))
    y_s[...] = scale * y
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(y_s, y_ref.at[b, h, n])
    plgpu.wait_smem_to_gmem(0)


def state_pullback(x: Prepared, tv: mc.TokenVectors, do, *, scale, ainv, interpret=False):
    """x: the padded inputs (q [B, Tp, H, K], k [B, Tp, H, L, K] in bf16 / f16); tv =
    `token_vectors(x)`; do [B, Tp, H, V] (q's dtype); ainv [B, H, N, C, C] float32 the chunks'
    (I + m)^{-1} saved by the forward (required). K, V in (64, 128).
    Returns p, ek [B, H, N, C, K] in q's dtype, a [B, H, N] float32, y [B, H, N, K, V] float32.
    Grid (B, N, H)."""
    _check(x, do, ainv)
    B, Tp, H, K = x.q.shape
    V = do.shape[-1]
    N = Tp // C
    dt = x.q.dtype
    gf = jnp.stack([tv.beta[:, :, 0] * tv.start_m1, tv.start, tv.end_m1, tv.G, tv.Gm1])
    gi = jnp.stack([tv.r, tv.rm1])
    scratch = dict(
        q_s=mc.smem((C, K), dt), k_s=mc.smem((C, K), dt), do_s=mc.smem((C, V), dt),
        ai32_s=mc.smem((C, C), jnp.float32), ai16_s=mc.smem((C, C), dt), w_s=mc.smem((C, K), dt),
        p_s=mc.smem((C, K), dt), ek_s=mc.smem((C, K), dt), a_s=mc.smem((C, C), dt), z_s=mc.smem((C, V), dt),
        y_s=mc.smem((K, V), jnp.float32), vf_s=plgpu.SMEM((5, C), jnp.float32),
        vi_s=plgpu.SMEM((2, C), jnp.int32), bar=plgpu.Barrier(num_arrivals=4 + 5 + 2))
    out_type = (jax.ShapeDtypeStruct((B, H, N, C, K), dt), jax.ShapeDtypeStruct((B, H, N, C, K), dt),
                jax.ShapeDtypeStruct((B, H, N, K, V), jnp.float32))
    p, ek, y = mc.kernel(functools.partial(_body, scale=scale), name="prism_mosaic_state_pullback",
                         out_type=out_type, scratch=scratch, grid=(B, N, H), grid_names=("b", "n", "h"),
                         interpret=interpret)(x.q, x.k, do, ainv, gf, gi)
    return p, ek, tv.all, y
