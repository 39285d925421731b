"""Collect probing JSON results into a Markdown table (Table 4 layout) and an optional PNG plot.

    python -m train.probing.report --in-dir docs/results/probing \
        --table docs/results/probing_table.md --plot docs/results/probing_accuracy.png
    python -m train.probing.report --in-dir docs/results/probing_gpu/probing_all.json --table ...

--in-dir takes a folder of per-run JSON files or a merged JSON file (`grid --merged-json`); repeat it
to combine several (a point present twice counts once, the later path wins). Cells: mean ± sample std
over the seeds present (n = number of seeds).

The plot needs matplotlib (optional: without it the table is still written and a note is printed).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from train.probing.run import MODEL_LABELS, MODELS
from train.probing.tasks import PAPER_LABELS, TASK_NAMES, get_task

# Table 4 of the paper (D = 16): Transformer, linear attention, MoM, PRISM. The paper has no Gated
# DeltaNet column; MoM is not part of this project.
PAPER_TABLE4 = {
    "mqar": (0.98, 0.98, 0.98, 0.98), "poly_recall": (1.00, 1.00, 1.00, 1.00),
    "variable_tracking": (0.40, 0.34, 0.35, 0.37), "parity": (1.00, 0.49, 0.50, 1.00),
    "local_xor": (1.00, 0.50, 0.49, 1.00), "modulo_add": (0.23, 0.07, 0.06, 0.50),
    "palindrome": (0.49, 0.49, 0.50, 0.99), "mux": (0.98, 0.98, 0.97, 0.98),
    "silence_gate": (0.82, 0.51, 0.50, 0.66),
}


def load_results(*paths):
    """{(task, model): [result per seed]} from folders of per-run JSON files and/or merged JSON files."""
    from train.probing.grid import load_points, point_key

    points = {}
    for path in paths:
        for r in load_points(path):
            points[point_key(r)] = r
    results = {}
    for key in sorted(points):
        r = points[key]
        results.setdefault((r["task"], r["model"]), []).append(r)
    return results


def summarize(runs):
    accs = np.array([r["eval_accuracy"] for r in runs])
    return accs.mean(), (accs.std(ddof=1) if len(accs) > 1 else None), len(accs)


def markdown_table(results, models=MODELS):
    lines = ["| Category | Task | chance | " + " | ".join(MODEL_LABELS[m] for m in models)
             + " | paper Trans. / LA / MoM / PRISM |",
             "|---|---|---|" + "---|" * len(models) + "---|"]
    for task in TASK_NAMES:
        cells = []
        for m in models:
            runs = results.get((task, m))
            if not runs:
                cells.append("not run")
                continue
            mean, std, n = summarize(runs)
            cells.append(f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "") + (f" (n={n})" if n > 1 else ""))
        paper = " / ".join(f"{x:.2f}" for x in PAPER_TABLE4[task])
        chance = results[next(iter(k for k in results if k[0] == task))][0]["chance"] if any(
            k[0] == task for k in results) else None
        lines.append(f"| {get_task(task).category} | {PAPER_LABELS[task]} | "
                     + (f"{chance:.3f}" if chance is not None else "-") + " | " + " | ".join(cells) + f" | {paper} |")
    return "\n".join(lines)


def plot(results, path, models=MODELS):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(models)
    x = np.arange(len(TASK_NAMES))
    for i, m in enumerate(models):
        means = [summarize(results[(t, m)])[0] if (t, m) in results else np.nan for t in TASK_NAMES]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, means, width, label=MODEL_LABELS[m])
    for j, t in enumerate(TASK_NAMES):
        runs = [r for (task, _), rs in results.items() if task == t for r in rs]
        if runs:
            ax.hlines(runs[0]["chance"], j - 0.45, j + 0.45, colors="k", linestyles="dotted", linewidth=1)
    ax.set_xticks(x, [PAPER_LABELS[t] for t in TASK_NAMES], rotation=20)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("held-out accuracy (answer positions)")
    cfg = next(iter(results.values()))[0].get("probe_config", {})
    ax.set_title(f"Mechanistic probing (D={cfg.get('d_model', '?')}, V={cfg.get('vocab', '?')}, "
                 f"T={cfg.get('seq_len', '?')}, {cfg.get('num_layers', '?')} layers, {cfg.get('steps', '?')} steps); "
                 f"bars: mean over up to {max(len(rs) for rs in results.values())} seeds; dotted: chance")
    ax.legend(ncol=len(models), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.probing.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-dir", action="append", default=None,
                        help="folder of per-run JSON files or a merged JSON file; repeatable "
                             "(default docs/results/probing)")
    parser.add_argument("--table", default=None, help="write the Markdown table here (also printed)")
    parser.add_argument("--plot", default=None, help="PNG path (needs matplotlib)")
    args = parser.parse_args(argv)
    in_dirs = args.in_dir or ["docs/results/probing"]
    results = load_results(*in_dirs)
    if not results:
        raise ValueError(f"--in-dir {args.in_dir!r} holds no result JSON files")
    table = markdown_table(results)
    print(table)
    if args.table:
        with open(args.table, "w") as f:
            f.write(table + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
