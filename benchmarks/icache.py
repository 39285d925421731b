"""Does straight-line code outgrow the SM's instruction cache? Time per instruction against code size.

Our chunk backward and intra kernels are straight-line code run once per CTA (8,880 and 5,120 SASS
instructions, 139 and 80 KiB at L = 1), and their phases take 13-26 cycles per PTX instruction whatever the
instructions are (`mosaic_diag.py phases`). That is what fetching every instruction from L2 would cost. This
kernel measures it directly: three warpgroups (384 threads, one CTA per SM by an SMEM reservation, as our
chunk backward), each running its own straight-line chain of float32 FMAs over a [64, 64] tile (32 independent
FMAs per step: no dependency stalls), so the code of one CTA is 3 x `steps` x 32 FMAs. Beside each
straight-line row, the same FMAs run as a loop over `unroll` steps (a few KiB of code, fetched once).

    python benchmarks/icache.py time [--kib 24,48,...] [--ctas-per-sm 16] [--reps 20] [--out DIR]  (a GPU)
    python benchmarks/icache.py sizes --out DIR   (deviceless.py's environment: PTX, then code size by ptxas)

`time` prints, per total code size, ns per FMA instruction of one warp, straight-line and looped, and with the
three warpgroups running one shared copy of the straight-line code (the same instructions per warp, a third
of the footprint); a cliff in the straight-line column at some size (and none in the looped one) is the
instruction cache's capacity and the cost of missing it, and the shared column says whether the footprint
(three copies) or each warp's own stream sets it. `sizes` compiles each variant for an H100 without one and reports its machine code
(instructions, KiB) from the cubin, which calibrates `steps_for` (`BASE_INSTRUCTIONS`, `STEP_INSTRUCTIONS`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.gpu.mosaic import common as mc

f32 = jnp.float32
TILE = (64, 64)  # one warpgroup's WGMMA-layout tile: 32 float32 registers per thread
FMAS_PER_STEP = 32
# Machine code of the straight-line kernel, from `sizes` (ptxas 13.0, sm_90a): ~870 instructions around the
# chains and 33 per step and warpgroup (32 FMAs and one more), 16 bytes each.
BASE_INSTRUCTIONS = 870
STEP_INSTRUCTIONS = FMAS_PER_STEP + 1
WARPGROUPS = 3
PAD_KIB = 160  # SMEM reserved per CTA so that one CTA runs per SM, as our chunk backward (~218 KiB)


def coefficients(w: int, i: int) -> tuple[float, float]:
    """(a, b) of step i of warpgroup w: x <- a x + b, distinct per step and warpgroup so no two steps share
    code and nothing folds; |a| < 1 keeps the chain bounded."""
    return 1.0 - (1 + i % 97 + 131 * w) * 2.0 ** -12, (1 + i % 89) * 2.0 ** -10


def chain(x, w: int, steps: int, start: int = 0):
    for i in range(start, start + steps):
        a, b = coefficients(w, i)
        x = x * a + b
    return x


def reference(ctas: int, steps: int, loop: int | None, shared: bool = False):
    """[ctas, 3, 64] float32: each warpgroup's row sums of its chain over i / 64 + j / 4096 + cta (plain JAX);
    shared: every warpgroup runs warpgroup 0's chain."""
    rows = jnp.arange(TILE[0], dtype=f32)[:, None] / 64 + jnp.arange(TILE[1], dtype=f32)[None, :] / 4096
    out = []
    for c in range(ctas):
        per_wg = []
        for w in range(WARPGROUPS):
            x = rows + c
            if loop:
                for _ in range(steps // loop):
                    x = chain(x, 0 if shared else w, loop)
            else:
                x = chain(x, 0 if shared else w, steps)
            per_wg.append(x.sum(axis=1))
        out.append(jnp.stack(per_wg))
    return jnp.stack(out)


def make(ctas: int, steps: int, loop: int | None = None, pad_kib: int = PAD_KIB, shared: bool = False,
         interpret: bool = False):
    """f() -> [ctas, 3, 64] float32: `steps` FMA steps per warpgroup, straight-line (loop None) or as a loop
    of steps // loop iterations over `loop` unrolled steps. shared: the three warpgroups run one copy of the
    code (warpgroup 0's chain, outside any branch): the same instructions per warp, a third of the code."""
    if loop is not None and (loop < 1 or steps % loop):
        raise ValueError(f"icache: `loop` = {loop} must divide `steps` = {steps}")

    def body(dummy_ref, o_ref, ovec, pad):
        del dummy_ref
        wg = lax.axis_index("wg")
        c = lax.axis_index("c")
        del pad  # reserved, never touched: it only keeps a second CTA off the SM

        def run_chain(w):
            # Distinct in every element (a tile constant along rows would let LLVM merge its registers).
            x = mc.iota(TILE, 0).astype(f32) / 64 + mc.iota(TILE, 1).astype(f32) / 4096 + c.astype(f32)
            if loop:
                return lax.fori_loop(0, steps // loop, lambda _, x: chain(x, w, loop), x)
            return chain(x, w, steps)

        def send(w, x):
            ovec[w] = jnp.sum(x, axis=1)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(ovec.at[w], o_ref.at[c, w])
            plgpu.wait_smem_to_gmem(0)

        x_shared = run_chain(0) if shared else None
        for w in range(WARPGROUPS):
            @pl.when(wg == w)
            def _run(w=w):
                send(w, x_shared if shared else run_chain(w))

    scratch = dict(ovec=plgpu.SMEM((WARPGROUPS, TILE[0]), f32), pad=plgpu.SMEM((pad_kib * 256,), f32))
    name = f"icache_{'loop' if loop else 'line'}{'_shared' if shared else ''}_{steps}"
    run = mc.kernel(body, name=name,
                    out_type=jax.ShapeDtypeStruct((ctas, WARPGROUPS, TILE[0]), f32), scratch=scratch,
                    grid=(ctas,), grid_names=("c",), interpret=interpret, num_threads=WARPGROUPS, thread_name="wg")
    # A dummy operand places the kernel: `sizes` lowers it with one on the compile-only H100.
    return jax.jit(lambda dummy: run(dummy.reshape(1)))


def steps_for(total_kib: float) -> int:
    """FMA steps per warpgroup for about `total_kib` of machine code in the straight-line kernel."""
    return max(1, round((total_kib * 1024 / 16 - BASE_INSTRUCTIONS) / (WARPGROUPS * STEP_INSTRUCTIONS)))


def code_kib(steps: int) -> float:
    return (BASE_INSTRUCTIONS + WARPGROUPS * STEP_INSTRUCTIONS * steps) * 16 / 1024


def looped_steps(steps: int, loop: int) -> int:
    """`steps` rounded down to whole iterations of `loop` steps (at least one)."""
    return max(loop, steps - steps % loop)


def time_rows(kibs, ctas_per_sm: int, reps: int, loop: int = 4) -> list[dict]:
    sms = getattr(jax.devices()[0], "core_count", 132)
    ctas = sms * ctas_per_sm
    rows = []
    for kib in kibs:
        steps = looped_steps(steps_for(kib), loop)
        row = {"kib": round(code_kib(steps), 1), "steps": steps, "ctas": ctas}
        for mode, lp, shared in (("line", None, False), ("loop", loop, False), ("shared", None, True)):
            f = make(ctas, steps, lp, shared=shared)
            t0 = time.perf_counter()
            dummy = jnp.zeros((), f32)
            f(dummy).block_until_ready()
            row[f"{mode}_compile_s"] = time.perf_counter() - t0
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                f(dummy).block_until_ready()
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1e3
            per_cta_ns = ms * 1e6 / ctas_per_sm  # one CTA per SM at a time
            row[f"{mode}_ms"] = ms
            row[f"{mode}_ns_per_fma"] = per_cta_ns / (steps * FMAS_PER_STEP)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _table(rows):
    out = ["| straight-line code KiB (3 warpgroups) | steps per warpgroup | straight-line ms | ns / FMA instr | looped ms | "
           "ns / FMA instr | straight / looped | one shared copy (a third of the code) ms | ns / FMA instr |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['kib']} | {r['steps']} | {r['line_ms']:.3f} | {r['line_ns_per_fma']:.2f} | {r['loop_ms']:.3f} "
                   f"| {r['loop_ns_per_fma']:.2f} | {r['line_ms'] / r['loop_ms']:.2f} | {r['shared_ms']:.3f} "
                   f"| {r['shared_ns_per_fma']:.2f} |")
    return "\n".join(out)


def size_rows(kibs, out: str, loop: int = 4) -> list[dict]:
    """Each straight-line variant compiled for an H100 without one (`deviceless.py`), its PTX dumped under
    `out` and assembled by ptxas: machine-code instructions and KiB per kernel."""
    import shutil
    import subprocess

    from benchmarks import deviceless, mosaic_diag

    rows = []
    for kib in kibs:
        steps = steps_for(kib)
        dump = os.path.join(out, f"ptx_{kib}")
        shutil.rmtree(dump, ignore_errors=True)
        os.makedirs(dump)
        env = deviceless.child_env(MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_TO=dump)
        for lp in (0, loop):  # straight-line, looped
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "_compile", str(steps), "--loop", str(lp)],
                                  env=env, capture_output=True, text=True, timeout=600)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-2000:])
        for f in os.listdir(dump):
            if not f.endswith(".ptx"):
                os.remove(os.path.join(dump, f))
        for r in mosaic_diag.cubin_rows(dump, ptxas=os.environ.get("PTXAS", "ptxas")):
            rows.append({"kib": kib, "steps": steps, "estimated_kib": round(code_kib(steps), 1), **{k: r.get(k) for k in ("kernel", "instructions", "bytes")}})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _compile(steps: int, loop: int):
    """Lowers and compiles one variant for a compile-only H100 (the PTX dump is the point)."""
    from benchmarks import deviceless

    make(4, looped_steps(steps, loop) if loop else steps, loop or None).lower(*deviceless.abstract(jnp.zeros((), f32))).compile()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["time", "sizes", "_compile"])
    p.add_argument("steps", nargs="?", type=int)
    p.add_argument("--kib", default="24,48,72,96,112,128,144,160,192,240")
    p.add_argument("--loop", type=int, default=4, help="steps per iteration of the looped variant")
    p.add_argument("--ctas-per-sm", type=int, default=16)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    if args.mode == "_compile":
        return _compile(args.steps, args.loop)
    kibs = [float(k) if "." in k else int(k) for k in args.kib.split(",")]
    os.makedirs(args.out, exist_ok=True)
    if args.mode == "sizes":
        rows = size_rows(kibs, args.out, args.loop)
        table = "\n".join(["| KiB asked | steps | kernel | instructions | KiB | estimated KiB |", "|---|---|---|---|---|---|"]
                          + [f"| {r['kib']} | {r['steps']} | {r['kernel']} | {r['instructions']} | {r['bytes'] / 1024:.1f} | "
                             f"{r['estimated_kib']} |"
                             for r in rows])
    else:
        rows = time_rows(kibs, args.ctas_per_sm, args.reps, args.loop)
        table = _table(rows)
    print(table)
    with open(os.path.join(args.out, f"icache_{args.mode}.json"), "w") as f:
        json.dump({"mode": args.mode, "rows": rows, "device": str(jax.devices()[0])}, f, indent=1)


if __name__ == "__main__":
    main()
