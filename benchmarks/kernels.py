"""PRISM kernels beside Gated DeltaNet peers, in one run on one GPU (issue 5's table).

    python benchmarks/kernels.py --out DIR [--lengths 2048,8192,32768] [--sweep] [--budget_s 400]
    python benchmarks/kernels.py --smoke --out /tmp   # tiny shapes on CPU (interpret mode), checks the script
    python benchmarks/kernels.py --fla                # flash-linear-attention GDN forward (torch)

Shapes: B * T = 32768 tokens, H = 16, K = V = 128, bf16 inputs (g float32). Rows, in priority
order (the run stops itself at --budget_s and skips what would not fit):
  1. at the first length: `pallas` (ours) at L = 1, 2, 3 with bwd="fused" and bwd="xla",
     jax-linear-attention 0.1.0's Gated DeltaNet (Mosaic GPU; skipped with a note when not
     importable), our XLA `chunk` form at L = 2;
  then the time of each pallas kernel (split forward, state pull-back, reverse pass, chunk backward)
  at the first length, L = 2;
  2. at the other lengths: pallas fused L = 1, 2, 3 and the GDN; 3. then pallas xla L = 2 and chunk.
--sweep first times fwd+bwd of the fused backward's block sizes / warps (T = first length, L = 2) and
uses the fastest for the table. Times are medians of `--reps` runs after 2 warm-ups (host clock
around a blocking call) of one compiled executable. TFLOP/s counts the useful matmul FLOPs of the
chunk algorithm (prism-math.md section 4; fwd+bwd counted as 3x fwd) against a bf16 8192^3 matmul
measured in the same run. Memory is XLA's compiled footprint (arguments + outputs + temporaries).
Every row is checked against our chunk form in float32 at full matmul precision on the same
bf16-rounded inputs: relative L2 error of the output and of each input gradient.
Results go to DIR/kernels.json, rewritten after every point, and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

SHAPE = dict(tokens=32768, heads=16, dk=128, dv=128)
SMOKE = dict(tokens=64, heads=2, dk=32, dv=32)
GRAD_NAMES = ("q", "k", "v", "beta", "g")


def timed(fn, *args, reps):
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def compiled(fn, *args):
    """(executable, footprint GiB): one compile serves timing, checks and memory."""
    exe = jax.jit(fn).lower(*args).compile()
    try:
        m = exe.memory_analysis()
        gib = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / 2**30
    except Exception:  # memory_analysis is best effort
        gib = float("nan")
    return exe, gib


def fwd_flops(T, B, L, H, K, V, C=64):
    per_chunk = 2 * C * C * K * (2 + 2 * L) + 2 * C * C * V * (2 + 2 * L) + 2 * C * K * V * (3 + L)
    return per_chunk * (T // C) * B * H


def inputs(key, B, T, L, H, K, V, dtype=jnp.bfloat16):
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (B, T, H, K), dtype)
    k = jax.random.normal(ks[1], (B, T, H, L, K), jnp.float32)
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, L, V), dtype)
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H, L))).astype(dtype)
    g = -jax.random.uniform(ks[4], (B, T, H), minval=0.01, maxval=0.3)
    do = jax.random.normal(ks[5], (B, T, H, V), dtype)
    return (q, k, v, beta, g), do


def rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def with_vjp(fwd):
    def fwd_bwd(args, do):
        o, pull = jax.vjp(fwd, *args)
        return pull(do)

    return fwd_bwd


def prism_fwd(impl, scale, **kw):
    from pallas_kernels import prism_pallas
    from prism_jax.ops import prism_recurrence

    def fwd(q, k, v, beta, g):
        if impl == "pallas":  # block kwargs go straight to the kernels
            return prism_pallas(q, k, v, beta, g, scale=scale, **kw)[0]
        return prism_recurrence(q, k, v, beta, g, impl=impl, **kw)[0]

    return fwd


def gdn_fwd(scale):
    from jla.ops.mosaic_gpu.gated_delta_rule import gated_delta_rule

    def fwd(q, k, v, beta, g):  # PRISM layout -> GDN (L = 1)
        return gated_delta_rule(q, k[:, :, :, 0], v[:, :, :, 0], g, beta[:, :, :, 0].astype(jnp.float32),
                                scale=scale)[0]

    return fwd


def reference(xs, do):
    """Output and input gradients of our chunk form in float32 at full matmul precision."""
    from prism_jax.ops import prism_recurrence

    def fwd(q, k, v, beta, g):
        with jax.default_matmul_precision("highest"):
            return prism_recurrence(q, k, v, beta, g, impl="chunk")[0]

    @jax.jit
    def ref(xs, do):
        o, pull = jax.vjp(fwd, *[x.astype(jnp.float32) for x in xs])
        return o, pull(do.astype(jnp.float32))

    return ref(xs, do)


def matmul_tflops(reps, n):
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.bfloat16)
    ms = timed(jax.jit(lambda x, y: x @ y), a, b, reps=reps)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def run_fla(lengths, reps, shape):
    import torch
    import triton.testing
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    rows = []
    H, K, V = shape["heads"], shape["dk"], shape["dv"]
    for T in lengths:
        B = shape["tokens"] // T
        dev = "cuda"
        q = torch.randn(B, T, H, K, device=dev, dtype=torch.bfloat16)
        k = torch.nn.functional.normalize(torch.randn(B, T, H, K, device=dev), dim=-1).bfloat16()
        v = torch.randn(B, T, H, V, device=dev, dtype=torch.bfloat16)
        beta = torch.rand(B, T, H, device=dev).bfloat16()
        g = -torch.rand(B, T, H, device=dev) * 0.3
        fn = lambda: chunk_gated_delta_rule(q, k, v, g, beta, scale=K ** -0.5)
        ms = triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
        rows.append(f"| fla-core GDN fwd (Triton, torch) | T={T} | {ms:.3f} ms |")
        print(rows[-1], flush=True)
    return rows


class Run:
    """Budget, results and the JSON file (rewritten after every point)."""

    def __init__(self, path, budget_s):
        self.path, self.budget_s, self.start = path, budget_s, time.time()
        self.doc = dict(meta={}, sweep=[], rows=[], skipped=[], notes=[])
        self.cost = {}  # kind -> seconds the last such point took

    def elapsed(self):
        return time.time() - self.start

    def fits(self, kind, default_s):
        return self.elapsed() + 1.2 * self.cost.get(kind, default_s) <= self.budget_s

    def add(self, section, item):
        self.doc[section].append(item)
        print(json.dumps(item), flush=True)
        self.save()

    def save(self):
        self.doc["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1)
        os.replace(tmp, self.path)


def measure_row(spec, shape, reps, refs, pallas_kw, gdn=None):
    """One table row: spec = (impl, L, T, bwd) with impl in pallas / chunk / jla_gdn. `refs` caches the
    float32 reference of the last (T, L); `gdn` (jitted GDN forward) is compared with pallas at L = 1."""
    impl, L, T, bwd = spec
    H, K, V = shape["heads"], shape["dk"], shape["dv"]
    B = shape["tokens"] // T
    scale = K ** -0.5
    xs, do = inputs(jax.random.PRNGKey(T + L), B, T, L, H, K, V)
    if refs.get("key") != (T, L):
        refs.clear()  # frees the previous shape's arrays first
        refs.update(key=(T, L), val=reference(xs, do))
    o_ref, grads_ref = refs["val"]
    if impl == "pallas":
        fwd = prism_fwd("pallas", scale, bwd=bwd, **pallas_kw)
    elif impl == "chunk":
        fwd = prism_fwd("chunk", scale, chunk_size=64)
    else:
        fwd = gdn_fwd(scale)
    row = dict(impl=impl, bwd=bwd, L=L, T=T, B=B)
    flops = fwd_flops(T, B, L, H, K, V)
    if not (impl == "pallas" and bwd == "xla"):  # that forward is the fused row's
        exe, mem = compiled(fwd, *xs)
        ms = timed(exe, *xs, reps=reps)
        o = exe(*xs)
        row.update(fwd_ms=ms, fwd_tflops=flops / (ms * 1e-3) / 1e12, fwd_mem_gib=mem, fwd_rel_err=rel(o, o_ref))
        if impl == "pallas" and L == 1 and gdn is not None:
            row["vs_jla_gdn"] = rel(o, gdn(*xs))
        del o
    exe, mem = compiled(with_vjp(fwd), xs, do)
    ms = timed(exe, xs, do, reps=reps)
    grads = exe(xs, do)
    errs = {n: rel(a, b) for n, a, b in zip(GRAD_NAMES, grads, grads_ref)}
    row.update(fwd_bwd_ms=ms, fwd_bwd_tflops=3 * flops / (ms * 1e-3) / 1e12, fwd_bwd_mem_gib=mem,
               grad_rel_err=errs, grad_rel_err_max=max(errs.values()))
    return row


def breakdown(shape, T, L, reps, pallas_kw):
    """Milliseconds of each kernel of pallas fwd+bwd (bf16, chunk 32, defaults / the sweep's pick)."""
    from pallas_kernels.common import prepare
    from pallas_kernels.gpu import chunk_bwd, pullback, split, state_bwd

    H, K, V, C = shape["heads"], shape["dk"], shape["dv"], 32
    B = shape["tokens"] // T
    (q, k, v, beta, g), do = inputs(jax.random.PRNGKey(1), B, T, L, H, K, V)
    x = prepare(q, k, v, beta, g, None, None, C)
    scale, interp = K ** -0.5, jax.default_backend() == "cpu"  # CPU: --smoke, interpret mode
    fwd = jax.jit(lambda x: split.forward(x, scale=scale, chunk_size=C, interpret=interp))
    _, final, starts, ainv = fwd(x)
    pull = jax.jit(lambda x, do, ainv: pullback.state_pullback(x.q, x.k, x.beta, x.g, x.r, x.rm1, do,
                                                               scale=scale, chunk_size=C, ainv=ainv,
                                                               interpret=interp))
    p, ek, a, y = pull(x, do, ainv)
    rev = jax.jit(lambda p, ek, a, y, df: state_bwd.reverse_pass(p, ek, a, y, df, mm_dtype=q.dtype,
                                                                 interpret=interp))
    cot, _ = rev(p, ek, a, y, final)
    cb = jax.jit(lambda x, starts, do, cot, ainv: chunk_bwd.chunk_backward(
        x.q, x.k, x.v, x.beta, x.g, x.r, x.rm1, starts, do, cot, scale=scale, chunk_size=C, ainv=ainv,
        block_v=pallas_kw.get("bwd_block_v"), num_warps=pallas_kw.get("bwd_num_warps"), interpret=interp))
    return dict(T=T, L=L, forward_ms=timed(fwd, x, reps=reps), pullback_ms=timed(pull, x, do, ainv, reps=reps),
                reverse_ms=timed(rev, p, ek, a, y, final, reps=reps),
                chunk_bwd_ms=timed(cb, x, starts, do, cot, ainv, reps=reps))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--lengths", default="2048,8192,32768")
    ap.add_argument("--writes", default="1,2,3")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget_s", type=float, default=400, help="stop starting points after this")
    ap.add_argument("--sweep", action="store_true", help="fused-backward block_v / warps sweep first")
    ap.add_argument("--sweep_budget_s", type=float, default=120)
    ap.add_argument("--skip", default="", help="rows to leave out, e.g. chunk@2048,jla_gdn@2048,xla@8192")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: interpret mode)")
    ap.add_argument("--no_breakdown", action="store_true", help="skip the per-kernel times (first length, L = 2)")
    ap.add_argument("--fla", action="store_true")
    args = ap.parse_args()
    shape = SMOKE if args.smoke else SHAPE
    lengths = [int(t) for t in args.lengths.split(",")] if not args.smoke else [32, 64]
    writes = [int(w) for w in args.writes.split(",")]
    if args.fla:
        rows = run_fla(lengths, args.reps, shape)
        open(os.path.join(args.out, "fla.md"), "w").write("\n".join(rows) + "\n")
        return
    run = Run(os.path.join(args.out, "kernels.json"), args.budget_s)
    peak = matmul_tflops(args.reps, 512 if args.smoke else 8192)
    run.doc["meta"].update(devices=[str(d) for d in jax.devices()], jax=jax.__version__, shape=shape,
                           matmul_bf16_tflops=peak, reps=args.reps)
    print(jax.devices(), f"bf16 matmul: {peak:.0f} TFLOP/s", flush=True)

    try:
        gdn = jax.jit(gdn_fwd(shape["dk"] ** -0.5))
        have_jla = True
    except Exception as e:
        have_jla, gdn = False, None
        run.doc["notes"].append(f"jax-linear-attention not importable ({type(e).__name__}: {e}); GDN rows skipped")
        print(run.doc["notes"][-1], flush=True)

    pallas_kw = {}
    if args.sweep:
        T, L = lengths[0], 2
        H, K, V = shape["heads"], shape["dk"], shape["dv"]
        xs, do = inputs(jax.random.PRNGKey(0), shape["tokens"] // T, T, L, H, K, V)
        best = None
        for bv, nw in ((64, 8), (64, 4), (32, 4), (128, 8), (32, 8), (128, 4)):
            if bv > V or run.elapsed() > args.sweep_budget_s:
                continue
            kw = dict(bwd_block_v=bv, bwd_num_warps=nw)
            t0 = time.time()
            try:
                exe, _ = compiled(with_vjp(prism_fwd("pallas", K ** -0.5, **kw)), xs, do)
                ms = timed(exe, xs, do, reps=args.reps)
                run.add("sweep", dict(T=T, L=L, fwd_bwd_ms=ms, seconds=round(time.time() - t0, 1), **kw))
                best = min(best or (ms, kw), (ms, kw), key=lambda t: t[0])
            except Exception as e:  # report and go on
                run.add("sweep", dict(T=T, L=L, error=f"{type(e).__name__}: {str(e)[:300]}", **kw))
        pallas_kw = best[1] if best else {}
        run.doc["meta"]["pallas_bwd_settings"] = pallas_kw
        print("fused-backward settings for the table:", pallas_kw, flush=True)

    first, rest = lengths[0], lengths[1:]
    specs = [("pallas", 2, first, "fused"), ("pallas", 2, first, "xla"), ("pallas", 1, first, "fused"),
             ("jla_gdn", 1, first, None), ("pallas", 3, first, "fused"), ("pallas", 1, first, "xla"),
             ("pallas", 3, first, "xla"), ("chunk", 2, first, None), ("breakdown", 2, first, None)]
    for T in rest:
        specs += [("pallas", 1, T, "fused"), ("jla_gdn", 1, T, None), ("pallas", 2, T, "fused"),
                  ("pallas", 3, T, "fused")]
    for T in rest:
        specs += [("pallas", 2, T, "xla"), ("chunk", 2, T, None)]
    skip = set(filter(None, args.skip.split(",")))
    refs = {}
    for spec in specs:
        impl, L, T, bwd = spec
        if L not in writes and impl == "pallas":
            continue
        if impl == "jla_gdn" and not have_jla:
            continue
        tag = f"{bwd if impl == 'pallas' else impl}@{T}"
        if tag in skip or f"{impl}@{T}" in skip:
            continue
        kind = (impl, bwd, T)
        if not run.fits(kind, default_s=40 if T == first else 60):
            run.add("skipped", dict(impl=impl, bwd=bwd, L=L, T=T, reason="time budget"))
            continue
        t0 = time.time()
        if impl == "breakdown":
            try:
                if not args.no_breakdown:
                    run.doc["breakdown"] = breakdown(shape, T, L, args.reps, pallas_kw)
                    print(json.dumps(run.doc["breakdown"]), flush=True)
                    run.save()
            except Exception as e:
                run.doc["notes"].append(f"breakdown failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        try:
            row = measure_row(spec, shape, args.reps, refs, pallas_kw, gdn)
            row["seconds"] = round(time.time() - t0, 1)
            run.add("rows", row)
        except Exception as e:
            run.add("rows", dict(impl=impl, bwd=bwd, L=L, T=T, error=f"{type(e).__name__}: {str(e)[:400]}"))
        run.cost[kind] = time.time() - t0
    print_tables(run.doc, peak, shape)


def print_tables(doc, peak, shape):
    f = lambda x, p=".2f": "-" if x is None else format(x, p)
    print(f"\nbf16 matmul peak measured: {peak:.0f} TFLOP/s; B*T = {shape['tokens']}, H = {shape['heads']}, "
          f"K = {shape['dk']}, V = {shape['dv']}, bf16 inputs; elapsed {doc['meta']['elapsed_s']} s")
    if doc.get("breakdown"):
        bd = doc["breakdown"]
        print(f"\nper kernel, pallas bf16 L = {bd['L']}, T = {bd['T']}: " + ", ".join(
            f"{k[:-3]} {v:.2f} ms" for k, v in bd.items() if k.endswith("_ms")))
    if doc["sweep"]:
        print("\n| bwd_block_v | bwd_num_warps | fwd+bwd ms |\n|---|---|---|")
        for s in doc["sweep"]:
            print(f"| {s['bwd_block_v']} | {s['bwd_num_warps']} | {f(s.get('fwd_bwd_ms'))} {s.get('error', '')[:80]} |")
    print("\n| impl | bwd | L | T | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | mem fwd / fwd+bwd GiB "
          "| fwd rel err | grad rel err (max; q k v beta g) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in doc["rows"]:
        if "error" in r:
            continue
        ge = r["grad_rel_err"]
        print(f"| {r['impl']} | {r['bwd'] or '-'} | {r['L']} | {r['T']} | {f(r.get('fwd_ms'))} | {f(r['fwd_bwd_ms'])} | "
              f"{f(r.get('fwd_tflops'), '.1f')} | {f(r['fwd_bwd_tflops'], '.1f')} | "
              f"{f(r.get('fwd_mem_gib'))} / {f(r['fwd_bwd_mem_gib'])} | {f(r.get('fwd_rel_err'), '.1e')} | "
              f"{r['grad_rel_err_max']:.1e}; " + " ".join(f"{ge[n]:.1e}" for n in GRAD_NAMES) + " |")
    for r in doc["rows"]:
        if "error" in r:
            print("ERROR", r)
    for s in doc["skipped"]:
        print("SKIPPED", s)
    for n in doc["notes"]:
        print("NOTE", n)


if __name__ == "__main__":
    sys.exit(main())
