"""Training throughput (tokens/s) of 130M-class models vs sequence length (paper Figure 2).

Models: Transformer (softmax attention), Gated DeltaNet, PRISM L = 2 and L = 3, TTT-Linear in its
mini-batch dual form and TTT-Linear per token (mini-batch 1), and, as outside reference points when the
`jla` package (jax-linear-attention) imports, its `deltanet-125m` and `gated-deltaproduct-125m` presets.
Each point is one full training step (forward, backward, AdamW update) on random tokens, at a fixed number
of tokens per step (batch = tokens_per_step / T), timed after a warm-up step. Prints a table, the
PRISM / TTT ratio next to the paper's 174x, and writes JSON (--out) after every point so a run that hits
a time limit keeps what it measured.

Compile time dominates a GPU window (10-47 s per point), so by default the run has two phases:
  1. pre-compile: every (model, T) point is compiled in its own subprocess, all in parallel
     (--compile-workers), into JAX's persistent compilation cache (--cache-dir). These processes only
     lower and compile (no step runs; XLA_PYTHON_CLIENT_PREALLOCATE=false) and write a small status
     JSON per point: which op form compiled, and XLA's memory estimate.
  2. timing: this process times the points one after another; each compile is a cache hit (load_s in
     the JSON). Points whose memory estimate exceeds the device are reported as OOM without running.
--compile-workers 0 skips phase 1 (every point compiles in the timing process, as before).

    python benchmarks/throughput.py --out $OUT/throughput.json   # one GPU: T in 2K..16K, 32K tokens/step
    python benchmarks/throughput.py --smoke                       # tiny models, tiny T, on CPU

Only jax, flax, optax and this package are imported (plus `jla` and its `equinox` for the jla points).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # `python benchmarks/throughput.py` (and its workers) from a checkout without an install
    sys.path.insert(0, _ROOT)

from benchmarks.compile_workers import run_workers, strip_flag_values  # noqa: E402,F401
from train.compilation_cache import enable_compilation_cache  # noqa: E402

# name -> PrismLMConfig overrides on top of the preset
MODELS = {
    "attention": dict(mixer="attention"),
    "gdn": dict(mixer="gdn"),
    "prism_l2": dict(mixer="prism", solver_steps=2),
    "prism_l3": dict(mixer="prism", solver_steps=3),
    "ttt_dual": dict(mixer="ttt", ttt_mini_batch=16),
    "ttt_token": dict(mixer="ttt", ttt_mini_batch=1),
}
# name -> jax-linear-attention preset (outside reference points, optional)
JLA_MODELS = {
    "jla_deltanet": "deltanet-125m",
    "jla_gated_deltaproduct": "gated-deltaproduct-125m",
}
ALL_MODELS = {**MODELS, **JLA_MODELS}
# Per-token TTT keeps its [B, H, Dh, Dh] inner weights for every token for the backward pass (~18 MB per
# token at 130M): 32K tokens/step asked XLA for 585 GiB on an H200, so 8K would need ~146 GiB; 4K fits.
# Longer T still run T tokens (batch 1) and are reported as "OOM predicted" from XLA's memory estimate.
DEFAULT_MODEL_TOKENS = {"ttt_token": 4096}
PAPER_PRISM_OVER_TTT = 174  # Figure 2 / section 5.3: TTT 0.34K tokens/s vs PRISM ~59K at 0.13B on one H20
PAPER_TOKENS_PER_S = {  # read off section 5.3's text (K tokens/s, one H20); the figure has the rest
    "attention": {2048: 71.4},
    "prism": {2048: 61.0, 16384: 57.0},
    "ttt": {"all": 0.34},
}


@contextlib.contextmanager
def cudnn_causal_attention(enabled: bool):
    """Route the attention layer's causal `jax.nn.dot_product_attention` to the cuDNN flash kernel
    (`implementation="cudnn"`, so a failure shows instead of silently falling back to XLA). Only valid
    here: the benchmark passes no segment_ids, so the layer's attention is exactly causal."""
    import jax

    if not enabled:
        yield
        return
    original = jax.nn.dot_product_attention

    def causal_cudnn(query, key, value, bias=None, mask=None, **kwargs):
        del mask
        kwargs.pop("is_causal", None)
        kwargs.pop("implementation", None)
        return original(query, key, value, bias, is_causal=True, implementation="cudnn", **kwargs)

    jax.nn.dot_product_attention = causal_cudnn
    try:
        yield
    finally:
        jax.nn.dot_product_attention = original


def resolve_defaults(args, backend):
    """Fill the backend-dependent defaults (same result in the timing process and the compile workers)."""
    args.tokens_per_step = args.tokens_per_step or (128 if args.smoke else 32768)
    args.dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    args.op_impl = args.op_impl or ("pallas" if backend == "gpu" else "chunk")
    args.attention = args.attention or ("cudnn" if backend == "gpu" else "layer")


def tokens_per_step_for(name, args):
    table = dict(DEFAULT_MODEL_TOKENS) if not args.smoke else {}
    for item in filter(None, (args.model_tokens_per_step or "").split(",")):
        model, _, count = item.partition("=")
        table[model] = int(count)
    return table.get(name, args.tokens_per_step)


def set_pallas_backward(bwd):
    """Benchmark knob: the backward `prism_pallas` uses when the model does not say (its `bwd` default;
    the model code passes no kernel options). Set identically in the workers and the timing process."""
    if bwd:
        from pallas_kernels import prism_pallas

        prism_pallas.__kwdefaults__["bwd"] = bwd


def model_config(name, args, seq_len, op_impl):
    from prism_jax.models import get_preset

    set_pallas_backward(args.pallas_bwd)

    overrides = dict(MODELS[name], dtype=args.dtype, op_impl=op_impl, max_seq_len=max(seq_len, 256))
    if args.smoke:
        overrides.update(vocab_size=256)
        return get_preset("tiny", **overrides)
    if args.chunk_size:
        overrides["chunk_size"] = args.chunk_size
    if args.scan_layers:
        overrides["scan_layers"] = True
    return get_preset(args.preset, **overrides)


def build_prism_point(name, seq_len, batch, args, op_impl):
    """(lower, adapt, state, info) for one of our models: lower(*state).compile() is the step, adapt(compiled)
    runs it as step(params, opt_state) -> (params, opt_state, loss)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from prism_jax.models import PrismLM

    cfg = model_config(name, args, seq_len, op_impl)
    model = PrismLM(cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(batch, seq_len + 1)), jnp.int32)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    params = jax.jit(model.init)(jax.random.PRNGKey(0), inputs[:1])["params"]
    tx = optax.adamw(3e-4, weight_decay=0.1)
    opt_state = tx.init(params)

    def loss_fn(p):
        logits = model.apply({"params": p}, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(p, o):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    num_params = int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
    info = dict(num_params=num_params, op_impl=cfg.op_impl, dtype=cfg.dtype, vocab_size=cfg.vocab_size,
                scan_layers=cfg.scan_layers, chunk_size=cfg.chunk_size, pallas_bwd=args.pallas_bwd or "default")
    return jax.jit(step).lower, (lambda compiled: compiled), (params, opt_state), info


def jla_config(name, args, impl="auto"):
    """The jla preset, with its remat policy set by --jla-remat (smoke: shrunk to a tiny model).
    impl "auto": jla's Mosaic GPU kernels on Hopper; "chunked": its plain-JAX ops (the fallback)."""
    from jla.models.presets import get_preset as jla_preset

    cfg = jla_preset(JLA_MODELS[name])
    la = cfg.linear_attention
    if impl != "auto":
        la = dataclasses.replace(la, implementation=impl, conv_impl="xla")
    cfg = dataclasses.replace(cfg, remat=args.jla_remat, compute_dtype=args.dtype, linear_attention=la)
    if args.smoke:
        la = dataclasses.replace(cfg.linear_attention, num_k_heads=2, num_v_heads=2, head_k_dim=16,
                                 head_v_dim=16, chunk_size=16)
        cfg = dataclasses.replace(cfg, vocab_size=256, d_model=64, n_layers=2, d_ff=128, linear_attention=la,
                                  layer_types=cfg.layer_types[:2])
    return cfg


def build_jla_point(name, seq_len, batch, args, impl):
    """(lower, adapt, state, info) for a jax-linear-attention preset through its public training API."""
    import equinox as eqx
    import jax
    import numpy as np
    import optax
    from jla.models.lm import build_model
    from jla.training.step import LossConfig, build_train_step, lm_loss

    cfg = jla_config(name, args, impl)
    model = build_model(cfg, key=jax.random.PRNGKey(0))
    tx = optax.adamw(3e-4, weight_decay=0.1)
    params = eqx.filter(model, eqx.is_inexact_array)
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(1, batch, seq_len + 1)).astype(np.int32)
    batch_dict = {"input_ids": jax.numpy.asarray(tokens[..., :-1]), "labels": jax.numpy.asarray(tokens[..., 1:])}
    step = build_train_step(tx, lm_loss(LossConfig(compute_dtype=args.dtype)), donate=False)
    num_params = int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
    info = dict(num_params=num_params, op_impl=f"jla ({cfg.linear_attention.implementation}, remat {cfg.remat})",
                dtype=cfg.compute_dtype, vocab_size=cfg.vocab_size)

    key = jax.random.PRNGKey(1)

    def lower(m, o):
        return step.lower(m, o, batch_dict, key)

    def adapt(compiled):  # jla's step takes and returns (batch, model, opt_state, key) / (model, opt_state, metrics, key)
        def run(m, o):
            m, o, metrics, _ = compiled(batch_dict, m, o, key)
            return m, o, metrics["loss"]
        return run

    return lower, adapt, (model, opt_state), info


def build_point(name, seq_len, args, op_impl):
    batch = max(1, tokens_per_step_for(name, args) // seq_len)
    if name in JLA_MODELS:
        lower, adapt, state, info = build_jla_point(name, seq_len, batch, args, op_impl)
    else:
        lower, adapt, state, info = build_prism_point(name, seq_len, batch, args, op_impl)
    return lower, adapt, state, dict(info, batch=batch, tokens_per_step=batch * seq_len)


def compile_point(name, seq_len, args, op_impl):
    """Lower and compile one point (a persistent-cache hit if a worker compiled it); returns the
    compiled step, its arguments, the info dict with load/compile seconds and XLA's memory estimate."""
    lower, adapt, state, info = build_point(name, seq_len, args, op_impl)
    with cudnn_causal_attention(args.attention == "cudnn" and name == "attention"):
        t0 = time.perf_counter()
        compiled = lower(*state).compile()
        info["compile_s"] = time.perf_counter() - t0
    info["memory_estimate_bytes"] = memory_estimate(getattr(compiled, "compiled", compiled))
    return adapt(compiled), state, info


def memory_estimate(compiled):
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def fallback_impls(name, args):
    """Forms to try in order: the requested one, then the plain chunk form for the Pallas op (jla: its
    kernels, then its plain-JAX chunked ops)."""
    if name in JLA_MODELS:
        return ["auto", "chunked"] if args.op_impl == "pallas" else ["auto"]
    if name in MODELS and MODELS[name]["mixer"] in ("prism", "gdn") and args.op_impl == "pallas":
        return ["pallas", "chunk"]
    return [args.op_impl]


def run_compile_worker(args):
    """Subprocess entry: compile one point into the persistent cache, write a status JSON, run nothing."""
    import jax

    enable_compilation_cache(args.cache_dir)
    resolve_defaults(args, jax.default_backend())
    name, seq_len = args.point.split(":")
    seq_len = int(seq_len)
    status = dict(model=name, seq_len=seq_len, errors=[])
    t0 = time.perf_counter()
    for impl in fallback_impls(name, args):
        try:
            _, _, info = compile_point(name, seq_len, args, impl)
            status.update(info, ok=True, impl=impl)
            break
        except Exception as e:  # noqa: BLE001 - record and try the next form
            status["errors"].append(f"{impl}: {type(e).__name__}: {e}"[:400])
    status["ok"] = status.get("ok", False)
    status["worker_s"] = time.perf_counter() - t0
    with open(args.status_file, "w") as f:
        json.dump(status, f)


def precompile(points, argv, args):
    """Compile all points in parallel subprocesses (at most --compile-workers at once, all stopped after
    --compile-timeout-s). Returns {(model, T): status dict}. Uses no accelerator memory in this process."""
    print(f"pre-compiling {len(points)} points, {args.compile_workers} at a time, cache {args.cache_dir}", flush=True)

    def describe(key, s):
        note = (f"ok ({s['impl']}) in {s['worker_s']:.1f} s" if s.get("ok")
                else f"FAILED: {' | '.join(s.get('errors', []))[:200]}")
        return f"  compiled {key[0]:24s} T={key[1]:6d}  {note}"

    jobs = [((name, t), ["--compile-only", "--point", f"{name}:{t}"]) for name, t in points]
    return run_workers(jobs, script=os.path.abspath(__file__), argv=argv, cache_dir=args.cache_dir,
                       max_parallel=args.compile_workers, timeout_s=args.compile_timeout_s, describe=describe)


def worker_failed_for_good(status):
    """True when the compile worker's failure is final. A worker killed by the timeout, or one that ran
    out of device memory (it autotunes on the GPU it shares with the other workers), is retried: the
    timing process compiles that point again, alone on the device."""
    if not status or status.get("ok") or status.get("killed"):
        return False
    return not any("RESOURCE_EXHAUSTED" in e or "Out of memory" in e for e in status.get("errors", []))


def time_point(name, seq_len, args, status):
    """tokens/s of one training step of model `name` at length seq_len (dict with the numbers)."""
    import numpy as np

    errors = list(status.get("errors", [])) if status else []
    if worker_failed_for_good(status):
        return dict(model=name, seq_len=seq_len, error=" | ".join(errors)[:300] or "compile failed")
    impls = [status["impl"]] if status and status.get("ok") else fallback_impls(name, args)
    for i, impl in enumerate(impls):
        try:
            compiled, state, info = compile_point(name, seq_len, args, impl)
            break
        except Exception as e:  # noqa: BLE001 - try the next form
            errors.append(f"{impl}: {type(e).__name__}: {e}"[:300])
            if i == len(impls) - 1:
                raise
    limit = device_memory_limit()
    if limit and info["memory_estimate_bytes"] and info["memory_estimate_bytes"] > 1.02 * limit:
        return dict(model=name, seq_len=seq_len, **info,
                    error=f"OOM predicted: XLA needs {info['memory_estimate_bytes'] / 2**30:.0f} GiB "
                          f"> {limit / 2**30:.0f} GiB (not run)")
    t0 = time.perf_counter()
    *state, loss = compiled(*state)
    loss.block_until_ready()
    warmup_s = time.perf_counter() - t0
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f"non-finite loss {float(loss)}")
    # Time at least `steps` steps and `min_time_s` seconds, but at most `max_time_s` (slow models: 1 step).
    times = []
    while len(times) < args.steps or sum(times) < args.min_time_s:
        if times and sum(times) + times[-1] > args.max_time_s:
            break
        t0 = time.perf_counter()
        *state, loss = compiled(*state)
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
    del state
    step_s = float(np.median(times))
    r = dict(model=name, seq_len=seq_len, **info, tokens_per_s=info["tokens_per_step"] / step_s, step_s=step_s,
             timed_steps=len(times), warmup_s=warmup_s, precompiled=bool(status and status.get("ok")))
    if impl != fallback_impls(name, args)[0]:
        r["fallback"] = f"impl={impl}"
    if status and status.get("ok"):
        r["worker_compile_s"] = status.get("compile_s")
    if errors:
        r["compile_errors"] = errors
    return r


def device_memory_limit():
    import jax

    try:
        return int(jax.devices()[0].memory_stats()["bytes_limit"])
    except Exception:  # noqa: BLE001 - CPU has no memory stats
        return None


def fmt_rate(r):
    if r is None:
        return "-"
    return f"{r / 1e3:.2f}K" if r >= 1e3 else f"{r:.1f}"


def print_table(results, models, lengths, file=sys.stdout):
    by = {(r["model"], r["seq_len"]): r for r in results}
    header = "| model | " + " | ".join(f"T={t}" for t in lengths) + " |"
    print("\nTraining throughput, tokens/s (one step = forward + backward + AdamW):", file=file)
    print(header, file=file)
    print("|" + "---|" * (len(lengths) + 1), file=file)
    for m in models:
        cells = []
        for t in lengths:
            r = by.get((m, t))
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append(r["error"][:28])
            else:
                tps = r["tokens_per_step"]
                cells.append(fmt_rate(r["tokens_per_s"]) + (f" ({fmt_tokens(tps)}/step)" if tps != by_default_tokens(results) else ""))
        print(f"| {m} | " + " | ".join(cells) + " |", file=file)
    print("\nPRISM / TTT throughput ratio (paper: ~%dx, PRISM vs TTT per token):" % PAPER_PRISM_OVER_TTT, file=file)
    print("| ratio | " + " | ".join(f"T={t}" for t in lengths) + " |", file=file)
    print("|" + "---|" * (len(lengths) + 1), file=file)
    for prism in ("prism_l2", "prism_l3"):
        for ttt in ("ttt_token", "ttt_dual"):
            if prism not in models or ttt not in models:
                continue
            cells = []
            for t in lengths:
                a, b = by.get((prism, t)), by.get((ttt, t))
                ok = a and b and "tokens_per_s" in a and "tokens_per_s" in b
                cells.append(f"{a['tokens_per_s'] / b['tokens_per_s']:.3g}x" if ok else "-")
            print(f"| {prism} / {ttt} | " + " | ".join(cells) + " |", file=file)
    print("Paper (section 5.3, 0.13B on one H20, K tokens/s): attention 71.4 at T=2K; PRISM 61.0 at 2K, "
          "57.0 at 16K; TTT-Linear 0.34; PRISM / TTT ~174x.", file=file)


def fmt_tokens(n):
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def by_default_tokens(results):
    counts = [r["tokens_per_step"] for r in results if "tokens_per_step" in r]
    return max(set(counts), key=counts.count) if counts else None


def merge_results(paths):
    """Results of several JSON files (e.g. window A and window B), later files winning per point."""
    merged = {}
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["results"]:
                merged[(r["model"], r["seq_len"])] = r
    return list(merged.values())


def plot_results(results, models, lengths, path):
    """Figure 2 style: tokens/s against T, one line per model, log scale (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["model"], r["seq_len"]): r for r in results if "tokens_per_s" in r}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in models:
        pts = [(t, by[(m, t)]["tokens_per_s"]) for t in lengths if (m, t) in by]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m + (" (ref.)" if m in JLA_MODELS else ""))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [fmt_tokens(t) for t in lengths])
    ax.set_xlabel("sequence length T (fixed tokens per step)")
    ax.set_ylabel("training tokens / s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny preset, T in {32, 64}, 128 tokens/step")
    parser.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma-separated, from {list(ALL_MODELS)}")
    parser.add_argument("--lengths", default=None, help="comma-separated T (default 2048,4096,8192,16384)")
    parser.add_argument("--tokens-per-step", type=int, default=None, help="default 32768 (smoke: 128)")
    parser.add_argument("--model-tokens-per-step", default=None,
                        help="per-model overrides, e.g. ttt_token=8192 (default ttt_token=4096; batch is at "
                             "least 1, so T above it runs T tokens per step)")
    parser.add_argument("--preset", default="130m")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="compute dtype (default bfloat16 on GPU/TPU, float32 on CPU)")
    parser.add_argument("--op-impl", default=None, choices=("chunk", "pallas", "reference", "scan"),
                        help="PRISM/GDN op form (default pallas on GPU, chunk elsewhere; "
                             "falls back to chunk if pallas fails)")
    parser.add_argument("--chunk-size", type=int, default=0, help="0: the preset's")
    parser.add_argument("--attention", default=None, choices=("layer", "cudnn"),
                        help="cudnn: causal cuDNN flash attention (default on GPU); layer: the layer as written")
    parser.add_argument("--pallas-bwd", default=None, choices=("auto", "xla", "fused", "explicit"),
                        help="the Pallas op's backward (default: the op's own default, 'auto')")
    parser.add_argument("--scan-layers", action="store_true",
                        help="our models' blocks under nn.scan (compiles one layer body; same model and step)")
    parser.add_argument("--jla-remat", default="none",
                        help="remat policy of the jla presets (default none, like our models; the presets' own is full)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per point (median)")
    parser.add_argument("--min-time-s", type=float, default=1.0)
    parser.add_argument("--max-time-s", type=float, default=8.0,
                        help="stop timing a point once another step would pass this (always >= 1 timed step)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="whole run incl. pre-compile: start no point after this (default 540; smoke: none)")
    parser.add_argument("--compile-workers", type=int, default=None,
                        help="parallel compile subprocesses (default: min(points, CPU cores); 0: no pre-compile)")
    parser.add_argument("--compile-timeout-s", type=float, default=None,
                        help="stop pre-compiling after this (default 0.6 * budget)")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "prism_jax_throughput_cache"),
                        help="JAX persistent compilation cache (keep it off $OUT)")
    parser.add_argument("--merge", default=None,
                        help="comma-separated JSON files of earlier runs: print their combined table and exit")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--plot", default=None, help="with --merge: write a PNG of tokens/s against T")
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--point", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--status-file", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def jla_available():
    try:
        import jla.models.presets  # noqa: F401
        import jla.training.step  # noqa: F401
        return None
    except Exception as e:  # noqa: BLE001 - optional outside reference
        return f"{type(e).__name__}: {e}"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.compile_only:
        return run_compile_worker(args)
    if args.merge:
        results = merge_results(args.merge.split(","))
        models = [m for m in ALL_MODELS if any(r["model"] == m for r in results)]
        lengths = sorted({r["seq_len"] for r in results})
        print_table(results, models, lengths)
        if args.plot:
            plot_results(results, models, lengths, args.plot)
        return results

    start = time.perf_counter()
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # let one step use most of the device
    lengths = [int(t) for t in (args.lengths or ("32,64" if args.smoke else "2048,4096,8192,16384")).split(",")]
    models = args.models.split(",")
    unknown = sorted(set(models) - set(ALL_MODELS))
    if unknown:
        raise ValueError(f"--models: unknown {unknown}, expected names from {sorted(ALL_MODELS)}")
    tokens = args.tokens_per_step or (128 if args.smoke else 32768)
    bad = [t for t in lengths if t < 1 or tokens % t]
    if bad:
        raise ValueError(f"--lengths {bad}: each T must divide --tokens-per-step = {tokens}")
    if args.budget_s is None:
        args.budget_s = float("inf") if args.smoke else 540.0
    if args.compile_timeout_s is None:
        args.compile_timeout_s = 0.6 * args.budget_s
    if args.smoke:
        args.steps, args.min_time_s = 1, 0.0

    results, skipped_models = [], {}
    if any(m in JLA_MODELS for m in models):
        why = jla_available()
        if why:
            print(f"jla (jax-linear-attention) not importable, skipping {[m for m in models if m in JLA_MODELS]}: {why}",
                  flush=True)
            for m in models:
                if m in JLA_MODELS:
                    skipped_models[m] = f"skipped: jla import failed ({why})"[:200]
    points = [(name, t) for t in lengths for name in models if name not in skipped_models]
    workers = args.compile_workers if args.compile_workers is not None else min(len(points), os.cpu_count() or 1)
    # The workers must compile exactly what this process will run: strip the orchestration flags.
    worker_argv = argv + [f"--cache-dir={args.cache_dir}"]
    statuses = precompile(points, strip_flag_values(worker_argv, ("--out", "--compile-workers")), argparse.Namespace(
        **{**vars(args), "compile_workers": workers})) if workers > 0 else {}
    precompile_s = time.perf_counter() - start

    import jax  # the accelerator is touched only now, after the compile workers are done

    enable_compilation_cache(args.cache_dir)
    backend = jax.default_backend()
    resolve_defaults(args, backend)
    device = jax.devices()[0].device_kind
    print(f"backend {backend} ({device}), preset {'tiny' if args.smoke else args.preset}, dtype {args.dtype}, "
          f"op_impl {args.op_impl}, attention {args.attention}, {args.tokens_per_step} tokens/step "
          f"(per model: {args.model_tokens_per_step or DEFAULT_MODEL_TOKENS if not args.smoke else '-'}), "
          f"pre-compile {precompile_s:.0f} s", flush=True)
    for name, why in skipped_models.items():
        results.extend(dict(model=name, seq_len=t, error=why) for t in lengths)

    def write_json():
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump({"backend": backend, "device": device, "args": vars(args), "precompile_s": precompile_s,
                           "jax_version": jax.__version__, "results": results}, f, indent=1)

    # Lengths outer, models inner: if the budget runs out, every model still has its shorter lengths.
    for name_t in points:
        name, seq_len = name_t
        if time.perf_counter() - start > args.budget_s:
            results.append(dict(model=name, seq_len=seq_len, error="skipped (budget)"))
            continue
        try:
            r = time_point(name, seq_len, args, statuses.get(name_t))
        except Exception as e:  # noqa: BLE001 - one failing point (OOM, kernel) must not end the run
            traceback.print_exc(limit=2)
            r = dict(model=name, seq_len=seq_len, error=f"{type(e).__name__}: {e}"[:300])
        jax.clear_caches()
        results.append(r)
        if "error" in r:
            print(f"{name:24s} T={seq_len:6d}  ERROR {r['error'][:120]}", flush=True)
        else:
            print(f"{name:24s} T={seq_len:6d}  B={r['batch']:4d}  {fmt_rate(r['tokens_per_s']):>9s} tok/s  "
                  f"step {r['step_s'] * 1e3:8.1f} ms x{r['timed_steps']}  compile/load {r['compile_s']:5.1f} s  "
                  f"{r['num_params'] / 1e6:.1f}M params  ({r['op_impl']}{', ' + r['fallback'] if 'fallback' in r else ''})"
                  f"  [{time.perf_counter() - start:.0f} s]", flush=True)
        write_json()
    write_json()
    print_table(results, models, lengths)
    return results


if __name__ == "__main__":
    main()
