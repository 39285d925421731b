"""Softmax attention baseline: causal multi-head attention with rotary position embeddings.

H heads of width D / H; `jax.nn.dot_product_attention` with a mask that is causal and, with
segment_ids, block-diagonal over documents. Positions (for the rotary embedding) restart per
document when the caller passes them. Decoding keeps a KV cache of max_seq_len tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from prism_jax.layers.common import DTYPES, check_segment_ids, dense


def rotary(x, positions, base):
    """Rotate pairs (first half, second half) of x [B, T, H, Dh] by angles positions [B, T] * freq."""
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[..., None, None] * freq  # [B, T, 1, half]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class AttentionMixer(nn.Module):
    """Causal softmax attention. config: a PrismLMConfig (d_model, num_heads, rope_base, max_seq_len)."""

    config: object

    def setup(self):
        c = self.config
        kw = dict(dtype=DTYPES[c.dtype], param_dtype=DTYPES[c.param_dtype])
        self.q_proj = dense(c.d_model, ("embed", "qkv"), **kw)
        self.k_proj = dense(c.d_model, ("embed", "qkv"), **kw)
        self.v_proj = dense(c.d_model, ("embed", "qkv"), **kw)
        self.o_proj = dense(c.d_model, ("qkv", "embed"), **kw)

    def _qkv(self, x, positions):
        c = self.config
        H = c.num_heads
        split = lambda t: t.reshape(*t.shape[:-1], H, c.d_model // H)
        q = rotary(split(self.q_proj(x)), positions, c.rope_base)
        k = rotary(split(self.k_proj(x)), positions, c.rope_base)
        return q, k, split(self.v_proj(x))

    def __call__(self, x, segment_ids=None, positions=None):
        """x: [B, T, D]; segment_ids, positions: [B, T] or None -> [B, T, D]."""
        B, T, _ = x.shape
        check_segment_ids(segment_ids, (B, T), "AttentionMixer")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        q, k, v = self._qkv(x, positions)
        if segment_ids is None:  # is_causal (no explicit mask) lets the GPU take cuDNN's flash kernel
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = jnp.tril(jnp.ones((T, T), dtype=bool))[None, None]
            mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
            o = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return self.o_proj(o.reshape(B, T, -1))

    def prefill(self, x, max_len):
        """x: [B, T, D] -> (y, cache {"k", "v": [B, max_len, H, D/H]}) (one document from position 0)."""
        B, T, _ = x.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        _, k, v = self._qkv(x, positions)
        pad = ((0, 0), (0, max_len - T), (0, 0), (0, 0))
        return self(x, None, positions), {"k": jnp.pad(k, pad), "v": jnp.pad(v, pad)}

    def decode(self, x_t, cache, index):
        """x_t: [B, D] at position `index` (int32 scalar) -> (y_t [B, D], new cache)."""
        B = x_t.shape[0]
        positions = jnp.full((B, 1), index, jnp.int32)
        q, k, v = self._qkv(x_t[:, None], positions)
        ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, axis=1)
        mask = (jnp.arange(ck.shape[1]) <= index)[None, None, None, :]
        o = jax.nn.dot_product_attention(q, ck, cv, mask=mask)
        return self.o_proj(o.reshape(B, -1)), {"k": ck, "v": cv}
