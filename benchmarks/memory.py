"""Memory accounting for training a preset (default 1.3b): which FSDP size fits a device.

    python benchmarks/memory.py                      # 1.3b, analytic activations, prints the tables
    python benchmarks/memory.py --preset 130m --seq_len 4096
    python benchmarks/memory.py --measure            # also calibrate activations with XLA's buffer
                                                     # assignment (compiles 1- and 2-layer models on CPU)

Per device, with FSDP over `fsdp` devices (prism_jax.sharding: every weight with an "embed" axis is
split over fsdp, the rest (norm scales, per-head biases) is replicated):

  model state   = (params fp32 4 B + grads fp32 4 B + grad accumulator fp32 4 B + AdamW mu, nu 8 B)
                  x sharded params / fsdp + the same x replicated params          (20 B / param)
  gathered      = one layer's weights all-gathered in the compute dtype (FSDP working set)
  activations   = rows per device x T x bytes per token (all layers, no rematerialisation: the
                  model saves every intermediate for the backward pass) + the logits terms.

Parameter counts come from `jax.eval_shape` of `PrismLM.init` on the preset (no weights allocated).
Activation bytes per token per layer are a stated formula over the layer's tensors (see
`activation_terms`), which `--measure` checks against XLA's temp-buffer size for the same model.
"""

from __future__ import annotations

import argparse
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from prism_jax.models import PrismLM, get_preset

GB = 1e9
DEVICES = {"H200 (141 GB)": 141e9, "TPU v4/v5e chip (16 GB)": 16e9}
USABLE = 0.9  # headroom for XLA temporaries, fragmentation and the runtime
STATE_BYTES = {"params fp32": 4, "grads fp32": 4, "grad accumulator fp32": 4, "AdamW mu+nu fp32": 8}


def parameter_counts(config):
    """(total, sharded over fsdp, replicated, largest layer) parameter counts, from the init's shapes."""
    model = PrismLM(config)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    abstract = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]
    specs = nn.get_partition_spec(abstract)
    sizes = jax.tree.map(lambda x: math.prod(x.shape), nn.unbox(abstract))
    flat_sizes = jax.tree_util.tree_leaves_with_path(sizes)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    sharded = replicated = 0
    per_layer = {}
    for (path, n), spec in zip(flat_sizes, flat_specs):
        if "embed" in tuple(spec):
            sharded += n
        else:
            replicated += n
        top = str(getattr(path[0], "key", path[0]))
        per_layer[top] = per_layer.get(top, 0) + n
    return sharded + replicated, sharded, replicated, max(per_layer.values())


def activation_terms(c, seq_len):
    """Saved-for-backward bytes per token per layer, by tensor, for the PRISM block (chunk form).

    Compute dtype bf16 (2 B) for projections; the op, the solver's residual chain and norms in f32.
    """
    D, H, K, L, M = c.d_model, c.num_heads, c.head_k_dim, c.solver_steps, c.mlp_hidden_dim
    V = D // H
    R = c.solver_rank or D
    C = min(c.chunk_size or 64, seq_len)  # None: the chunk form's default
    bf, f32 = (2 if c.dtype == "bfloat16" else 4), 4
    return {
        "block input, 2 norms (in/out)": (3 * D * bf + 2 * D * f32),
        "short conv + SiLU anchor u": 2 * D * bf,
        "q, first key, rest keys, rank proj": (H * K + L * H * K + R) * bf,
        "l2-normalised q, k (f32)": (H * K + L * H * K) * f32,
        "v, gains, gates, decay": (D + L * D + H * L + H) * bf,
        "solver chain p*r, GELU, residual (f32)": 3 * L * D * f32,
        "op inputs cast to f32 (q, k, v, beta, g)": (H * K + L * H * K + L * H * V + H * L + H) * f32,
        "op chunk terms P, Q (f32)": H * (K + V) * f32,
        "op chunk start states (f32, per chunk / C)": H * K * V * f32 / C,
        "op output o (f32)": H * V * f32,
        "output head: norm, gate, SiLU, product": 4 * D * bf + D * f32,
        "MLP: gate, up, SiLU, product": 4 * M * bf,
    }


def logits_bytes_per_token(c):
    """f32 logits, their softmax and its gradient (three vocab-wide f32 tensors per token)."""
    return 3 * c.vocab_size * 4


def measure_activation_bytes(preset, seq_len, rows):
    """XLA temp bytes per token per layer: (temp(2 layers) - temp(1 layer)) / tokens, value_and_grad."""
    import optax  # noqa: PLC0415

    temps = {}
    for layers in (1, 2):
        config = get_preset(preset, num_layers=layers, dtype="bfloat16", param_dtype="float32")
        model = PrismLM(config)
        tokens = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32)
        params = jax.eval_shape(lambda t: nn.unbox(model.init(jax.random.key(0), t)), tokens)["params"]

        def loss(p, t):
            logits = model.apply({"params": p}, t)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], t[:, 1:]).mean()

        compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
        temps[layers] = compiled.memory_analysis().temp_size_in_bytes
    return (temps[2] - temps[1]) / (rows * seq_len), temps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1.3b")
    ap.add_argument("--seq_len", type=int, default=2048)
    ap.add_argument("--global_batch", type=int, default=256, help="rows per optimizer step")
    ap.add_argument("--grad_accum", type=int, default=16, help="micro-batches per step (configs: 1.3b = 16)")
    ap.add_argument("--measure", action="store_true", help="calibrate activations with XLA (slow)")
    args = ap.parse_args()
    c = get_preset(args.preset, dtype="bfloat16", param_dtype="float32")
    T = args.seq_len

    total, sharded, replicated, largest = parameter_counts(c)
    print(f"## {args.preset}: d_model {c.d_model}, {c.num_layers} layers, {c.num_heads} heads, K {c.head_k_dim}, "
          f"L {c.solver_steps}, vocab {c.vocab_size}, T {T}\n")
    print(f"parameters: {total / 1e6:,.1f} M  (split over fsdp: {sharded / 1e6:,.1f} M, replicated: "
          f"{replicated / 1e6:,.2f} M, largest all-gathered module (the embedding): {largest / 1e6:,.1f} M)\n")

    terms = activation_terms(c, T)
    per_layer = sum(terms.values())
    print("| activation term (per token, per layer) | bytes |\n|---|---:|")
    for name, b in terms.items():
        print(f"| {name} | {b:,.0f} |")
    print(f"| **sum per layer** | **{per_layer:,.0f}** |\n")
    if args.measure:
        measured, temps = measure_activation_bytes(args.preset, min(T, 512), 1)
        print(f"XLA (CPU buffer assignment, bf16, T={min(T, 512)}): {measured:,.0f} B per token per layer "
              f"(temp 1 layer {temps[1] / GB:.2f} GB, 2 layers {temps[2] / GB:.2f} GB); formula {per_layer:,.0f}\n")
        per_layer = max(per_layer, measured)
    per_token = per_layer * c.num_layers + logits_bytes_per_token(c) + c.d_model * 2
    per_row = per_token * T
    state_b = sum(STATE_BYTES.values())
    print(f"model state: {state_b} B / param ({', '.join(f'{k} {v}' for k, v in STATE_BYTES.items())}); "
          f"activations {per_token / 1e6:.2f} MB / token = {per_row / GB:.2f} GB per row of {T} tokens "
          f"(logits {logits_bytes_per_token(c) / 1e6:.2f} MB / token of it)\n")

    # With block rematerialisation (jax.checkpoint per block) only each block's input survives the
    # forward pass; one block's intermediates are rebuilt at a time during the backward pass.
    per_token_remat = (c.num_layers * c.d_model * 2 + per_layer + logits_bytes_per_token(c)
                       + c.d_model * 2)
    per_row_remat = per_token_remat * T
    print(f"with per-block remat: {per_token_remat / 1e6:.2f} MB / token = {per_row_remat / GB:.2f} GB per row\n")

    micro = args.global_batch // args.grad_accum
    print(f"Per device, FSDP only (micro-batch {micro} rows = {args.global_batch} rows / {args.grad_accum} "
          f"accumulation steps, split over the fsdp devices, at least 1 row each; 'max rows' = most rows of T "
          f"tokens per device within "
          f"{USABLE:.0%} of the memory; 'remat' = per-block rematerialisation):\n")
    head = ["fsdp", "state GB", "gathered GB", "rows/device", "acts GB", "total GB", "acts GB remat",
            "total GB remat"] + [f"max rows/device {name} (plain / remat)" for name in DEVICES]
    print("| " + " | ".join(head) + " |\n|" + "---:|" * len(head))
    first_fit, first_row = {}, {}
    for fsdp in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        state = state_b * (sharded / fsdp + replicated)
        gathered = 2 * largest if fsdp > 1 else 0  # the largest all-gathered unit, in bf16
        rows = max(micro / fsdp, 1)
        plain, remat = state + gathered + rows * per_row, state + gathered + rows * per_row_remat
        cells = []
        for name, cap in DEVICES.items():
            free = USABLE * cap - state - gathered
            most = [max(int(free // r), 0) for r in (per_row, per_row_remat)]
            cells.append(" / ".join(str(m) for m in most))
            for kind, tot, m in (("plain", plain, most[0]), ("remat", remat, most[1])):
                if tot <= USABLE * cap and (name, kind) not in first_fit:
                    first_fit[(name, kind)] = (fsdp, rows)
                if m >= 1 and (name, kind) not in first_row:
                    first_row[(name, kind)] = fsdp
        print(f"| {fsdp} | {state / GB:.1f} | {gathered / GB:.2f} | {rows:g} | {rows * per_row / GB:.1f} | "
              f"{plain / GB:.1f} | {rows * per_row_remat / GB:.1f} | {remat / GB:.1f} | " + " | ".join(cells) + " |")
    print()
    for name in DEVICES:
        for kind in ("plain", "remat"):
            at_batch = (f"smallest fsdp {first_fit[(name, kind)][0]} at this micro-batch "
                        f"({first_fit[(name, kind)][1]:g} rows/device)" if (name, kind) in first_fit
                        else "no fsdp size fits this micro-batch")
            one = (f"smallest fsdp {first_row[(name, kind)]} for one row of {T} tokens (raise grad_accum)"
                   if (name, kind) in first_row else "not even one row per device: shard the sequence axis")
            print(f"{name}, {kind}: {at_batch}; {one}")


if __name__ == "__main__":
    main()
