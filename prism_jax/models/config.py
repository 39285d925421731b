"""PrismLMConfig: the one description of a model, validated on construction, and its named presets."""

from __future__ import annotations

import dataclasses
import json

MIXERS = ("prism", "gdn", "gla", "attention", "ttt")
NONLINEARITIES = ("gelu", "identity")
COMPUTE_DTYPES = ("float32", "bfloat16")
OP_IMPLS = ("reference", "scan", "chunk", "pallas", "auto")
REMAT_POLICIES = ("none", "full")


@dataclasses.dataclass(frozen=True)
class PrismLMConfig:
    """A PRISM language model or one of its baselines (same block structure, `mixer=` picks the mixer).

    Shapes: d_model = num_heads * head_v_dim (head_v_dim = d_model // num_heads); q/k heads are
    head_k_dim wide (PRISM, GDN, GLA); attention and TTT use head width d_model // num_heads.

    scan_layers: False (default) builds num_layers separate blocks (params "blocks_0", "blocks_1", ...).
    True runs one block under `flax.linen.scan` over the layer axis: the params are stacked under
    "blocks" with a leading axis of size num_layers (logical axis name "layers"), so the block is traced
    and compiled once whatever num_layers is. Same function given the same weights; convert with
    `prism_jax.models.stack_layer_params` / `unstack_layer_params`. Generation caches are then stacked on
    the layer axis too.
    remat_policy: "none" keeps every block's activations for the backward pass; "full" recomputes
    each block in the backward pass (jax.checkpoint of the block; less memory, about one more forward).
    """

    vocab_size: int = 256
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 2
    head_k_dim: int = 32
    mixer: str = "prism"
    solver_steps: int = 2            # L: write terms per token (PRISM)
    solver_nonlinearity: str = "gelu"
    use_short_conv: bool = True
    use_gain: bool = True
    solver_rank: int | None = None   # None: full-rank solver projections
    conv_kernel_size: int = 4
    mlp_hidden_dim: int = 128
    tie_embeddings: bool = True
    dtype: str = "float32"           # compute dtype
    param_dtype: str = "float32"
    op_impl: str = "auto"            # the kernels on a Hopper GPU with 16-bit compute, else the chunk form
    chunk_size: int | None = None    # None: the op form's default (chunk 64; pallas 64 on Hopper, else 32)
    # op_impl "pallas" only: further prism_pallas keyword arguments as a JSON object, e.g.
    # '{"mosaic_stages": ["intra", "state", "outputs", "pullback", "reverse", "grads"]}'
    pallas_options: str = ""
    gla_decay: bool = True           # mixer "gla": False fixes the decay to 1 (plain linear attention)
    ttt_mini_batch: int = 16
    ttt_base_lr: float = 1.0
    max_seq_len: int = 2048          # attention KV cache length for generation
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    scan_layers: bool = False        # one block scanned over the layer axis (compile once)
    remat_policy: str = "none"       # "full": recompute each block in the backward pass

    def __post_init__(self):
        def fail(field, expected):
            raise ValueError(f"PrismLMConfig.{field} = {getattr(self, field)!r}: expected {expected}")

        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "head_k_dim", "solver_steps",
                     "conv_kernel_size", "mlp_hidden_dim", "chunk_size", "ttt_mini_batch", "max_seq_len"):
            value = getattr(self, name)
            if name == "chunk_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(name, "a positive int" + (" (L >= 1)" if name == "solver_steps" else ""))
        if self.d_model % self.num_heads:
            fail("d_model", f"a multiple of num_heads = {self.num_heads}")
        if self.mixer not in MIXERS:
            fail("mixer", f"one of {MIXERS}")
        if self.solver_nonlinearity not in NONLINEARITIES:
            fail("solver_nonlinearity", f"one of {NONLINEARITIES}")
        for name in ("use_short_conv", "use_gain", "tie_embeddings", "gla_decay", "scan_layers"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "a bool")
        if self.solver_rank is not None and (isinstance(self.solver_rank, bool)
                                             or not isinstance(self.solver_rank, int) or self.solver_rank < 1):
            fail("solver_rank", "None (full rank) or a positive int")
        if self.dtype not in COMPUTE_DTYPES:
            fail("dtype", f"one of {COMPUTE_DTYPES}")
        if self.param_dtype not in COMPUTE_DTYPES:
            fail("param_dtype", f"one of {COMPUTE_DTYPES}")
        if self.remat_policy not in REMAT_POLICIES:
            fail("remat_policy", f"one of {REMAT_POLICIES}")
        if self.op_impl not in OP_IMPLS:
            fail("op_impl", f"one of {OP_IMPLS}")
        if self.chunk_size is not None and self.chunk_size & (self.chunk_size - 1):
            fail("chunk_size", "None (the op form's default) or a power of two")
        if not isinstance(self.pallas_options, str):
            fail("pallas_options", "a JSON object string ('' for none)")
        if self.pallas_options:
            from prism_jax.ops.prism import check_pallas_options  # noqa: PLC0415

            try:
                options = json.loads(self.pallas_options)
            except json.JSONDecodeError as e:
                fail("pallas_options", f"a JSON object of prism_pallas keyword arguments ({e})")
            check_pallas_options(options, self.op_impl, where="PrismLMConfig.pallas_options")
        if self.mixer == "attention" and (self.d_model // self.num_heads) % 2:
            fail("d_model", "d_model // num_heads even (rotary embedding) for mixer='attention'")
        if not self.ttt_base_lr > 0:
            fail("ttt_base_lr", "> 0")
        if not self.rope_base > 0:
            fail("rope_base", "> 0")
        if not self.norm_eps > 0:
            fail("norm_eps", "> 0")

    @property
    def head_v_dim(self) -> int:
        return self.d_model // self.num_heads


# Sizes follow the GDN / Mamba language-model ladder (d_model 768 / 1024 / 2048, SwiGLU width ~8/3 d).
# PRISM presets use L = 3 solver steps with rank-64/128 solver projections (solver adds ~3% params).
_PRESETS = {
    "tiny": dict(vocab_size=256, d_model=64, num_layers=2, num_heads=2, head_k_dim=32, mlp_hidden_dim=128,
                 solver_steps=2, solver_rank=None, chunk_size=16, ttt_mini_batch=4, max_seq_len=256),
    "130m": dict(vocab_size=32000, d_model=768, num_layers=12, num_heads=6, head_k_dim=128,
                 mlp_hidden_dim=2048, solver_steps=3, solver_rank=64, max_seq_len=2048),
    "370m": dict(vocab_size=32000, d_model=1024, num_layers=24, num_heads=8, head_k_dim=128,
                 mlp_hidden_dim=2816, solver_steps=3, solver_rank=64, max_seq_len=2048),
    "1.3b": dict(vocab_size=32000, d_model=2048, num_layers=24, num_heads=16, head_k_dim=128,
                 mlp_hidden_dim=5632, solver_steps=3, solver_rank=128,
                 max_seq_len=2048),
}
PRESETS = tuple(_PRESETS)


def get_preset(name: str, **overrides) -> PrismLMConfig:
    """The named preset (one of PRESETS) with `overrides` applied, e.g. get_preset("130m", mixer="gdn")."""
    if name not in _PRESETS:
        raise ValueError(f"get_preset: `name` is {name!r}, expected one of {PRESETS}")
    fields = {f.name for f in dataclasses.fields(PrismLMConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"get_preset: unknown PrismLMConfig fields {unknown}")
    return PrismLMConfig(**{**_PRESETS[name], **overrides})
