"""Flax linen layers: the PRISM mixer, its baselines and the shared building blocks.

Every mixer has the same interface (x: [B, T, D]):
  __call__(x, segment_ids=None, positions=None) -> y [B, T, D]
  prefill(x, max_len) -> (y, cache);  decode(x_t [B, D], cache, index) -> (y_t [B, D], cache)
"""

from prism_jax.layers.attention import AttentionMixer
from prism_jax.layers.common import RMSNorm, ShortConv, document_starts, positions_in_document
from prism_jax.layers.gdn import DeltaMixer
from prism_jax.layers.mlp import SwiGLU
from prism_jax.layers.prism import PrismMixer
from prism_jax.layers.ttt import TTTLinearMixer

MIXER_CLASSES = {
    "prism": (PrismMixer, {}),
    "gdn": (DeltaMixer, {"erase": True}),
    "gla": (DeltaMixer, {"erase": False}),
    "attention": (AttentionMixer, {}),
    "ttt": (TTTLinearMixer, {}),
}

__all__ = ["AttentionMixer", "DeltaMixer", "MIXER_CLASSES", "PrismMixer", "RMSNorm", "ShortConv", "SwiGLU", "TTTLinearMixer",
           "document_starts", "positions_in_document"]
