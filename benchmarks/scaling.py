"""Scaling on several GPUs: data / fsdp training throughput, long-context training over the sequence
axis, and the sequence-parallel PRISM op. Fits one fixed device window (internal --budget-s).

    python benchmarks/scaling.py --budget-s 280 --out-dir $OUT   # 2-GPU machine: parts train + long
    python benchmarks/scaling.py --part op                       # the op table (sequence-parallel op)
    python benchmarks/scaling.py --smoke --out-dir /tmp/sc       # tiny shapes on 8 fake CPU devices

Parts (comma-separated `--part`, default "train,long"):

train  The 130m preset's training step (train.loop.make_train_step: bf16 compute, fp32 params, AdamW)
       on synthetic tokens, T = 2048, --rows rows per device: 1 GPU, then 2 GPUs with mesh data=2 and
       fsdp=2 (same rows per device). tokens/s, tokens/s per device, scaling efficiency (tokens/s per
       device over the 1-GPU figure), compile time, peak memory per device. The op is `--impl`
       (default "pallas"); if the Pallas kernels fail to lower, compile or run, that point falls back
       to the chunk form and the table says so.
long   One row of --long-T tokens (default 65536) with mesh sequence=2: the PRISM layers take the
       sequence-parallel form (chunk form inside, `prism_recurrence_sharded`). Models are tried in the
       order of --long-layers (layer counts of the 130m preset's width; the first whose compiled
       program fits the device is run). The same model on 1 GPU at the same T shows the memory split
       (run when XLA's buffer assignment says it fits, else reported as out of memory).
op     The old table: prism_recurrence(impl="chunk") on 1 device vs sequence_parallel_prism on 2
       (one subprocess per point; see docs/scaling.md).

How it fits the window: every training configuration is compiled exactly once, all of them at once
(lowered in the main thread, `Lowered.compile()` in a thread pool: XLA releases the GIL), while the
parameters are initialised once per model on one device and re-placed into each mesh's shardings.
The measurements then run one after another in compile order (1 GPU first). Everything runs in one
worker process (one CUDA start); the driver (no jax) kills it at the budget, and the worker writes
the JSON after every point, so a cut-off run still leaves its results.

Peak memory per device is XLA's buffer assignment of the compiled step (arguments + outputs -
donated aliases + temporaries, per device), a per-configuration figure; the runtime allocator's
peak (`peak_bytes_in_use`, cumulative over the worker's life) is in the JSON as `runtime_peaks`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MESH_AXES = ("data", "fsdp", "tensor", "sequence")
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")
# Tests force a failure of one op impl at one stage, e.g. PRISM_SCALING_FAIL="compile:scan", to check the
# fallback to the chunk form without a broken kernel.
FORCED_FAILURE = os.environ.get("PRISM_SCALING_FAIL", "")


def _maybe_fail(stage: str, impl: str) -> None:
    if FORCED_FAILURE == f"{stage}:{impl}":
        raise RuntimeError(f"forced failure of impl {impl!r} at {stage} (PRISM_SCALING_FAIL)")


# ----------------------------------------------------------------------------- the plan (pure Python)


def mesh_of(axis: str | None, n: int) -> list[int]:
    """(data, fsdp, tensor, sequence) sizes with `n` devices on `axis` (None: one device)."""
    return [n if a == axis else 1 for a in MESH_AXES]


def plan_points(*, smoke: bool, parts: list[str], impl: str, rows: int, steps: int, long_T: int,
                long_layers: list[int], long_steps: int, long_impl: str = "chunk") -> list[dict]:
    """The measurement points in run order; each a JSON-able dict (the worker's input)."""
    points = []
    if "train" in parts:
        T = 32 if smoke else 2048
        for name, axis, n in (("train-1gpu", None, 1), ("train-data2", "data", 2), ("train-fsdp2", "fsdp", 2)):
            points.append(dict(name=name, part="train", devices=n, mesh=mesh_of(axis, n), T=T, rows=rows,
                               layers=None, impl=impl, steps=steps))
    if "long" in parts:
        for n, axis, group in ((2, "sequence", "long-seq2"), (1, None, "long-1gpu")):
            for layers in long_layers:
                points.append(dict(name=f"{group}-L{layers}", part="long", group=group, devices=n,
                                   mesh=mesh_of(axis, n), T=long_T, rows=1, layers=layers, impl=long_impl,
                                   steps=long_steps))
    return points


def is_oom(message: str) -> bool:
    return any(m in message for m in OOM_MARKERS)


def short_error(e: BaseException, limit: int = 240) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + " ..."


def write_json(path: str | None, doc: dict) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- worker (subprocess)


def _setup(smoke: bool):
    if smoke:
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        os.environ["JAX_PLATFORMS"] = "cpu"
    # Let the allocator use nearly the whole GPU (default 75%): the long-context step needs it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    sys.path.insert(0, str(REPO))
    import jax  # noqa: PLC0415

    return jax


def _peaks(jax, devices):
    out = []
    for d in devices:
        stats = d.memory_stats() or {}
        out.append(stats.get("peak_bytes_in_use", float("nan")))
    return out


def xla_peak_bytes(compiled) -> float:
    """Per-device bytes of the compiled step: arguments + outputs - donated aliases + temporaries."""
    try:
        m = compiled.memory_analysis()
        return float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                     + m.temp_size_in_bytes)
    except Exception:  # noqa: BLE001  (not every backend reports it)
        return float("nan")


class TrainPoint:
    """One configuration: its config, mesh, abstract inputs and lowered / compiled step."""

    def __init__(self, jax, spec, smoke, impl):
        from train import config_lib, loop, optim  # noqa: PLC0415
        from train import mesh as mesh_lib  # noqa: PLC0415

        self.spec, self.impl = spec, impl
        _maybe_fail("lower", impl)
        n, T, rows = spec["devices"], spec["T"], spec["rows"]
        overrides = {} if spec["layers"] is None else {"num_layers": spec["layers"]}
        config = (config_lib.tiny_config(**overrides) if smoke
                  else config_lib.large_config("130m", **overrides))
        config.model.op_impl = impl
        config.data.seq_len = T
        config.model.max_seq_len = max(config.model.max_seq_len, T)
        config.grad_accum_steps = 1
        sizes = dict(zip(MESH_AXES, spec["mesh"]))
        config.batch_size = rows * sizes["data"] * sizes["fsdp"]
        config.mesh_shape = tuple(spec["mesh"])
        devices = jax.devices()[:n]
        config_lib.validate(config, len(devices))  # bad shapes fail here, before compiling
        self.config, self.devices = config, devices
        self.mesh = mesh_lib.make_mesh(config.mesh_shape, devices)
        self.rules = mesh_lib.logical_axis_rules()
        self.model = loop.build_model(config)
        self.optimizer = optim.make_optimizer(config)
        abstract, self.state_shardings = loop.train_state_shardings(
            self.model, self.optimizer, self.mesh, self.rules, min(T, 256))
        self.batch_sharding = mesh_lib.batch_sharding(self.mesh, leading_dims=1)
        shape = (1, config.batch_size, T)
        batch = {k: jax.ShapeDtypeStruct(shape, jax.numpy.int32, sharding=self.batch_sharding)
                 for k in ("tokens", "segment_ids", "positions")}
        t0 = time.perf_counter()
        with loop.sharding_context(self.mesh, self.rules):
            step = jax.jit(loop.make_train_step(self.model, self.optimizer),
                           in_shardings=(self.state_shardings, self.batch_sharding),
                           out_shardings=(self.state_shardings, None), donate_argnums=0)
            self.lowered = step.lower(abstract, batch)
        self.lower_s = time.perf_counter() - t0

    def compile(self):
        _maybe_fail("compile", self.impl)
        t0 = time.perf_counter()
        compiled = self.lowered.compile()
        return compiled, time.perf_counter() - t0

    def host_batch(self, np):
        rng = np.random.default_rng(0)
        B, T = self.config.batch_size, self.spec["T"]
        return {"tokens": rng.integers(1, self.config.model.vocab_size, (1, B, T), dtype=np.int32),
                "segment_ids": np.ones((1, B, T), np.int32),
                "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (1, B, T)).copy()}


def host_state(jax, point):
    """Initial TrainState as numpy (fp32 params + AdamW state), built once per model on one device."""
    from train import loop  # noqa: PLC0415
    from train import mesh as mesh_lib  # noqa: PLC0415

    mesh = mesh_lib.make_mesh((1, 1, 1, 1), jax.devices()[:1])
    state, _ = loop.create_train_state(point.model, point.optimizer, mesh, point.rules, jax.random.key(0),
                                       min(point.spec["T"], 256))
    host = jax.device_get(state)
    del state
    return host


def points_worker(cfg):
    jax = _setup(cfg["smoke"])
    import numpy as np  # noqa: PLC0415
    from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout  # noqa: PLC0415

    deadline = cfg["deadline"]  # time.time() by which the worker should be done
    doc = json.load(open(cfg["out"])) if cfg.get("out") and os.path.exists(cfg["out"]) else {}
    doc.setdefault("points", {})
    ndev = jax.device_count()
    doc["meta"] = dict(devices=ndev, kind=jax.devices()[0].device_kind, jax=jax.__version__,
                       platform=jax.devices()[0].platform, **cfg.get("meta", {}))
    limit = cfg.get("mem_limit_gb")
    limit = limit * 1e9 if limit else (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    doc["meta"]["device_memory_limit_bytes"] = limit
    write_json(cfg.get("out"), doc)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def record(spec, **result):
        doc["points"][spec["name"]] = dict(spec=spec, **result)
        write_json(cfg.get("out"), doc)
        log(f"{spec['name']}: " + ", ".join(f"{k}={v}" for k, v in result.items() if k not in ("runtime_peaks",)))

    specs = [s for s in cfg["points"] if s["name"] not in doc["points"]]
    prepared, futures = {}, {}
    pool = ThreadPoolExecutor(max_workers=max(1, len(specs)))

    def prepare(spec, impl):
        """Lower `spec` with `impl`; on failure of a non-chunk impl, fall back to the chunk form."""
        try:
            return TrainPoint(jax, spec, cfg["smoke"], impl), None
        except Exception as e:  # noqa: BLE001
            if impl == "chunk" or isinstance(e, ValueError) and "config" in str(e):
                raise
            return TrainPoint(jax, spec, cfg["smoke"], "chunk"), f"{impl} failed at lowering ({short_error(e)})"

    states = {}

    def state_for(point):
        key = point.config.model.num_layers
        if key not in states:
            t0 = time.perf_counter()
            states[key] = host_state(jax, point)
            log(f"initialised the {key}-layer model in {time.perf_counter() - t0:.1f} s")
        return states[key]

    t_start = time.time()
    lowering_failed = False
    for spec in specs:  # lower in the main thread (tracing holds the GIL), compile in the pool
        if spec["devices"] > ndev:
            record(spec, status="skipped", note=f"needs {spec['devices']} devices, {ndev} present")
            continue
        try:
            point, note = prepare(spec, "chunk" if lowering_failed and spec["part"] == "train" else spec["impl"])
            if note:
                lowering_failed = True
            elif lowering_failed and spec["part"] == "train" and spec["impl"] != "chunk":
                note = f"{spec['impl']} failed at lowering on an earlier point; chunk form"
        except Exception as e:  # noqa: BLE001
            record(spec, status="error", note=f"lowering: {short_error(e)}")
            continue
        prepared[spec["name"]] = (point, note)
        if not states:  # initialise the first model before any compile competes for the CPU
            state_for(point)
        if spec["part"] == "train":  # the long part's compiles start after the train measurements
            futures[spec["name"]] = pool.submit(point.compile)
        log(f"lowered {spec['name']} ({point.impl}) in {point.lower_s:.1f} s")

    def run(point, compiled, steps):
        """(first step s, median-free mean step s over `steps`, loss, runtime peaks)."""
        _maybe_fail("run", point.impl)
        state = jax.device_put(state_for(point), point.state_shardings)
        batch = {k: jax.device_put(v, point.batch_sharding) for k, v in point.host_batch(np).items()}
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        first = time.perf_counter() - t0
        left = deadline - time.time() - 2.0
        steps = max(1, min(steps, int(left / max(first, 1e-3)) - 1))
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - t0) / steps
        loss = float(metrics["loss"])
        peaks = _peaks(jax, point.devices)
        del state, batch
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss is {loss}")
        return first, step_s, steps, loss, peaks

    chosen_long_layers = None
    base = doc["points"].get("train-1gpu", {})
    base_per_device = base.get("tokens_per_s_per_device") if base.get("status") == "ok" else None
    # Measurements run on a quiet machine: no compile (whose autotuning runs kernels on the GPUs) is in
    # flight while the train points are timed. The long part's compiles start afterwards, all at once.
    for name, future in futures.items():
        try:
            future.result(timeout=max(1.0, deadline - time.time()))
        except Exception:  # noqa: BLE001  (reported at the point)
            pass
    def fall_back_rest(failed: str, reason: str):
        """The Pallas op failed on `failed`: re-lower the train points not yet measured with the chunk
        form and compile them together now (one failing kernel fails them all; sequential re-compiles
        would not fit the window)."""
        for other, (p, _) in list(prepared.items()):
            if other == failed or other in doc["points"] or p.spec["part"] != "train" or p.impl == "chunk":
                continue
            if other in futures:
                futures[other].cancel()
            chunk = TrainPoint(jax, p.spec, cfg["smoke"], "chunk")
            prepared[other] = (chunk, f"{p.impl} failed on {failed} ({reason}); chunk form")
            futures[other] = pool.submit(chunk.compile)

    order = sorted(prepared, key=lambda name: prepared[name][0].spec["part"] != "train")
    long_started = False
    for name in order:
        point, note = prepared[name]
        spec = point.spec
        if spec["part"] == "long" and not long_started:
            long_started = True  # every sequence-parallel candidate, and one GPU with the first model
            for other, (other_point, _) in prepared.items():
                o = other_point.spec
                if o["part"] == "long" and (o["group"] == "long-seq2" or o["layers"] == cfg["long_layers"][0]):
                    futures[other] = pool.submit(other_point.compile)
            log("long part: compiles started")
        if spec["part"] == "long":
            if spec["group"] == "long-seq2" and chosen_long_layers is not None:
                if name in futures:
                    futures[name].cancel()
                record(spec, status="not needed", note=f"the {chosen_long_layers}-layer model fits")
                continue
            if spec["group"] == "long-1gpu":
                want = chosen_long_layers if chosen_long_layers is not None else cfg["long_layers"][0]
                if spec["layers"] != want:
                    if name in futures:
                        futures[name].cancel()
                    record(spec, status="not needed", note=f"the sequence-parallel run used {want} layers")
                    continue
        if time.time() > deadline - 3.0:
            record(spec, status="not run", note="budget spent")
            continue
        if name not in futures:  # a long candidate not compiled up front
            futures[name] = pool.submit(point.compile)
        if spec["part"] == "train":  # fallback compiles too: none in flight while a train point is timed
            for other, future in list(futures.items()):
                if prepared[other][0].spec["part"] == "train" and other not in doc["points"]:
                    try:
                        future.result(timeout=max(1.0, deadline - time.time()))
                    except Exception:  # noqa: BLE001  (reported at its point)
                        pass
        try:
            compiled, compile_s = futures[name].result(timeout=max(1.0, deadline - time.time()))
        except FutureTimeout:
            record(spec, status="not run", note="budget spent while compiling")
            continue
        except Exception as e:  # noqa: BLE001
            if point.impl == "chunk" or is_oom(str(e)):
                record(spec, status="oom" if is_oom(str(e)) else "error", note=f"compile: {short_error(e)}",
                       impl=point.impl)
                continue
            note = f"{point.impl} failed to compile ({short_error(e)})"
            fall_back_rest(name, "compile")
            point = TrainPoint(jax, spec, cfg["smoke"], "chunk")
            compiled, compile_s = point.compile()
        need = xla_peak_bytes(compiled)
        base = dict(impl=point.impl, note=note, lower_s=round(point.lower_s, 2), compile_s=round(compile_s, 2),
                    xla_peak_bytes=need, params=int(sum(x.size for x in jax.tree.leaves(state_for(point).params))),
                    layers=point.config.model.num_layers)
        if limit and need == need and need > limit:
            record(spec, status="oom", **{**base, "note": f"XLA needs {need / 1e9:.3g} GB per device "
                                                          f"> {limit / 1e9:.3g} GB (not run)"})
            continue
        try:
            first, step_s, steps, loss, peaks = run(point, compiled, spec["steps"])
        except Exception as e:  # noqa: BLE001
            if is_oom(str(e)) or point.impl == "chunk":
                record(spec, status="oom" if is_oom(str(e)) else "error", **{**base, "note": short_error(e)})
                continue
            base["note"] = f"{point.impl} failed at run ({short_error(e)})"
            fall_back_rest(name, "run")
            point = TrainPoint(jax, spec, cfg["smoke"], "chunk")
            compiled, compile_s = point.compile()
            base.update(impl="chunk", compile_s=round(compile_s, 2), xla_peak_bytes=xla_peak_bytes(compiled))
            first, step_s, steps, loss, peaks = run(point, compiled, spec["steps"])
        del compiled
        n = spec["devices"]
        tokens = point.config.batch_size * spec["T"]
        tps = tokens / step_s
        result = dict(status="ok", **base, first_step_s=round(first, 3), step_s=step_s, steps=steps,
                      tokens_per_step=tokens, tokens_per_s=tps, tokens_per_s_per_device=tps / n, loss=loss,
                      runtime_peaks=peaks)
        if spec["part"] == "train":
            if spec["devices"] == 1:
                base_per_device = tps
            if base_per_device:
                result["scaling_efficiency"] = tps / n / base_per_device
        record(spec, **result)
        if spec["part"] == "long" and spec["group"] == "long-seq2":
            chosen_long_layers = spec["layers"]
    doc["meta"]["worker_seconds"] = round(time.time() - t_start, 1)
    write_json(cfg.get("out"), doc)
    pool.shutdown(wait=False, cancel_futures=True)
    print("RESULT " + json.dumps({"done": True}), flush=True)
    os._exit(0)  # do not wait for compiles nobody needs any more


# ----------------------------------------------------------------------------- op part workers


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


def info_worker(cfg):
    jax = _setup(cfg["smoke"])
    return dict(count=jax.device_count(), kind=jax.devices()[0].device_kind, jax=jax.__version__)




# ----------------------------------------------------------------------------- driver (no jax here)


def run_worker(kind, cfg, timeout):
    """The op part's per-point subprocess (one measurement, one process: exact peak memory)."""
    cmd = [sys.executable, __file__, "--worker", kind, json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[-300:]}
    return json.loads(lines[-1][len("RESULT "):])


def run_points(cfg, deadline: float) -> int:
    """Start the points worker; kill it (its own process group) at the deadline, or when the driver
    itself is told to stop (SIGTERM / SIGINT, e.g. an outer `timeout`). Returns its exit code."""
    cmd = [sys.executable, __file__, "--worker", "points", json.dumps(cfg)]
    proc = subprocess.Popen(cmd, start_new_session=True)

    def stop(signum, frame):
        os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(f"stopped by signal {signum}; the JSON holds the points measured so far")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        print(f"budget reached: stopping the worker (pid {proc.pid})", flush=True)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -9
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def gb(x):
    return "n/a" if x is None or x != x else f"{x / 1e9:.2f}"


def mesh_str(mesh):
    return "(" + ", ".join(str(m) for m in mesh) + ")"


def training_table(doc: dict) -> str:
    """The markdown table for docs/scaling.md from the worker's JSON."""
    points = doc.get("points", {})
    base = points.get("train-1gpu", {}).get("tokens_per_s_per_device")
    lines = ["| part | devices | mesh (data, fsdp, tensor, sequence) | model | op | T | rows / device | tokens/s | "
             "tokens/s per device | scaling efficiency | step (ms) | compile (s) | peak memory per device "
             "(GB, XLA) | runtime peak per device (GB) |",
             "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, p in points.items():
        s = p["spec"]
        layers = p.get("layers", s.get("layers"))
        model = "130m" if not layers or layers == 12 else f"130m width, {layers} layers"
        if doc.get("meta", {}).get("platform") == "cpu":
            model = "tiny" if not s.get("layers") else f"tiny, {s['layers']} layer(s)"
        op = "chunk (sequence-parallel)" if s["mesh"][3] > 1 else p.get("impl", s["impl"])
        head = (f"| {s['part']} | {s['devices']} | {mesh_str(s['mesh'])} | {model} | {op} | "
                f"{s['T']} | {s['rows']} |")
        if p.get("status") != "ok":
            what = {"oom": "out of memory", "not needed": "not needed"}.get(p.get("status"), p.get("status"))
            lines.append(f"{head} {what}: {p.get('note') or ''} | | | | "
                         f"{p['compile_s'] if 'compile_s' in p else ''} | {gb(p.get('xla_peak_bytes'))} | |")
            continue
        eff = ""
        if s["part"] == "train" and base:
            eff = f"{p['tokens_per_s_per_device'] / base:.1%}"
        note = f" ({p['note']})" if p.get("note") else ""
        lines.append(f"{head} {p['tokens_per_s']:,.0f} | {p['tokens_per_s_per_device']:,.0f} | {eff} | "
                     f"{1e3 * p['step_s']:.1f} | {p['compile_s']:.1f} | {gb(p['xla_peak_bytes'])} | "
                     f"{', '.join(gb(x) for x in p['runtime_peaks'])}{note} |")
    return "\n".join(lines)


def op_table(args, ndev):
    lengths = [256, 512] if args.smoke else [int(t) for t in args.lengths.split(",")]
    shape = dict(B=1, H=2, L=2, K=16, V=16, chunk=16) if args.smoke else \
        dict(B=1, H=args.heads, L=args.solver_steps, K=128, V=128, chunk=64)
    print(f"\n### PRISM op, forward + backward, B={shape['B']} H={shape['H']} L={shape['L']} "
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


def main():
    t_start = time.time()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="train,long", help="comma-separated: train, long, op")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on 8 fake CPU devices")
    ap.add_argument("--budget-s", type=float, default=280.0, help="the whole run stops itself by then")
    ap.add_argument("--out", default="", help="JSON file (written after every point)")
    ap.add_argument("--out-dir", default="", help="directory for scaling.json (instead of --out)")
    ap.add_argument("--impl", default="pallas", help="op impl for the train part (falls back to chunk)")
    ap.add_argument("--rows", type=int, default=8, help="train part: rows of T=2048 per device")
    ap.add_argument("--steps", type=int, default=4, help="train part: timed steps after the first")
    ap.add_argument("--long-T", type=int, default=65536, help="long part: tokens in the one row")
    ap.add_argument("--long-layers", default="12,4",
                    help="long part: layer counts (130m width) to try in order; the first that fits runs")
    ap.add_argument("--long-steps", type=int, default=2)
    ap.add_argument("--long-impl", default="chunk",
                    help="long part: op impl of the 1-GPU point (the sequence-parallel form is the chunk form)")
    ap.add_argument("--mem-limit-gb", type=float, default=0.0,
                    help="treat the device as this large (default: the allocator's limit)")
    # op part (the previous table)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lengths", default="131072", help="op part: sequence lengths, comma-separated")
    ap.add_argument("--dtype", default="bfloat16", help="op part: input dtype (compute is float32)")
    ap.add_argument("--heads", type=int, default=6, help="op part: heads (130m preset: 6)")
    ap.add_argument("--solver_steps", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=120, help="op part: seconds per measurement")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, cfg = args.worker[0], json.loads(args.worker[1])
        if kind == "points":
            points_worker(cfg)
            return
        result = {"op": op_worker, "info": info_worker}[kind](cfg)
        print("RESULT " + json.dumps(result), flush=True)
        return

    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    unknown = sorted(set(parts) - {"train", "long", "op"})
    if unknown:
        raise SystemExit(f"--part: unknown parts {unknown}; expected train, long, op")
    out = args.out or (os.path.join(args.out_dir, "scaling.json") if args.out_dir else "")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        if os.path.exists(out):
            os.remove(out)  # a fresh run; the worker merges only within this run (after a restart)
    deadline = t_start + args.budget_s
    if args.smoke:
        args.rows, args.steps, args.long_steps, args.repeats = 2, 2, 1, 1
        if args.long_T == 65536:
            args.long_T = 64
        if args.long_layers == "12,4":
            args.long_layers = "2,1"
        # CPU compiles of the chunk form and of interpreted Pallas kernels take minutes on 2 cores;
        # the smoke run checks the script's logic, so its single-device points use the token loop.
        if args.impl == "pallas":
            args.impl = "reference"
        if args.long_impl == "chunk":
            args.long_impl = "reference"
    long_layers = [int(x) for x in args.long_layers.split(",")]
    points = plan_points(smoke=args.smoke, parts=parts, impl=args.impl, rows=args.rows, steps=args.steps,
                         long_T=args.long_T, long_layers=long_layers, long_steps=args.long_steps,
                         long_impl=args.long_impl)
    if points:
        cfg = dict(smoke=args.smoke, points=points, out=out, deadline=deadline - 3.0, long_layers=long_layers,
                   mem_limit_gb=args.mem_limit_gb or None,
                   meta=dict(argv=sys.argv[1:], budget_s=args.budget_s))
        rc = run_points(cfg, deadline - 2.0 if "op" not in parts else deadline - 0.4 * args.budget_s)
        doc = json.load(open(out)) if out and os.path.exists(out) else {}
        missing = [p for p in points if p["name"] not in doc.get("points", {})]
        if rc not in (0, -9) and missing and out and deadline - time.time() > 60:
            # The worker died (not the budget): blame the first point it had not finished, go on without it.
            doc.setdefault("points", {})[missing[0]["name"]] = dict(spec=missing[0], status="error",
                                                     note=f"the worker died here (exit code {rc})")
            write_json(out, doc)
            if missing[1:]:
                print(f"worker exited with {rc}; restarting it for {len(missing) - 1} points", flush=True)
                run_points(dict(cfg, points=missing[1:]), deadline - 2.0)
                doc = json.load(open(out)) if os.path.exists(out) else doc
        if not out:
            print("(no --out / --out-dir: results were only logged above)")
        if doc:
            for p in points:  # points the worker never reached (stopped at the budget, or crashed)
                doc["points"].setdefault(p["name"], dict(spec=p, status="not reached",
                                                         note="the worker stopped before this point"))
        if doc:
            meta = doc.get("meta", {})
            print(f"\n### Training step: {meta.get('devices')} x {meta.get('kind')}, jax {meta.get('jax')}\n")
            table = training_table(doc)
            print(table, flush=True)
            doc["table_md"] = table
            write_json(out, doc)
    if "op" in parts:
        info = run_worker("info", {"smoke": args.smoke}, 120)
        if "error" in info:
            raise SystemExit(f"could not list devices: {info['error']}")
        op_table(args, 2 if args.smoke else info["count"])
    print(f"\ntotal {time.time() - t_start:.0f} s (budget {args.budget_s:.0f} s)")


if __name__ == "__main__":
    main()
