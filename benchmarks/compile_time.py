"""Compile time of the training step with scan_layers False vs True, measured side by side in one run.

Each point is one (mixer, op_impl, num_layers): the training step of `train.loop.make_train_step`
(forward, backward and the AdamW update of `train.optim.make_optimizer`), jitted with the training
loop's shardings on a one-device mesh, lowered (`lower_s`: tracing + StableHLO) and compiled by XLA
(`compile_s`), first unrolled (scan_layers=False), then scanned (scan_layers=True), --repeats times
alternating (the table shows each model's fastest run; the JSON keeps every run). The ratio is
unrolled / scanned of lower + compile. `--step-time` also runs each compiled step (random tokens) and
reports the steady-state ms per step, so the runtime cost of the scan shows next to the compile gain.

    python benchmarks/compile_time.py                                   # CPU: tiny, 4 and 8 layers, reference/chunk
    python benchmarks/compile_time.py --preset 130m --layers 12,24 --op-impls chunk,pallas \\
        --step-time --budget-s 540 --out $OUT/compile_time.json         # GPU

The run stops itself before --budget-s (a point is started only if the last point's duration still
fits), prints a markdown table and rewrites the JSON after every point. No persistent compilation cache
is used: every compile is a real one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `python benchmarks/compile_time.py` from a checkout without an install
    sys.path.insert(0, _ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="model preset (default: tiny on CPU, 130m elsewhere)")
    p.add_argument("--layers", default=None, help="comma-separated num_layers (default: 4,8 on CPU; 12,24)")
    p.add_argument("--mixers", default="prism", help="comma-separated mixers")
    p.add_argument("--op-impls", default=None, help="comma-separated op_impl (default: reference,chunk on "
                                                    "CPU; chunk,pallas on GPU)")
    p.add_argument("--seq-len", type=int, default=None, help="default: 128 (tiny) / 2048")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default: 4 (tiny) / 8)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: float32 (tiny) / bfloat16)")
    p.add_argument("--remat-policy", default="none", choices=("none", "full"))
    p.add_argument("--repeats", type=int, default=1, help="measure each pair R times, alternating "
                                                          "unrolled / scanned; the table shows the minimum")
    p.add_argument("--step-time", action="store_true", help="also time the compiled steps (ms/step)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model with --step-time")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop before this many seconds")
    p.add_argument("--out", default=None, help="JSON file, rewritten after every point")
    p.add_argument("--out-dir", default=None, help="directory for compile_time.json (if --out is not given)")
    return p.parse_args(argv)


def resolve_defaults(args, backend):
    cpu = backend == "cpu"
    args.preset = args.preset or ("tiny" if cpu else "130m")
    tiny = args.preset == "tiny"
    args.layers = [int(n) for n in (args.layers or ("4,8" if cpu else "12,24")).split(",")]
    args.mixers = args.mixers.split(",")
    args.op_impls = (args.op_impls or ("reference,chunk" if cpu else "chunk,pallas")).split(",")
    args.seq_len = args.seq_len or (128 if tiny else 2048)
    args.batch = args.batch or (4 if tiny else 8)
    args.dtype = args.dtype or ("float32" if tiny else "bfloat16")
    if args.out is None and args.out_dir:
        args.out = os.path.join(args.out_dir, "compile_time.json")
    return args


def train_config(args, mixer, op_impl, num_layers, scan_layers):
    """The training config (train.config_lib schema) of one measured model."""
    from train import config_lib

    config = config_lib.base_config(
        args.preset, mixer=mixer, op_impl=op_impl, num_layers=num_layers, dtype=args.dtype,
        scan_layers=scan_layers, remat_policy=args.remat_policy,
        max_seq_len=max(args.seq_len, 256), pallas_options=getattr(args, "pallas_options", ""))
    config.data.seq_len = args.seq_len
    config.batch_size = args.batch
    config.mesh_shape = (1, 1, 1, 1)
    config.init_on = getattr(args, "init_on", "auto")
    return config


def measure(args, mixer, op_impl, num_layers, scan_layers, progress=None):
    """{"lower_s", "compile_s", "hlo_kb", "num_params", ["step_ms"]} for one training step. `progress(msg)`,
    if given, hears of each phase as it ends (lowered, compiled, first step), so a run stopped by a timeout
    shows how far it got."""
    progress = progress or (lambda msg: None)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from train import config_lib, loop, optim
    from train import mesh as mesh_lib

    config = train_config(args, mixer, op_impl, num_layers, scan_layers)
    config_lib.validate(config, num_devices=1)
    model = loop.build_model(config)
    optimizer = optim.make_optimizer(config)
    mesh = mesh_lib.make_mesh(config.mesh_shape, jax.devices()[:1])
    rules = mesh_lib.logical_axis_rules()
    abstract, shardings = loop.train_state_shardings(model, optimizer, mesh, rules, args.seq_len)
    batch_sharding = mesh_lib.batch_sharding(mesh, leading_dims=1)
    batch_shape = (1, args.batch, args.seq_len)
    abstract_batch = {k: jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=batch_sharding)
                      for k in ("tokens", "segment_ids", "positions")}
    with loop.sharding_context(mesh, rules):
        step = jax.jit(loop.make_train_step(model, optimizer), in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, None), donate_argnums=0)
        t0 = time.perf_counter()
        lowered = step.lower(abstract, abstract_batch)
        t1 = time.perf_counter()
        progress(f"lowered in {t1 - t0:.1f} s")
        compiled = lowered.compile()
        t2 = time.perf_counter()
        progress(f"compiled in {t2 - t1:.1f} s")
    result = {"lower_s": t1 - t0, "compile_s": t2 - t1, "hlo_kb": len(lowered.as_text()) / 1024,
              "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract.params)))}
    if args.step_time:
        t0 = time.perf_counter()
        state, _ = loop.create_train_state(model, optimizer, mesh, rules, jax.random.key(0), args.seq_len,
                                           config.init_on)
        jax.block_until_ready(state)
        result["init_s"] = time.perf_counter() - t0
        progress(f"state initialised on the {loop.init_placement(config.init_on)} in {result['init_s']:.1f} s")
        tokens = jax.random.randint(jax.random.key(1), batch_shape, 0, config.model.vocab_size)
        batch = {"tokens": tokens, "segment_ids": jnp.ones(batch_shape, jnp.int32),
                 "positions": jnp.broadcast_to(jnp.arange(args.seq_len, dtype=jnp.int32), batch_shape)}
        batch = jax.device_put(batch, batch_sharding)
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        progress(f"first step in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        result["step_ms"] = 1e3 * (time.perf_counter() - t0) / args.steps
        result["loss"] = float(metrics["loss"])
    return result


def format_table(rows, step_time: bool) -> str:
    head = ["preset", "mixer", "op", "layers", "unrolled lower s", "unrolled compile s", "scanned lower s",
            "scanned compile s", "unrolled / scanned (lower + compile)"]
    if step_time:
        head += ["unrolled ms/step", "scanned ms/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        u, s = r["unrolled"], r.get("scanned")
        cells = [r["preset"], r["mixer"], r["op_impl"], str(r["num_layers"]),
                 f"{u['lower_s']:.2f}", f"{u['compile_s']:.2f}"]
        if s is None:
            cells += ["-", "-", "-"]
        else:
            ratio = (u["lower_s"] + u["compile_s"]) / (s["lower_s"] + s["compile_s"])
            cells += [f"{s['lower_s']:.2f}", f"{s['compile_s']:.2f}", f"{ratio:.2f}x"]
        if step_time:
            cells += [f"{u['step_ms']:.1f}" if "step_ms" in u else "-",
                      f"{s['step_ms']:.1f}" if s and "step_ms" in s else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path, payload):
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)
    import jax

    backend = jax.default_backend()
    resolve_defaults(args, backend)
    # one throw-away compile so one-time backend start-up is not charged to the first point
    jax.jit(lambda x: jax.grad(lambda y: (y * y).sum())(x)).lower(jax.numpy.ones(3)).compile()

    device = str(jax.devices()[0].device_kind)
    payload = {"backend": backend, "device": device, "jax": jax.__version__,
               "settings": {k: v for k, v in vars(args).items() if k not in ("out", "out_dir")},
               "rows": [], "stopped_early": False}
    print(f"# compile time of the training step, {backend} ({device}), jax {jax.__version__}; preset "
          f"{args.preset}, seq_len {args.seq_len}, batch {args.batch}, dtype {args.dtype}, "
          f"remat {args.remat_policy}", flush=True)
    last_point_s = 0.0
    for mixer in args.mixers:
        for op_impl in args.op_impls:
            for num_layers in args.layers:
                row = {"preset": args.preset, "mixer": mixer, "op_impl": op_impl, "num_layers": num_layers}
                runs = {"unrolled": [], "scanned": []}
                for scan_layers, key in ((False, "unrolled"), (True, "scanned")) * args.repeats:
                    elapsed = time.perf_counter() - start
                    if elapsed + last_point_s > args.budget_s:
                        payload["stopped_early"] = True
                        print(f"# budget: stopping after {elapsed:.0f} s (the next model took ~{last_point_s:.0f} s)")
                        break
                    t = time.perf_counter()
                    try:
                        runs[key].append(measure(args, mixer, op_impl, num_layers, scan_layers))
                        row[key] = min(runs[key], key=lambda r: r["lower_s"] + r["compile_s"])
                        row[key + "_runs"] = runs[key]
                    except Exception as e:  # noqa: BLE001 -- report and go on with the next point
                        row[key + "_error"] = f"{type(e).__name__}: {e}"[:2000]
                        print(f"# {mixer} {op_impl} L={num_layers} scan_layers={scan_layers}: "
                              f"{row[key + '_error'][:300]}", flush=True)
                    last_point_s = time.perf_counter() - t
                    print(f"# {mixer} {op_impl} L={num_layers} {key}: {runs[key][-1:]}", flush=True)
                if "unrolled" in row:
                    payload["rows"].append(row)
                    write_json(args.out, payload)
                if payload["stopped_early"]:
                    break
            if payload["stopped_early"]:
                break
        if payload["stopped_early"]:
            break
    payload["total_s"] = time.perf_counter() - start
    write_json(args.out, payload)
    print()
    print(format_table(payload["rows"], args.step_time))
    return payload


if __name__ == "__main__":
    main()
