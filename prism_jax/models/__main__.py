"""Print parameter counts: `python -m prism_jax.models --preset 130m [--mixer prism] [--markdown]`."""

from __future__ import annotations

import argparse

from prism_jax.models.config import MIXERS, PRESETS, get_preset
from prism_jax.models.params import count_params


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m prism_jax.models", description=__doc__)
    parser.add_argument("--preset", choices=PRESETS, default="130m")
    parser.add_argument("--mixer", choices=MIXERS + ("all",), default="all")
    parser.add_argument("--markdown", action="store_true", help="print rows of the docs/model.md table")
    args = parser.parse_args(argv)
    mixers = MIXERS if args.mixer == "all" else (args.mixer,)
    cols = ("embedding", "head", "mixer", "mlp", "norms", "total")
    if not args.markdown:
        print(f"preset {args.preset}: " + ", ".join(
            f"{k}={v}" for k, v in vars(get_preset(args.preset)).items()
            if k in ("vocab_size", "d_model", "num_layers", "num_heads", "head_k_dim", "mlp_hidden_dim",
                     "solver_steps", "solver_rank", "tie_embeddings")))
        print(f"{'mixer':<10}" + "".join(f"{c:>14}" for c in cols))
    for mixer in mixers:
        counts = count_params(get_preset(args.preset, mixer=mixer))
        if args.markdown:
            print(f"| {args.preset} | {mixer} | {counts['total']:,} | {counts['mixer']:,} |")
        else:
            print(f"{mixer:<10}" + "".join(f"{counts[c]:>14,}" for c in cols))


if __name__ == "__main__":
    main()
