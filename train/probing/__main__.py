"""CLI: train one model on one probing task, evaluate on fresh samples, write JSON.

    python -m train.probing --task mqar --model prism --seed 0 --steps 1000 \
        --out docs/results/probing/mqar-prism-s0.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from train.probing.run import MODELS, ProbeConfig, train_and_evaluate
from train.probing.tasks import TASK_NAMES


def parse_args(argv=None) -> tuple[ProbeConfig, str | None]:
    parser = argparse.ArgumentParser(prog="python -m train.probing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=TASK_NAMES)
    parser.add_argument("--model", required=True, choices=MODELS)
    parser.add_argument("--out", default=None, help="JSON output path (parent folders are created)")
    defaults = ProbeConfig()
    for field in dataclasses.fields(ProbeConfig):
        if field.name in ("task", "model"):
            continue
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    return ProbeConfig(**args), out


def main(argv=None) -> dict:
    cfg, out = parse_args(argv)
    cfg.validate()

    def progress(step, losses):
        print(f"[{cfg.task}/{cfg.model}/s{cfg.seed}] step {step:6d}  loss {losses[0]:.4f}", file=sys.stderr,
              flush=True)

    result = train_and_evaluate(cfg, progress=progress)
    print(f"{cfg.task} {cfg.model} seed={cfg.seed} steps={cfg.steps}: eval accuracy "
          f"{result['eval_accuracy']:.4f} (chance {result['chance']:.4f}), eval loss {result['eval_loss']:.4f}, "
          f"{result['steps_per_s'] or 0:.1f} steps/s")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
