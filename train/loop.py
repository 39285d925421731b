"""The training loop: train state, jitted sharded step functions, evaluation, logging, checkpoints.

Data flow: config -> mesh + logical rules -> model init under the mesh -> grain iterator ->
jitted step (loss -> grads accumulated over micro-batches -> optax update) -> orbax save
(state + iterator) -> metric writers.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from train import checkpoint as checkpoint_lib
from train import config_lib
from train import mesh as mesh_lib
from train import metrics as metrics_lib
from train import optim
from train.data import pipeline
from train.data import prepare as prepare_lib
from train.data import tokenizers


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


# ----------------------------------------------------------------------------- loss


def target_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T-1] bool: which next-token predictions count.

    The prediction at t targets token t+1; it counts only when both lie in the same (non-padding)
    document. Across a packing boundary the target is another document's first token, which the
    model cannot know, so it is skipped.
    """
    return (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)


def nll_terms(logits: jax.Array, batch: dict[str, jax.Array]):
    """(per-position nll [B, T-1] f32 masked to 0, mask [B, T-1], targets [B, T-1])."""
    targets = batch["tokens"][:, 1:]
    mask = target_mask(batch["segment_ids"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), targets)
    return jnp.where(mask, nll, 0.0), mask, targets


def _forward(model, params, batch):
    return model.apply(
        {"params": params}, batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"]
    )


def make_train_step(model, optimizer):
    """state, batch [A, B/A, T] -> state, metrics. Gradients are summed over the A micro-batches in
    float32 and divided by the total count of target tokens, so accumulation equals one big batch."""

    def summed_nll(params, micro):
        nll, mask, _ = nll_terms(_forward(model, params, micro), micro)
        return nll.sum(), mask.sum()

    grad_fn = jax.value_and_grad(summed_nll, has_aux=True)

    def step(state: TrainState, batch):
        def accumulate(carry, micro):
            grads_acc, nll_acc, count_acc = carry
            (nll, count), grads = grad_fn(state.params, micro)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            return (grads_acc, nll_acc + nll, count_acc + count), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        (grads, nll, count), _ = jax.lax.scan(accumulate, init, batch)
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": nll / denom, "grad_norm": optax.tree.norm(grads), "target_tokens": count}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def make_eval_step(model, token_bytes: np.ndarray):
    """params, batch [B, T] -> summed nll, target count, target bytes (for bits per byte)."""
    token_bytes = jnp.asarray(token_bytes, jnp.float32)

    def step(params, batch):
        nll, mask, targets = nll_terms(_forward(model, params, batch), batch)
        return {
            "nll_sum": nll.sum(),
            "tokens": mask.sum().astype(jnp.float32),
            "bytes": jnp.where(mask, token_bytes[targets], 0.0).sum(),
        }

    return step


# ----------------------------------------------------------------------------- state


def sharding_context(mesh, rules):
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack


# Parameter shapes do not depend on the sequence length, so `model.init` traces its forward on at most this
# many tokens (shorter tracing). The compile does not shrink with it: JAX drops the forward from the init
# program (only the parameters are outputs), and the 130m init took ~120 s to compile for an H100 at 64
# tokens (session 23) against 91 s at 2,048 (session 22). That compile is why `config.init_on` exists.
INIT_TOKENS = 64


def _init_fn(model, optimizer, seq_len: int):
    seq_len = min(seq_len, INIT_TOKENS)

    def init_boxed(rng):
        dummy = jnp.zeros((1, seq_len), jnp.int32)
        variables = model.init(rng, dummy, segment_ids=jnp.ones_like(dummy), positions=dummy)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    return init_boxed


def train_state_shardings(model, optimizer, mesh, rules, seq_len: int):
    """(abstract TrainState with shardings attached, the NamedSharding tree), without allocating."""
    init_boxed = _init_fn(model, optimizer, seq_len)
    with sharding_context(mesh, rules):
        abstract = jax.eval_shape(init_boxed, jax.random.key(0))
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.unbox(abstract), shardings)
    return abstract, shardings


def init_placement(init_on: str = "auto") -> str:
    """"host" or "device" for `config.init_on` ("auto": host on a single-process GPU run, else device)."""
    if init_on not in config_lib.INIT_ON:
        raise ValueError(f"init_on must be one of {config_lib.INIT_ON}, got {init_on!r}")
    if init_on == "auto":
        return "host" if jax.process_count() == 1 and jax.default_backend() == "gpu" else "device"
    return init_on


def create_train_state(model, optimizer, mesh, rules, rng, seq_len: int, init_on: str = "auto"):
    """Fresh params and optimizer state in their shardings. Returns (state, shardings).

    init_on "device": one program, compiled for the accelerator, writes every leaf straight into its
    sharding. "host": the same program on XLA:CPU, each leaf then placed shard by shard (every process
    computes the whole state, so it must fit in host memory). On a GPU the init program is ~1,100 small
    kernels for the 130m model, whose compile took ~120 s on an H100; on its host the state was ready in
    19-24 s with "host" (session 23). `init_placement` resolves "auto".
    """
    _, shardings = train_state_shardings(model, optimizer, mesh, rules, seq_len)
    init_boxed = _init_fn(model, optimizer, seq_len)
    init = lambda r: nn.unbox(init_boxed(r))  # noqa: E731
    if init_placement(init_on) == "host":
        cpu = jax.local_devices(backend="cpu")[0]
        with jax.default_device(cpu):  # no mesh context: the boxes' sharding constraints name the accelerators
            host = jax.device_get(jax.jit(init)(jax.device_put(rng, cpu)))
        state = jax.tree.map(
            lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: np.asarray(x[index])), host, shardings)
        return state, shardings
    with sharding_context(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings


def global_batch(host_batch: dict[str, np.ndarray], sharding, leading: tuple[int, ...] = ()):
    """Host-local numpy rows -> one global jax.Array per key, split over the data axes."""
    out = {}
    for key, value in host_batch.items():
        value = value.reshape(*leading, -1, value.shape[-1]) if leading else value
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


# ----------------------------------------------------------------------------- run


def maybe_initialize_distributed(mode: str) -> bool:
    """jax.distributed.initialize() when asked ('on') or when a multi-process cluster is detected ('auto').

    Must run before anything touches the devices. 'auto' looks for an explicit coordinator
    (JAX_COORDINATOR_ADDRESS, with JAX_NUM_PROCESSES and JAX_PROCESS_ID), a multi-task SLURM or Open MPI
    job, or a multi-host TPU slice.
    """
    import os  # noqa: PLC0415

    if mode == "off":
        return False
    if mode == "auto":
        env = os.environ
        cluster = (
            bool(env.get("JAX_COORDINATOR_ADDRESS"))
            or int(env.get("SLURM_NTASKS", "1")) > 1
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        )
        if not cluster:
            return False
    # A plain launch (no SLURM/MPI/TPU auto-detection) names the job's size and this process's rank
    # with JAX_NUM_PROCESSES and JAX_PROCESS_ID beside JAX_COORDINATOR_ADDRESS; jax reads only the latter.
    env = os.environ
    kwargs = {}
    if env.get("JAX_NUM_PROCESSES") and env.get("JAX_PROCESS_ID"):
        kwargs = dict(num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)
    return True


def ensure_data(config, workdir: pathlib.Path) -> pathlib.Path:
    """The prepared data directory: config.data.data_dir, or the embedded corpus under the workdir."""
    if config.data.data_dir:
        return pathlib.Path(config.data.data_dir)
    data_dir = workdir / "data"
    if jax.process_index() == 0 and not (data_dir / prepare_lib.META_FILE).exists():
        prepare_lib.prepare(data_dir, tokenizer=config.data.tokenizer, val_permille=config.data.val_permille)
    if jax.process_count() > 1:
        # Every process syncs, whatever it finds on disk: a process that saw process 0's data already
        # written and skipped the sync would meet process 0 at its next collective instead.
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices("prism_jax_prepare_data")
    return data_dir


def _pipeline_spec(config, data_dir, split, vocab_size) -> pipeline.PipelineSpec:
    train = split == "train"
    return pipeline.PipelineSpec(
        data_dir=str(data_dir),
        split=split,
        seq_len=config.data.seq_len,
        batch_size=config.batch_size // jax.process_count(),
        seed=config.seed,
        shuffle=train,
        repeat=train,
        document_boundaries=config.data.document_boundaries,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        vocab_size=vocab_size,
    )


def build_model(config):
    from prism_jax.models import PrismLM  # noqa: PLC0415

    return PrismLM(config_lib.model_config(config))


def evaluate(eval_step, params, config, data_dir, vocab_size, mesh) -> dict[str, float]:
    spec = _pipeline_spec(config, data_dir, "val", vocab_size)
    sharding = mesh_lib.batch_sharding(mesh)
    totals = {"nll_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
    for host_batch in pipeline.eval_batches(spec, config.eval_batches):
        out = eval_step(params, global_batch(host_batch, sharding))
        for key in totals:  # float64 on the host: long evaluations do not lose precision
            totals[key] += float(out[key])
    return metrics_lib.eval_summary(totals["nll_sum"], totals["tokens"], totals["bytes"])


def train_and_evaluate(config, workdir: str | pathlib.Path, *, model=None, rules=None) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint); returns the final summary.

    `model` / `rules` replace the PrismLM built from config.model and the library's logical-axis
    rules (tests use a small stand-in model).
    """
    workdir = pathlib.Path(workdir).absolute()
    maybe_initialize_distributed(config.distributed)
    config_lib.validate(config, jax.device_count(), jax.process_count(), check_model=model is None)
    if config.compilation_cache_dir:  # before anything compiles
        from train.compilation_cache import enable_compilation_cache  # noqa: PLC0415

        enable_compilation_cache(config.compilation_cache_dir)
    is_main = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    data_dir = ensure_data(config, workdir)
    meta = prepare_lib.load_meta(data_dir)
    tokenizer = tokenizers.tokenizer_from_spec(meta["tokenizer"])
    vocab_size = int(config.model.vocab_size)
    train_spec = _pipeline_spec(config, data_dir, "train", vocab_size)
    pipeline.validate_spec(train_spec)
    pipeline.validate_spec(_pipeline_spec(config, data_dir, "val", vocab_size))

    mesh = mesh_lib.make_mesh(config.mesh_shape)
    rules = mesh_lib.logical_axis_rules() if rules is None else rules
    model = build_model(config) if model is None else model
    optimizer = optim.make_optimizer(config)
    train_iter = iter(pipeline.make_dataset(train_spec))

    ckpt = checkpoint_lib.Checkpointer(
        workdir / "checkpoints",
        save_every=config.checkpoint_every_steps,
        keep_last=config.keep_checkpoints,
        keep_best=config.keep_best_checkpoints,
        async_save=config.async_checkpointing,
    )
    start_step = ckpt.latest_step() or 0
    if start_step:  # restore straight into the shardings, never materialising a fresh init
        abstract, state_shardings = train_state_shardings(model, optimizer, mesh, rules, config.data.seq_len)
        state = ckpt.restore(start_step, abstract, train_iter)
        if is_main:
            print(f"resumed from step {start_step} in {ckpt.directory}", flush=True)
    else:
        state, state_shardings = create_train_state(
            model, optimizer, mesh, rules, jax.random.key(config.seed), config.data.seq_len, config.init_on
        )

    accum = config.grad_accum_steps
    train_sharding = mesh_lib.batch_sharding(mesh, leading_dims=1)
    batch_specs = {k: train_sharding for k in ("tokens", "segment_ids", "positions")}
    with sharding_context(mesh, rules):
        train_step = jax.jit(
            make_train_step(model, optimizer),
            in_shardings=(state_shardings, batch_specs),
            out_shardings=(state_shardings, None),
            donate_argnums=0,
        )
        eval_step = jax.jit(make_eval_step(model, tokenizer.token_byte_lengths()))

    writer = metrics_lib.MetricsWriter(workdir, tensorboard=config.tensorboard, enabled=is_main)
    stop = config.stop_at_step or config.total_steps
    progress = metrics_lib.Progress(start_step, config.total_steps, enabled=config.progress_bar and is_main)
    tokens_per_step = config.batch_size * config.data.seq_len
    schedule = optim.learning_rate_schedule(config)
    last_eval: dict[str, float] = {}
    train_loss = float("nan")
    run_start = time.perf_counter()
    step = start_step
    with sharding_context(mesh, rules):
        while step < stop:
            batch = global_batch(next(train_iter), train_sharding, leading=(accum,))
            state, step_metrics = train_step(state, batch)
            step += 1
            if step % config.log_every_steps == 0 or step == stop:
                host = jax.device_get(step_metrics)
                train_loss = float(host["loss"])
                if not math.isfinite(train_loss):
                    raise FloatingPointError(f"training loss is {train_loss} at step {step}")
                rate = progress.update(step, train_loss, tokens_per_step)
                writer.write(step, {"loss": train_loss, "grad_norm": float(host["grad_norm"]),
                                    "learning_rate": float(schedule(step - 1)),
                                    "target_tokens": float(host["target_tokens"]), **rate})
            eval_now = step % config.eval_every_steps == 0 or step == config.total_steps
            if eval_now:
                last_eval = evaluate(eval_step, state.params, config, data_dir, vocab_size, mesh)
                writer.write(step, last_eval)
                progress.write(
                    f"step {step}: eval loss {last_eval['eval_loss']:.4f}  perplexity "
                    f"{last_eval['eval_perplexity']:.3f}  bits/byte {last_eval['eval_bits_per_byte']:.4f}"
                )
            if step % config.checkpoint_every_steps == 0 or step == stop:
                ckpt.save(step, state, train_iter, metrics=last_eval if eval_now else None, force=True)
    progress.close()
    ckpt.wait()
    ckpt.close()

    summary: dict[str, Any] = {"step": step, "train_loss": train_loss, "seconds": time.perf_counter() - run_start}
    finished = step >= config.total_steps
    if finished:
        summary.update(last_eval or evaluate(eval_step, state.params, config, data_dir, vocab_size, mesh))
        if config.sample.max_new_tokens > 0:
            summary["sample"] = generate_sample(model, state.params, tokenizer, config)
    if is_main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary, finished)
    writer.close()
    summary["state"] = state
    return summary


def generate_sample(model, params, tokenizer, config) -> str:
    from prism_jax.generation import generate  # noqa: PLC0415

    prompt_ids = tokenizer.encode(config.sample.prompt.encode("utf-8"))
    if prompt_ids.size == 0:
        raise ValueError("config.sample.prompt must not be empty")
    tokens = generate(
        model,
        {"params": params},
        jnp.asarray(prompt_ids[None, :], jnp.int32),
        config.sample.max_new_tokens,
        jax.random.key(config.seed + 1),
        config.sample.temperature,
        config.sample.top_k,
    )
    return tokenizer.decode(np.asarray(tokens)[0])


def print_summary(summary: dict[str, Any], finished: bool) -> None:
    if not finished:
        print(f"stopped at step {summary['step']} (config.stop_at_step); rerun the same command to resume")
        return
    print(
        f"done: step {summary['step']}  train loss {summary['train_loss']:.4f}  "
        f"val loss {summary['eval_loss']:.4f}  val perplexity {summary['eval_perplexity']:.3f}  "
        f"val bits/byte {summary['eval_bits_per_byte']:.4f}  ({summary['seconds']:.0f} s)"
    )
    if "sample" in summary:
        print("sample:\n" + summary["sample"])
