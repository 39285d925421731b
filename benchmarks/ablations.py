"""Paper Table 3 on our language model: PRISM's solver ablations at equal token budget, several seeds.

    python benchmarks/ablations.py --steps 300 --seeds 0,1,2 \
        --json docs/results/ablations.json --md docs/results/ablations.md

Every run is the training stack's recipe for `configs/tiny.py` (the tiny preset: d_model 64, 2 layers,
seq 128, batch 16, byte-level embedded corpus; `train.loop`'s train / eval steps, `train.optim`'s AdamW
with warmup + cosine, `train.data.pipeline`'s grain input) with the variant's model override and
`config.seed = SEED` (the seed sets both the initialisation and the data order). Every run sees the same
number of tokens (steps x batch x seq_len) and is evaluated on the same validation batches (the
validation split is read in order).

--mode vmap (default): the seeds of one variant train side by side in one process, `jax.vmap` over the
seed axis of the train state and of the batches (each seed its own grain iterator), so a variant
compiles once and the small, latency-bound steps of the three seeds share their dispatches. The math
per seed is that of a separate run. --mode cli: one `python -m train` process per (variant, seed), in
its own workdir under --root (a finished run is skipped, so rerunning resumes).

The JSON and markdown table are rewritten after every variant (vmap) or run (cli), so a cut-off sweep
still leaves its results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent

# name -> (label, model overrides). "full" is the tiny preset as it is (PRISM, L = solver_steps = 2).
VARIANTS = {
    "full": ("PRISM (full, L = 2)", {}),
    "l1": ("w/o iterative refinement (L = 1)", {"model.solver_steps": 1}),
    "no_nonlinearity": ("w/o non-linearity", {"model.solver_nonlinearity": "identity"}),
    "no_shortconv": ("w/o ShortConv anchor", {"model.use_short_conv": False}),
    "no_gain": ("w/o gain predictor", {"model.use_gain": False}),
    "gdn": ("Gated DeltaNet", {"model.mixer": "gdn"}),
}


def run_overrides(variant: str, seed: int, args) -> dict:
    """Every --config.* override of one run: the variant's model switch plus the shared budget."""
    overrides = {
        "seed": seed,
        "total_steps": args.steps,
        "warmup_steps": max(1, args.steps // 10),
        "data.data_dir": str(pathlib.Path(args.root).absolute() / "data"),
        "eval_every_steps": args.steps,
        "eval_batches": args.eval_batches,
        "checkpoint_every_steps": args.steps,
        "async_checkpointing": False,
        "progress_bar": False,
        "tensorboard": False,
        "sample.max_new_tokens": 0,
    }
    overrides.update(VARIANTS[variant][1])
    return overrides


def run_command(workdir: pathlib.Path, overrides: dict) -> list[str]:
    return [sys.executable, "-m", "train", "--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(workdir),
            *[f"--config.{k}={v}" for k, v in overrides.items()]]


def variant_config(variant: str, seed: int, args):
    """The tiny training config of one (variant, seed) with the shared budget (as `run_overrides`)."""
    from train.config_lib import tiny_config  # noqa: PLC0415

    config = tiny_config()
    for key, value in run_overrides(variant, seed, args).items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def train_seeds_vmapped(variant: str, seeds: list[int], args) -> dict:
    """Train every seed of `variant` in one vmapped step; returns {seed: summary} (the CLI's summary
    fields: step, train_loss, eval_loss, eval_perplexity, eval_bits_per_byte, eval_tokens, seconds)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from flax import linen as nn  # noqa: PLC0415

    from train import loop, optim  # noqa: PLC0415
    from train import metrics as metrics_lib  # noqa: PLC0415
    from train.data import pipeline  # noqa: PLC0415
    from train.data import prepare as prepare_lib  # noqa: PLC0415
    from train.data import tokenizers  # noqa: PLC0415

    t0 = time.time()
    configs = [variant_config(variant, s, args) for s in seeds]
    config = configs[0]
    data_dir = pathlib.Path(config.data.data_dir)
    tokenizer = tokenizers.tokenizer_from_spec(prepare_lib.load_meta(data_dir)["tokenizer"])
    vocab = int(config.model.vocab_size)
    model, optimizer = loop.build_model(config), optim.make_optimizer(config)
    init_boxed = loop._init_fn(model, optimizer, config.data.seq_len)
    keys = jax.numpy.stack([jax.random.key(c.seed) for c in configs])  # the CLI's init key per seed
    states = jax.jit(jax.vmap(lambda r: nn.unbox(init_boxed(r))))(keys)
    train_step = jax.jit(jax.vmap(loop.make_train_step(model, optimizer)), donate_argnums=0)
    eval_step = jax.jit(jax.vmap(loop.make_eval_step(model, tokenizer.token_byte_lengths()), in_axes=(0, None)))
    iters = [iter(pipeline.make_dataset(loop._pipeline_spec(c, data_dir, "train", vocab))) for c in configs]
    losses = []
    for step in range(1, config.total_steps + 1):
        host = [next(it) for it in iters]
        batch = {k: np.stack([h[k] for h in host])[:, None] for k in ("tokens", "segment_ids", "positions")}
        states, metrics = train_step(states, batch)
        if step % config.log_every_steps == 0 or step == config.total_steps:
            losses = np.asarray(metrics["loss"]).tolist()
            if not all(math.isfinite(x) for x in losses):
                raise FloatingPointError(f"{variant}: training loss {losses} at step {step}")
            print(f"  {variant} step {step:5d}  {time.time() - t0:6.0f}s  loss " +
                  " ".join(f"{x:.4f}" for x in losses), flush=True)
    totals = np.zeros((3, len(seeds)))
    for host_batch in pipeline.eval_batches(loop._pipeline_spec(config, data_dir, "val", vocab), config.eval_batches):
        out = eval_step(states.params, host_batch)
        totals += np.stack([np.asarray(out[k], np.float64) for k in ("nll_sum", "tokens", "bytes")])
    seconds = time.time() - t0
    result = {}
    for i, s in enumerate(seeds):
        result[s] = {"step": config.total_steps, "train_loss": losses[i], "seconds": seconds,
                     **metrics_lib.eval_summary(totals[0, i], totals[1, i], totals[2, i])}
    return result


def read_summary(workdir: pathlib.Path, steps: int) -> dict | None:
    """The run's summary.json if the run finished `steps` steps, else None."""
    path = workdir / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("step") == steps and "eval_bits_per_byte" in summary else None


def count_params(variant: str) -> int:
    """Parameter count of the variant's model (abstract init, no compute)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from prism_jax.models import PrismLM  # noqa: PLC0415
    from train.config_lib import model_config, tiny_config  # noqa: PLC0415

    config = tiny_config()
    for key, value in VARIANTS[variant][1].items():
        config.model[key.split(".", 1)[1]] = value
    model = PrismLM(model_config(config))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32)))
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(runs: dict, variants: list[str], seeds: list[int], args) -> dict:
    """The JSON document: per-run summaries and per-variant mean / std of validation bits per byte."""
    rows = []
    full_mean = None
    for variant in variants:
        bpb = [runs[(variant, s)]["eval_bits_per_byte"] for s in seeds if (variant, s) in runs]
        mean, std = mean_std(bpb)
        if variant == "full":
            full_mean = mean
        rows.append({"variant": variant, "label": VARIANTS[variant][0], "overrides": VARIANTS[variant][1],
                     "seeds_done": [s for s in seeds if (variant, s) in runs], "bits_per_byte": bpb,
                     "bpb_mean": mean, "bpb_std": std,
                     "seconds_mean": mean_std([runs[(variant, s)]["seconds"] for s in seeds
                                               if (variant, s) in runs])[0],
                     "num_params": args.param_counts.get(variant)})
    full = {s: runs[("full", s)]["eval_bits_per_byte"] for s in seeds if ("full", s) in runs}
    for row in rows:
        row["delta_vs_full"] = (row["bpb_mean"] - full_mean
                                if row["bpb_mean"] is not None and full_mean is not None else None)
        # Paired by seed: a seed fixes the data order, shared by every variant, so
        # per-seed differences remove the seed-to-seed spread of the data order.
        diffs = [b - full[s] for s, b in zip(row["seeds_done"], row["bits_per_byte"]) if s in full]
        row["paired_delta_mean"], row["paired_delta_std"] = mean_std(diffs)
    return {
        "what": "validation bits per byte after equal token budgets (paper Table 3 analogue)",
        "command": " ".join(["python", "benchmarks/ablations.py", *sys.argv[1:]]),
        "config": "configs/tiny.py", "steps": args.steps, "seeds": seeds,
        "tokens_per_run": args.steps * 16 * 128, "eval_batches": args.eval_batches,
        "rows": rows,
        "runs": [{"variant": v, "seed": s, **runs[(v, s)]} for v in variants for s in seeds if (v, s) in runs],
        "env": {"python": platform.python_version(), "host_cpus": os.cpu_count(),
                "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
    }


def _fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(doc: dict) -> str:
    lines = [f"Validation bits per byte (lower is better), tiny preset, {doc['steps']} steps x 16 x 128 tokens "
             f"= {doc['tokens_per_run'] / 1e6:.2f}M training tokens per run, seeds {doc['seeds']}, "
             f"mean +- sample std over the seeds done. Paired column: mean +- std over seeds of (variant - full) "
             f"for the same seed (same data order). wall s: per process (vmap mode: all seeds of a variant "
             f"together, several variants in parallel processes on a shared 2-core CPU).", "",
             "| variant | val bits/byte | minus full, paired by seed | per seed | params | wall s |",
             "|---|---|---|---|---|---|"]
    for row in doc["rows"]:
        pm = "-" if row["bpb_mean"] is None else (
            f"{row['bpb_mean']:.4f} +- {_fmt(row['bpb_std'])}" if row["bpb_std"] is not None
            else f"{row['bpb_mean']:.4f}")
        delta = "-" if row["paired_delta_mean"] is None else f"{row['paired_delta_mean']:+.4f}" + (
            f" +- {row['paired_delta_std']:.4f}" if row["paired_delta_std"] is not None else "")
        seeds = ", ".join(f"s{s}: {b:.4f}" for s, b in zip(row["seeds_done"], row["bits_per_byte"])) or "not run"
        params = "-" if row["num_params"] is None else f"{row['num_params'] / 1e3:.1f}K"
        secs = "-" if row["seconds_mean"] is None else f"{row['seconds_mean']:.0f}"
        lines.append(f"| {row['label']} | {pm} | {delta} | {seeds} | {params} | {secs} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (16 x 128 tokens each)")
    parser.add_argument("--eval-batches", type=int, default=32, help="validation batches of 16 x 128 per run")
    parser.add_argument("--root", default=str(REPO / "workdirs" / "ablations"), help="workdirs and prepared data")
    parser.add_argument("--json", default=str(REPO / "docs" / "results" / "ablations.json"))
    parser.add_argument("--md", default=str(REPO / "docs" / "results" / "ablations.md"))
    parser.add_argument("--also-json", action="append", default=[], metavar="PATH",
                        help="runs from other sweeps' JSON (same budget) to include; e.g. to merge two "
                             "sweeps run in parallel over different --variants")
    parser.add_argument("--no-start-after", default=None, metavar="HH:MM",
                        help="start no run after this UTC wall-clock time")
    parser.add_argument("--mode", choices=("vmap", "cli"), default="vmap",
                        help="vmap: the seeds of a variant in one vmapped process; cli: one process per run")
    parser.add_argument("--dry-run", action="store_true", help="print the cli commands, run nothing")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants: unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.steps < 2:
        raise ValueError(f"--steps must be >= 2, got {args.steps}")
    if args.eval_batches < 1:
        raise ValueError(f"--eval-batches must be >= 1, got {args.eval_batches}")

    root = pathlib.Path(args.root)
    todo = [(v, s) for s in seeds for v in variants]
    if args.dry_run:
        for v, s in todo:
            print(" ".join(run_command(root / f"{v}-s{s}", run_overrides(v, s, args))))
        return {}

    data_dir = root / "data"
    if not (data_dir / "meta.json").exists():
        subprocess.run([sys.executable, "-m", "train.data.prepare", "--output_dir", str(data_dir)], check=True)
    args.param_counts = {v: count_params(v) for v in variants}

    runs = {}
    for path in [args.json, *args.also_json]:  # resume / merge: finished runs of the same budget
        if not os.path.exists(path):
            continue
        old = json.loads(pathlib.Path(path).read_text())
        if old.get("steps") == args.steps and old.get("eval_batches") == args.eval_batches:
            runs.update({(r["variant"], r["seed"]): {k: v for k, v in r.items() if k not in ("variant", "seed")}
                         for r in old["runs"] if r["variant"] in variants and r["seed"] in seeds})

    def save():
        doc = aggregate(runs, variants, seeds, args)
        for path, text in ((args.json, json.dumps(doc, indent=1)), (args.md, markdown(doc))):
            pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
            pathlib.Path(path).write_text(text)

    # The seeds of a variant compile the same programs: share them through JAX's persistent cache (cli).
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(root.absolute() / "jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    units = [[(v, s) for s in seeds] for v in variants] if args.mode == "vmap" else [[u] for u in todo]
    for unit in units:
        unit = [(v, s) for v, s in unit if (v, s) not in runs]
        if not unit:
            continue
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M")
        if args.no_start_after and now >= args.no_start_after:
            print(f"== {unit}: not started ({now} UTC is past --no-start-after)", flush=True)
            continue
        v = unit[0][0]
        print(f"== {v} seeds {[s for _, s in unit]}: {now} UTC, {args.steps} steps ({args.mode})", flush=True)
        if args.mode == "vmap":
            done = train_seeds_vmapped(v, [s for _, s in unit], args)
        else:
            s = unit[0][1]
            workdir = root / f"{v}-s{s}"
            summary = read_summary(workdir, args.steps)
            if summary is None:
                subprocess.run(run_command(workdir, run_overrides(v, s, args)), cwd=REPO, env=env)
                summary = read_summary(workdir, args.steps)
            done = {s: summary} if summary is not None else {}
        for s, summary in done.items():
            runs[(v, s)] = {k: summary[k] for k in ("step", "train_loss", "eval_loss", "eval_bits_per_byte",
                                                    "seconds") if k in summary}
            print(f"== {v} seed {s}: bits/byte {summary['eval_bits_per_byte']:.4f}", flush=True)
        save()
    save()
    doc = aggregate(runs, variants, seeds, args)
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
