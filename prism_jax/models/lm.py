"""PrismLM: embedding, N pre-norm blocks of [mixer, SwiGLU MLP], final norm, tied or untied head.

The N blocks are either N separate modules ("blocks_0" ... "blocks_{N-1}") or, with
config.scan_layers, one block under `flax.linen.scan` ("blocks", params stacked on a leading axis of
size N with logical axis name "layers"; see prism_jax.models.layer_params for converting between them).
"""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from prism_jax.layers import MIXER_CLASSES, RMSNorm, SwiGLU, positions_in_document
from prism_jax.layers.common import DTYPES, check_segment_ids, dense
from prism_jax.models.config import PrismLMConfig


def make_mixer(config, name=None):
    cls, kwargs = MIXER_CLASSES[config.mixer]
    return cls(config, **kwargs, name=name)


class Block(nn.Module):
    """x + mixer(norm(x)), then + MLP(norm(x)). x: [B, T, D]."""

    config: PrismLMConfig

    def setup(self):
        c = self.config
        kw = dict(dtype=DTYPES[c.dtype], param_dtype=DTYPES[c.param_dtype])
        self.mixer_norm = RMSNorm(c.norm_eps, **kw)
        self.mixer = make_mixer(c)
        self.mlp_norm = RMSNorm(c.norm_eps, **kw)
        self.mlp = SwiGLU(c.d_model, c.mlp_hidden_dim, **kw)

    def _mlp(self, x):
        return x + self.mlp(self.mlp_norm(x))

    def __call__(self, x, segment_ids=None, positions=None):
        x = x + self.mixer(self.mixer_norm(x), segment_ids, positions)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return self._mlp(x)

    def prefill(self, x, max_len):
        y, cache = self.mixer.prefill(self.mixer_norm(x), max_len)
        return self._mlp(x + y), cache

    def decode(self, x_t, cache, index):
        y, cache = self.mixer.decode(self.mixer_norm(x_t), cache, index)
        return self._mlp(x_t + y), cache


class ScannedBlock(Block):
    """Block with the loop-body signature of nn.scan: x is the carry.

    __call__(x, segment_ids, positions) -> (x, None); prefill(x, max_len) -> (x, cache of this layer);
    decode(x_t, cache of this layer, index) -> (x_t, cache of this layer)."""

    def __call__(self, x, segment_ids=None, positions=None):
        return Block.__call__(self, x, segment_ids, positions), None


def block_stack(config: PrismLMConfig, **module_kwargs):
    """The config.num_layers blocks as one scanned module: params and generation caches carry a
    leading layer axis; segment_ids, positions, max_len and the decode index are the same for every
    layer (broadcast)."""
    cls = ScannedBlock
    if config.remat_policy == "full":
        # prevent_cse=False is safe (and faster) inside a scan body
        cls = nn.remat(cls, prevent_cse=False)
    common = dict(variable_axes={"params": 0}, split_rngs={"params": True}, length=config.num_layers,
                  metadata_params={nn.PARTITION_NAME: "layers"},
                  # no broadcast variables or outputs here: skip flax's extra invariance trace
                  check_constancy_invariants=False)
    methods = {
        "__call__": dict(common, in_axes=(nn.broadcast, nn.broadcast)),
        "prefill": dict(common, in_axes=(nn.broadcast,)),
        "decode": dict(common, in_axes=(0, nn.broadcast)),
    }
    return nn.scan(cls, methods=methods)(config, **module_kwargs)


class PrismLM(nn.Module):
    """Language model. `apply(params, tokens [B, T] int32, segment_ids=None, positions=None)`
    -> logits [B, T, vocab_size] float32. segment_ids [B, T] int marks packed documents (no mixer looks
    across a change); positions [B, T] default to the position inside each document.

    Generation entry points (see prism_jax.generation): `prefill(tokens, max_len)` -> (logits, cache),
    `decode(token [B], cache)` -> (logits [B, vocab], cache). cache["layers"] is a list of one cache
    per block, or (config.scan_layers) one cache whose leaves carry a leading layer axis.
    """

    config: PrismLMConfig

    def setup(self):
        c = self.config
        dtype, pdtype = DTYPES[c.dtype], DTYPES[c.param_dtype]
        self.embed = nn.Embed(
            c.vocab_size, c.d_model, dtype=dtype, param_dtype=pdtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        if c.scan_layers:
            self.blocks = block_stack(c)
        else:
            cls = nn.remat(Block) if c.remat_policy == "full" else Block
            self.blocks = [cls(c) for _ in range(c.num_layers)]
        self.final_norm = RMSNorm(c.norm_eps, dtype=dtype, param_dtype=pdtype)
        if not c.tie_embeddings:
            self.lm_head = dense(c.vocab_size, ("embed", "vocab"), dtype=dtype, param_dtype=pdtype)

    def _check_tokens(self, tokens, ndim):
        if tokens.ndim != ndim or not jnp.issubdtype(tokens.dtype, jnp.integer):
            shape = "[B, T]" if ndim == 2 else "[B]"
            raise ValueError(f"PrismLM: `tokens` has shape {tuple(tokens.shape)} and dtype {tokens.dtype}, "
                             f"expected an integer array {shape}")

    def _logits(self, x):
        x = self.final_norm(x)
        if self.config.tie_embeddings:
            return jnp.einsum("...d,vd->...v", x, self.embed.embedding.astype(x.dtype),
                              preferred_element_type=jnp.float32)
        return self.lm_head(x).astype(jnp.float32)

    def __call__(self, tokens, segment_ids=None, positions=None):
        self._check_tokens(tokens, 2)
        B, T = tokens.shape
        check_segment_ids(segment_ids, (B, T), "PrismLM")
        if positions is None:
            positions = (jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if segment_ids is None
                         else positions_in_document(segment_ids))
        elif tuple(positions.shape) != (B, T):
            raise ValueError(f"PrismLM: `positions` has shape {tuple(positions.shape)}, expected [B, T] = {(B, T)}")
        x = nn.with_logical_constraint(self.embed(tokens), ("batch", "length", "embed"))
        if self.config.scan_layers:
            x, _ = self.blocks(x, segment_ids, positions)
        else:
            for block in self.blocks:
                x = block(x, segment_ids, positions)
        return self._logits(x)

    def prefill(self, tokens, max_len):
        """tokens [B, T] (one document per row) -> (logits [B, T, vocab], cache)."""
        self._check_tokens(tokens, 2)
        x = self.embed(tokens)
        if self.config.scan_layers:
            x, layers = self.blocks.prefill(x, max_len)
        else:
            layers = []
            for block in self.blocks:
                x, cache = block.prefill(x, max_len)
                layers.append(cache)
        return self._logits(x), {"index": jnp.asarray(tokens.shape[1], jnp.int32), "layers": layers}

    def decode(self, token, cache):
        """token [B] int at position cache["index"] -> (logits [B, vocab], cache)."""
        self._check_tokens(token, 1)
        x = self.embed(token)
        index = cache["index"]
        if self.config.scan_layers:
            x, layers = self.blocks.decode(x, cache["layers"], index)
        else:
            layers = []
            for block, layer_cache in zip(self.blocks, cache["layers"]):
                x, layer_cache = block.decode(x, layer_cache, index)
                layers.append(layer_cache)
        return self._logits(x), {"index": index + 1, "layers": layers}
