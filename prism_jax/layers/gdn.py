"""Gated DeltaNet and gated linear attention baselines, both on the PRISM op.

Standard Gated DeltaNet parameterisation (Yang et al. 2024):

    q, k, v = SiLU(ShortConv(W_q x, W_k x, W_v x))   q, k L2-normalised per head, H * V = D
    beta    = sigmoid(W_b x)                           [H]
    g       = -exp(A_log) * softplus(W_a x + dt_bias)  [H], log decay <= 0
    S_t     = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        (op with L = 1)
    y       = OutProj(RMSNorm_head(S^T q) * SiLU(W_gate x))

Gated linear attention ("gla") is the same block without the delta erase: S_t = exp(g_t) S_{t-1} + k_t v_t^T,
a scalar (per-head) data-dependent decay (`gla_decay=False`: decay fixed to 1, plain linear attention). The op ties the erase strength to the first write gate, so GLA
passes L = 2 write slots: slot 0 has gate 0 (no erase, no write), slot 1 writes k v^T with gate 1.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from prism_jax.layers.common import DTYPES, OutputHead, ShortConv, check_segment_ids, dense, run_recurrence, l2_normalize
from prism_jax.ops import prism_step


def _a_log_init(key, shape, dtype=jnp.float32):
    return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


def _dt_bias_init(key, shape, dtype=jnp.float32):
    """Inverse softplus of dt, dt log-uniform in [1e-3, 1e-1] (as in Mamba-2 / GDN)."""
    dt = jnp.exp(jax.random.uniform(key, shape, dtype, math.log(1e-3), math.log(1e-1)))
    return dt + jnp.log(-jnp.expm1(-dt))


class DeltaMixer(nn.Module):
    """Gated DeltaNet (erase=True, mixer "gdn") or gated linear attention (erase=False, mixer "gla")."""

    config: object
    erase: bool = True

    def setup(self):
        c = self.config
        D, H, K = c.d_model, c.num_heads, c.head_k_dim
        kw = dict(dtype=DTYPES[c.dtype], param_dtype=DTYPES[c.param_dtype])
        self.q_proj = dense(H * K, ("embed", "qkv"), **kw)
        self.k_proj = dense(H * K, ("embed", "qkv"), **kw)
        self.v_proj = dense(D, ("embed", "qkv"), **kw)
        if c.use_short_conv:
            self.conv = ShortConv(2 * H * K + D, c.conv_kernel_size, "qkv", **kw)
        if self.erase:
            self.b_proj = dense(H, ("embed", "heads"), use_bias=True, **kw)
        if self._decays:
            self.a_proj = dense(H, ("embed", "heads"), **kw)
            pd = DTYPES[c.param_dtype]
            self.a_log = self.param("a_log", nn.with_logical_partitioning(_a_log_init, ("heads",)), (H,), pd)
            self.dt_bias = self.param("dt_bias", nn.with_logical_partitioning(_dt_bias_init, ("heads",)), (H,), pd)
        self.head = OutputHead(H, D // H, D, c.norm_eps, **kw)

    @property
    def _decays(self):
        return self.erase or self.config.gla_decay

    def _project(self, x):
        return jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)

    def op_terms(self, qkv, x):
        """From the (convolved) projections [..., 2HK + D] and input x [..., D]: op inputs."""
        c = self.config
        H, K = c.num_heads, c.head_k_dim
        lead = qkv.shape[:-1]
        qkv = nn.silu(qkv)
        q = l2_normalize(qkv[..., : H * K].reshape(*lead, H, K))
        k = l2_normalize(qkv[..., H * K: 2 * H * K].reshape(*lead, H, K))
        v = qkv[..., 2 * H * K:].reshape(*lead, H, -1)
        if self._decays:
            a = self.a_proj(x).astype(jnp.float32) + self.dt_bias.astype(jnp.float32)
            g = -jnp.exp(self.a_log.astype(jnp.float32)) * jax.nn.softplus(a)
        else:  # plain linear attention: no forgetting
            g = jnp.zeros((*lead, H), jnp.float32)
        if self.erase:
            beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))[..., None].astype(v.dtype)
            return q, k[..., None, :], v[..., None, :], beta, g
        ones = jnp.ones((*lead, H, 1), v.dtype)
        k2 = jnp.stack([k, k], axis=-2)
        v2 = jnp.stack([jnp.zeros_like(v), v], axis=-2)
        return q, k2, v2, jnp.concatenate([0 * ones, ones], axis=-1), g

    def _sequence(self, x, segment_ids, want_state):
        c = self.config
        check_segment_ids(segment_ids, x.shape[:2], type(self).__name__)
        qkv = self._project(x)
        pre = self.conv(qkv, segment_ids) if c.use_short_conv else qkv
        q, k, v, beta, g = self.op_terms(pre, x)
        o, state = run_recurrence(self, c, q, k, v, beta, g, segment_ids, want_state)
        return self.head(o, x), state, qkv

    def __call__(self, x, segment_ids=None, positions=None):
        """x: [B, T, D] -> [B, T, D]."""
        del positions
        return self._sequence(x, segment_ids, False)[0]

    def prefill(self, x, max_len):
        """x: [B, T, D] -> (y, cache {"conv": [B, W-1, 2HK+D], "state": [B, H, K, V]})."""
        del max_len
        y, state, qkv = self._sequence(x, None, True)
        cache = {"state": state}
        if self.config.use_short_conv:
            cache["conv"] = self.conv.window(qkv)
        return y, cache

    def decode(self, x_t, cache, index):
        """x_t: [B, D] -> (y_t [B, D], new cache)."""
        del index
        c = self.config
        new = dict(cache)
        qkv = self._project(x_t)
        if c.use_short_conv:
            qkv, new["conv"] = self.conv.step(qkv, cache["conv"])
        q, k, v, beta, g = self.op_terms(qkv, x_t)
        o, new["state"] = prism_step(q, k, v, beta, g, cache["state"], scale=c.head_k_dim ** -0.5)
        return self.head(o.astype(DTYPES[c.dtype]), x_t), new
