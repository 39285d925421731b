"""Where the whole op's time goes: every GPU kernel of one forward + backward, ours beside the peer's.

    python benchmarks/op_profile.py --out DIR [--rows mosaic:1:2048,mosaic:2:2048,jla_gdn:2048] [--reps 5]
    python benchmarks/op_profile.py --smoke --out /tmp   # CPU: checks the script (host events only)

Each row ("VARIANT:L:T" with VARIANT a key of `kernels.VARIANTS`, "chunk:L:T" or "jla_gdn:T":
`kernels.parse_plan_item`) is compiled as one jitted forward + pull-back (returning the output too with
--keep_output, `kernels.with_vjp`; shapes of `kernels.py`: B * T = 32K tokens, H = 16, K = V = 128,
bf16), warmed up, then run --reps times under `jax.profiler.trace`. The Perfetto trace is read back
and every event on the GPU's streams is summed by kernel name: per call, each kernel's milliseconds
and launches, the Mosaic / Pallas kernels and XLA's own (fusions, copies, memsets) apart, and the
GPU's busy time against the host clock.
Writes DIR/op_profile.json; prints a markdown table per row.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402

import kernels as kb  # noqa: E402


def trace_events(trace_dir):
    """(events, process names by pid) of the Perfetto trace that `jax.profiler.trace` wrote in trace_dir."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    paths += glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise RuntimeError(f"op_profile: no trace under {trace_dir}")
    with gzip.open(sorted(paths, key=os.path.getmtime)[-1], "rt") as f:
        doc = json.load(f)
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return events, names, threads


def device_lanes(names, threads):
    """(pid, tid) lanes of the GPU's streams: threads named "Stream ..." of the processes named
    "/device:GPU..." (their "XLA Ops" / "XLA Modules" lanes repeat the same time); every lane of those
    processes where no stream is named; None on the CPU (then every event counts)."""
    pids = {pid for pid, n in names.items() if "GPU" in n or "gpu" in n}
    if not pids:
        return None
    lanes = {pt for pt, n in threads.items() if pt[0] in pids and "stream" in n.lower()}
    return lanes or {pt for pt in threads if pt[0] in pids}


def kernel_times(events, lanes, calls):
    """{name: (ms per call, launches per call)} of the complete events on lanes (None: all), largest
    first."""
    tot, cnt = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and (lanes is None or (e.get("pid"), e.get("tid")) in lanes):
            tot[e["name"]] += float(e["dur"])
            cnt[e["name"]] += 1
    return {n: (tot[n] / 1e3 / calls, cnt[n] / calls) for n, _ in tot.most_common()}


def is_ours(name):
    """Pallas / Mosaic kernels (named by their kernel_name) against XLA's own fusions and copies."""
    low = name.lower()
    return any(s in low for s in ("mosaic", "mgpu", "prism", "pallas", "triton", "gated_delta", "chunk"))


def profile_row(spec, shape, reps, keep_output=False):
    impl, L, T, variant = spec
    H, K, V = shape["heads"], shape["dk"], shape["dv"]
    B = shape["tokens"] // T
    xs, do = kb.inputs(jax.random.PRNGKey(T + L), B, T, L, H, K, V)
    scale = K ** -0.5
    if impl == "pallas":
        fwd = kb.prism_fwd("pallas", scale, **kb.VARIANTS[variant])
    elif impl == "chunk":
        fwd = kb.prism_fwd("chunk", scale, chunk_size=64)
    else:
        fwd = kb.gdn_fwd(scale)
    exe, _ = kb.compiled(kb.with_vjp(fwd, keep_output), xs, do)
    wall = kb.timed(exe, xs, do, reps=reps)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(reps):
                jax.block_until_ready(exe(xs, do))
        events, names, threads = trace_events(d)
    lanes = device_lanes(names, threads)
    times = kernel_times(events, lanes, reps)
    ours = sum(ms for n, (ms, _) in times.items() if is_ours(n))
    busy = sum(ms for ms, _ in times.values())
    return dict(spec=f"{variant or impl}:{L}:{T}", keeps_output=keep_output, wall_ms=wall, gpu_busy_ms=busy,
                kernels_ms=ours, xla_ms=busy - ours, processes=sorted(set(names.values())),
                lanes=sorted({threads.get(pt, "") for pt in lanes or ()}),
                kernels=[dict(name=n, ms=ms, launches=c) for n, (ms, c) in times.items()])


def print_row(r, top):
    kept = " (output kept)" if r["keeps_output"] else ""
    print(f"\n### {r['spec']}{kept}: host {r['wall_ms']:.3f} ms per call, GPU busy {r['gpu_busy_ms']:.3f} "
          f"(Pallas / Mosaic kernels {r['kernels_ms']:.3f}, XLA {r['xla_ms']:.3f})\n")
    print("| kernel | ms / call | launches / call |\n|---|---|---|")
    for k in r["kernels"][:top]:
        print(f"| {k['name'][:90]} | {k['ms']:.3f} | {k['launches']:.0f} |")
    rest = r["kernels"][top:]
    if rest:
        print(f"| ({len(rest)} more) | {sum(k['ms'] for k in rest):.3f} | {sum(k['launches'] for k in rest):.0f} |")


def parse_row(item):
    """-> (impl, L, T, variant) as `kernels.parse_plan_item` (its "breakdown" rows are not profiles)."""
    spec = kb.parse_plan_item(item, kb.VARIANTS)
    if spec[0] == "breakdown":
        raise ValueError(f"op_profile: row {item!r}: breakdown rows belong to kernels.py")
    return spec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rows", default="mosaic:1:2048,mosaic:2:2048,jla_gdn:2048")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--variant", action="append", default=[], metavar='NAME={"kernel": "mosaic", ...}')
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, the chunk form (CPU)")
    ap.add_argument("--keep_output", action="store_true", help="the output too (kernels.with_vjp)")
    a = ap.parse_args(argv)
    kb.VARIANTS.update(kb.parse_variant(item) for item in a.variant)
    shape = kb.SMOKE if a.smoke else kb.SHAPE
    rows = [parse_row(r) for r in ("chunk:2:64" if a.smoke else a.rows).split(",")]
    out = dict(device=str(jax.devices()[0]), shape=shape, reps=a.reps, rows=[])
    os.makedirs(a.out, exist_ok=True)
    for spec in rows:
        t0 = time.time()
        try:
            r = profile_row(spec, shape, a.reps, a.keep_output)
        except Exception as e:  # one row's failure must not lose the others
            r = dict(spec=":".join(str(s) for s in spec), error=f"{type(e).__name__}: {str(e)[:500]}")
            print(f"\n### {r['spec']}: {r['error']}", flush=True)
        else:
            print_row(r, a.top)
        r["seconds"] = time.time() - t0
        out["rows"].append(r)
        with open(os.path.join(a.out, "op_profile.json"), "w") as f:
            json.dump(out, f, indent=1)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
