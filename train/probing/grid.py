"""Run the probing grid: every (model, task, seed); one JSON per run under --out-dir, optionally all
runs in one merged JSON (--merged-json).

    # CPU, data made on the host per step (the 250 / 1000-step tables in docs/results.md):
    python -m train.probing.grid --steps 250 --batch-size 16 --learning-rate 3e-3 \
        --out-dir docs/results/probing
    # GPU, the paper's budget: data made on the device, 500 steps per jitted call, a time budget:
    python -m train.probing.grid --data device --seeds 0,1,2 --steps 10000 --steps-per-call 500 \
        --budget-s 280 --out-dir $OUT/probing --merged-json $OUT/probing_all.json

All pending runs of one model (its tasks x seeds) train side by side in one vmapped step, so each model
compiles once. Models run in the --models order (default prism, gdn, la, transformer). Points already
written (a JSON in --out-dir, an entry of --merged-json if it exists, or of any --resume file or
folder) are skipped unless --overwrite; skipped points from --resume files are carried into
--merged-json, so a second window's merged file holds the whole grid.

--budget-s: no model starts once the budget is spent, and a model whose measured pace (after its
first call) says it cannot end inside the budget is abandoned (nothing written for it) so the next,
possibly cheaper, model gets the rest of the time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import sys
import time

from train.probing.run import ProbeConfig, train_and_evaluate_many
from train.probing.tasks import TASK_NAMES

GRID_ORDER = ("prism", "gdn", "la", "transformer")


def result_path(out_dir, task, model, seed):
    return os.path.join(out_dir, f"{task}-{model}-s{seed}.json")


def load_points(path) -> list[dict]:
    """Result dicts from a merged JSON file ({"results": [...]}), a per-point JSON file, or a folder of
    either. Missing paths give []."""
    if os.path.isdir(path):
        return [r for p in sorted(glob.glob(os.path.join(path, "*.json"))) for r in load_points(p)]
    if not os.path.exists(path):
        return []
    with open(path) as f:
        doc = json.load(f)
    if isinstance(doc, dict) and "results" in doc:
        return list(doc["results"])
    if isinstance(doc, dict) and {"task", "model", "seed"} <= doc.keys():
        return [doc]
    raise ValueError(f"{path} is neither a probing result nor a merged results file")


def point_key(r) -> tuple:
    return r["task"], r["model"], int(r["seed"])


def write_merged(path, points: dict, meta: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "results": [points[k] for k in sorted(points)]}, f, default=str)
    os.replace(tmp, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.probing.grid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(GRID_ORDER))
    parser.add_argument("--tasks", default=",".join(TASK_NAMES))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out-dir", default="docs/results/probing")
    parser.add_argument("--merged-json", default=None, help="also write every point into this one JSON file")
    parser.add_argument("--resume", action="append", default=[], metavar="PATH",
                        help="earlier results (merged JSON or folder) whose points are skipped; repeatable")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--data", choices=("host", "device"), default="host",
                        help="host: numpy batches per step (train.probing.run); device: generated inside "
                             "a lax.scan of --steps-per-call steps (train.probing.device)")
    parser.add_argument("--steps-per-call", type=int, default=200, help="with --data device")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the whole grid")
    parser.add_argument("--compilation-cache", default=None, metavar="DIR",
                        help="JAX persistent compilation cache: a later grid on the same machine (e.g. a "
                             "second window for a model abandoned in the first) skips its compiles")
    parser.add_argument("--no-start-after", default=None, metavar="HH:MM",
                        help="do not start another model after this UTC wall-clock time")
    defaults = ProbeConfig()
    for field in dataclasses.fields(ProbeConfig):
        if field.name not in ("task", "model", "seed"):
            parser.add_argument("--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)),
                                default=getattr(defaults, field.name))
    return parser.parse_args(argv)


def main(argv=None, *, model_override=None) -> dict:
    """Returns {(task, model, seed): result} of every point the grid knows (new and skipped ones).
    `model_override(model_name)` builds a stand-in Flax module (tests)."""
    t_start = time.time()
    args = vars(parse_args(argv))
    models, tasks = args.pop("models").split(","), args.pop("tasks").split(",")
    seeds = [int(s) for s in args.pop("seeds").split(",")]
    out_dir, merged_path, overwrite = args.pop("out_dir"), args.pop("merged_json"), args.pop("overwrite")
    resume, data, steps_per_call = args.pop("resume"), args.pop("data"), args.pop("steps_per_call")
    budget_s, no_start_after = args.pop("budget_s"), args.pop("no_start_after")
    cache_dir = args.pop("compilation_cache")
    if cache_dir:
        from train.compilation_cache import enable_compilation_cache  # noqa: PLC0415

        enable_compilation_cache(cache_dir)
    deadline = t_start + budget_s if budget_s else None
    for c in [ProbeConfig(task=t, model=m, **args) for m in models for t in tasks]:
        c.validate()  # bad settings fail before anything compiles
    if steps_per_call < 1:
        raise ValueError(f"--steps-per-call must be >= 1, got {steps_per_call}")
    os.makedirs(out_dir, exist_ok=True)

    known = {}
    for path in [*resume, *([merged_path] if merged_path else []), out_dir]:
        for r in load_points(path):
            known[point_key(r)] = r
    meta = {"argv": sys.argv if argv is None else list(argv), "data": data, "steps_per_call": steps_per_call,
            "budget_s": budget_s}
    if merged_path:
        write_merged(merged_path, known, meta)

    for model in models:
        todo = [(t, s) for s in seeds for t in tasks if overwrite or (t, model, s) not in known]
        if not todo:
            print(f"== {model}: all {len(tasks) * len(seeds)} points already written", flush=True)
            continue
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M")
        if no_start_after and now >= no_start_after:
            print(f"== {model}: not started ({now} UTC is past --no-start-after)", flush=True)
            continue
        if deadline is not None and time.time() >= deadline:
            print(f"== {model}: not started (budget of {budget_s:.0f} s spent)", flush=True)
            continue
        cfgs = [ProbeConfig(task=t, model=model, seed=s, **args) for t, s in todo]
        t0 = time.time()
        print(f"== {model}: {len(todo)} runs ({len(set(s for _, s in todo))} seeds), {cfgs[0].steps} steps, "
              f"data on {data}, {t0 - t_start:.0f} s into the grid", file=sys.stderr, flush=True)

        def progress(step, losses):
            print(f"  step {step:6d}  {time.time() - t0:7.1f}s  mean loss {sum(losses) / len(losses):.3f}",
                  file=sys.stderr, flush=True)

        stand_in = model_override(model) if model_override else None
        if data == "device":
            from train.probing.device import BudgetExceeded, train_and_evaluate_on_device

            try:
                results = train_and_evaluate_on_device(cfgs, model=stand_in, steps_per_call=steps_per_call,
                                                       deadline=deadline, progress=progress)
            except BudgetExceeded as e:
                print(f"== {model}: abandoned, cannot finish inside --budget-s ({e})", flush=True)
                continue
        else:
            results = train_and_evaluate_many(cfgs, model=stand_in, progress=progress)
        for r in results:
            with open(result_path(out_dir, r["task"], model, r["seed"]), "w") as f:
                json.dump(r, f, indent=1, default=str)
            known[point_key(r)] = r
            print(f"{r['task']:18s} {model:12s} s{r['seed']}  acc {r['eval_accuracy']:.3f}  "
                  f"(chance {r['chance']:.3f})", flush=True)
        r = results[0]
        print(f"== {model}: {time.time() - t0:.0f} s (compile {r['compile_s']:.0f} s, train {r['train_s']:.0f} s, "
              f"{r['steps_per_s'] or 0:.1f} steps/s of {len(results)} runs)", flush=True)
        if merged_path:
            write_merged(merged_path, known, meta)
    return known


if __name__ == "__main__":
    main()
