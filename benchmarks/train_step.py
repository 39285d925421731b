"""The training step's time under different kernel settings, side by side in one process.

Each variant is an op_impl and, for "pallas", a JSON object of prism_pallas keyword arguments
(`PrismLMConfig.pallas_options`); every variant's step (forward, backward, AdamW; one device) is
compiled and timed the same way (`compile_time.measure`: the training loop's step, random tokens),
and the table gives ms per step, tokens/s and each variant's time over the first one's.

    python benchmarks/train_step.py --preset 130m --steps 10 \\
        --variant 'default=pallas' \\
        --variant 'mosaic_grads=pallas:{"mosaic_stages": ["intra", "state", "outputs", "pullback", "reverse", "grads"]}' \\
        --variant 'xla=chunk' --out $OUT/train_step.json
    python benchmarks/train_step.py          # CPU: the tiny preset, chunk against reference

The run starts no variant after --budget-s; the JSON is rewritten after every variant.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compile_time  # noqa: E402


def parse_variant(item: str):
    """'NAME=OP_IMPL' or 'NAME=pallas:{JSON}' -> (name, op_impl, pallas_options JSON string)."""
    name, sep, spec = item.partition("=")
    op_impl, _, options = spec.partition(":")
    if not sep or not name or not op_impl:
        raise ValueError(f"--variant {item!r}: expected NAME=OP_IMPL or NAME=pallas:{{JSON object}}")
    if options:
        try:
            if not isinstance(json.loads(options), dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise ValueError(f"--variant {item!r}: the options after 'pallas:' must be a JSON object ({e})") from e
    return name, op_impl, options


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", action="append", default=[], help="NAME=OP_IMPL or NAME=pallas:{JSON}")
    p.add_argument("--preset", default=None, help="model preset (default: tiny on CPU, 130m elsewhere)")
    p.add_argument("--layers", type=int, default=None, help="num_layers (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=None, help="default: 128 (tiny) / 2048")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default: 4 (tiny) / 8)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: float32 (tiny) / bfloat16)")
    from train.config_lib import INIT_ON

    p.add_argument("--init-on", default="auto", choices=INIT_ON,
                   help="where the fresh train state is made (config.init_on)")
    p.add_argument("--scan-layers", action="store_true", help="one block scanned over the layers (default: unrolled)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up)")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no variant after this many seconds")
    p.add_argument("--out", default=None, help="JSON file, rewritten after every variant")
    return p.parse_args(argv)


def format_table(rows) -> str:
    lines = ["| variant | op | pallas_options | lower s | compile s | ms/step | tokens/s | vs first |",
             "|---|---|---|---|---|---|---|---|"]
    first = next((r["step_ms"] for r in rows if "step_ms" in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['op_impl']} | {r['pallas_options'] or '-'} | error: {r['error'][:120]} | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['op_impl']} | {r['pallas_options'] or '-'} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | "
                     f"{r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['step_ms'] / first:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)
    import jax
    from prism_jax.models import get_preset

    backend = jax.default_backend()
    variants = [parse_variant(v) for v in args.variant] or (
        [("chunk", "chunk", ""), ("reference", "reference", "")] if backend == "cpu" else
        [("pallas", "pallas", ""), ("chunk", "chunk", "")])
    ct = argparse.Namespace(preset=args.preset, layers=None, mixers="prism", op_impls=None, seq_len=args.seq_len,
                            batch=args.batch, dtype=args.dtype, remat_policy="none", repeats=1, step_time=True,
                            init_on=args.init_on, steps=args.steps, budget_s=args.budget_s, out=None, out_dir=None)
    compile_time.resolve_defaults(ct, backend)
    layers = args.layers or get_preset(ct.preset).num_layers
    device = str(jax.devices()[0].device_kind)
    payload = {"backend": backend, "device": device, "jax": jax.__version__, "preset": ct.preset, "layers": layers,
               "scan_layers": args.scan_layers, "seq_len": ct.seq_len, "batch": ct.batch, "dtype": ct.dtype, "rows": []}
    print(f"# training step, {backend} ({device}), jax {jax.__version__}; preset {ct.preset}, {layers} layers, "
          f"{ct.batch} x {ct.seq_len} tokens, {ct.dtype}, {'scanned' if args.scan_layers else 'unrolled'} layers",
          flush=True)
    for name, op_impl, options in variants:
        if time.perf_counter() - start > args.budget_s:
            print(f"# budget: {name} and later variants not run")
            break
        ct.pallas_options = options
        row = {"name": name, "op_impl": op_impl, "pallas_options": options}
        try:
            r = compile_time.measure(ct, "prism", op_impl, layers, scan_layers=args.scan_layers,
                                     progress=lambda msg: print(f"# {name}: {msg} ({time.perf_counter() - start:.0f} s "
                                                                f"since start)", file=sys.stderr, flush=True))
            row.update(r, tokens_per_s=ct.batch * ct.seq_len / (r["step_ms"] / 1e3))
            print(f"# {name}: {r['step_ms']:.1f} ms/step", file=sys.stderr, flush=True)  # lower / compile: above
        except Exception as e:  # noqa: BLE001 -- report and go on with the next variant
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
            print(f"# {name}: {row['error'][:300]}", flush=True)
        payload["rows"].append(row)
        compile_time.write_json(args.out, payload)
    print(format_table(payload["rows"]), flush=True)
    return payload


if __name__ == "__main__":
    main()
