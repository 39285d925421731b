"""Each stage of the chunk-64 pipeline (`pallas_kernels/gpu/mosaic/pipeline.py`) timed alone, the
Triton kernel beside the Mosaic GPU one, on the same inputs, with their agreement.

    python benchmarks/mosaic_stages.py [--lengths 2048,32768] [--writes 1,2] [--stages intra,state] [--out DIR]
                                       [--try 'intra:{"block": 8}' ...]   # extra rows: a stage's kwargs
    python benchmarks/mosaic_stages.py --smoke      # tiny shapes on CPU (interpreters): checks the script

Shapes as benchmarks/kernels.py: B * T = 32768 tokens, H = 16, K = V = 128, bf16. Every stage runs on
the previous stages' real outputs (from the Triton kernels, so that a failing Mosaic stage does not
stop the others); a stage whose Mosaic kernel fails to build or run is reported with its error.
"err" is the relative L2 difference of the Mosaic stage's outputs from the Triton stage's (same
inputs; both bf16 operands with float32 accumulation). Times: median of --reps runs after 2 warm-ups.
Prints a markdown table; writes DIR/mosaic_stages.json after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import SHAPE, SMOKE, inputs, rel, timed  # noqa: E402

C = 64


def _stage_fns(x, tv, do, scale, interpret):
    """name -> (triton fn, mosaic fn or error, args builder) on the previous stages' Triton outputs."""
    from pallas_kernels.gpu import chunk_grads, pullback, split, state_bwd

    mm_dtype = x.q.dtype
    t_intra = jax.jit(lambda x: split.intra(x, chunk_size=C, inverse="blocked8", save_inverse=True,
                                            interpret=interpret))
    p, qe, ainv = t_intra(x)
    t_state = jax.jit(lambda x, p, qe: split.state_pass(x, p, qe, chunk_size=C, interpret=interpret)[:2])
    starts, final = t_state(x, p, qe)
    t_out = jax.jit(lambda x, p, qe, s: split.outputs(x, p, qe, s, scale=scale, chunk_size=C, interpret=interpret))
    t_pull = jax.jit(lambda x, do, ainv: pullback.state_pullback(x.q, x.k, x.beta, x.g, x.r, x.rm1, do, scale=scale,
                                                                 chunk_size=C, ainv=ainv, interpret=interpret))
    pp, ek, a, y = t_pull(x, do, ainv)
    dfinal = jnp.ones_like(final)
    t_rev = jax.jit(lambda pp, ek, a, y, df: state_bwd.reverse_pass(pp, ek, a, y, df, mm_dtype=mm_dtype,
                                                                    interpret=interpret))
    cot_end, _ = t_rev(pp, ek, a, y, dfinal)
    t_grads = jax.jit(lambda x, s, do, ce, ainv: chunk_grads.chunk_grads_backward(
        x.q, x.k, x.v, x.beta, x.g, x.r, x.rm1, s, do, ce, scale=scale, chunk_size=C, ainv=ainv,
        interpret=interpret))

    def mosaic(stage, kw):
        if stage == "intra":
            from pallas_kernels.gpu.mosaic.intra import intra
            return jax.jit(lambda x, tv: intra(x, tv, save_inverse=True, interpret=interpret, **kw)), (x, tv)
        if stage == "state":
            from pallas_kernels.gpu.mosaic.state import state_pass
            return jax.jit(lambda x, tv, p, qe: state_pass(x, tv, p, qe, interpret=interpret, **kw)), (x, tv, p, qe)
        if stage == "outputs":  # kw "starts16": the start states handed over in the input dtype
            from pallas_kernels.gpu.mosaic.outputs import outputs
            kw = dict(kw)
            s = starts.astype(x.q.dtype) if kw.pop("starts16", False) else starts
            return (jax.jit(lambda x, tv, p, qe, s: outputs(x, tv, p, qe, s, scale=scale, interpret=interpret, **kw)),
                    (x, tv, p, qe, s))
        if stage == "pullback":
            from pallas_kernels.gpu.mosaic.pullback import state_pullback
            return (jax.jit(lambda x, tv, do, ainv: state_pullback(x, tv, do, scale=scale, ainv=ainv,
                                                                   interpret=interpret, **kw)), (x, tv, do, ainv))
        if stage == "reverse":
            from pallas_kernels.gpu.mosaic.reverse import reverse_pass
            return (jax.jit(lambda pp, ek, a, y, df: reverse_pass(pp, ek, a, y, df, interpret=interpret, **kw)),
                    (pp.astype(mm_dtype), ek.astype(mm_dtype), a, y, dfinal))
        from pallas_kernels.gpu.mosaic.chunk_grads import chunk_grads_backward
        return (jax.jit(lambda x, tv, s, do, ce, ainv: chunk_grads_backward(x, tv, s, do, ce, scale=scale, ainv=ainv,
                                                                            interpret=interpret, **kw)),
                (x, tv, starts, do, cot_end, ainv))

    triton = dict(intra=(t_intra, (x,)), state=(t_state, (x, p, qe)), outputs=(t_out, (x, p, qe, starts)),
                  pullback=(t_pull, (x, do, ainv)), reverse=(t_rev, (pp, ek, a, y, dfinal)),
                  grads=(t_grads, (x, starts, do, cot_end, ainv)))
    return triton, mosaic


def _agreement(mine, ref):
    mine, ref = jax.tree.leaves(mine), jax.tree.leaves(ref)
    return max(rel(m, r) for m, r in zip(mine, ref) if r is not None)


def run_point(T, L, shape, stages, reps, interpret, tries=()):
    from pallas_kernels.common import prepare
    from pallas_kernels.gpu.mosaic.common import token_vectors

    H, K, V = shape["heads"], shape["dk"], shape["dv"]
    (q, k, v, beta, g), do = inputs(jax.random.PRNGKey(T + L), shape["tokens"] // T, T, L, H, K, V)
    x = prepare(q, k, v, beta, g, None, None, C)
    tv = jax.jit(token_vectors)(x)
    triton, mosaic = _stage_fns(x, tv, do, K ** -0.5, interpret)
    rows = []
    triton_ms = {}
    for stage, kw in [(s, {}) for s in stages] + list(tries):
        fn, args = triton[stage]
        if stage not in triton_ms:
            triton_ms[stage] = timed(fn, *args, reps=reps)
        row = dict(T=T, L=L, stage=stage, kwargs=kw, triton_ms=triton_ms[stage])
        try:
            mfn, margs = mosaic(stage, kw)
            out = mfn(*margs)
            ref = fn(*args)
            if stage == "intra" or stage == "state":
                out, ref = out[:2], ref[:2]
            row["err"] = _agreement(out, ref)
            row["mosaic_ms"] = timed(mfn, *margs, reps=reps)
        except Exception as e:  # report and go on: one broken stage must not hide the others
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc(limit=3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048,32768")
    ap.add_argument("--writes", default="1,2")
    ap.add_argument("--stages", default="intra,state,outputs,pullback,reverse,grads")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--try", dest="tries", action="append", default=[],
                    help='extra Mosaic rows STAGE:JSON, e.g. intra:{"block": 8} (repeatable)')
    ap.add_argument("--try-file", help="a file of --try lines (STAGE:JSON, one per line)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.try_file:
        args.tries += [line.strip() for line in open(args.try_file) if line.strip()]
    tries = [(t.split(":", 1)[0], json.loads(t.split(":", 1)[1])) for t in args.tries]
    shape = SMOKE if args.smoke else SHAPE
    if args.smoke:
        shape = dict(shape, dk=64, dv=64, tokens=128)
    lengths = [128] if args.smoke else [int(t) for t in args.lengths.split(",")]
    interpret = jax.default_backend() == "cpu"
    rows = []
    for L in (int(w) for w in args.writes.split(",")):
        for T in lengths:
            rows += run_point(T, L, shape, [s for s in args.stages.split(",") if s], args.reps, interpret, tries)
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "mosaic_stages.json"), "w") as f:
                json.dump(dict(devices=[str(d) for d in jax.devices()], shape=shape, rows=rows), f, indent=1)
    print(f"\nB*T = {shape['tokens']}, H = {shape['heads']}, K = {shape['dk']}, V = {shape['dv']}, bf16, chunk 64; "
          "ms per stage; err: Mosaic vs Triton outputs (relative L2)\n")
    print("| L | T | stage | kwargs | Triton | Mosaic | ratio | err |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = f"{r['mosaic_ms']:.3f}" if "mosaic_ms" in r else r.get("error", "-")[:60]
        ratio = f"{r['triton_ms'] / r['mosaic_ms']:.2f}x" if "mosaic_ms" in r else "-"
        err = f"{r['err']:.1e}" if "err" in r else "-"
        kw = json.dumps(r["kwargs"]) if r["kwargs"] else "-"
        print(f"| {r['L']} | {r['T']} | {r['stage']} | {kw} | {r['triton_ms']:.3f} | {m} | {ratio} | {err} |")


if __name__ == "__main__":
    sys.exit(main())
