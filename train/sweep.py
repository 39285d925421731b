"""Expand a grid of config overrides into runs (one workdir each) and tabulate their final metrics.

    python -m train.sweep --config configs/tiny.py --root workdirs/sweep \
        --grid model.solver_steps=1,2,3 --grid learning_rate=1e-3,3e-3 --set total_steps=200

Each run is `python -m train --config CONFIG --workdir ROOT/NAME --config.KEY=VALUE ...` in its own
process (a finished run is skipped, an interrupted one resumes). The table of final metrics is
printed and written to ROOT/summary.md and ROOT/summary.json.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import re
import subprocess
import sys
from collections.abc import Sequence

from absl import app, flags

METRICS = ("step", "train_loss", "eval_loss", "eval_perplexity", "eval_bits_per_byte", "seconds")


def _split_assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def expand_grid(grid: Sequence[str]) -> list[dict[str, str]]:
    """['a=1,2', 'b=x,y'] -> [{'a':'1','b':'x'}, {'a':'1','b':'y'}, {'a':'2','b':'x'}, {'a':'2','b':'y'}]."""
    axes = []
    for item in grid:
        key, values = _split_assignment(item)
        options = [v.strip() for v in values.split(",") if v.strip()]
        if not options:
            raise ValueError(f"grid axis {key} has no values")
        axes.append([(key, v) for v in options])
    keys = [axis[0][0] for axis in axes]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a grid key appears twice: {keys}")
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def run_name(overrides: dict[str, str]) -> str:
    if not overrides:
        return "base"
    parts = [f"{key.split('.')[-1]}-{value}" for key, value in overrides.items()]
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "_".join(parts))


def run_command(config: str, workdir: pathlib.Path, overrides: dict[str, str]) -> list[str]:
    return [sys.executable, "-m", "train", "--config", config, "--workdir", str(workdir),
            *[f"--config.{k}={v}" for k, v in overrides.items()]]


def format_table(rows: list[dict]) -> str:
    columns = ["run", *METRICS]
    cells = [[str(r.get("run", ""))] + [_fmt(r.get(m)) for m in METRICS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def sweep(config: str, root: str | pathlib.Path, grid: Sequence[str], fixed: Sequence[str] = (),
          dry_run: bool = False) -> list[dict]:
    root = pathlib.Path(root)
    common = dict(_split_assignment(s) for s in fixed)
    rows = []
    for overrides in expand_grid(grid):
        name = run_name(overrides)
        workdir = root / name
        command = run_command(config, workdir, {**common, **overrides})
        print(" ".join(command), flush=True)
        if dry_run:
            continue
        summary_path = workdir / "summary.json"
        status = "done"
        if not summary_path.exists() or "eval_loss" not in json.loads(summary_path.read_text()):
            status = "ok" if subprocess.run(command).returncode == 0 else "failed"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        rows.append({"run": name, "status": status, **overrides, **{m: summary.get(m) for m in METRICS}})
    if rows:
        table = format_table(rows)
        print(table)
        root.mkdir(parents=True, exist_ok=True)
        (root / "summary.md").write_text(table + "\n")
        (root / "summary.json").write_text(json.dumps(rows, indent=2))
    return rows


def main(argv):
    del argv
    rows = sweep(_CONFIG.value, _ROOT.value, _GRID.value, _SET.value, _DRY_RUN.value)
    if any(r["status"] == "failed" for r in rows):
        sys.exit(1)


def _define_flags():
    """The CLI's flags, defined only when the module runs as a program."""
    global _CONFIG, _ROOT, _GRID, _SET, _DRY_RUN
    _CONFIG = flags.DEFINE_string("config", None, "Config file (as for prism-train).", required=True)
    _ROOT = flags.DEFINE_string("root", None, "Directory holding one workdir per run.", required=True)
    _GRID = flags.DEFINE_multi_string("grid", [], "KEY=V1,V2,... : one axis of the grid (repeatable).")
    _SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE applied to every run (repeatable).")
    _DRY_RUN = flags.DEFINE_bool("dry_run", False, "Only print the runs.")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
