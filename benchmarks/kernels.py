"""PRISM kernels beside Gated DeltaNet peers, in one run on one GPU (issue 5's table).

    python benchmarks/kernels.py --out DIR [--lengths 2048,8192,32768] [--plan ...] [--sweep explicit]
                                 [--variant 'NAME={"bwd": "explicit", "chunk_size": 64}'] [--dplr]
    python benchmarks/kernels.py --smoke --out /tmp   # tiny shapes on CPU (interpret mode), checks the script
    python benchmarks/kernels.py --fla                # flash-linear-attention GDN forward (torch)

Shapes: B * T = 32768 tokens, H = 16, K = V = 128, bf16 inputs (g float32). Each `pallas` row runs one
named VARIANT (a set of `prism_pallas` kwargs: backward "xla" / "fused" / "explicit", chunk 32 or 64,
forward options; `--variant` adds or replaces one). `--plan` lists the rows in priority order
(`VARIANT:L:T`, `chunk:L:T` our XLA chunk form, `jla_gdn:T` jax-linear-attention 0.1.0's Gated
DeltaNet on Mosaic GPU, `breakdown:VARIANT:L:T` the time of each kernel of that variant); the default
(`default_plan`) puts the first length's comparison of backwards first. The run stops starting rows at
--budget_s. `--sweep VARIANT` first times that variant's backward block settings (SWEEP_GRIDS) and uses
the fastest. `--dplr` then runs the DPLR-interleaved exact PRISM path through flash-linear-attention
(`dplr_peer.py`, torch) in the same process (set XLA_PYTHON_CLIENT_PREALLOCATE=false for it).
A forward is timed once per forward setting and (L, T); rows that share it say so (`fwd_as`).
Times are medians of `--reps` runs after 2 warm-ups (host clock around a blocking call) of one compiled
executable. TFLOP/s counts the useful matmul FLOPs of the chunk algorithm (prism-math.md section 4;
fwd+bwd counted as 3x fwd) against a bf16 8192^3 matmul measured in the same run. Memory is XLA's
compiled footprint (arguments + outputs + temporaries). Every row is checked against our chunk form in
float32 at full matmul precision on the same bf16-rounded inputs: relative L2 error of the output and
of each input gradient. Results go to DIR/kernels.json, rewritten after every point, and a markdown
table is printed.
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

# name -> prism_pallas keyword arguments. A row "pallas" names one of these; its forward is timed once per
# distinct forward setting (the keys below that are not backward options) and (L, T).
VARIANTS = {
    "default": {},  # prism_pallas' defaults on this machine (on a TPU: its kernels, chunk 64, the kernel backward)
    "xla": dict(bwd="xla"),                       # chunk 32 (the kernels' default chunk)
    "fused": dict(bwd="fused"),
    "explicit": dict(bwd="explicit"),
    "xla64": dict(bwd="xla", chunk_size=64),
    "fused64": dict(bwd="fused", chunk_size=64),  # bwd="auto" at chunk 64 (the model presets)
    "explicit64": dict(bwd="explicit", chunk_size=64),
    "mosaic": dict(kernel="mosaic", chunk_size=64),  # every stage in Mosaic GPU (gpu/mosaic/pipeline.py)
    "triton64": dict(kernel="mosaic", chunk_size=64, mosaic_stages=()),  # that pipeline, all Triton
    # the outputs in the state pass, no outputs / pull-back kernels (factors from the intra kernel at L = 1)
    "mfused": dict(kernel="mosaic", chunk_size=64, mosaic_options={"outputs": {"fused": True}}),
    "mxla": dict(kernel="mosaic", chunk_size=64, mosaic_options={"outputs": {"fused": "xla"}}),  # factors in XLA
}
BWD_KEYS = ("bwd", "bwd_block_v", "bwd_num_warps", "bwd_v_split")


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


def with_vjp(fwd, keep_output=False):
    """(args, do) -> input gradients, or (o, gradients) with keep_output: as in a training step, where
    the output feeds the loss. Without it XLA drops every forward computation that only o needs (our
    outputs kernel; the backward reads the saved start states) while a peer that forms o inside its
    state pass keeps that work: `--keep_output` times both sides doing the same work."""

    def fwd_bwd(args, do):
        o, pull = jax.vjp(fwd, *args)
        return (o, pull(do)) if keep_output else pull(do)

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
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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


def forward_key(kw):
    hashable = lambda v: json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v  # --variant JSON
    return tuple(sorted((k, hashable(v)) for k, v in kw.items() if k not in BWD_KEYS))


def measure_row(spec, shape, reps, refs, variants, gdn=None, timed_forwards=None, keep_output=False):
    """One table row: spec = (impl, L, T, variant) with impl in pallas / chunk / jla_gdn and variant a key
    of `variants` (pallas only). `refs` caches the float32 reference of the last (T, L); `gdn` (jitted GDN
    forward) is compared with pallas at L = 1; `timed_forwards` {(forward settings, L, T): row} skips
    timing a forward already timed under another backward."""
    impl, L, T, variant = spec
    H, K, V = shape["heads"], shape["dk"], shape["dv"]
    B = shape["tokens"] // T
    scale = K ** -0.5
    xs, do = inputs(jax.random.PRNGKey(T + L), B, T, L, H, K, V)
    row = dict(impl=impl, variant=variant, L=L, T=T, B=B, phase_s={})
    start = time.perf_counter()

    def phase(name):  # a row killed by a timeout says on stderr which phase it was in
        row["phase_s"][name] = round(time.perf_counter() - start, 1)
        print(f"[{variant or impl} L={L} T={T}] {row['phase_s'][name]:7.1f} s: {name}", file=sys.stderr, flush=True)

    if refs.get("key") != (T, L):
        refs.clear()  # frees the previous shape's arrays first
        phase("reference")
        refs.update(key=(T, L), val=jax.block_until_ready(reference(xs, do)))
    o_ref, grads_ref = refs["val"]
    fkey = None
    if impl == "pallas":
        kw = variants[variant]
        row.update(bwd=kw.get("bwd", "auto"), chunk=kw.get("chunk_size", "default"), kwargs=kw)
        fwd = prism_fwd("pallas", scale, **kw)
        fkey = (forward_key(kw), L, T)
    elif impl == "chunk":
        fwd = prism_fwd("chunk", scale, chunk_size=64)
        row.update(bwd=None, chunk=64)
    else:
        fwd = gdn_fwd(scale)
        row.update(bwd=None, chunk=64)
    flops = fwd_flops(T, B, L, H, K, V)
    timed_forwards = {} if timed_forwards is None else timed_forwards
    if fkey is not None and fkey in timed_forwards:
        row["fwd_as"] = timed_forwards[fkey]  # the same forward kernels, timed in that row
    else:
        phase("compile fwd")
        exe, mem = compiled(fwd, *xs)
        phase("time fwd")
        ms = timed(exe, *xs, reps=reps)
        o = exe(*xs)
        row.update(fwd_ms=ms, fwd_tflops=flops / (ms * 1e-3) / 1e12, fwd_mem_gib=mem, fwd_rel_err=rel(o, o_ref))
        if impl == "pallas" and L == 1 and gdn is not None:
            row["vs_jla_gdn"] = rel(o, gdn(*xs))
        del o
        if fkey is not None:
            timed_forwards[fkey] = variant
    phase("compile fwd+bwd")
    exe, mem = compiled(with_vjp(fwd, keep_output), xs, do)
    phase("time fwd+bwd")
    ms = timed(exe, xs, do, reps=reps)
    grads = exe(xs, do)
    if keep_output:
        row["fwd_bwd_keeps_output"] = True
        grads = grads[1]
    errs = {n: rel(a, b) for n, a, b in zip(GRAD_NAMES, grads, grads_ref)}
    row.update(fwd_bwd_ms=ms, fwd_bwd_tflops=3 * flops / (ms * 1e-3) / 1e12, fwd_bwd_mem_gib=mem,
               grad_rel_err=errs, grad_rel_err_max=max(errs.values()))
    phase("done")
    return row


def breakdown(shape, T, L, reps, kw):
    """Milliseconds of each kernel of pallas fwd+bwd for the variant's kwargs `kw` (bf16): the split
    forward, the state pull-back, the reverse state pass and the per-chunk backward of its `bwd`
    ("fused": gpu/chunk_bwd.py, "explicit": gpu/chunk_grads.py)."""
    from pallas_kernels.common import prepare
    from pallas_kernels.gpu import chunk_bwd, chunk_grads, pullback, split, state_bwd

    H, K, V, C = shape["heads"], shape["dk"], shape["dv"], kw.get("chunk_size", 32)
    bwd = kw.get("bwd", "explicit")
    if bwd not in ("fused", "explicit"):
        raise ValueError(f"breakdown: times the kernel backwards ('fused', 'explicit'), not {bwd!r}")
    B = shape["tokens"] // T
    (q, k, v, beta, g), do = inputs(jax.random.PRNGKey(1), B, T, L, H, K, V)
    x = prepare(q, k, v, beta, g, None, None, C)
    scale, interp = K ** -0.5, jax.default_backend() == "cpu"  # CPU: --smoke, interpret mode
    fwd_kw = {k_: v_ for k_, v_ in kw.items() if k_ in ("block_v", "num_warps", "forward_inverse",
                                                         "state_pieces")}
    if "forward_inverse" in fwd_kw:
        fwd_kw["inverse"] = fwd_kw.pop("forward_inverse")
    fwd = jax.jit(lambda x: split.forward(x, scale=scale, chunk_size=C, interpret=interp, **fwd_kw))
    _, final, starts, ainv = fwd(x)
    pull = jax.jit(lambda x, do, ainv: pullback.state_pullback(x.q, x.k, x.beta, x.g, x.r, x.rm1, do,
                                                               scale=scale, chunk_size=C, ainv=ainv,
                                                               interpret=interp))
    p, ek, a, y = pull(x, do, ainv)
    rev = jax.jit(lambda p, ek, a, y, df: state_bwd.reverse_pass(p, ek, a, y, df, mm_dtype=q.dtype,
                                                                 interpret=interp))
    cot, _ = rev(p, ek, a, y, final)
    blocks = dict(block_v=kw.get("bwd_block_v"), num_warps=kw.get("bwd_num_warps"))
    if bwd == "explicit":
        cb = jax.jit(lambda x, starts, do, cot, ainv: chunk_grads.chunk_grads_backward(
            x.q, x.k, x.v, x.beta, x.g, x.r, x.rm1, starts, do, cot, scale=scale, chunk_size=C, ainv=ainv,
            v_split=kw.get("bwd_v_split"), interpret=interp, **blocks))
    else:
        cb = jax.jit(lambda x, starts, do, cot, ainv: chunk_bwd.chunk_backward(
            x.q, x.k, x.v, x.beta, x.g, x.r, x.rm1, starts, do, cot, scale=scale, chunk_size=C, ainv=ainv,
            interpret=interp, **blocks))
    return dict(T=T, L=L, kwargs=kw, forward_ms=timed(fwd, x, reps=reps),
                pullback_ms=timed(pull, x, do, ainv, reps=reps),
                reverse_ms=timed(rev, p, ek, a, y, final, reps=reps),
                chunk_bwd_ms=timed(cb, x, starts, do, cot, ainv, reps=reps))


SWEEP_GRIDS = {  # backward settings tried by --sweep VARIANT (fwd+bwd at the first length, L = 2): the
    # variant's own entry, else its bwd's
    "explicit64": [dict(bwd_block_v=bv, bwd_num_warps=nw, bwd_v_split=vs)
                   for bv, nw, vs in ((32, 16, 1), (16, 16, 1), (64, 16, 1), (32, 8, 1), (32, 16, 4), (32, 8, 4))],
    "fused": [dict(bwd_block_v=bv, bwd_num_warps=nw) for bv, nw in ((32, 8), (64, 4), (64, 8), (128, 4))],
    "explicit": [dict(bwd_block_v=bv, bwd_num_warps=nw, bwd_v_split=vs)
                 for bv, nw, vs in ((32, 8, 1), (32, 4, 1), (64, 8, 1), (32, 8, 4), (64, 8, 2), (32, 4, 4))],
}


def default_plan(lengths, writes):
    """Rows in priority order: "VARIANT:L:T", "chunk:L:T", "jla_gdn:T", "breakdown:VARIANT:L:T"."""
    first, rest = lengths[0], lengths[1:]
    plan = [f"explicit:2:{first}", f"xla:2:{first}", f"fused64:2:{first}", f"explicit64:2:{first}",
            f"jla_gdn:{first}"]
    plan += [f"explicit:{L}:{first}" for L in writes if L != 2]
    plan += [f"xla:{L}:{first}" for L in writes if L != 2]
    plan += [f"chunk:2:{first}", f"breakdown:explicit:2:{first}"]
    for T in rest:
        plan += [f"explicit:{L}:{T}" for L in writes] + [f"jla_gdn:{T}"]
    for T in rest:
        plan += [f"xla:2:{T}", f"chunk:2:{T}"]
    return plan


def parse_variant(item):
    """--variant NAME=JSON -> (name, prism_pallas kwargs); ValueError naming the item."""
    name, _, spec = item.partition("=")
    try:
        return name, json.loads(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"--variant {item!r}: expected NAME=<JSON object of prism_pallas kwargs> ({e})")


def parse_plan_item(item, variants):
    """-> (impl, L, T, variant). Raises ValueError naming the item when it does not parse."""
    parts = item.split(":")
    try:
        if parts[0] == "jla_gdn" and len(parts) == 2:
            return ("jla_gdn", 1, int(parts[1]), None)
        if parts[0] == "chunk" and len(parts) == 3:
            return ("chunk", int(parts[1]), int(parts[2]), None)
        if parts[0] == "breakdown" and len(parts) == 4 and parts[1] in variants:
            return ("breakdown", int(parts[2]), int(parts[3]), parts[1])
        if parts[0] in variants and len(parts) == 3:
            return ("pallas", int(parts[1]), int(parts[2]), parts[0])
    except ValueError:
        pass
    raise ValueError(f"--plan item {item!r}: expected VARIANT:L:T (VARIANT in {sorted(variants)}), chunk:L:T, "
                     "jla_gdn:T or breakdown:VARIANT:L:T")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--lengths", default="2048,8192,32768")
    ap.add_argument("--writes", default="1,2,3")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget_s", type=float, default=400, help="stop starting points after this")
    ap.add_argument("--variant", action="append", default=[], metavar='NAME={"bwd": "explicit", ...}',
                    help="add or replace a named set of prism_pallas kwargs (JSON)")
    ap.add_argument("--plan", default=None, help="comma-separated rows (default: default_plan)")
    ap.add_argument("--sweep", action="append", default=[], metavar="VARIANT",
                    help="time SWEEP_GRIDS[its bwd] on top of VARIANT first; the fastest replaces it")
    ap.add_argument("--sweep_budget_s", type=float, default=120)
    ap.add_argument("--dplr", action="store_true", help="then the DPLR-interleaved peer (dplr_peer.py, torch)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: interpret mode)")
    ap.add_argument("--fla", action="store_true", help="flash-linear-attention GDN forward only (torch)")
    ap.add_argument("--keep_output", action="store_true",
                    help="fwd+bwd returns the output too (a training step's work; see with_vjp)")
    args = ap.parse_args()
    shape = SMOKE if args.smoke else SHAPE
    lengths = [int(t) for t in args.lengths.split(",")] if not args.smoke else [32, 64]
    writes = [int(w) for w in args.writes.split(",")]
    variants = dict(VARIANTS)
    variants.update(parse_variant(item) for item in args.variant)
    plan = [parse_plan_item(i, variants) for i in (args.plan.split(",") if args.plan else
                                                   default_plan(lengths, writes))]
    if args.fla:
        rows = run_fla(lengths, args.reps, shape)
        open(os.path.join(args.out, "fla.md"), "w").write("\n".join(rows) + "\n")
        return
    run = Run(os.path.join(args.out, "kernels.json"), args.budget_s)
    peak = matmul_tflops(args.reps, 512 if args.smoke else 8192)
    run.doc["meta"].update(devices=[str(d) for d in jax.devices()], jax=jax.__version__, shape=shape,
                           matmul_bf16_tflops=peak, reps=args.reps, plan=args.plan or "default")
    print(jax.devices(), f"bf16 matmul: {peak:.0f} TFLOP/s", flush=True)

    try:
        gdn = jax.jit(gdn_fwd(shape["dk"] ** -0.5))
        have_jla = True
    except Exception as e:
        have_jla, gdn = False, None
        run.doc["notes"].append(f"jax-linear-attention not importable ({type(e).__name__}: {e}); GDN rows skipped")
        print(run.doc["notes"][-1], flush=True)

    for name in args.sweep:
        base = variants[name]
        T, L = lengths[0], 2
        H, K, V = shape["heads"], shape["dk"], shape["dv"]
        xs, do = inputs(jax.random.PRNGKey(0), shape["tokens"] // T, T, L, H, K, V)
        best = None
        for extra in SWEEP_GRIDS.get(name, SWEEP_GRIDS[base["bwd"]]):
            kw = dict(base, **extra)
            if kw.get("bwd_block_v", 0) > V or run.elapsed() > args.sweep_budget_s:
                continue
            t0 = time.time()
            try:
                exe, _ = compiled(with_vjp(prism_fwd("pallas", K ** -0.5, **kw)), xs, do)
                ms = timed(exe, xs, do, reps=args.reps)
                run.add("sweep", dict(variant=name, T=T, L=L, fwd_bwd_ms=ms, seconds=round(time.time() - t0, 1), **extra))
                best = min(best or (ms, kw), (ms, kw), key=lambda t: t[0])
            except Exception as e:  # report and go on
                run.add("sweep", dict(variant=name, T=T, L=L, error=f"{type(e).__name__}: {str(e)[:300]}", **extra))
        if best:
            variants[name] = best[1]
        print(f"{name}: settings for the table: {variants[name]}", flush=True)
    run.doc["meta"]["variants"] = variants

    refs, timed_forwards = {}, {}
    for spec in plan:
        impl, L, T, variant = spec
        if impl == "jla_gdn" and not have_jla:
            continue
        kind = (impl, variant, T)
        if not run.fits(kind, default_s=40 if T == lengths[0] else 60):
            run.add("skipped", dict(impl=impl, variant=variant, L=L, T=T, reason="time budget"))
            continue
        t0 = time.time()
        if impl == "breakdown":
            try:
                run.doc.setdefault("breakdowns", []).append(breakdown(shape, T, L, args.reps, variants[variant]))
                print(json.dumps(run.doc["breakdowns"][-1]), flush=True)
                run.save()
            except Exception as e:
                run.doc["notes"].append(f"breakdown {variant} failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        try:
            row = measure_row(spec, shape, args.reps, refs, variants, gdn, timed_forwards, args.keep_output)
            row["seconds"] = round(time.time() - t0, 1)
            run.add("rows", row)
        except Exception as e:
            run.add("rows", dict(impl=impl, variant=variant, L=L, T=T, error=f"{type(e).__name__}: {str(e)[:400]}"))
        run.cost[kind] = time.time() - t0
    if args.dplr:
        from dplr_peer import run_dplr

        left = args.budget_s - run.elapsed()
        for r in run_dplr(lengths, [2] + [w for w in writes if w != 2], args.reps, shape, left, refs=refs):
            if "fwd_bwd_ms" in r:
                run.add("rows", r)
            else:
                run.add("notes", json.dumps(r))
    print_tables(run.doc, peak, shape)


def print_tables(doc, peak, shape):
    f = lambda x, p=".2f": "-" if x is None else format(x, p)
    print(f"\nbf16 matmul peak measured: {peak:.0f} TFLOP/s; B*T = {shape['tokens']}, H = {shape['heads']}, "
          f"K = {shape['dk']}, V = {shape['dv']}, bf16 inputs; elapsed {doc['meta']['elapsed_s']} s")
    for bd in doc.get("breakdowns", []):
        print(f"\nper kernel, pallas bf16 L = {bd['L']}, T = {bd['T']}, {bd['kwargs']}: " + ", ".join(
            f"{k[:-3]} {v:.2f} ms" for k, v in bd.items() if k.endswith("_ms")))
    if doc["sweep"]:
        print("\n| variant | settings | fwd+bwd ms |\n|---|---|---|")
        for s in doc["sweep"]:
            settings = {k: v for k, v in s.items() if k.startswith("bwd_")}
            print(f"| {s['variant']} | {settings} | {f(s.get('fwd_bwd_ms'))} {s.get('error', '')[:80]} |")
    print("\n| impl | variant | bwd | chunk | L | T | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s "
          "| mem fwd / fwd+bwd GiB | fwd rel err | grad rel err (max; q k v beta g) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in doc["rows"]:
        if "error" in r:
            continue
        ge = r["grad_rel_err"]
        print(f"| {r['impl']} | {r.get('variant') or '-'} | {r.get('bwd') or '-'} | {r.get('chunk', '-')} | {r['L']} | "
              f"{r['T']} | {f(r.get('fwd_ms'))} | {f(r['fwd_bwd_ms'])} | "
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
