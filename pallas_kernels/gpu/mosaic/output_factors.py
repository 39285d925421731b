"""The chunk outputs split into the part that needs the chunk's start state and the part that does not.

Per chunk (`pallas_kernels.common.chunk_output`, prism-math.md section 3), with E = P S + Qe:

    o  = scale (diag(start) q S - (q k0^T . T_m1) E + sum_l (q k_l^T . T_0 . beta_l^cols) v_l)
       = Qf S + Of
    Qf = scale (diag(start) q - (q k0^T . T_m1) P)                                   [C, K]
    Of = scale (sum_l (q k_l^T . T_0 . beta_l^cols) v_l - (q k0^T . T_m1) Qe)          [C, V]

Qf and Of need no state, so they are formed for every chunk at once (here batched in XLA), and the
state pass, which holds S anyway, adds one product per chunk and writes o itself
(`state.state_pass(factors=...)`): the outputs kernel, its second read of every start state and its
own walk over the chunks go away. The [C, C] products are rounded to the inputs' 16-bit dtype before
they multiply P, Qe and v_l, as the outputs kernel rounds its operands.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import Prepared, _masked_exp
from pallas_kernels.gpu.mosaic import common as mc

f32 = jnp.float32
C = mc.CHUNK


def _decay(g_rows, r_rows, g_cols, r_cols):
    """exp(g_rows[t] - g_cols[i]) where i <= t and the reset counts agree, else 0; [..., C, C]."""
    causal = jnp.tril(jnp.ones((C, C), bool))
    keep = causal & (r_rows[..., :, None] == r_cols[..., None, :])
    return _masked_exp(g_rows[..., :, None] - g_cols[..., None, :], keep)


def output_factors(x: Prepared, tv: mc.TokenVectors, p, qe, *, scale):
    """(Qf [B, Tp, H, K], Of [B, Tp, H, V]) in q's dtype; x padded to whole chunks of 64, tv =
    `token_vectors(x)`, p [B, Tp, H, K] and qe [B, Tp, H, V] the intra kernel's (q's dtype)."""
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    N = Tp // C
    dt = x.q.dtype
    tokens = lambda t: t.reshape(B, N, C, H, *t.shape[3:])  # [B, N, C, H, ...]
    heads = lambda t: t.reshape(B, H, N, C)  # head-major vectors
    q, k, v, p_c, qe_c = tokens(x.q), tokens(x.k), tokens(x.v), tokens(p), tokens(qe)
    G, Gm1, start = heads(tv.G), heads(tv.Gm1), heads(tv.start)
    r, rm1 = tv.r.reshape(B, 1, N, C), tv.rm1.reshape(B, 1, N, C)
    beta = tv.beta.reshape(B, H, L, N, C)
    prod = lambda spec, a, b: jnp.einsum(spec, a, b, preferred_element_type=f32)

    qk = prod("bnthk,bnihlk->bhnlti", q, k)  # [B, H, N, L, C, C]
    a_m1 = (qk[:, :, :, 0] * _decay(G, r, Gm1, rm1)).astype(dt)  # q k0^T . T_m1
    a_w = (qk * _decay(G, r, G, r)[:, :, :, None] * jnp.moveaxis(beta, 2, 3)[..., None, :]).astype(dt)
    qf = start[..., None] * jnp.moveaxis(q, 3, 1).astype(f32) - prod("bhnti,bnihk->bhntk", a_m1, p_c)
    of = prod("bhnlti,bnihlv->bhntv", a_w, v) - prod("bhnti,bnihv->bhntv", a_m1, qe_c)
    back = lambda t: jnp.moveaxis((scale * t).astype(dt), 1, 3).reshape(B, Tp, H, t.shape[-1])
    return back(qf), back(of)
