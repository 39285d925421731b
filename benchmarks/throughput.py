"""Training throughput (tokens/s) of 130M-class models vs sequence length (paper Figure 2).

Models: Transformer (softmax attention), Gated DeltaNet, PRISM L = 2 and L = 3, TTT-Linear in its
mini-batch dual form and TTT-Linear per token (mini-batch 1). Each point is one full training step
(forward, backward, AdamW update) on random tokens, at a fixed number of tokens per step
(batch = tokens_per_step / T), timed after a warm-up step that compiles. Prints a table, the
PRISM / TTT ratio next to the paper's 174x, and writes JSON (--out) after every point so a run that
hits a time limit keeps what it measured.

    python benchmarks/throughput.py                 # on one GPU (H200): T in 2K..16K, 32K tokens/step
    python benchmarks/throughput.py --smoke         # tiny models, tiny T, on CPU: checks that it runs

Only jax, flax, optax and this package are imported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prism_jax.models import PrismLM, get_preset

# name -> PrismLMConfig overrides on top of the preset
MODELS = {
    "attention": dict(mixer="attention"),
    "gdn": dict(mixer="gdn"),
    "prism_l2": dict(mixer="prism", solver_steps=2),
    "prism_l3": dict(mixer="prism", solver_steps=3),
    "ttt_dual": dict(mixer="ttt", ttt_mini_batch=16),
    "ttt_token": dict(mixer="ttt", ttt_mini_batch=1),
}
PAPER_PRISM_OVER_TTT = 174  # Figure 2 / section 5.3: TTT 0.34K tokens/s vs PRISM ~59K at 0.13B on one H20
PAPER_TOKENS_PER_S = {  # read off section 5.3's text (K tokens/s, one H20); the figure has the rest
    "attention": {2048: 71.4},
    "prism": {2048: 61.0, 16384: 57.0},
    "ttt": {"all": 0.34},
}


@contextlib.contextmanager
def cudnn_causal_attention(enabled: bool):
    """Route the attention layer's `jax.nn.dot_product_attention(q, k, v, mask=tril)` to the cuDNN
    flash kernel with `is_causal=True`. Only valid here: the benchmark passes no segment_ids, so the
    layer's mask is exactly the causal one."""
    if not enabled:
        yield
        return
    original = jax.nn.dot_product_attention

    def causal_cudnn(query, key, value, bias=None, mask=None, **kwargs):
        del mask
        return original(query, key, value, bias, is_causal=True, implementation="cudnn", **kwargs)

    jax.nn.dot_product_attention = causal_cudnn
    try:
        yield
    finally:
        jax.nn.dot_product_attention = original


def model_config(name, args, seq_len):
    overrides = dict(MODELS[name], dtype=args.dtype, op_impl=args.op_impl, max_seq_len=max(seq_len, 256))
    if args.smoke:
        overrides.update(vocab_size=256)
        return get_preset("tiny", **overrides)
    if args.chunk_size:
        overrides["chunk_size"] = args.chunk_size
    return get_preset(args.preset, **overrides)


def measure(name, seq_len, args):
    """tokens/s of one training step of model `name` at length seq_len (dict with the numbers)."""
    cfg = model_config(name, args, seq_len)
    batch = max(1, args.tokens_per_step // seq_len)
    model = PrismLM(cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(batch, seq_len + 1)), jnp.int32)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    params = jax.jit(model.init)(jax.random.PRNGKey(0), inputs[:1])["params"]
    num_params = int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
    tx = optax.adamw(3e-4, weight_decay=0.1)
    opt_state = tx.init(params)

    def loss_fn(p):
        logits = model.apply({"params": p}, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(p, o):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state)
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f"non-finite loss {float(loss)}")
    # Time at least `steps` steps and at least `min_time_s` seconds, but stop early for slow models.
    times = []
    while len(times) < args.steps or sum(times) < args.min_time_s:
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state)
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
        if sum(times) > args.max_time_s:
            break
    step_s = float(np.median(times))
    return dict(model=name, seq_len=seq_len, batch=batch, tokens_per_step=batch * seq_len,
                tokens_per_s=batch * seq_len / step_s, step_s=step_s, timed_steps=len(times),
                compile_s=compile_s, num_params=num_params, op_impl=cfg.op_impl, dtype=cfg.dtype)


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
            cells.append("-" if r is None else (r.get("error", "err")[:24] if "error" in r else fmt_rate(r["tokens_per_s"])))
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
                cells.append(f"{a['tokens_per_s'] / b['tokens_per_s']:.1f}x" if ok else "-")
            print(f"| {prism} / {ttt} | " + " | ".join(cells) + " |", file=file)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny preset, T in {32, 64}, 128 tokens/step")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--lengths", default=None, help="comma-separated T (default 2048,4096,8192,16384)")
    parser.add_argument("--tokens-per-step", type=int, default=None, help="default 32768 (smoke: 128)")
    parser.add_argument("--preset", default="130m")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="compute dtype (default bfloat16 on GPU/TPU, float32 on CPU)")
    parser.add_argument("--op-impl", default=None, choices=("chunk", "pallas", "reference", "scan"),
                        help="PRISM/GDN op form (default pallas on GPU, chunk elsewhere; "
                             "falls back to chunk if pallas fails)")
    parser.add_argument("--chunk-size", type=int, default=0, help="0: the preset's")
    parser.add_argument("--attention", default=None, choices=("layer", "cudnn"),
                        help="cudnn: causal cuDNN flash attention (default on GPU); layer: the layer as written")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per point (median)")
    parser.add_argument("--min-time-s", type=float, default=1.0)
    parser.add_argument("--max-time-s", type=float, default=20.0, help="stop timing a point after this")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip remaining points after this many seconds (default 540; smoke: none)")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    lengths = [int(t) for t in (args.lengths or ("32,64" if args.smoke else "2048,4096,8192,16384")).split(",")]
    args.tokens_per_step = args.tokens_per_step or (128 if args.smoke else 32768)
    args.dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
    args.op_impl = args.op_impl or ("pallas" if backend == "gpu" else "chunk")
    args.attention = args.attention or ("cudnn" if backend == "gpu" else "layer")
    if args.budget_s is None:
        args.budget_s = float("inf") if args.smoke else 540.0
    if args.smoke:
        args.steps, args.min_time_s = 1, 0.0
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"--models: unknown {unknown}, expected names from {sorted(MODELS)}")
    bad = [t for t in lengths if t < 1 or args.tokens_per_step % t]
    if bad:
        raise ValueError(f"--lengths {bad}: each T must divide --tokens-per-step = {args.tokens_per_step}")

    print(f"backend {backend} ({jax.devices()[0].device_kind}), preset {'tiny' if args.smoke else args.preset}, "
          f"dtype {args.dtype}, op_impl {args.op_impl}, attention {args.attention}, "
          f"{args.tokens_per_step} tokens/step", flush=True)
    results, start = [], time.perf_counter()
    # Lengths outer, models inner: if the budget runs out, every model still has its shorter lengths.
    for seq_len in lengths:
        for name in models:
            if time.perf_counter() - start > args.budget_s:
                results.append(dict(model=name, seq_len=seq_len, error="skipped (budget)"))
                continue
            try:
                with cudnn_causal_attention(args.attention == "cudnn" and name == "attention"):
                    r = measure(name, seq_len, args)
            except Exception as e:  # noqa: BLE001 - one failing point (OOM, kernel) must not end the run
                retry = None
                if args.op_impl == "pallas" and MODELS[name].get("mixer") in ("prism", "gdn"):
                    retry = "op_impl=chunk"
                elif args.attention == "cudnn" and name == "attention":
                    retry = "attention=layer"
                if retry:
                    print(f"{name} T={seq_len}: failed ({type(e).__name__}: {str(e)[:200]}), retrying with {retry}",
                          flush=True)
                    try:
                        if retry == "op_impl=chunk":
                            r = measure(name, seq_len, argparse.Namespace(**{**vars(args), "op_impl": "chunk"}))
                        else:
                            r = measure(name, seq_len, args)
                        r["fallback"] = retry
                    except Exception as e2:  # noqa: BLE001
                        r = dict(model=name, seq_len=seq_len, error=f"{type(e2).__name__}: {e2}"[:300])
                else:
                    traceback.print_exc(limit=2)
                    r = dict(model=name, seq_len=seq_len, error=f"{type(e).__name__}: {e}"[:300])
            results.append(r)
            if "error" in r:
                print(f"{name:10s} T={seq_len:6d}  ERROR {r['error'][:120]}", flush=True)
            else:
                print(f"{name:10s} T={seq_len:6d}  B={r['batch']:4d}  {fmt_rate(r['tokens_per_s']):>9s} tok/s  "
                      f"step {r['step_s'] * 1e3:8.1f} ms  compile {r['compile_s']:6.1f} s  "
                      f"{r['num_params'] / 1e6:.1f}M params  ({r['op_impl']}{', ' + r['fallback'] if 'fallback' in r else ''})",
                      flush=True)
            if args.out:
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump({"backend": backend, "device": jax.devices()[0].device_kind,
                               "args": vars(args), "results": results}, f, indent=1)
    print_table(results, models, lengths)
    return results


if __name__ == "__main__":
    main()
