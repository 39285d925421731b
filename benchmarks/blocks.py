"""Forward + backward time of one block (mixer + MLP) per mixer at a few sequence lengths; prints a table.

    python benchmarks/blocks.py [--lengths 256 512 1024] [--d-model 256] [--batch 1] [--repeats 5]

Times are medians of `--repeats` runs after one compile-and-run; the compile time is printed too.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from prism_jax.models import MIXERS, Block, PrismLMConfig


def time_block(config, batch, length, repeats):
    block = Block(config)
    x = jax.random.normal(jax.random.key(0), (batch, length, config.d_model), jnp.float32)
    params = block.init(jax.random.key(1), x[:, :1])
    loss = lambda p, x: jnp.sum(block.apply(p, x).astype(jnp.float32) ** 2)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    start = time.perf_counter()
    jax.block_until_ready(step(params, x))
    compile_s = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params, x))
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), compile_s


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    base = PrismLMConfig(d_model=args.d_model, num_heads=args.heads, head_k_dim=args.d_model // args.heads,
                         mlp_hidden_dim=int(8 / 3 * args.d_model), solver_steps=3, chunk_size=64,
                         ttt_mini_batch=16, dtype=args.dtype, max_seq_len=max(args.lengths))
    print(f"one block, forward+backward, B={args.batch}, d_model={args.d_model}, heads={args.heads}, "
          f"dtype={args.dtype}, PRISM L=3, chunk 64, TTT mini-batch 16, backend={jax.default_backend()}")
    header = f"| {'mixer':<10} |" + "".join(f" T={t:<6} ms |" for t in args.lengths) + " compile s (largest T) |"
    print(header)
    print("|" + "---|" * (len(args.lengths) + 2))
    for mixer in args.mixers:
        config = dataclasses.replace(base, mixer=mixer)
        cells, compile_s = [], 0.0
        for length in args.lengths:
            run_s, compile_s = time_block(config, args.batch, length, args.repeats)
            cells.append(f" {1e3 * run_s:>11.1f} |")
        print(f"| {mixer:<10} |" + "".join(cells) + f" {compile_s:>21.1f} |", flush=True)


if __name__ == "__main__":
    main()
