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


def inputs(B, T, H, L, K, V, documents, dtype):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    k = rng.standard_normal((B, T, H, L, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    arrays = (rng.standard_normal((B, T, H, K)), k, rng.standard_normal((B, T, H, L, V)),
              rng.uniform(size=(B, T, H, L)))
    args = tuple(jnp.asarray(a, dtype) for a in arrays) + (jnp.asarray(np.log(rng.uniform(0.9, 1.0, (B, T, H))),
                                                                        jnp.float32),)
    segment_ids = None
    if documents > 1:
        starts = np.sort(rng.choice(np.arange(1, T), size=(B, documents - 1), replace=True), axis=1)
        segment_ids = jnp.asarray((np.arange(T)[None, :, None] >= starts[:, None, :]).sum(-1) + 1, jnp.int32)
    return args, segment_ids


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

    start = time.perf_counter()

    def phase(name, t0):
        now = time.perf_counter()
        print(f"[{label}] {now - start:7.1f} s: {name} took {now - t0:.1f} s", file=sys.stderr, flush=True)
        return now - t0

    label = args.impl
    B, T, H, L, K, V = shape(args)
    options = json.loads(args.pallas_options) if args.pallas_options else None
    impl = "chunk" if args.smoke and args.impl == "pallas" and jax.default_backend() == "cpu" else args.impl
    dtype = jnp.bfloat16
    xs, segment_ids = inputs(B, T, H, L, K, V, args.documents, dtype)
    print(f"# op phases, {jax.default_backend()} ({jax.devices()[0].device_kind}); impl {impl}, B {B}, T {T}, "
          f"H {H}, L {L}, K {K}, V {V}, {args.documents} documents per row, bf16, forward + gradients", flush=True)
    step = jax.jit(jax.value_and_grad(loss_fn(impl, options, segment_ids), argnums=range(5), has_aux=True))
    result = {"impl": impl, "options": options, "shape": dict(B=B, T=T, H=H, L=L, K=K, V=V),
              "documents": args.documents, "device": jax.devices()[0].device_kind}
    t0 = time.perf_counter()
    lowered = step.lower(*xs)
    result["lower_s"] = phase("lower", t0)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    result["compile_s"] = phase("compile", t0)
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*xs))
    result["first_call_s"] = phase("first call", t0)
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*xs))
        times.append(time.perf_counter() - t0)
    result["ms"] = 1e3 * float(np.median(times))
    phase(f"{args.reps} timed calls (median {result['ms']:.2f} ms)", time.perf_counter() - sum(times))
    if args.check:
        t0 = time.perf_counter()
        xs32 = tuple(x.astype(jnp.float32) for x in xs)
        ref = jax.jit(jax.value_and_grad(loss_fn("chunk", None, segment_ids), argnums=range(5), has_aux=True))(*xs32)
        jax.block_until_ready(ref)
        phase("float32 chunk form (compile + call)", t0)
        pairs = [("o", out[0][1], ref[0][1])] + [(f"d{n}", a, b) for n, a, b in zip("q k v beta g".split(), out[1],
                                                                                   ref[1])]
        result["rel_err"] = {n: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
                             for n, a, b in pairs}
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
