"""One op at a model layer's shape, phase by phase: lower, compile, first call, steady time (not a test).

A training step that never finishes compiling tells nothing about which part is slow or whether a
kernel hangs. This script times the op alone at one layer's shape of a preset (packed documents as the
training batch has them), forward + gradients in bf16, and prints each phase to stderr as it ends, so
a device call's `timeout` shows how far it got:

    python benchmarks/op_phases.py --impl pallas                 # 130m's layer: B 8, T 2048, H 6, L 3, K = V = 128
    python benchmarks/op_phases.py --impl chunk --documents 0    # the XLA chunk form, one document per row
    python benchmarks/op_phases.py --smoke                       # CPU: tiny shape, chunk form

`--check` also compares outputs and gradients with the float32 chunk form (its compile is timed too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # kernels.py beside it


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impl", default="pallas", help="prism_recurrence impl")
    p.add_argument("--pallas-options", default="", help="JSON object of prism_pallas keyword arguments")
    p.add_argument("--preset", default="130m", help="take B, T, H, L, K, V from this preset's training step")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's max_seq_len")
    p.add_argument("--documents", type=int, default=4, help="documents per row (0: no segment_ids)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--check", action="store_true", help="compare with the float32 chunk form")
    p.add_argument("--smoke", action="store_true", help="tiny shape (CPU)")
    p.add_argument("--out", default=None, help="JSON file for the result")
    return p.parse_args(argv)


def shape(args):
    """(B, T, H, L, K, V) of one layer of the preset's training step."""
    from prism_jax.models import get_preset

    if args.smoke:
        return 2, 37, 2, 2, 16, 8
    c = get_preset(args.preset)
    return args.batch, args.seq_len or c.max_seq_len, c.num_heads, c.solver_steps, c.head_k_dim, c.head_v_dim


def segment_ids(B, T, documents):
    """[B, T] int32 ids of `documents` documents per row, at random boundaries; None for one document."""
    import jax.numpy as jnp
    import numpy as np

    if documents <= 1:
        return None
    starts = np.sort(np.random.default_rng(0).choice(np.arange(1, T), size=(B, documents - 1)), axis=1)
    return jnp.asarray((np.arange(T)[None, :, None] >= starts[:, None, :]).sum(-1) + 1, jnp.int32)


def loss_fn(impl, options, segment_ids):
    import jax.numpy as jnp

    from prism_jax.ops import prism_recurrence

    def loss(q, k, v, beta, g):
        o, _ = prism_recurrence(q, k, v, beta, g, impl=impl, segment_ids=segment_ids, pallas_options=options)
        w = jnp.cos(jnp.arange(o.shape[-1], dtype=jnp.float32))
        return jnp.sum(o.astype(jnp.float32) * w), o

    return loss


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kernels import inputs, rel  # the kernel benchmark's inputs: unit keys, gates in [0, 1], g < 0

    start = time.perf_counter()
    impl = "chunk" if args.smoke and args.impl == "pallas" and jax.default_backend() == "cpu" else args.impl

    def timed(name, fn):
        """fn() and its seconds, printed as the phase ends."""
        t0 = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - t0
        print(f"[{impl}] {time.perf_counter() - start:7.1f} s: {name} took {seconds:.1f} s", file=sys.stderr,
              flush=True)
        return value, seconds

    B, T, H, L, K, V = shape(args)
    options = json.loads(args.pallas_options) if args.pallas_options else None
    xs, _ = inputs(jax.random.key(0), B, T, L, H, K, V)
    segments = segment_ids(B, T, args.documents)
    print(f"# op phases, {jax.default_backend()} ({jax.devices()[0].device_kind}); impl {impl}, B {B}, T {T}, "
          f"H {H}, L {L}, K {K}, V {V}, {args.documents} documents per row, bf16, forward + gradients", flush=True)
    step = jax.jit(jax.value_and_grad(loss_fn(impl, options, segments), argnums=range(5), has_aux=True))
    result = {"impl": impl, "options": options, "shape": dict(B=B, T=T, H=H, L=L, K=K, V=V),
              "documents": args.documents, "device": jax.devices()[0].device_kind}
    lowered, result["lower_s"] = timed("lower", lambda: step.lower(*xs))
    compiled, result["compile_s"] = timed("compile", lowered.compile)
    out, result["first_call_s"] = timed("first call", lambda: jax.block_until_ready(compiled(*xs)))
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*xs))
        times.append(time.perf_counter() - t0)
    result["ms"] = 1e3 * float(np.median(times))
    print(f"[{impl}] {args.reps} timed calls: median {result['ms']:.2f} ms", file=sys.stderr, flush=True)
    if args.check:
        f32 = lambda: jax.block_until_ready(jax.jit(jax.value_and_grad(
            loss_fn("chunk", None, segments), argnums=range(5), has_aux=True))(*(x.astype(jnp.float32) for x in xs)))
        ref, _ = timed("float32 chunk form (compile + call)", f32)
        names = ["o"] + [f"d{n}" for n in ("q", "k", "v", "beta", "g")]
        result["rel_err"] = {n: rel(a, b) for n, a, b in zip(names, [out[0][1], *out[1]], [ref[0][1], *ref[1]])}
    print("| impl | lower s | compile s | first call s | fwd+bwd ms | rel err vs f32 chunk (o; dq dk dv dbeta dg) |")
    print("|---|---|---|---|---|---|")
    err = result.get("rel_err")
    err_cell = (f"{err['o']:.1e}; " + " ".join(f"{err[n]:.1e}" for n in ("dq", "dk", "dv", "dbeta", "dg"))
                if err else "-")
    print(f"| {impl} | {result['lower_s']:.1f} | {result['compile_s']:.1f} | {result['first_call_s']:.2f} | "
          f"{result['ms']:.2f} | {err_cell} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
