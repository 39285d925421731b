"""How long the Mosaic GPU kernels take to lower for CUDA, on any machine (no GPU needed).

Lowering is the Python half of a training step's compile with the kernels: Pallas traces each kernel
and Mosaic GPU infers its register layouts (a constraint solver) before XLA and ptxas see it. Two
tables, side by side in one run:

1. Per kernel of one op (forward + gradients): lowering seconds, of which layout inference, and the
   kernel module's size (Mosaic GPU internals are hooked for this; if they move, the table says so).
2. n stacked ops (as n unrolled layers) through `prism_recurrence` (which shares one jitted kernel
   call between them) against `prism_pallas` called directly (traced and lowered once per layer).

    python benchmarks/lowering_time.py                  # L = 3, K = V = 128, bf16, layers 1 and 4
    python benchmarks/lowering_time.py --L 1 --layers 1,2,12
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

STAGES = ["intra", "state", "outputs", "pullback", "reverse", "grads"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--L", type=int, default=3, help="writes per token")
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=128)
    p.add_argument("--T", type=int, default=256, help="tokens per sequence (lowering barely depends on it)")
    p.add_argument("--layers", default="1,4", help="comma-separated layer counts for table 2")
    return p.parse_args(argv)


def _loss(op, n, dtype):
    import jax.numpy as jnp

    def loss(q, k, v, beta, g):
        total, x = 0.0, q
        for _ in range(n):  # each layer's output feeds the next one's queries
            o = op(x, k, v, beta, g)
            total = total + o.astype(jnp.float32).sum()
            x = (x.astype(jnp.float32) + 1e-3 * o.astype(jnp.float32)).astype(dtype)
        return total

    return loss


def lower_seconds(op, n, args):
    """Seconds to trace and lower grad(n stacked ops) for CUDA, and how many Mosaic GPU kernels the module
    holds (a kernel in a function that several layers call counts once)."""
    import jax
    import jax.numpy as jnp

    dt = jnp.bfloat16
    S = jax.ShapeDtypeStruct
    B, T, H, L, K, V = 1, args.T, 2, args.L, args.K, args.V
    shapes = (S((B, T, H, K), dt), S((B, T, H, L, K), dt), S((B, T, H, L, V), dt), S((B, T, H, L), dt),
              S((B, T, H), jnp.float32))
    t0 = time.perf_counter()
    text = jax.jit(jax.grad(_loss(op, n, dt), argnums=range(5))).trace(*shapes).lower(
        lowering_platforms=("cuda",)).as_text()
    return time.perf_counter() - t0, len(re.findall(r"custom_call @mosaic_gpu", text))


def _ops():
    from pallas_kernels import prism_pallas
    from prism_jax.ops.prism import prism_recurrence

    options = dict(platform="gpu", kernel="mosaic", mosaic_stages=STAGES)
    shared = lambda *a: prism_recurrence(*a, scale=0.1, impl="pallas", chunk_size=64, pallas_options=options)[0]
    direct = lambda *a: prism_pallas(*a, scale=0.1, chunk_size=64, **options)[0]
    return shared, direct


def per_kernel(args):
    """[(kernel name, lowering s, layout inference s, module KB)] for one op's forward + gradients."""
    try:
        from jax.experimental.mosaic.gpu import core as mgpu_core
        from jax.experimental.mosaic.gpu import layout_inference
    except ImportError as e:
        return f"Mosaic GPU internals not found ({e})"
    rows, inferred = [], []
    real_lower, real_infer = mgpu_core.lower_mgpu_module, layout_inference.infer_layout

    def infer(module, *a, **kw):
        t0 = time.perf_counter()
        out = real_infer(module, *a, **kw)
        inferred.append((time.perf_counter() - t0, len(str(module)) / 1024))
        return out

    def lower(module, *a, **kw):
        t0 = time.perf_counter()
        inferred.clear()
        out = real_lower(module, *a, **kw)
        names = re.findall(r"func\.func @(\w+)", str(module))
        infer_s, kb = inferred[0] if inferred else (0.0, float("nan"))
        rows.append((names[0] if names else "?", time.perf_counter() - t0, infer_s, kb))
        return out

    mgpu_core.lower_mgpu_module, layout_inference.infer_layout = lower, infer
    try:
        lower_seconds(_ops()[1], 1, args)
    finally:
        mgpu_core.lower_mgpu_module, layout_inference.infer_layout = real_lower, real_infer
    return rows


def main(argv=None):
    args = parse_args(argv)
    import jax

    print(f"# lowering for CUDA on {jax.default_backend()} (jax {jax.__version__}); L = {args.L}, K = {args.K}, "
          f"V = {args.V}, bf16, forward + gradients, every stage Mosaic")
    rows = per_kernel(args)
    if isinstance(rows, str):
        print(f"# per kernel: {rows}")
    else:
        print("| kernel | lower s | layout inference s | module KiB |\n|---|---|---|---|")
        for name, s, infer_s, kb in rows:
            print(f"| {name} | {s:.2f} | {infer_s:.2f} | {kb:.0f} |")
    shared, direct = _ops()
    print("\n| layers | shared jit s | direct s | direct / shared | Mosaic kernels in the module, shared / direct |\n|---|---|---|---|---|")
    for n in (int(x) for x in args.layers.split(",")):
        (s_shared, c_shared), (s_direct, c_direct) = lower_seconds(shared, n, args), lower_seconds(direct, n, args)
        print(f"| {n} | {s_shared:.1f} | {s_direct:.1f} | {s_direct / s_shared:.2f}x | {c_shared} / {c_direct} |",
              flush=True)


if __name__ == "__main__":
    main()
