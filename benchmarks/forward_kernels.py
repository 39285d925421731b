"""Time each kernel of the split Pallas forward alone (intra, state pass, outputs), per T at fixed B * T.

    python benchmarks/forward_kernels.py [--lengths 2048,32768] [--writes 2] [--out DIR]
    python benchmarks/forward_kernels.py --smoke      # tiny shapes on CPU (interpret mode): checks the script

Shapes as benchmarks/kernels.py: B * T = 32768 tokens, H = 16, K = V = 128, bf16, chunk 32. Each kernel
is jitted alone on the previous kernel's real outputs; times are medians of --reps runs after 2
warm-ups. Prints a markdown table and writes DIR/forward_kernels.json. This says which of the three
kernels the forward's time (and its growth with T) sits in.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import SHAPE, SMOKE, inputs, timed  # noqa: E402


def time_kernels(T, L, shape, chunk, reps, interpret):
    from pallas_kernels.common import prepare
    from pallas_kernels.gpu import split

    H, K, V = shape["heads"], shape["dk"], shape["dv"]
    (q, k, v, beta, g), _ = inputs(jax.random.PRNGKey(T + L), shape["tokens"] // T, T, L, H, K, V)
    x = prepare(q, k, v, beta, g, None, None, chunk)
    scale = K ** -0.5
    row = dict(T=T, L=L, chunk=chunk)
    for inverse in ("rows", "blocked8"):
        f = jax.jit(lambda x, inverse=inverse: split.intra(x, chunk_size=chunk, inverse=inverse,
                                                             save_inverse=False, interpret=interpret))
        row[f"intra_{inverse}_ms"] = timed(f, x, reps=reps)
    p, qe, _ = jax.jit(lambda x: split.intra(x, chunk_size=chunk, save_inverse=False, interpret=interpret))(x)
    state = jax.jit(lambda x, p, qe: split.state_pass(x, p, qe, chunk_size=chunk, interpret=interpret)[:2])
    row["state_ms"] = timed(state, x, p, qe, reps=reps)
    starts, _ = state(x, p, qe)
    out = jax.jit(lambda x, p, qe, s: split.outputs(x, p, qe, s, scale=scale, chunk_size=chunk,
                                                     interpret=interpret))
    row["outputs_ms"] = timed(out, x, p, qe, starts, reps=reps)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048,32768")
    ap.add_argument("--writes", default="2")
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    shape = SMOKE if args.smoke else SHAPE
    lengths = [32, 64] if args.smoke else [int(t) for t in args.lengths.split(",")]
    interpret = jax.default_backend() == "cpu"
    rows = []
    for L in (int(w) for w in args.writes.split(",")):
        for T in lengths:
            rows.append(time_kernels(T, L, shape, args.chunk, args.reps, interpret))
            print(json.dumps(rows[-1]), flush=True)
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "forward_kernels.json"), "w") as f:
                json.dump(dict(devices=[str(d) for d in jax.devices()], shape=shape, rows=rows), f, indent=1)
    print(f"\nB*T = {shape['tokens']}, H = {shape['heads']}, K = {shape['dk']}, V = {shape['dv']}, bf16, "
          f"chunk {args.chunk}; ms per kernel\n")
    print("| L | T | intra (rows) | intra (blocked8) | state pass | outputs |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['L']} | {r['T']} | {r['intra_rows_ms']:.2f} | {r['intra_blocked8_ms']:.2f} | "
              f"{r['state_ms']:.2f} | {r['outputs_ms']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
