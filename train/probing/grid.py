"""Run the probing grid: every (model, task, seed), one JSON per run under --out-dir.

    python -m train.probing.grid --steps 250 --batch-size 16 --learning-rate 3e-3 \
        --out-dir docs/results/probing

The nine tasks of one (model, seed) train side by side in one vmapped step (see run.py), so each
model compiles once. Existing JSON files are skipped unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

from train.probing.run import MODELS, ProbeConfig, train_and_evaluate_many
from train.probing.tasks import TASK_NAMES


def result_path(out_dir, task, model, seed):
    return os.path.join(out_dir, f"{task}-{model}-s{seed}.json")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.probing.grid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--tasks", default=",".join(TASK_NAMES))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out-dir", default="docs/results/probing")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-start-after", default=None, metavar="HH:MM",
                        help="do not start another (model, seed) after this UTC wall-clock time")
    defaults = ProbeConfig()
    skip = {"task", "model", "seed"}
    for field in dataclasses.fields(ProbeConfig):
        if field.name not in skip:
            parser.add_argument("--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)),
                                default=getattr(defaults, field.name))
    args = vars(parser.parse_args(argv))
    models, tasks = args.pop("models").split(","), args.pop("tasks").split(",")
    seeds = [int(s) for s in args.pop("seeds").split(",")]
    out_dir, overwrite = args.pop("out_dir"), args.pop("overwrite")
    no_start_after = args.pop("no_start_after")
    os.makedirs(out_dir, exist_ok=True)
    for model in models:
        for seed in seeds:
            todo = [t for t in tasks if overwrite or not os.path.exists(result_path(out_dir, t, model, seed))]
            if not todo:
                continue
            now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M")
            if no_start_after and now >= no_start_after:
                print(f"== {model} seed {seed}: not started ({now} UTC is past --no-start-after)", flush=True)
                continue
            cfgs = [ProbeConfig(task=t, model=model, seed=seed, **args) for t in todo]
            t0 = time.time()
            print(f"== {model} seed {seed}: {len(todo)} tasks, {cfgs[0].steps} steps", file=sys.stderr, flush=True)
            results = train_and_evaluate_many(cfgs, progress=lambda step, losses: print(
                f"  step {step:5d}  {time.time() - t0:7.1f}s  mean loss {sum(losses) / len(losses):.3f}",
                file=sys.stderr, flush=True))
            for r in results:
                with open(result_path(out_dir, r["task"], model, seed), "w") as f:
                    json.dump(r, f, indent=1, default=str)
                print(f"{r['task']:18s} {model:12s} s{seed}  acc {r['eval_accuracy']:.3f}  "
                      f"(chance {r['chance']:.3f})", flush=True)


if __name__ == "__main__":
    main()
