"""Time the forms of the PRISM op on the current backend and print a table (not a test).

    python benchmarks/ops.py                      # CPU defaults
    python benchmarks/ops.py --T 256 1024 4096 --L 2 --heads 4 --dim 64

Forward and forward+backward times are medians over `--repeats` runs after one warm-up (compile)
call; ratios are against `chunk` measured in the same run. `scan` materialises K x K per token and is
skipped where it would need more than `--scan-max-mb` of memory.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.ops import prism_recurrence


def inputs(B, T, H, L, K, V, seed=0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, T, H, L, K)).astype(np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    return (jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32), jnp.asarray(k),
            jnp.asarray(rng.standard_normal((B, T, H, L, V)), jnp.float32),
            jnp.asarray(rng.uniform(size=(B, T, H, L)), jnp.float32),
            jnp.asarray(np.log(rng.uniform(0.9, 1.0, (B, T, H))), jnp.float32))


def median_ms(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--L", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=32, help="K = V")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scan-max-mb", type=float, default=512)
    a = p.parse_args()
    forms = [("reference", {}), ("scan", {}), ("chunk", {}), ("chunk-assoc", {"inter_chunk": "associative"})]
    print(f"backend={jax.default_backend()} B={a.batch} H={a.heads} K=V={a.dim} L={a.L} C={a.chunk_size}")
    print(f"{'T':>6} {'form':<12} {'fwd ms':>10} {'fwd+bwd ms':>11} {'fwd vs chunk':>13} {'f+b vs chunk':>13}")
    for T in a.T:
        args = inputs(a.batch, T, a.heads, a.L, a.dim, a.dim)
        rows = []
        for name, kw in forms:
            impl = name.split("-")[0]
            scan_mb = a.batch * T * a.heads * (a.dim * a.dim * 2) * 4 * 3 / 2 ** 20
            if impl == "scan" and scan_mb > a.scan_max_mb:
                rows.append((name, None, None))
                continue
            f = functools.partial(prism_recurrence, impl=impl, chunk_size=a.chunk_size, **kw)
            fwd = jax.jit(f)
            fb = jax.jit(jax.grad(lambda *x, f=f: jnp.sum(f(*x)[0] ** 2), argnums=(0, 1, 2, 3, 4)))
            rows.append((name, median_ms(fwd, args, a.repeats), median_ms(fb, args, a.repeats)))
        base = {n: (f, b) for n, f, b in rows}["chunk"]
        for name, f, b in rows:
            if f is None:
                print(f"{T:>6} {name:<12} {'skipped (memory)':>24}")
                continue
            print(f"{T:>6} {name:<12} {f:>10.2f} {b:>11.2f} {f / base[0]:>12.2f}x {b / base[1]:>12.2f}x")


if __name__ == "__main__":
    main()
