"""Train one small model on one probing task and evaluate it on fresh held-out samples.

Loss and accuracy are computed on the answer positions only (the task's mask). Training batches come
from the seed's training stream, evaluation batches from a disjoint stream, so every evaluated
sequence is fresh. The optimiser is optax AdamW with global-norm clipping (settings default to the
authors' released probing script: lr 1e-3, weight decay 1e-4, clip 5.0, batch 32).
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.probing.tasks import chance_level, get_task, make_batch

MODELS = ("transformer", "la", "gdn", "prism")
MODEL_LABELS = {"transformer": "Transformer", "la": "Linear attn.", "gdn": "Gated DeltaNet", "prism": "PRISM"}
EVAL_SEED_OFFSET = 1_000_003  # evaluation stream: seed + offset, never used for training


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    task: str = "mqar"
    model: str = "prism"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 128
    vocab: int = 64
    d_model: int = 16
    num_layers: int = 2
    num_heads: int = 1
    solver_steps: int = 2
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    clip_norm: float = 5.0
    warmup_steps: int = 0
    mlp_hidden_dim: int = 0  # 0: 4 * d_model
    chunk_size: int = 16
    op_impl: str = "chunk"  # the recurrence form of the recurrent mixers: reference, scan, chunk, pallas
    eval_samples: int = 2048
    eval_batch_size: int = 256
    log_every: int = 50

    def validate(self):
        get_task(self.task)
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        for name in ("steps", "batch_size", "seq_len", "d_model", "num_layers", "num_heads", "solver_steps",
                     "eval_samples", "eval_batch_size", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.mlp_hidden_dim < 0:
            raise ValueError(f"mlp_hidden_dim must be >= 0 (0: 4 * d_model), got {self.mlp_hidden_dim}")
        from prism_jax.models.config import OP_IMPLS

        if self.op_impl not in OP_IMPLS:
            raise ValueError(f"op_impl must be one of {OP_IMPLS}, got {self.op_impl!r}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")


def model_config(cfg: ProbeConfig):
    """The prism_jax.models config for a probing model. "la" (linear attention without decay) is the
    GLA mixer with its decay fixed to 1 (see `_no_decay_overrides`)."""
    from prism_jax.models import get_preset

    mixer = {"transformer": "attention", "la": "gla", "gdn": "gdn", "prism": "prism"}[cfg.model]
    overrides = dict(d_model=cfg.d_model, num_layers=cfg.num_layers, vocab_size=cfg.vocab, mixer=mixer,
                     num_heads=cfg.num_heads, head_k_dim=cfg.d_model // cfg.num_heads,
                     mlp_hidden_dim=cfg.mlp_hidden_dim or 4 * cfg.d_model, chunk_size=cfg.chunk_size,
                     op_impl=cfg.op_impl,
                     max_seq_len=max(cfg.seq_len, 256))
    if cfg.model == "prism":
        overrides["solver_steps"] = cfg.solver_steps
    if cfg.model == "la":
        overrides.update(no_decay_overrides())
    return get_preset("tiny", **overrides)


def no_decay_overrides() -> dict:
    """Config overrides that fix the GLA decay to 1, if PrismLMConfig has such a switch; {} otherwise
    (then "la" is GLA with its learned data-dependent decay, and the results say so)."""
    from prism_jax.models import PrismLMConfig

    fields = {f.name for f in dataclasses.fields(PrismLMConfig)}
    for name, value in (("gla_decay", False), ("use_decay", False), ("decay", False), ("fixed_decay", True)):
        if name in fields:
            return {name: value}
    return {}


def _loss_and_accuracy(logits, targets, mask):
    """Mean cross-entropy and accuracy over the masked positions. logits [B, T, V] f32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    weights = mask.astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return (nll * weights).sum() / count, (correct * weights).sum() / count, count


def step_functions(model, learning_rate, weight_decay, clip_norm, warmup_steps):
    """(optax transform, train step, eval step) of one run, not vmapped or jitted.

    train step: (params, opt_state, batch) -> (params, opt_state, loss, acc);
    eval step: (params, batch) -> (loss, acc, answer count). batch: tokens/targets [B, T], mask [B, T].
    """
    if warmup_steps:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
            [warmup_steps])
    else:
        lr = learning_rate
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(lr, weight_decay=weight_decay))

    def loss_fn(p, batch):
        logits = model.apply({"params": p}, batch["tokens"])
        loss, acc, _ = _loss_and_accuracy(logits, batch["targets"], batch["mask"])
        return loss, acc

    def one_train_step(p, o, batch):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss, acc

    def one_eval_step(p, batch):
        logits = model.apply({"params": p}, batch["tokens"])
        return _loss_and_accuracy(logits, batch["targets"], batch["mask"])

    return tx, one_train_step, one_eval_step


@functools.lru_cache(maxsize=16)
def _compiled_steps(model, learning_rate, weight_decay, clip_norm, warmup_steps):
    """(optax transform, jitted train step, jitted eval step) for a hashable Flax `model`.

    Both steps are vmapped over a leading "run" axis of params, optimiser state and batch, so several
    independent runs (the tasks of one model) train in one call: on a small CPU the per-op overhead,
    not the arithmetic, dominates these tiny models. Each run's clipping and AdamW update see only its
    own gradients, so the math is that of separate runs. Cached so repeated calls compile once.
    """
    tx, one_train_step, one_eval_step = step_functions(model, learning_rate, weight_decay, clip_norm, warmup_steps)
    return tx, jax.jit(jax.vmap(one_train_step)), jax.jit(jax.vmap(one_eval_step))


@functools.lru_cache(maxsize=16)
def _compiled_init(model):
    """jit(vmap(init)): keys [R, 2], tokens [R, B, T] -> params with a leading run axis. Jitted because
    an eager init of the chunked recurrence dispatches hundreds of small ops."""
    return jax.jit(jax.vmap(lambda key, tokens: model.init(key, tokens)["params"]))


def _run_batches(cfgs, rngs, batch_size):
    batches = [make_batch(c.task, r, batch_size, c.seq_len, c.vocab) for c, r in zip(cfgs, rngs)]
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def train_and_evaluate(cfg: ProbeConfig, *, model=None, progress=None) -> dict:
    """Train `cfg.model` on `cfg.task` and return a JSON-able result dict (see `train_and_evaluate_many`)."""
    return train_and_evaluate_many([cfg], model=model, progress=progress)[0]


def train_and_evaluate_many(cfgs, *, model=None, progress=None) -> list[dict]:
    """Train independent runs that share a model and optimiser settings (they may differ in task and
    seed) side by side, and return one JSON-able result dict per run.

    `model` (a Flax module taking tokens [B, T] int32 and returning logits [B, T, V]) overrides the
    prism_jax.models build; tests use it. `progress(step, losses)` is called every `log_every` steps.
    """
    cfgs = list(cfgs)
    if not cfgs:
        raise ValueError("cfgs must hold at least one ProbeConfig")
    for c in cfgs:
        c.validate()
    shared = [dataclasses.replace(c, task="mqar", seed=0) for c in cfgs]
    if any(s != shared[0] for s in shared):
        raise ValueError("runs trained together must differ only in task and seed")
    cfg = cfgs[0]
    if model is None:
        from prism_jax.models import PrismLM

        mcfg = model_config(cfg)
        model = PrismLM(mcfg)
        model_cfg_dict = dataclasses.asdict(mcfg) if dataclasses.is_dataclass(mcfg) else repr(mcfg)
    else:
        model_cfg_dict = repr(model)

    train_rngs = [np.random.default_rng(c.seed) for c in cfgs]
    eval_rngs = [np.random.default_rng(c.seed + EVAL_SEED_OFFSET) for c in cfgs]
    batch = _run_batches(cfgs, train_rngs, cfg.batch_size)
    keys = jnp.stack([jax.random.PRNGKey(c.seed) for c in cfgs])
    params = _compiled_init(model)(keys, jnp.asarray(batch["tokens"]))
    num_params = int(sum(np.prod(p.shape[1:]) for p in jax.tree_util.tree_leaves(params)))

    tx, train_step, eval_step = _compiled_steps(model, cfg.learning_rate, cfg.weight_decay, cfg.clip_norm,
                                                cfg.warmup_steps)
    opt_state = jax.vmap(tx.init)(params)

    histories = [[] for _ in cfgs]
    t0 = time.perf_counter()
    compile_s, t_loop = None, None
    for step in range(1, cfg.steps + 1):
        params, opt_state, loss, acc = train_step(params, opt_state, batch)
        if step == 1:
            loss.block_until_ready()
            compile_s = time.perf_counter() - t0
            t_loop = time.perf_counter()
        if step == 1 or step % cfg.log_every == 0 or step == cfg.steps:
            losses, accs = np.asarray(loss).tolist(), np.asarray(acc).tolist()
            if not np.all(np.isfinite(losses)):
                raise FloatingPointError(f"non-finite training loss {losses} at step {step}")
            for h, l, a in zip(histories, losses, accs):
                h.append({"step": step, "loss": l, "acc": a})
            if progress is not None:
                progress(step, losses)
        if step < cfg.steps:
            batch = _run_batches(cfgs, train_rngs, cfg.batch_size)
    jax.block_until_ready(params)
    train_s = time.perf_counter() - t_loop if cfg.steps > 1 else 0.0

    # Equal-size evaluation batches (one compile): eval_samples is rounded up to a whole number of them.
    eval_bs = min(cfg.eval_batch_size, cfg.eval_samples)
    totals = np.zeros((3, len(cfgs)))
    for _ in range(-(-cfg.eval_samples // eval_bs)):
        loss, acc, count = (np.asarray(x, np.float64) for x in
                            eval_step(params, _run_batches(cfgs, eval_rngs, eval_bs)))
        totals += np.stack([loss * count, acc * count, count])

    return [result_record(c, totals[:, i], histories[i], num_params, len(cfgs), model_cfg_dict,
                          compile_s=compile_s, train_s=train_s,
                          steps_per_s=(c.steps - 1) / train_s if train_s > 0 else None)
            for i, c in enumerate(cfgs)]


def result_record(c, totals, history, num_params, runs_together, model_cfg_dict, **timing) -> dict:
    """The JSON record of one (task, model, seed) run; totals = (loss sum, correct sum, answer count)."""
    return {
        "task": c.task, "model": c.model, "seed": c.seed,
        "eval_accuracy": totals[1] / totals[2],
        "eval_loss": totals[0] / totals[2],
        "eval_answers": int(totals[2]),
        "chance": chance_level(c.task, c.vocab),
        "final_train_loss": history[-1]["loss"],
        "num_params": num_params,
        "runs_trained_together": runs_together,
        **timing,
        "history": history,
        "probe_config": dataclasses.asdict(c),
        "model_config": model_cfg_dict,
        "env": {"jax": jax.__version__, "backend": jax.default_backend(),
                "device": str(jax.devices()[0].device_kind), "python": platform.python_version(),
                "argv": sys.argv},
    }
