"""Probing runs with the data made on the accelerator: many steps per jitted call, no host work per step.

`train_and_evaluate_on_device(cfgs)` trains independent runs of one model (any mix of tasks and
seeds; e.g. 9 tasks x 3 seeds = 27 runs) side by side: params, AdamW state and data stream carry a
leading run axis, one `lax.scan` does `steps_per_call` training steps of every run per call, and each
step generates its batches inside the scan with `jax_tasks.make_batch_jax`. A run's data depends only
on (task, seed, step), so a run trained alone or with others sees the same batches, and the math is
that of separate runs (`tests/probing/test_device.py`).

Streams (jax.random): training batch of step s = fold_in(fold_in(key(seed), task id), s); evaluation
batch i = fold_in(fold_in(key(seed + EVAL_SEED_OFFSET), task id), i), never used for training.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from train.probing.jax_tasks import make_batch_jax
from train.probing.run import EVAL_SEED_OFFSET, model_config, result_record, step_functions
from train.probing.tasks import TASK_NAMES, chance_level


class BudgetExceeded(RuntimeError):
    """Raised between calls when the runs cannot finish before the deadline; nothing is returned."""


def _stream_keys(cfgs, offset):
    return jnp.stack([jax.random.fold_in(jax.random.PRNGKey(c.seed + offset), TASK_NAMES.index(c.task))
                      for c in cfgs])


def _batches_fn(cfgs, batch_size):
    """(keys [R, 2], index) -> batch dict of [R, B, T] arrays: each run's batch from its own task."""
    tasks = [c.task for c in cfgs]
    groups = {t: [i for i, x in enumerate(tasks) if x == t] for t in dict.fromkeys(tasks)}
    order = np.argsort(np.concatenate([np.array(g) for g in groups.values()]))
    cfg = cfgs[0]

    def batches(keys, index):
        parts = []
        for task, members in groups.items():
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, index))(keys[np.array(members)])
            parts.append(jax.vmap(lambda k, task=task: make_batch_jax(task, k, batch_size, cfg.seq_len,
                                                                        cfg.vocab))(step_keys))
        return {name: jnp.concatenate([p[name] for p in parts])[order] for name in parts[0]}

    return batches


def train_and_evaluate_on_device(cfgs, *, model=None, steps_per_call: int = 200, deadline: float | None = None,
                                 progress=None) -> list[dict]:
    """Train runs that differ only in task and seed; return one JSON-able result dict per run (the
    fields of `run.train_and_evaluate_many`, plus "data": "device").

    `model` overrides the prism_jax.models build (tests). `steps_per_call`: training steps per jitted
    call. `deadline` (a time.time() value): after each call, if the measured pace says the remaining
    calls and the evaluation cannot end before it, raise `BudgetExceeded`. `progress(step, losses)` is
    called after each call with the last step and its per-run losses.
    """
    cfgs = list(cfgs)
    if not cfgs:
        raise ValueError("cfgs must hold at least one ProbeConfig")
    for c in cfgs:
        c.validate()
    if not isinstance(steps_per_call, int) or steps_per_call < 1:
        raise ValueError(f"steps_per_call must be a positive int, got {steps_per_call!r}")
    if any(dataclasses.replace(c, task="mqar", seed=0) != dataclasses.replace(cfgs[0], task="mqar", seed=0)
           for c in cfgs):
        raise ValueError("runs trained together must differ only in task and seed")
    if len({(c.task, c.seed) for c in cfgs}) != len(cfgs):
        raise ValueError("runs trained together must be distinct (task, seed) pairs")
    cfg = cfgs[0]
    if model is None:
        from prism_jax.models import PrismLM

        mcfg = model_config(cfg)
        model = PrismLM(mcfg)
        model_cfg_dict = dataclasses.asdict(mcfg)
    else:
        model_cfg_dict = repr(model)

    tx, one_train_step, one_eval_step = step_functions(model, cfg.learning_rate, cfg.weight_decay, cfg.clip_norm,
                                                       cfg.warmup_steps)
    train_batches = _batches_fn(cfgs, cfg.batch_size)
    eval_bs = min(cfg.eval_batch_size, cfg.eval_samples)
    eval_batches = _batches_fn(cfgs, eval_bs)
    num_eval_batches = -(-cfg.eval_samples // eval_bs)
    train_keys, eval_keys = _stream_keys(cfgs, 0), _stream_keys(cfgs, EVAL_SEED_OFFSET)

    @jax.jit
    def init(keys, data_keys):
        tokens = train_batches(data_keys, 0)["tokens"]
        params = jax.vmap(lambda k, t: model.init(k, t)["params"])(keys, tokens)
        return params, jax.vmap(tx.init)(params)

    def block(params, opt_state, first_step, num_steps):
        def body(carry, step):
            p, o = carry
            p, o, loss, acc = jax.vmap(one_train_step)(p, o, train_batches(train_keys, step))
            return (p, o), (loss, acc)

        (params, opt_state), (loss, acc) = jax.lax.scan(body, (params, opt_state),
                                                        first_step + jnp.arange(num_steps))
        return params, opt_state, loss, acc

    @jax.jit
    def evaluate(params):
        def body(totals, i):
            loss, acc, count = jax.vmap(one_eval_step)(params, eval_batches(eval_keys, i))
            return totals + jnp.stack([loss * count, acc * count, count]), None

        totals, _ = jax.lax.scan(body, jnp.zeros((3, len(cfgs)), jnp.float32), jnp.arange(num_eval_batches))
        return totals

    init_keys = jnp.stack([jax.random.PRNGKey(c.seed) for c in cfgs])
    t0 = time.perf_counter()
    params, opt_state = init(init_keys, train_keys)
    num_params = int(sum(np.prod(p.shape[1:]) for p in jax.tree_util.tree_leaves(params)))

    # Blocks of steps_per_call steps (the last may be shorter: a second compile). Steps are 1-based in
    # the history; the scan index is step - 1 (the data of step s uses index s - 1).
    sizes = [steps_per_call] * (cfg.steps // steps_per_call) + ([cfg.steps % steps_per_call]
                                                                 if cfg.steps % steps_per_call else [])
    compiled, compile_s = {}, 0.0
    for n in sorted(set(sizes)):
        t = time.perf_counter()
        compiled[n] = jax.jit(block, static_argnums=3, donate_argnums=(0, 1)).lower(
            params, opt_state, jnp.int32(0), n).compile()
        compile_s += time.perf_counter() - t
    t = time.perf_counter()
    compiled_eval = evaluate.lower(params).compile()
    compile_s += time.perf_counter() - t
    setup_s = time.perf_counter() - t0

    histories = [[] for _ in cfgs]
    done, t_loop = 0, time.perf_counter()
    eval_s_estimate = None
    for n in sizes:
        params, opt_state, loss, acc = compiled[n](params, opt_state, jnp.int32(done))
        loss, acc = np.asarray(loss), np.asarray(acc)  # [n, R]; also waits for the call
        if not np.all(np.isfinite(loss)):
            raise FloatingPointError(f"non-finite training loss in steps {done + 1}..{done + n}")
        for j in range(n):
            step = done + j + 1
            if step == 1 or step % cfg.log_every == 0 or step == cfg.steps:
                for h, l, a in zip(histories, loss[j].tolist(), acc[j].tolist()):
                    h.append({"step": step, "loss": l, "acc": a})
        done += n
        if progress is not None:
            progress(done, loss[-1].tolist())
        if deadline is not None and done < cfg.steps:
            pace = (time.perf_counter() - t_loop) / done
            if eval_s_estimate is None:
                eval_s_estimate = pace * num_eval_batches  # an eval batch costs less than a train step
            if time.time() + pace * (cfg.steps - done) + eval_s_estimate > deadline:
                raise BudgetExceeded(f"{done}/{cfg.steps} steps after {time.perf_counter() - t_loop:.0f} s: "
                                     f"the rest needs ~{pace * (cfg.steps - done):.0f} s more")
    train_s = time.perf_counter() - t_loop
    t = time.perf_counter()
    totals = np.asarray(compiled_eval(params), np.float64)
    eval_s = time.perf_counter() - t

    return [result_record(c, totals[:, i], histories[i], num_params, len(cfgs), model_cfg_dict,
                          data="device", steps_per_call=steps_per_call, compile_s=compile_s,
                          setup_s=setup_s, train_s=train_s, eval_s=eval_s,
                          steps_per_s=cfg.steps / train_s if train_s > 0 else None)
            for i, c in enumerate(cfgs)]
