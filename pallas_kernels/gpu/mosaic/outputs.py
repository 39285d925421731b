"""Forward kernel 3 (the chunk outputs) on Mosaic GPU: a drop-in for `split.outputs` at chunk 64.

Grid (B, N, H, V / block_v): one CTA (one warpgroup) per chunk, head and block of value columns,
all independent. Per chunk (`pallas_kernels.common.chunk_output`, prism-math.md section 3):

    E = P S + Qe                                            [C, bv]
    o = scale * (diag(start) q S - (q k0^T . T_m1) E + sum_l (q k_l^T . T_0 . beta_l^cols) v_l)

S = starts[b, h, n] [K, bv] float32 comes by TMA into SMEM and is re-staged as a 16-bit wgmma
operand; q, k_l, v_l, P, Qe come by TMA as [C, K] / [C, bv] tiles of the caller's layout; the
per-token vectors (G, Gm1, r, rm1, start, beta_l) from `token_vectors` as rows of two small SMEM
buffers, one row per register layout. The decay matrices T_m1 / T_0 are formed in registers; the
gate beta_l folds into the columns of the l-th C x C product, so v_l is read as loaded. All
matrix products are wgmma (16-bit operands, float32 accumulators); every C x C product is staged in
SMEM as the A operand of the next product, and E is staged as a B operand. The products of o chain
into one accumulator (init = diag(start) q S).

SMEM (`smem_bytes`): at K = V = 128 all V columns do not fit (S alone is 64 KiB float32 + 32 KiB
16-bit), so `default_block_v` gives 64 columns per CTA: ~140 KiB at L = 1, ~170 KiB at L = 2, one
CTA per SM; at K = V = 64 one CTA holds all columns in ~90 KiB (2 per SM).

Cost: per (chunk, head) 2 [C,K]x[K,V] + (L+1) [C,K]x[K,C] + (L+1) [C,C]x[C,V] wgmmas (~6 MFLOP at
K = V = 128, L = 1: ~50 GFLOP at B*T = 32K, H = 16, under 0.1 ms of tensor-core time); bytes per
(chunk, head) q, k_l, p, v_l, qe, o 16-bit (16 KiB each at 128) + S 64 KiB float32: ~160 KiB at
L = 1, 1.3 GB at B*T = 32K, H = 16, ~0.3 ms at 4.8 TB/s. The kernel is bandwidth-bound (the float32
start state is 40 % of the bytes; q, k, p are read by both column halves, the second read mostly
from L2). Nothing is pipelined inside a CTA (one chunk each: TMA in, compute, TMA out); with one
CTA per SM the load latency is exposed between CTAs, so expect well above the 0.3 ms bytes' time.
Next step if it shows: several chunks per CTA with the next chunk's tiles prefetched into a
second slot (that needs the SMEM cut first, e.g. S staged in halves).
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
SIZES = (64, 128)  # supported K and V (wgmma rows / columns, one register tile each)
SMEM_LIMIT = 200 * 1024  # bytes of SMEM a CTA may use (an H200 gives 227 KiB)


def _check(x: Prepared, p, qe, starts, block_v):
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
    if starts.dtype != jnp.float32:
        raise ValueError(f"mosaic outputs: `starts` has dtype {starts.dtype}, expected float32")
    if block_v not in (64, V) or V % block_v:
        raise ValueError(f"mosaic outputs: block_v = {block_v}; supported 64 or V = {V}")


def smem_bytes(K, bv, L, itemsize=2):
    """SMEM one CTA uses: 16-bit tiles q, k_l, p [C, K], v_l, qe (later o), E [C, bv], S [K, bv],
    L + 1 products [C, C]; S in float32 [K, bv]; the vectors."""
    tiles = (2 + L) * C * K + (2 + L) * C * bv + K * bv + (L + 1) * C * C
    return tiles * itemsize + 4 * K * bv + (8 + L) * C * 4


def default_block_v(K, V, L):
    """All V columns in one CTA when that fits the SMEM limit, else 64."""
    return V if smem_bytes(K, V, L) <= SMEM_LIMIT else 64


def _matmul(a, b, shape, init, interpret):
    """`init + a @ b`: chained into the wgmma accumulator on the GPU; the CPU interpreter has no
    rule for an initialised accumulator (the discharged `wgmma` primitive), so there it adds."""
    if interpret:
        return init + mc.matmul(a, b, shape)
    return mc.matmul(a, b, shape, init=init)


def _body(q_ref, k_ref, v_ref, p_ref, qe_ref, s_ref, gf_ref, gi_ref, o_ref,
          q_s, k_s, v_s, p_s, qe_s, s32_s, s16_s, e_s, a_s, vf_s, vi_s, bar, *, L, bv, scale, interpret):
    b, n, h, vb = (lax.axis_index(a) for a in ("b", "n", "h", "v"))
    rows, cols = pl.ds(n * C, C), pl.ds(vb * bv, bv)
    copies = [(q_ref.at[b, rows, h], q_s), (p_ref.at[b, rows, h], p_s),
              (qe_ref.at[b, rows, h, cols], qe_s), (s_ref.at[b, h, n, :, cols], s32_s)]
    copies += [(k_ref.at[b, rows, h, l], k_s.at[l]) for l in range(L)]
    copies += [(v_ref.at[b, rows, h, l, cols], v_s[l]) for l in range(L)]
    # float vectors: 0 G (rows), 1 G (cols), 2 Gm1 (cols), 3 start (rows), 4 + l beta_l (cols)
    copies += [(gf_ref.at[i, b, h, rows], vf_s.at[i]) for i in range(4)]
    copies += [(gf_ref.at[4 + l, b, h, rows], vf_s.at[4 + l]) for l in range(L)]
    # int vectors: 0 r (rows), 1 r (cols), 2 rm1 (cols)
    copies += [(gi_ref.at[i, b, rows], vi_s.at[i]) for i in range(3)]
    for src, dst in copies:
        plgpu.copy_gmem_to_smem(src, dst, bar)
    plgpu.barrier_wait(bar)

    s16_s[...] = s32_s[...].astype(s16_s.dtype)
    plgpu.commit_smem()
    e = _matmul(p_s, s16_s, (C, bv), plgpu.load(qe_s, layout=mc.WGMMA).astype(jnp.float32), interpret)
    e_s[...] = e.astype(e_s.dtype)

    vec = lambda ref, i, layout: plgpu.load(ref.at[i], layout=layout)
    G_r, G_c, Gm1_c, start_r = vec(vf_s, 0, mc.ROWS), vec(vf_s, 1, mc.COLS), vec(vf_s, 2, mc.COLS), vec(
        vf_s, 3, mc.ROWS)
    r_r, r_c, rm1_c = vec(vi_s, 0, mc.ROWS), vec(vi_s, 1, mc.COLS), vec(vi_s, 2, mc.COLS)
    sq = (C, C)
    t_m1 = mc.decay_matrix(G_r, r_r, Gm1_c, rm1_c, sq, strict=False)
    t_0 = mc.decay_matrix(G_r, r_r, G_c, r_c, sq, strict=False)
    qk0 = mc.matmul(q_s, k_s.at[0].T, sq)
    a_s[0][...] = (-(qk0 * t_m1)).astype(a_s[0].dtype)
    for l in range(L):
        qk = qk0 if l == 0 else mc.matmul(q_s, k_s.at[l].T, sq)
        a_s[1 + l][...] = (qk * t_0 * mc.cols_of(vec(vf_s, 4 + l, mc.COLS), sq)).astype(a_s[0].dtype)
    plgpu.commit_smem()

    o = mc.rows_of(start_r, (C, bv)) * mc.matmul(q_s, s16_s, (C, bv))
    o = _matmul(a_s[0], e_s, (C, bv), o, interpret)
    for l in range(L):
        o = _matmul(a_s[1 + l], v_s[l], (C, bv), o, interpret)
    qe_s[...] = (scale * o).astype(qe_s.dtype)  # qe_s is free (read into registers for E)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qe_s, o_ref.at[b, rows, h, cols])
    plgpu.wait_smem_to_gmem(0)


def outputs(x: Prepared, tv: mc.TokenVectors, p, qe, starts, *, scale, block_v=None, interpret=False):
    """o [B, Tp, H, V] in v's dtype: `split.outputs` at chunk_size = 64 on Mosaic GPU.

    x: the padded inputs (q [B, Tp, H, K], k [B, Tp, H, L, K], v [B, Tp, H, L, V] in bf16 / f16);
    tv = `token_vectors(x)`; p [B, Tp, H, K], qe [B, Tp, H, V] from the intra kernel (q's dtype);
    starts [B, H, N, K, V] float32 every chunk's start state. K, V in (64, 128).
    block_v: value columns per CTA, 64 or V (default: V when the CTA's SMEM fits, else 64:
    `default_block_v`). 32 columns would let two CTAs share an SM at K = 128 but fail Mosaic's
    layout inference in jax 0.11.2 (not supported).
    Grid (B, N, H, V / block_v).
    """
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    block_v = default_block_v(K, V, L) if block_v is None else block_v
    _check(x, p, qe, starts, block_v)
    dt = x.q.dtype
    # One [B, H, Tp] row per (vector, layout): see the module docstring of `common`.
    gf = jnp.stack([tv.G, tv.G, tv.Gm1, tv.start, *(tv.beta[:, :, l] for l in range(L))])
    gi = jnp.stack([tv.r, tv.r, tv.rm1])
    n_copies = 4 + 2 * L + 4 + L + 3
    scratch = dict(
        q_s=mc.smem((C, K), dt), k_s=mc.smem((L, C, K), dt),
        v_s=tuple(mc.smem((C, block_v), dt) for _ in range(L)),
        p_s=mc.smem((C, K), dt), qe_s=mc.smem((C, block_v), dt), s32_s=mc.smem((K, block_v), jnp.float32),
        s16_s=mc.smem((K, block_v), dt), e_s=mc.smem((C, block_v), dt),
        a_s=tuple(mc.smem((C, C), dt) for _ in range(L + 1)),
        vf_s=plgpu.SMEM((4 + L, C), jnp.float32), vi_s=plgpu.SMEM((3, C), jnp.int32),
        bar=plgpu.Barrier(num_arrivals=n_copies))
    body = functools.partial(_body, L=L, bv=block_v, scale=scale, interpret=interpret)
    out_type = jax.ShapeDtypeStruct((B, Tp, H, V), x.v.dtype)
    return mc.kernel(body, name="prism_mosaic_outputs", out_type=out_type, scratch=scratch,
                     grid=(B, Tp // C, H, V // block_v), grid_names=("b", "n", "h", "v"),
                     interpret=interpret)(x.q, x.k, x.v, p, qe, starts, gf, gi)
