"""The PRISM mixer (paper section 4, Algorithm 1; prism-math.md section 2).

Per token, from the input only (never from the state):

    u     = SiLU(ShortConv(x))                anchor, D wide (use_short_conv=False: u = SiLU(x))
    q     = normalize(Linear_q(u))            [H, K]
    v     = Linear_v(u)                       [H, V] with H * V = D, so r^1 = v - u needs no projection
    g     = log_sigmoid(Linear_alpha(u))      [H]  (alpha = sigmoid, kept in log space)
    for l = 1..L:
        w^l = normalize(Linear_k^l(u))        [H, K] write key
        p^l = Linear_p^l(u)                   [H, V] contextual gain (use_gain=False: p = 1)
        b^l = sigmoid(Linear_b^l(u))          [H]    write gate
        d^l = GELU(p^l * r^l)                 [H, V] update direction (identity if asked)
        r^{l+1} = r^l - d^l
    (w^l, d^l, b^l) -> prism_recurrence as (k[..., l, :], v[..., l, :], beta[..., l]);
    the erase key and strength are w^1 and b^1.
    y     = OutProj(RMSNorm_head(S^T q) * SiLU(Linear_gate(x)))

`solver_rank=r` (low-rank solver): keys w^2..w^L and all gains p^l are read from a shared rank-r
projection z = A u (w^l = B_k^l z, p^l = B_p^l z + 1); w^1 stays full rank because it is also the
erase key, as in Gated DeltaNet. q is L2-normalised too (as in GDN) so the output scale is bounded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from prism_jax.layers.common import (DTYPES, OutputHead, ShortConv, check_segment_ids, constant_init,
                                     dense, l2_normalize, run_recurrence)
from prism_jax.ops import prism_step


def _alpha_bias_init(key, shape, dtype=jnp.float32):
    """Decay bias so alpha = sigmoid(bias) starts between 0.88 and 0.993 (a range of memory lengths)."""
    return jax.random.uniform(key, shape, dtype, 2.0, 5.0)


class PrismMixer(nn.Module):
    """PRISM token mixer. config: a PrismLMConfig (fields d_model, num_heads, head_k_dim, solver_*, ...)."""

    config: object

    def setup(self):
        c = self.config
        D, H, K, L = c.d_model, c.num_heads, c.head_k_dim, c.solver_steps
        kw = dict(dtype=DTYPES[c.dtype], param_dtype=DTYPES[c.param_dtype])
        if c.use_short_conv:
            self.conv = ShortConv(D, c.conv_kernel_size, "embed", **kw)
        self.q_proj = dense(H * K, ("embed", "qkv"), **kw)
        self.v_proj = dense(D, ("embed", "qkv"), **kw)
        self.alpha_proj = dense(H, ("embed", "heads"), use_bias=True, bias_init=_alpha_bias_init, **kw)
        self.gate_proj = dense(H * L, ("embed", "heads"), use_bias=True, **kw)
        self.key_first = dense(H * K, ("embed", "qkv"), **kw)
        low_rank = c.solver_rank is not None
        if low_rank:
            self.solver_down = dense(c.solver_rank, ("embed", "rank"), **kw)
        src = ("rank" if low_rank else "embed")
        self.keys_rest = [dense(H * K, (src, "qkv"), **kw) for _ in range(L - 1)]
        if c.use_gain:
            self.gains = [dense(D, (src, "qkv"), use_bias=True, bias_init=constant_init(1.0), **kw)
                          for _ in range(L)]
        self.head = OutputHead(H, D // H, D, c.norm_eps, **kw)

    # -- the input-anchored solver ------------------------------------------------------------------
    def solver_terms(self, u):
        """Op inputs from the anchor u [..., D]: q [..., H, K], k [..., H, L, K], v [..., H, L, V],
        beta [..., H, L], g [..., H]."""
        c = self.config
        H, K, L = c.num_heads, c.head_k_dim, c.solver_steps
        V = c.d_model // H
        lead = u.shape[:-1]
        q = l2_normalize(self.q_proj(u).reshape(*lead, H, K))
        g = jax.nn.log_sigmoid(self.alpha_proj(u).astype(jnp.float32))
        beta = jax.nn.sigmoid(self.gate_proj(u).astype(jnp.float32)).reshape(*lead, H, L)
        z = self.solver_down(u) if c.solver_rank is not None else u
        keys = [self.key_first(u)] + [proj(z) for proj in self.keys_rest]
        k = l2_normalize(jnp.stack([kk.reshape(*lead, H, K) for kk in keys], axis=-2))
        residual = (self.v_proj(u) - u).astype(jnp.float32)
        deltas = []
        for l in range(L):
            p = self.gains[l](z).astype(jnp.float32) if c.use_gain else 1.0
            d = p * residual
            if c.solver_nonlinearity == "gelu":
                d = jax.nn.gelu(d, approximate=False)
            deltas.append(d)
            residual = residual - d
        v = jnp.stack([d.reshape(*lead, H, V) for d in deltas], axis=-2).astype(u.dtype)
        return q, k, v, beta.astype(u.dtype), g

    def anchor(self, x, segment_ids=None):
        """u = SiLU(ShortConv(x)) [B, T, D] (SiLU(x) without the conv)."""
        pre = self.conv(x, segment_ids) if self.config.use_short_conv else x.astype(DTYPES[self.config.dtype])
        return nn.silu(pre)

    # -- forward, prefill, decode -------------------------------------------------------------------
    def _sequence(self, x, segment_ids, want_state):
        c = self.config
        check_segment_ids(segment_ids, x.shape[:2], "PrismMixer")
        q, k, v, beta, g = self.solver_terms(self.anchor(x, segment_ids))
        o, state = run_recurrence(self, c, q, k, v, beta, g, segment_ids, want_state)
        return self.head(o, x), state

    def __call__(self, x, segment_ids=None, positions=None):
        """x: [B, T, D] -> [B, T, D]. positions are unused (no positional encoding needed)."""
        del positions
        return self._sequence(x, segment_ids, False)[0]

    def prefill(self, x, max_len):
        """x: [B, T, D] -> (y [B, T, D], cache {"conv": [B, W-1, D], "state": [B, H, K, V]})."""
        del max_len
        y, state = self._sequence(x, None, True)
        cache = {"state": state}
        if self.config.use_short_conv:
            cache["conv"] = self.conv.window(x)
        return y, cache

    def decode(self, x_t, cache, index):
        """x_t: [B, D] one token -> (y_t [B, D], new cache)."""
        del index
        c = self.config
        new = dict(cache)
        if c.use_short_conv:
            pre, new["conv"] = self.conv.step(x_t, cache["conv"])
        else:
            pre = x_t.astype(DTYPES[c.dtype])
        q, k, v, beta, g = self.solver_terms(nn.silu(pre))
        o, new["state"] = prism_step(q, k, v, beta, g, cache["state"], scale=c.head_k_dim ** -0.5)
        return self.head(o.astype(DTYPES[c.dtype]), x_t), new
