"""Building blocks shared by the mixers: partitioned dense layers, norms, the causal ShortConv and
segment (packed-document) helpers.

Every parameter carries logical axis names from the fixed vocabulary of `prism_jax.sharding`
("vocab", "embed", "mlp", "heads", "qkv", "conv", "rank", "norm"; None = never sharded).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import flax.linen as nn

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dense(features, axes, *, dtype, param_dtype, use_bias=False, bias_init=nn.initializers.zeros,
          kernel_scale=1.0, name=None):
    """nn.Dense with logical axis names `axes` = (input axis, output axis) on its kernel."""
    kernel_init = nn.initializers.variance_scaling(kernel_scale, "fan_in", "truncated_normal")
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(bias_init, (axes[1],)), name=name)


def constant_init(value):
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.full(shape, value, dtype)
    return init


def l2_normalize(x, eps=1e-6):
    """Unit L2 norm along the last axis, computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
    """RMS norm over the last axis (float32 inside); scale vector of width x.shape[-1]."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str | None = "norm"

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def document_starts(segment_ids):
    """[B, T] bool: True where a new document starts (t = 0 or segment id changes)."""
    first = jnp.ones_like(segment_ids[:, :1], dtype=bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def positions_in_document(segment_ids):
    """[B, T] int32: position of each token inside its document (restarts at 0 at each boundary)."""
    T = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids.shape)
    last_start = jax.lax.cummax(jnp.where(document_starts(segment_ids), idx, 0), axis=1)
    return idx - last_start


def check_segment_ids(segment_ids, batch_shape, who):
    if segment_ids is None:
        return
    if tuple(segment_ids.shape) != tuple(batch_shape):
        raise ValueError(f"{who}: `segment_ids` has shape {tuple(segment_ids.shape)}, expected [B, T] = "
                         f"{tuple(batch_shape)}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"{who}: `segment_ids` has dtype {segment_ids.dtype}, expected an integer dtype")


class ShortConv(nn.Module):
    """Causal depthwise convolution over time, kernel [W, F]; kernel[W - 1] weighs the current token.

    With segment_ids it never looks across a document boundary (inputs of other documents count as 0).
    `step` is the one-token decode form with a window cache [B, W - 1, F] of the previous inputs.
    """

    features: int
    kernel_size: int
    axis_name: str = "embed"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        bound = self.kernel_size ** -0.5
        init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
        self.kernel = self.param("kernel", nn.with_logical_partitioning(init, ("conv", self.axis_name)),
                                 (self.kernel_size, self.features), self.param_dtype)

    def __call__(self, x, segment_ids=None):
        """x: [B, T, F] -> [B, T, F]."""
        W = self.kernel_size
        w = self.kernel.astype(self.dtype)
        x = x.astype(self.dtype)
        y = x * w[W - 1]
        for j in range(1, min(W, x.shape[1] + 1) if x.shape[1] else 1):
            shifted = jnp.pad(x, ((0, 0), (j, 0), (0, 0)))[:, : x.shape[1]]
            if segment_ids is not None:
                same = jnp.pad(segment_ids[:, j:] == segment_ids[:, :-j], ((0, 0), (j, 0)))
                shifted = jnp.where(same[..., None], shifted, 0)
            y = y + shifted * w[W - 1 - j]
        return y

    def window(self, x):
        """Decode cache after a prefix x [B, T, F]: its last W - 1 inputs, zero-padded on the left."""
        W = self.kernel_size
        padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (W - 1, 0), (0, 0)))
        return padded[:, padded.shape[1] - (W - 1):]

    def step(self, x_t, window):
        """x_t: [B, F]; window: [B, W - 1, F] float32 -> (y_t [B, F], new window)."""
        full = jnp.concatenate([window, x_t[:, None].astype(jnp.float32)], axis=1)
        y = jnp.einsum("bwf,wf->bf", full.astype(self.dtype), self.kernel.astype(self.dtype))
        return y, full[:, 1:]


class OutputHead(nn.Module):
    """Per-head RMS norm of the mixer output, SiLU gate from the block input, output projection."""

    num_heads: int
    head_dim: int
    d_model: int
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.norm = RMSNorm(self.eps, **kw)
        self.gate = dense(self.num_heads * self.head_dim, ("embed", "qkv"), **kw)
        self.proj = dense(self.d_model, ("qkv", "embed"), **kw)

    def __call__(self, o, x):
        """o: [..., H, V] mixer output; x: [..., D] block input -> [..., D]."""
        o = self.norm(o).reshape(*o.shape[:-2], -1)
        return self.proj(o * nn.silu(self.gate(x)))


def run_recurrence(module, config, q, k, v, beta, g, segment_ids, want_state):
    """prism_recurrence with the config's impl and chunk size. During `init` the recurrence is skipped
    (zeros of the right shape): parameter values never depend on it and init then compiles fast.
    Under an ambient mesh (`jax.set_mesh`) whose `sequence` axis is > 1 the sequence-parallel form runs
    (`prism_jax.parallel.prism_recurrence_sharded`); otherwise this is plain `prism_recurrence`."""
    from prism_jax.parallel import prism_recurrence_sharded

    if module.is_initializing():
        B, T, H, K = q.shape
        V = v.shape[-1]
        state = jnp.zeros((B, H, K, V), jnp.float32) if want_state else None
        return jnp.zeros((B, T, H, V), v.dtype), state
    options = {"pallas_options": json.loads(config.pallas_options)} if config.pallas_options else {}
    return prism_recurrence_sharded(q, k, v, beta, g, impl=config.op_impl, chunk_size=config.chunk_size,
                                    segment_ids=segment_ids, output_final_state=want_state, **options)
