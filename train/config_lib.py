"""The training config: its defaults (the schema), model-config conversion and validation.

Config files under `configs/` call `base_config(preset)` and change a few fields. Every field
is overridable from the command line (`--config.model.solver_steps=3`) or from gin
(`train/gin_frontend.py`). `validate(config)` runs before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from train import mesh as mesh_lib

INIT_ON = ("auto", "host", "device")
DISTRIBUTED_MODES = ("auto", "on", "off")


# PrismLMConfig fields typed `int | None`: a None default becomes a typed placeholder, so that
# `--config.model.chunk_size=32` can override it (ml_collections refuses to override a plain None).
OPTIONAL_INT_MODEL_FIELDS = ("chunk_size", "solver_rank")


def model_fields(preset: str, **overrides) -> dict:
    """The model preset `preset` as a plain dict (every PrismLMConfig field)."""
    from prism_jax.models import get_preset  # noqa: PLC0415

    return dataclasses.asdict(get_preset(preset, **overrides))


def _model_section(fields: dict) -> ml_collections.ConfigDict:
    fields = {k: (ml_collections.config_dict.placeholder(int) if k in OPTIONAL_INT_MODEL_FIELDS and v is None
                  else v) for k, v in fields.items()}
    return ml_collections.ConfigDict(fields)


def base_config(preset: str = "tiny", *, model: dict | None = None, **model_overrides) -> ml_collections.ConfigDict:
    """Every training field with its default; the model section is the full `preset`.

    `model` replaces the preset lookup with the given dict of model fields (used by tests with a
    stand-in model, and by the schema check, which needs no model).
    """
    c = ml_collections.ConfigDict()
    c.model_preset = preset
    c.model = _model_section(model if model is not None else model_fields(preset, **model_overrides))

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ""  # "" = the embedded stdlib corpus, prepared into <workdir>/data
    c.data.tokenizer = "byte"  # for the embedded corpus: "byte" or a SentencePiece .model path
    c.data.val_permille = 50  # for the embedded corpus: share of documents held out, by content hash
    c.data.seq_len = 128
    c.data.document_boundaries = True  # False: no state reset / loss mask at document boundaries

    c.seed = 0
    c.batch_size = 16  # global rows per optimizer step (over all hosts and micro-batches)
    c.grad_accum_steps = 1  # micro-batches per optimizer step
    c.total_steps = 1000
    c.learning_rate = 3e-3
    c.warmup_steps = 100
    c.min_lr_ratio = 0.1  # the cosine ends at learning_rate * min_lr_ratio
    c.weight_decay = 0.1
    c.adam_b1 = 0.9
    c.adam_b2 = 0.95
    c.adam_eps = 1e-8
    c.grad_clip_norm = 1.0  # <= 0 turns clipping off

    c.mesh_shape = (-1, 1, 1, 1)  # (data, fsdp, tensor, sequence); -1 = the remaining devices
    c.distributed = "auto"  # auto: jax.distributed.initialize() when the environment names a cluster
    # JAX's persistent compilation cache: "" = off; a directory (local, or a gs:// / other URL JAX reads)
    # where compiled steps are kept, so a restarted or repeated run skips XLA's and the kernels' compile.
    c.compilation_cache_dir = ""
    # Where the fresh params and optimizer state are made before they move into their shardings: "device"
    # (one program compiled for the accelerator), "host" (the same program on XLA:CPU, then copied) or "auto"
    # (host on a single-process GPU run, else device). On an H100 the 130m model's init program took ~120 s
    # to compile for the GPU (session 23): ~1,100 small kernels for ~300 parameters and their Adam moments.
    c.init_on = "auto"

    c.log_every_steps = 10
    c.eval_every_steps = 200
    c.eval_batches = 8  # per evaluation, per host (padded when the split runs out); <= 0: whole split
    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 2  # the latest K ...
    c.keep_best_checkpoints = 1  # ... plus the best N by eval loss
    c.async_checkpointing = True
    c.stop_at_step = 0  # > 0: save and stop there (simulates a preemption); 0: run to total_steps

    c.progress_bar = True
    c.tensorboard = True
    c.sample = ml_collections.ConfigDict()
    c.sample.prompt = "def "
    c.sample.max_new_tokens = 200  # 0: no sample at the end
    c.sample.temperature = 0.8
    c.sample.top_k = 40
    return c


def model_config(config):
    """The PrismLMConfig described by `config.model`."""
    from prism_jax.models import PrismLMConfig  # noqa: PLC0415

    return PrismLMConfig(**config.model.to_dict())


def _check_same_keys(config, schema, where="config"):
    for key in config.keys():
        if key not in schema:
            raise ValueError(f"unknown field {where}.{key} (known: {', '.join(sorted(schema.keys()))})")
    for key in schema.keys():
        if key not in config:
            raise ValueError(f"missing field {where}.{key}")
        if isinstance(schema[key], ml_collections.ConfigDict) and key != "model":
            _check_same_keys(config[key], schema[key], f"{where}.{key}")


def validate(config, num_devices: int, process_count: int = 1, *, check_model: bool = True) -> None:
    """Raises ValueError naming the field when `config` cannot run on `num_devices` devices."""
    _check_same_keys(config, base_config(model={}))
    if check_model:
        model_keys = set(model_fields("tiny").keys())
        for key in config.model.keys():
            if key not in model_keys:
                raise ValueError(f"unknown field config.model.{key} (known: {', '.join(sorted(model_keys))})")
        try:
            model_config(config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config.model is not a valid model config: {e}") from e

    mesh_shape = mesh_lib.resolve_mesh_shape(config.mesh_shape, num_devices)
    shards = math.prod(dict(zip(mesh_lib.MESH_AXES, mesh_shape))[a] for a in mesh_lib.BATCH_AXES)

    def positive(name):
        if config[name] <= 0:
            raise ValueError(f"config.{name} must be > 0, got {config[name]}")

    for name in ("batch_size", "grad_accum_steps", "total_steps", "log_every_steps", "eval_every_steps",
                 "checkpoint_every_steps", "keep_checkpoints", "learning_rate"):
        positive(name)
    if config.batch_size % process_count:
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the {process_count} hosts")
    if config.batch_size % config.grad_accum_steps or (config.batch_size // process_count) % config.grad_accum_steps:
        raise ValueError(
            f"config.batch_size={config.batch_size} (per host {config.batch_size // process_count}) is not "
            f"divisible by config.grad_accum_steps={config.grad_accum_steps}"
        )
    micro = config.batch_size // config.grad_accum_steps
    if micro % shards:
        raise ValueError(
            f"the micro-batch of {micro} rows (config.batch_size / grad_accum_steps) is not divisible by the "
            f"data axes of the mesh (data x fsdp = {shards}, mesh_shape {mesh_shape})"
        )
    if not 0 <= config.warmup_steps <= config.total_steps:
        raise ValueError(f"config.warmup_steps must be in [0, total_steps], got {config.warmup_steps}")
    if not 0.0 <= config.min_lr_ratio <= 1.0:
        raise ValueError(f"config.min_lr_ratio must be in [0, 1], got {config.min_lr_ratio}")
    if config.weight_decay < 0:
        raise ValueError(f"config.weight_decay must be >= 0, got {config.weight_decay}")
    if not 0 <= config.stop_at_step <= config.total_steps:
        raise ValueError(f"config.stop_at_step must be in [0, total_steps], got {config.stop_at_step}")
    if config.keep_best_checkpoints < 0:
        raise ValueError(f"config.keep_best_checkpoints must be >= 0, got {config.keep_best_checkpoints}")
    if config.distributed not in DISTRIBUTED_MODES:
        raise ValueError(f"config.distributed must be one of {DISTRIBUTED_MODES}, got {config.distributed!r}")
    if config.init_on not in INIT_ON:
        raise ValueError(f"config.init_on must be one of {INIT_ON}, got {config.init_on!r}")
    if config.data.seq_len < 2:
        raise ValueError(f"config.data.seq_len must be >= 2, got {config.data.seq_len}")
    sequence = dict(zip(mesh_lib.MESH_AXES, mesh_shape))["sequence"]
    if config.data.seq_len % sequence:
        raise ValueError(
            f"config.data.seq_len={config.data.seq_len} is not divisible by the sequence axis of the mesh "
            f"(sequence = {sequence}, mesh_shape {mesh_shape}); each device holds seq_len / sequence tokens"
        )
    max_len = config.model.get("max_seq_len", None) if "model" in config else None
    if max_len and config.data.seq_len > max_len:
        raise ValueError(f"config.data.seq_len={config.data.seq_len} exceeds config.model.max_seq_len={max_len}")
    if config.sample.max_new_tokens < 0:
        raise ValueError(f"config.sample.max_new_tokens must be >= 0, got {config.sample.max_new_tokens}")


# ----------------------------------------------------------------------------- recipes used by configs/

# Tokens per optimizer step ~0.5M (256 rows x 2048), as in the GDN / Mamba ladders.
_LARGE_SCHEDULES = {
    "130m": dict(learning_rate=3e-3, total_steps=20_000, warmup_steps=1_000, grad_accum_steps=4),
    "370m": dict(learning_rate=1.5e-3, total_steps=30_000, warmup_steps=1_500, grad_accum_steps=8),
    "1.3b": dict(learning_rate=8e-4, total_steps=50_000, warmup_steps=2_000, grad_accum_steps=16),
}


def tiny_config(**model_overrides) -> ml_collections.ConfigDict:
    """The tiny preset on the embedded corpus, sized for 2-4 minutes on a 2-core CPU."""
    # On CPU the token-loop form of the op is ~3x faster than the chunk form at these sizes
    # (d_model 64, T 128) and compiles ~3x faster; GPU/TPU configs keep "chunk" / "pallas".
    model_overrides.setdefault("op_impl", "reference")
    config = base_config("tiny", **model_overrides)
    config.data.seq_len = 128
    config.batch_size = 16
    config.total_steps = 300
    config.warmup_steps = 30
    config.learning_rate = 3e-3
    config.log_every_steps = 10
    config.eval_every_steps = 100
    config.eval_batches = 8
    config.checkpoint_every_steps = 100
    return config


def large_config(preset: str, **model_overrides) -> ml_collections.ConfigDict:
    """130m / 370m / 1.3b: bf16 compute with float32 params, seq 2048, FSDP over every device."""
    if preset not in _LARGE_SCHEDULES:
        raise ValueError(f"large preset must be one of {tuple(_LARGE_SCHEDULES)}, got {preset!r}")
    config = base_config(preset, **model_overrides)
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.data.seq_len = 2048
    config.batch_size = 256
    for key, value in _LARGE_SCHEDULES[preset].items():
        config[key] = value
    config.log_every_steps = 50
    config.eval_every_steps = 1_000
    config.eval_batches = 16
    config.checkpoint_every_steps = 1_000
    config.keep_checkpoints = 3
    config.mesh_shape = (1, -1, 1, 1)
    config.sample.max_new_tokens = 256
    return config


def sized_config(size: str = "tiny", **model_overrides) -> ml_collections.ConfigDict:
    """`tiny_config` or `large_config(size)`, with model overrides such as mixer='gdn'."""
    return tiny_config(**model_overrides) if size == "tiny" else large_config(size, **model_overrides)
