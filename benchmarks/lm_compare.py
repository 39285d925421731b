"""Small LM comparison on one GPU (issue 8 item 4): PRISM (L = 2) vs Gated DeltaNet vs Transformer vs
TTT-Linear, ~30M parameters each (configs/lm_compare.py), byte tokenizer, T = 1024, the same number of
training tokens for every model, validation bits per byte on the same held-out rows.

Everything goes through the training stack (train/): the embedded corpus prepared by
`train.data.prepare`, the grain pipeline, `train.loop.create_train_state` / `make_train_step` /
`make_eval_step` / `evaluate`, and the AdamW recipe of `train.optim` (clipping, decay mask, warmup +
cosine). The one difference from `train.main`: the learning rate enters the optimizer state through
`optax.inject_hyperparams` and is set from `train.optim.learning_rate_schedule` on the host each step,
so a step compiles before its step count is known.

Phases, all inside --budget-s:
  1. data: prepare the corpus (--corpus stdlib: the interpreter's stdlib `.py` files; stdlib+site: plus
     the site-packages `.py` files, several times more text) into --workdir; the time is reported.
  2. pre-compile: one subprocess per model, --compile-workers at a time (`compile_workers.run_workers`),
     compiles its train and eval steps into JAX's persistent compilation cache (--cache-dir) and runs
     nothing (--compile-workers 0: skip).
  3. calibrate: each model loads its step (a cache hit) and times --calibration-steps steps.
  4. equal tokens: steps = --train-seconds / (slowest model's step time), or --steps; every model
     trains that many steps on the same batches (the same seed, prepared once), then is evaluated
     on the first --config eval_batches rows of the validation split.
The JSON (--out) is rewritten after every model; a markdown table is printed at the end.

    python benchmarks/lm_compare.py --out $OUT/lm_compare.json            # one GPU, ~9 minutes
    python benchmarks/lm_compare.py --smoke --out /tmp/lm_compare.json    # tiny models on CPU
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/lm_compare.py` from a checkout without an install
    sys.path.insert(0, str(ROOT))

from benchmarks.compile_workers import run_workers, strip_flag_values  # noqa: E402
from train.compilation_cache import enable_compilation_cache  # noqa: E402

MODEL_NAMES = ("prism", "gdn", "attention", "ttt")
SMOKE_MODEL = dict(d_model=32, num_layers=2, num_heads=2, head_k_dim=16, mlp_hidden_dim=64, chunk_size=16,
                   max_seq_len=64, dtype="float32")


def load_config(config_file, name, args):
    """configs/lm_compare.py:get_config(name) with this run's overrides (op form, smoke shapes)."""
    spec = importlib.util.spec_from_file_location("lm_compare_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(name)
    config.model.op_impl = args.op_impl
    if args.smoke:
        for key, value in SMOKE_MODEL.items():
            config.model[key] = value
        if name == "prism":
            config.model.solver_rank = None
        if name == "ttt":
            config.model.ttt_mini_batch = 4
        config.data.seq_len, config.batch_size, config.eval_batches = 64, 4, 2
        config.warmup_steps = 2
    if args.seq_len:
        config.data.seq_len = args.seq_len
        config.model.max_seq_len = max(config.model.max_seq_len, args.seq_len)
    if args.batch_size:
        config.batch_size = args.batch_size
    return config


def make_optimizer(config):
    """train.optim.make_optimizer's AdamW recipe, with the learning rate injected into the state."""
    import optax

    from train import optim

    # mask is static: a callable hyperparameter would otherwise be taken for a schedule of the step count
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=config.learning_rate, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
        weight_decay=config.weight_decay, mask=optim.weight_decay_mask)
    parts = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm > 0 else []
    return optax.chain(*parts, adamw)


def set_learning_rate(state, lr):
    """state with the injected learning rate replaced (same sharding as the old value)."""
    import jax
    import numpy as np
    import optax

    old = optax.tree_utils.tree_get(state.opt_state, "learning_rate")
    new = jax.device_put(np.asarray(lr, old.dtype), old.sharding)
    return state.replace(opt_state=optax.tree_utils.tree_set(state.opt_state, learning_rate=new))


class Runner:
    """One model: its train state and compiled train / eval steps (persistent-cache hits when pre-compiled)."""

    def __init__(self, name, config, token_bytes):
        import jax
        import numpy as np

        from train import loop
        from train import mesh as mesh_lib

        t0 = time.perf_counter()
        self.name, self.config = name, config
        self.mesh = mesh_lib.make_mesh(config.mesh_shape)
        self.rules = mesh_lib.logical_axis_rules()
        self.model = loop.build_model(config)
        self.optimizer = make_optimizer(config)
        self.state, shardings = loop.create_train_state(
            self.model, self.optimizer, self.mesh, self.rules, jax.random.key(config.seed), config.data.seq_len)
        self.num_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(self.state.params)))
        self.train_sharding = mesh_lib.batch_sharding(self.mesh, leading_dims=1)
        self.eval_sharding = mesh_lib.batch_sharding(self.mesh)
        accum, rows, seq = config.grad_accum_steps, config.batch_size, config.data.seq_len
        zeros = {k: np.zeros((rows, seq), np.int32) for k in ("tokens", "segment_ids", "positions")}
        with loop.sharding_context(self.mesh, self.rules):
            batch_specs = {k: self.train_sharding for k in zeros}
            train_step = jax.jit(loop.make_train_step(self.model, self.optimizer),
                                 in_shardings=(shardings, batch_specs), out_shardings=(shardings, None),
                                 donate_argnums=0)
            eval_step = jax.jit(loop.make_eval_step(self.model, token_bytes))
            self.train_step = train_step.lower(
                self.state, loop.global_batch(zeros, self.train_sharding, leading=(accum,))).compile()
            self.eval_step = eval_step.lower(
                self.state.params, loop.global_batch(zeros, self.eval_sharding)).compile()
        self.compile_s = time.perf_counter() - t0

    def fresh_state(self):
        import jax

        from train import loop

        self.state, _ = loop.create_train_state(self.model, self.optimizer, self.mesh, self.rules,
                                                jax.random.key(self.config.seed), self.config.data.seq_len)

    def step(self, host_batch, lr):
        from train import loop

        self.state = set_learning_rate(self.state, lr)
        batch = loop.global_batch(host_batch, self.train_sharding, leading=(self.config.grad_accum_steps,))
        self.state, metrics = self.train_step(self.state, batch)
        return metrics

    def evaluate(self, data_dir, vocab_size):
        from train import loop

        with loop.sharding_context(self.mesh, self.rules):
            return loop.evaluate(self.eval_step, self.state.params, self.config, data_dir, vocab_size, self.mesh)


def prepare_data(workdir, corpus):
    """The prepared corpus directory (reused when its meta.json exists) and the seconds it took."""
    import sysconfig

    from train.data import corpus as corpus_lib
    from train.data import prepare as prepare_lib

    data_dir = pathlib.Path(workdir) / f"data_{corpus.replace('+', '_')}"
    if (data_dir / prepare_lib.META_FILE).exists():
        return data_dir, 0.0, prepare_lib.load_meta(data_dir)
    t0 = time.perf_counter()
    files = corpus_lib.stdlib_python_files()
    source = f"python stdlib .py files at {corpus_lib.stdlib_root()}"
    if corpus == "stdlib+site":
        site = pathlib.Path(sysconfig.get_paths()["purelib"])
        if site.is_dir() and site != corpus_lib.stdlib_root():
            files = files + corpus_lib.stdlib_python_files(site)
            source += f" and site-packages .py files at {site}"
    meta = prepare_lib.prepare(data_dir, files=files, tokenizer="byte", val_permille=50, source=source)
    return data_dir, time.perf_counter() - t0, meta


def precompile(names, argv, args):
    """Each model's steps compiled in its own subprocess, --compile-workers at once (all stopped after
    --compile-timeout-s). Returns {name: status dict}."""
    print(f"pre-compiling {names}, {args.compile_workers} at a time, cache {args.cache_dir}", flush=True)

    def describe(name, s):
        return f"  {name:10s} " + (f"compiled ({s['op_impl']}) in {s['compile_s']:.1f} s" if s.get("ok")
                                   else f"FAILED {s['error'][:200]}")

    return run_workers([(name, ["--worker", name]) for name in names], script=os.path.abspath(__file__),
                       argv=argv, cache_dir=args.cache_dir, max_parallel=args.compile_workers,
                       timeout_s=args.compile_timeout_s, describe=describe)


def resolve_defaults(args, backend):
    args.op_impl = args.op_impl or ("pallas" if backend == "gpu" else "chunk")


def run_worker(args):
    import jax

    from train.data import tokenizers

    enable_compilation_cache(args.cache_dir)
    resolve_defaults(args, jax.default_backend())
    status = dict(ok=False, errors=[])
    for impl in op_impls(args.worker, args):
        try:
            config = load_config(args.config, args.worker, argparse.Namespace(**{**vars(args), "op_impl": impl}))
            runner = Runner(args.worker, config, tokenizers.make_tokenizer("byte").token_byte_lengths())
            status.update(ok=True, op_impl=impl, compile_s=runner.compile_s, num_params=runner.num_params)
            break
        except Exception as e:  # noqa: BLE001 - reported; try the next form
            status["errors"].append(f"{impl}: {type(e).__name__}: {e}"[:400])
    status["error"] = " | ".join(status["errors"])
    pathlib.Path(args.status_file).write_text(json.dumps(status))


def op_impls(name, args):
    """Op forms to try for model `name`: the Pallas kernels, then the plain chunk form (PRISM / GDN)."""
    if args.op_impl == "pallas" and name in ("prism", "gdn"):
        return ["pallas", "chunk"]
    return [args.op_impl]


def training_batches(config, data_dir, vocab_size, steps):
    """The host batches of `steps` optimizer steps: the same rows, in the same order, for every model."""
    from train import loop
    from train.data import pipeline

    it = iter(pipeline.make_dataset(loop._pipeline_spec(config, data_dir, "train", vocab_size)))
    return [next(it) for _ in range(steps)]


def fmt_table(results):
    lines = ["| model | params | steps | tokens seen | val bits/byte | val loss | final train loss | tokens/s | "
             "step ms | compile/load s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r.get('num_params', 0) / 1e6:.1f}M | - | - | {r['error'][:60]} |"
                         " | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['num_params'] / 1e6:.2f}M | {r['steps']} | {r['tokens_seen'] / 1e6:.2f}M | "
            f"{r['eval_bits_per_byte']:.4f} | {r['eval_loss']:.4f} | {r['train_loss']:.4f} | "
            f"{r['tokens_per_s'] / 1e3:.1f}K | {r['step_s'] * 1e3:.1f} | {r['compile_s']:.1f} |"
            + (" stopped early (budget)" if r.get("stopped_early") else ""))
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODEL_NAMES), help=f"comma-separated, from {MODEL_NAMES}")
    p.add_argument("--config", default=str(ROOT / "configs" / "lm_compare.py"))
    p.add_argument("--smoke", action="store_true", help="tiny models, T = 64, 4 rows: checks that it runs (CPU)")
    p.add_argument("--corpus", default="stdlib+site", choices=("stdlib", "stdlib+site"))
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "prism_jax_lm_compare"),
                   help="where the prepared corpus goes (reused across runs)")
    p.add_argument("--budget-s", type=float, default=540.0, help="the whole run; training is cut to fit")
    p.add_argument("--train-seconds", type=float, default=90.0,
                   help="training time of the slowest model; sets the common step count")
    p.add_argument("--steps", type=int, default=0, help="> 0: this many steps for every model (no time rule)")
    p.add_argument("--calibration-steps", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=0, help="0: the config's (1024)")
    p.add_argument("--batch-size", type=int, default=0, help="rows per step; 0: the config's (64)")
    p.add_argument("--op-impl", default=None, choices=("chunk", "pallas", "reference", "scan"),
                   help="PRISM/GDN op form (default pallas on GPU, chunk elsewhere)")
    p.add_argument("--compile-workers", type=int, default=4, help="0: compile in this process only")
    p.add_argument("--compile-timeout-s", type=float, default=None, help="default 0.3 * budget")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "prism_jax_lm_compare_cache"))
    p.add_argument("--out", default=None, help="JSON output path")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--status-file", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    start = time.perf_counter()
    names = args.models.split(",")
    unknown = sorted(set(names) - set(MODEL_NAMES))
    if unknown:
        raise ValueError(f"--models: unknown {unknown}, expected names from {MODEL_NAMES}")
    if args.compile_timeout_s is None:
        args.compile_timeout_s = 0.3 * args.budget_s
    if args.smoke and args.corpus == "stdlib+site" and "--corpus" not in " ".join(argv):
        args.corpus = "stdlib"

    from train import config_lib

    for n in names:  # bad settings fail here, before any data preparation or compile
        probe = argparse.Namespace(**{**vars(args), "op_impl": args.op_impl or "chunk"})
        config_lib.validate(load_config(args.config, n, probe), num_devices=1)

    data_dir, prep_s, meta = prepare_data(args.workdir, args.corpus)
    data = dict(data_dir=str(data_dir), corpus=args.corpus, prepare_s=prep_s, reused=not prep_s, source=meta["source"],
                splits={k: dict(documents=v["documents"], tokens=v["tokens"]) for k, v in meta["splits"].items()})
    print(f"data: {args.corpus}: train {data['splits']['train']['tokens'] / 1e6:.1f}M bytes, val "
          f"{data['splits']['val']['tokens'] / 1e6:.2f}M bytes, "
          + (f"prepared in {prep_s:.1f} s" if prep_s else f"reused from {data_dir}"), flush=True)

    worker_argv = strip_flag_values(argv, ("--out", "--compile-workers")) + [f"--cache-dir={args.cache_dir}"]
    statuses = precompile(names, worker_argv, args) if args.compile_workers > 0 else {}
    precompile_s = time.perf_counter() - start - prep_s

    import jax
    import numpy as np

    from train import optim
    from train.data import tokenizers

    enable_compilation_cache(args.cache_dir)
    backend = jax.default_backend()
    resolve_defaults(args, backend)
    device = jax.devices()[0].device_kind
    tokenizer = tokenizers.tokenizer_from_spec(meta["tokenizer"])
    configs = {n: load_config(args.config, n, args) for n in names}
    vocab_size = int(configs[names[0]].model.vocab_size)
    results = {n: dict(model=n, mixer=configs[n].model.mixer) for n in names}
    run = dict(backend=backend, device=device, jax_version=jax.__version__, args=vars(args), data=data,
               precompile_s=precompile_s, results=[])

    def write_json():
        run["results"] = list(results.values())
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(run, f, indent=1)

    # Calibrate: load each model's steps, time a few steps on the first training batch.
    runners, step_s = {}, {}
    first = training_batches(configs[names[0]], data_dir, vocab_size, 1)[0]
    for n in names:
        try:
            status = statuses.get(n, {})
            impls = [status["op_impl"]] if status.get("ok") else op_impls(n, args)
            for i, impl in enumerate(impls):
                try:
                    configs[n].model.op_impl = impl
                    runner = Runner(n, configs[n], tokenizer.token_byte_lengths())
                    break
                except Exception as e:  # noqa: BLE001 - try the next form
                    print(f"{n}: op_impl {impl} failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
                    if i == len(impls) - 1:
                        raise
            results[n]["op_impl"] = impl
            runner.step(first, 0.0)["loss"].block_until_ready()  # warm-up
            times = []
            for _ in range(args.calibration_steps):
                t0 = time.perf_counter()
                runner.step(first, 0.0)["loss"].block_until_ready()
                times.append(time.perf_counter() - t0)
            step_s[n] = float(np.median(times))
            runners[n] = runner
            results[n].update(num_params=runner.num_params, compile_s=runner.compile_s, step_s=step_s[n],
                              worker_compile_s=statuses.get(n, {}).get("compile_s"))
            print(f"calibrated {n:10s} ({impl}) {runner.num_params / 1e6:.2f}M params  step {step_s[n] * 1e3:.1f} ms  "
                  f"load {runner.compile_s:.1f} s  [{time.perf_counter() - start:.0f} s]", flush=True)
        except Exception as e:  # noqa: BLE001 - one model failing must not end the comparison
            results[n]["error"] = f"{type(e).__name__}: {e}"[:300]
            print(f"{n}: FAILED {results[n]['error']}", flush=True)
    write_json()
    if not runners:
        print(fmt_table(list(results.values())))
        return run

    # Equal tokens: the slowest model gets --train-seconds (or what the budget leaves), the others as many steps.
    slowest = max(step_s.values())
    left = args.budget_s - (time.perf_counter() - start)
    per_model = min(args.train_seconds, (left - 15.0 * len(runners)) / len(runners))
    steps = args.steps or max(1, int(per_model / slowest))
    any_config = configs[names[0]]
    tokens_per_step = any_config.batch_size * any_config.data.seq_len
    t0 = time.perf_counter()
    batches = training_batches(any_config, data_dir, vocab_size, steps)
    print(f"{steps} steps x {tokens_per_step} tokens = {steps * tokens_per_step / 1e6:.1f}M tokens per model "
          f"(slowest step {slowest * 1e3:.0f} ms, {per_model:.0f} s per model); batches read in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    run.update(steps=steps, tokens_per_step=tokens_per_step, tokens_per_model=steps * tokens_per_step)

    for n, runner in runners.items():
        config = copy.deepcopy(configs[n])
        config.total_steps = steps
        config.warmup_steps = min(config.warmup_steps, max(1, steps // 10))
        # One device computation up front: calling the schedule per step would dispatch (and wait on) its ops.
        lrs = np.asarray(jax.vmap(optim.learning_rate_schedule(config))(np.arange(steps)), np.float32)
        runner.fresh_state()
        losses, done, stopped = [], 0, False
        t0 = time.perf_counter()
        # Stop (and say so) if this model runs far over its calibrated time or would starve the ones after it.
        after = len(runners) - 1 - list(runners).index(n)
        deadline = min(t0 + 1.5 * steps * step_s[n] + 10.0, start + args.budget_s - 15.0 * (after + 1))
        for i, batch in enumerate(batches):
            metrics = runner.step(batch, lrs[i])
            done = i + 1
            if done % configs[n].log_every_steps == 0 or done == steps:
                loss = float(metrics["loss"])
                losses.append(loss)
                if not np.isfinite(loss):
                    results[n]["error"] = f"non-finite training loss at step {done}"
                    break
                if time.perf_counter() > deadline:
                    stopped = True
                    break
        jax.block_until_ready(runner.state)
        train_s = time.perf_counter() - t0
        if "error" in results[n]:
            write_json()
            continue
        ev = runner.evaluate(data_dir, vocab_size)
        results[n].update(steps=done, tokens_seen=done * tokens_per_step, train_s=train_s,
                          tokens_per_s=done * tokens_per_step / train_s, train_loss=losses[-1],
                          train_loss_curve=losses, stopped_early=stopped, **ev)
        print(f"trained {n:10s} {done} steps in {train_s:.1f} s ({results[n]['tokens_per_s'] / 1e3:.1f}K tok/s)  "
              f"train loss {losses[-1]:.4f}  val bits/byte {ev['eval_bits_per_byte']:.4f}  "
              f"[{time.perf_counter() - start:.0f} s]", flush=True)
        del runner.state
        write_json()
    run["total_s"] = time.perf_counter() - start
    write_json()
    print(f"\nSmall LM comparison ({device}, {backend}; {steps} steps x {tokens_per_step} tokens; corpus "
          f"{args.corpus}, val = first {any_config.eval_batches} x {any_config.batch_size} rows of the held-out split):")
    print(fmt_table(list(results.values())))
    return run


if __name__ == "__main__":
    main()
