"""SwiGLU feed-forward block."""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from prism_jax.layers.common import dense


class SwiGLU(nn.Module):
    """y = W_down(SiLU(W_gate x) * W_up x); x: [..., D] -> [..., D]."""

    d_model: int
    hidden_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.gate = dense(self.hidden_dim, ("embed", "mlp"), **kw)
        self.up = dense(self.hidden_dim, ("embed", "mlp"), **kw)
        self.down = dense(self.d_model, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down(nn.silu(self.gate(x)) * self.up(x))
