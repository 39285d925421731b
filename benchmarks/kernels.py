"""PRISM kernels beside Gated DeltaNet peers, in one run on one GPU (issue 5's table).

    PYTHONPATH=. python benchmarks/kernels.py [--out DIR] [--lengths 2048,8192,32768] [--sweep]
    PYTHONPATH=. python benchmarks/kernels.py --fla      # flash-linear-attention GDN forward (torch)
    --check_grads adds the largest relative gradient error of `pallas` against the float32 chunk form.

Shapes: B * T = 32768 tokens, H = 16, K = V = 128, bf16 inputs. Rows: our `pallas` at L = 1, 2, 3,
our XLA `chunk` form (L = 2), jax-linear-attention 0.1.0's Gated DeltaNet (Mosaic GPU) when it is
importable. Times are medians of `--reps` runs after warm-up (host clock around a blocking call).
TFLOP/s counts the useful matmul FLOPs of the chunk algorithm (prism-math.md section 4; fwd+bwd
counted as 3x fwd) against a bf16 8192^3 matmul measured in the same run. Memory is XLA's compiled
footprint (arguments + outputs + temporaries). Each benchmarked shape is checked against our chunk
form in float32 at full matmul precision on the same bf16-rounded inputs (relative L2 error).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

TOKENS, HEADS, DK, DV = 32768, 16, 128, 128


def timed(fn, *args, reps):
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def footprint_gib(fn, *args):
    try:
        m = fn.lower(*args).compile().memory_analysis()
        return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / 2**30
    except Exception:  # memory_analysis is best effort
        return float("nan")


def fwd_flops(T, B, L, C=64, H=HEADS, K=DK, V=DV):
    per_chunk = 2 * C * C * K * (2 + 2 * L) + 2 * C * C * V * (2 + 2 * L) + 2 * C * K * V * (3 + L)
    return per_chunk * (T // C) * B * H


def inputs(key, B, T, L, dtype=jnp.bfloat16):
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (B, T, HEADS, DK), dtype)
    k = jax.random.normal(ks[1], (B, T, HEADS, L, DK), jnp.float32)
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, HEADS, L, DV), dtype)
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, HEADS, L))).astype(dtype)
    g = -jax.random.uniform(ks[4], (B, T, HEADS), minval=0.01, maxval=0.3)
    do = jax.random.normal(ks[5], (B, T, HEADS, DV), dtype)
    return (q, k, v, beta, g), do


def rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def prism_fns(impl, **kw):
    from prism_jax.ops import prism_recurrence

    from pallas_kernels import prism_pallas

    def fwd(q, k, v, beta, g):
        if impl == "pallas":  # block kwargs go straight to the kernels
            return prism_pallas(q, k, v, beta, g, scale=DK ** -0.5, **kw)[0]
        return prism_recurrence(q, k, v, beta, g, impl=impl, **kw)[0]

    def fwd_bwd(args, do):
        o, pull = jax.vjp(fwd, *args)
        return pull(do)

    return jax.jit(fwd), jax.jit(fwd_bwd), fwd


def gdn_fns():
    from jla.ops.mosaic_gpu.gated_delta_rule import gated_delta_rule

    def fwd(q, k, v, beta, g):  # PRISM layout -> GDN (L = 1)
        return gated_delta_rule(q, k[:, :, :, 0], v[:, :, :, 0], g, beta[:, :, :, 0].astype(jnp.float32),
                                scale=DK ** -0.5)[0]

    def fwd_bwd(args, do):
        o, pull = jax.vjp(fwd, *args)
        return pull(do)

    return jax.jit(fwd), jax.jit(fwd_bwd), fwd


def reference_fwd():
    from prism_jax.ops import prism_recurrence

    @jax.jit
    def ref(q, k, v, beta, g):
        f32 = lambda x: x.astype(jnp.float32)
        with jax.default_matmul_precision("highest"):
            return prism_recurrence(f32(q), f32(k), f32(v), f32(beta), g, impl="chunk")[0]

    return ref


def reference_fwd_bwd():
    from prism_jax.ops import prism_recurrence

    @jax.jit
    def ref(args, do):
        def fwd(q, k, v, beta, g):
            with jax.default_matmul_precision("highest"):
                return prism_recurrence(q, k, v, beta, g, impl="chunk")[0]

        up = [x.astype(jnp.float32) for x in args]
        return jax.vjp(fwd, *up)[1](do.astype(jnp.float32))

    return ref


def matmul_tflops(reps):
    a = jax.random.normal(jax.random.PRNGKey(1), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(2), (8192, 8192), jnp.bfloat16)
    ms = timed(jax.jit(lambda x, y: x @ y), a, b, reps=reps)
    return 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


def run_fla(lengths, reps):
    import torch
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    rows = []
    for T in lengths:
        B = TOKENS // T
        dev = "cuda"
        q = torch.randn(B, T, HEADS, DK, device=dev, dtype=torch.bfloat16)
        k = torch.nn.functional.normalize(torch.randn(B, T, HEADS, DK, device=dev), dim=-1).bfloat16()
        v = torch.randn(B, T, HEADS, DV, device=dev, dtype=torch.bfloat16)
        beta = torch.rand(B, T, HEADS, device=dev).bfloat16()
        g = -torch.rand(B, T, HEADS, device=dev) * 0.3
        fn = lambda: chunk_gated_delta_rule(q, k, v, g, beta, scale=DK ** -0.5)
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
        rows.append(f"| fla-core GDN fwd (Triton, torch) | T={T} | {ms:.3f} ms |")
        print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--lengths", default="2048,8192,32768")
    ap.add_argument("--writes", default="1,2,3")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget_s", type=float, default=420)
    ap.add_argument("--sweep", action="store_true", help="block_v / num_warps / chunk sweep at T=8K, L=2")
    ap.add_argument("--no_bwd", action="store_true")
    ap.add_argument("--skip", default="", help="rows to leave out, e.g. chunk@2048,jla_gdn@2048")
    ap.add_argument("--fla", action="store_true")
    ap.add_argument("--check_grads", action="store_true",
                    help="also compare pallas gradients with the float32 chunk form at each shape")
    args = ap.parse_args()
    lengths = [int(t) for t in args.lengths.split(",")]
    if args.fla:
        rows = run_fla(lengths, args.reps)
        open(os.path.join(args.out, "fla.md"), "w").write("\n".join(rows) + "\n")
        return
    start = time.time()
    print(jax.devices(), flush=True)
    peak = matmul_tflops(args.reps)
    print(f"bf16 8192^3 matmul: {peak:.0f} TFLOP/s", flush=True)
    results = []
    log = open(os.path.join(args.out, "kernels.jsonl"), "w")

    def record(**row):
        results.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(json.dumps(row), flush=True)

    best = dict(chunk_size=64)
    if args.sweep:
        from pallas_kernels import prism_pallas

        B, T, L = TOKENS // 8192, 8192, 2
        xs, do = inputs(jax.random.PRNGKey(0), B, T, L)
        timings = []
        for C, bv, nw in ((32, 64, 8), (64, 64, 8), (64, 32, 8), (64, 64, 4)):
            kw = dict(chunk_size=C, block_v=bv, num_warps=nw)
            try:
                f = jax.jit(lambda q, k, v, b, g, kw=kw: prism_pallas(q, k, v, b, g, scale=DK ** -0.5, **kw)[0])
                ms = timed(f, *xs, reps=args.reps)
                timings.append((ms, kw))
                record(sweep=True, T=T, L=L, fwd_ms=ms, **kw)
            except Exception as e:  # report and go on
                record(sweep=True, error=str(e)[:300], **kw)
        if timings:
            best = min(timings, key=lambda t: t[0])[1]
        print("pallas settings for the table:", best, flush=True)
    ref = reference_fwd()
    have_jla = True
    try:
        gdn_fns()
    except Exception as e:
        have_jla = False
        print("jax-linear-attention not importable:", e, flush=True)
    for T in lengths:
        B = TOKENS // T
        for name, L in ([("pallas", L) for L in map(int, args.writes.split(","))] + [("chunk", 2)]
                        + ([("jla_gdn", 1)] if have_jla else [])):
            if time.time() - start > args.budget_s:
                print("time budget spent; skipping", name, T, L, flush=True)
                continue
            xs, do = inputs(jax.random.PRNGKey(T + L), B, T, L)
            try:
                if f"{name}@{T}" in args.skip.split(","):
                    continue
                f, fb, _ = (gdn_fns() if name == "jla_gdn" else
                            prism_fns("pallas", **best) if name == "pallas" else prism_fns(name, chunk_size=64))
                fwd_ms = timed(f, *xs, reps=args.reps)
                err = rel(f(*xs), ref(*xs))
                row = dict(impl=name, T=T, B=B, L=L, fwd_ms=fwd_ms, rel_err=err,
                           fwd_tflops=fwd_flops(T, B, L) / (fwd_ms * 1e-3) / 1e12,
                           fwd_mem_gib=footprint_gib(f, *xs))
                if name == "pallas" and L == 1 and have_jla:
                    row["vs_jla_gdn"] = rel(f(*xs), gdn_fns()[0](*xs))
                if not args.no_bwd:
                    fb_ms = timed(fb, xs, do, reps=args.reps)
                    if name == "pallas" and args.check_grads:
                        grads, grads_ref = fb(xs, do), reference_fwd_bwd()(xs, do)
                        row["grad_rel_err"] = max(rel(a, b) for a, b in zip(grads, grads_ref))
                    row.update(fwd_bwd_ms=fb_ms, fwd_bwd_tflops=3 * fwd_flops(T, B, L) / (fb_ms * 1e-3) / 1e12,
                               fwd_bwd_mem_gib=footprint_gib(fb, xs, do))
                record(**row)
            except Exception as e:
                record(impl=name, T=T, L=L, error=f"{type(e).__name__}: {str(e)[:400]}")
    print(f"\nbf16 matmul peak measured: {peak:.0f} TFLOP/s; B*T = {TOKENS}, H = {HEADS}, K = V = {DK}, bf16")
    print("| impl | L | T | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | mem fwd / fwd+bwd GiB | rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r.get("sweep") or "error" in r:
            continue
        print(f"| {r['impl']} | {r['L']} | {r['T']} | {r['fwd_ms']:.3f} | {r.get('fwd_bwd_ms', float('nan')):.3f} | "
              f"{r['fwd_tflops']:.1f} | {r.get('fwd_bwd_tflops', float('nan')):.1f} | "
              f"{r['fwd_mem_gib']:.2f} / {r.get('fwd_bwd_mem_gib', float('nan')):.2f} | {r['rel_err']:.1e} |")
    for r in results:
        if "error" in r:
            print("ERROR", r)


if __name__ == "__main__":
    sys.exit(main())
