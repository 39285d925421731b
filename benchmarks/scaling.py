"""Scaling on several GPUs: sequence-parallel PRISM op and data-parallel training throughput.

    python benchmarks/scaling.py                  # on a 2-GPU machine: both tables
    python benchmarks/scaling.py --part op        # (a) only;  --part train: (b) only
    python benchmarks/scaling.py --smoke          # tiny shapes on CPU (8 fake devices), checks the script

(a) The op: `prism_recurrence(impl="chunk")` on one device vs `sequence_parallel_prism` with T split
    over 2 devices, T = 64K .. 128K, forward + backward (grad of a random projection of o and the
    final state). Time per call (median of --repeats after a warm-up) and peak memory per device.
(b) Training: the 130m preset (bf16 compute, fp32 params, AdamW) through the training stack's own
    step function (train.loop.make_train_step) on synthetic tokens, --rows rows of 2048 tokens per
    device, mesh (data=n) and (fsdp=n) for n = 1 and 2 devices: tokens/s, tokens/s per device, scaling
    efficiency against one device, peak memory per device.

Every measurement runs in its own subprocess so `memory_stats()["peak_bytes_in_use"]` is that
configuration's peak. Needs only jax, flax, optax, orbax-checkpoint, grain, ml_collections, absl.
Prints markdown tables (paste into docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- workers (subprocess)


def _setup(smoke: bool):
    if smoke:
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(REPO))
    import jax  # noqa: PLC0415

    return jax


def _peaks(jax, devices):
    out = []
    for d in devices:
        stats = d.memory_stats() or {}
        out.append(stats.get("peak_bytes_in_use", float("nan")))
    return out


def _timed(fn, args, repeats):
    import jax  # noqa: PLC0415

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times)


def op_worker(cfg):
    jax = _setup(cfg["smoke"])
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: PLC0415

    from prism_jax.ops import prism_recurrence  # noqa: PLC0415
    from prism_jax.parallel import sequence_parallel_prism  # noqa: PLC0415

    B, T, H, L, K, V, C = (cfg[n] for n in ("B", "T", "H", "L", "K", "V", "chunk"))
    n = cfg["devices"]
    devices = jax.devices()[:n]
    mesh = Mesh(np.array(devices), ("sequence",))
    seq = NamedSharding(mesh, P(None, "sequence"))
    rep = NamedSharding(mesh, P())
    dt = jnp.dtype(cfg["dtype"])

    def make(key):
        ks = jax.random.split(key, 6)
        k = jax.random.normal(ks[1], (B, T, H, L, K), jnp.float32)
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
        return dict(q=jax.random.normal(ks[0], (B, T, H, K), dt), k=k.astype(dt),
                    v=jax.random.normal(ks[2], (B, T, H, L, V), dt),
                    beta=jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H, L))).astype(dt),
                    g=jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H)) + 3.0),
                    co=jax.random.normal(ks[5], (B, T, H, V), dt))

    shardings = {name: seq for name in ("q", "k", "v", "beta", "g", "co")}
    x = jax.jit(make, out_shardings=shardings if n > 1 else None)(jax.random.key(0))
    if n > 1:
        op = lambda q, k, v, beta, g: sequence_parallel_prism(
            q, k, v, beta, g, mesh=mesh, chunk_size=C, output_final_state=True)
    else:
        op = lambda q, k, v, beta, g: prism_recurrence(q, k, v, beta, g, chunk_size=C, output_final_state=True)

    def loss(q, k, v, beta, g, co):
        o, final = op(q, k, v, beta, g)
        return jnp.sum(o.astype(jnp.float32) * co.astype(jnp.float32)) + jnp.sum(final)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)),
                 out_shardings=(rep, tuple(seq for _ in range(5))) if n > 1 else None)
    args = [x[nm] for nm in ("q", "k", "v", "beta", "g", "co")]
    compile_s, step_s = _timed(fn, args, cfg["repeats"])
    return dict(step_s=step_s, compile_s=compile_s, peaks=_peaks(jax, devices))


def train_worker(cfg):
    jax = _setup(cfg["smoke"])
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from train import config_lib, loop, optim  # noqa: PLC0415
    from train import mesh as mesh_lib  # noqa: PLC0415

    n, T, rows = cfg["devices"], cfg["T"], cfg["rows"]
    config = config_lib.tiny_config() if cfg["smoke"] else config_lib.large_config(cfg["preset"])
    config.data.seq_len = T
    config.model.max_seq_len = max(config.model.max_seq_len, T)
    config.grad_accum_steps = 1
    config.batch_size = rows * n
    config.mesh_shape = tuple(n if a == cfg["axis"] else 1 for a in mesh_lib.MESH_AXES)
    devices = jax.devices()[:n]
    mesh = mesh_lib.make_mesh(config.mesh_shape, devices)
    rules = mesh_lib.logical_axis_rules()
    model = loop.build_model(config)
    optimizer = optim.make_optimizer(config)
    state, state_shardings = loop.create_train_state(model, optimizer, mesh, rules, jax.random.key(0), T)
    sharding = mesh_lib.batch_sharding(mesh, leading_dims=1)
    rng = np.random.default_rng(0)
    host = {"tokens": rng.integers(1, config.model.vocab_size, (1, rows * n, T), dtype=np.int32),
            "segment_ids": np.ones((1, rows * n, T), np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (1, rows * n, T)).copy()}
    batch = {k: jax.device_put(v, sharding) for k, v in host.items()}
    with loop.sharding_context(mesh, rules):
        step = jax.jit(loop.make_train_step(model, optimizer), in_shardings=(state_shardings, sharding),
                       out_shardings=(state_shardings, None), donate_argnums=0)
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(cfg["steps"]):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - t0
    loss = float(metrics["loss"])
    assert np.isfinite(loss), loss
    tokens = rows * n * T * cfg["steps"]
    return dict(tokens_per_s=tokens / elapsed, step_s=elapsed / cfg["steps"], compile_s=compile_s,
                loss=loss, peaks=_peaks(jax, devices), params=sum(x.size for x in jax.tree.leaves(state.params)))


def info_worker(cfg):
    jax = _setup(cfg["smoke"])
    return dict(count=jax.device_count(), kind=jax.devices()[0].device_kind, jax=jax.__version__)


# ----------------------------------------------------------------------------- driver


def run_worker(kind, cfg, timeout):
    cmd = [sys.executable, __file__, "--worker", kind, json.dumps(cfg)]
    env = dict(os.environ)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[-300:]}
    return json.loads(lines[-1][len("RESULT "):])


def gb(x):
    return "n/a" if x != x else f"{x / 1e9:.2f}"


def op_table(args, ndev):
    lengths = [256, 512] if args.smoke else [int(t) for t in args.lengths.split(",")]
    shape = dict(B=1, H=2, L=2, K=16, V=16, chunk=16) if args.smoke else \
        dict(B=1, H=args.heads, L=args.solver_steps, K=128, V=128, chunk=64)
    print(f"\n### (a) PRISM op, forward + backward, B={shape['B']} H={shape['H']} L={shape['L']} "
          f"K={shape['K']} V={shape['V']} chunk {shape['chunk']}, {args.dtype} inputs\n")
    print("| T | devices | mode | time / call (ms) | tokens/s | peak memory per device (GB) | compile (s) |")
    print("|---:|---:|---|---:|---:|---|---:|")
    for T in lengths:
        for n in sorted({1, min(2, ndev)} | ({ndev} if args.smoke else set())):
            cfg = dict(shape, T=T, devices=n, repeats=args.repeats, dtype=args.dtype, smoke=args.smoke)
            r = run_worker("op", cfg, args.timeout)
            mode = "single device (chunk)" if n == 1 else f"sequence-parallel over {n}"
            if "error" in r:
                print(f"| {T} | {n} | {mode} | failed: {r['error']} | | | |")
                continue
            print(f"| {T} | {n} | {mode} | {1e3 * r['step_s']:.1f} | {T * shape['B'] / r['step_s']:,.0f} | "
                  f"{', '.join(gb(p) for p in r['peaks'])} | {r['compile_s']:.1f} |", flush=True)


def train_table(args, ndev):
    T = 64 if args.smoke else 2048
    preset = "tiny" if args.smoke else args.preset
    print(f"\n### (b) Training step, {preset} preset, T={T}, {args.rows} rows per device, {args.steps} steps\n")
    print("| devices | mesh (data, fsdp, tensor, sequence) | tokens/s | tokens/s per device | scaling efficiency "
          "| step (ms) | peak memory per device (GB) | loss |")
    print("|---:|---|---:|---:|---:|---:|---|---:|")
    base = None
    runs = [(1, "data")] + ([(n2, axis) for axis in ("data", "fsdp") for n2 in [min(2, ndev)]] if ndev > 1 else [])
    for n, axis in runs:
        cfg = dict(devices=n, axis=axis, T=T, rows=args.rows, steps=args.steps, preset=preset, smoke=args.smoke)
        r = run_worker("train", cfg, args.timeout)
        mesh = tuple(n if a == axis else 1 for a in ("data", "fsdp", "tensor", "sequence"))
        if "error" in r:
            print(f"| {n} | {mesh} | failed: {r['error']} | | | | | |")
            continue
        if n == 1:
            base = r["tokens_per_s"]
        eff = r["tokens_per_s"] / n / base if base else float("nan")
        print(f"| {n} | {mesh} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / n:,.0f} | {eff:.1%} | "
              f"{1e3 * r['step_s']:.0f} | {', '.join(gb(p) for p in r['peaks'])} | {r['loss']:.3f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("op", "train", "all"), default="all")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on 8 fake CPU devices")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lengths", default="65536,98304,131072", help="op sequence lengths, comma-separated")
    ap.add_argument("--dtype", default="bfloat16", help="op input dtype (compute is float32)")
    ap.add_argument("--heads", type=int, default=6, help="op heads (130m preset: 6)")
    ap.add_argument("--solver_steps", type=int, default=3)
    ap.add_argument("--preset", default="130m")
    ap.add_argument("--rows", type=int, default=8, help="training rows per device")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per measurement")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, cfg = args.worker[0], json.loads(args.worker[1])
        result = {"op": op_worker, "train": train_worker, "info": info_worker}[kind](cfg)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.smoke:
        args.repeats, args.steps, args.rows = 1, 2, 2
        ndev = 2
    else:  # ask a subprocess: importing jax here would hold GPU memory the workers need
        info = run_worker("info", {"smoke": False}, args.timeout)
        if "error" in info:
            raise SystemExit(f"could not list devices: {info['error']}")
        ndev = info["count"]
        print(f"devices: {ndev} x {info['kind']}, jax {info['jax']}")
    if args.part in ("op", "all"):
        op_table(args, ndev)
    if args.part in ("train", "all"):
        train_table(args, ndev)


if __name__ == "__main__":
    main()
