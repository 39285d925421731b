"""Exact PRISM through flash-linear-attention's DPLR delta-rule kernel on an L*T-long interleaved sequence.

The peer row of issue 5's kernel table: "exact PRISM L = 2 today". One PRISM token with L writes becomes L
steps of fla's diagonal-plus-low-rank (DPLR) recurrence (fla-core 0.6.0,
`fla.ops.generalized_delta_rule.dplr.chunk_dplr_delta_rule`; layout [B, T, H, *], state [B, H, K, V]):

    S_t = diag(exp(gk_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T        o_t = scale * S_t^T q_t

(the low-rank term reads the undecayed previous state). PRISM's token (prism-math.md section 1)

    S_t = exp(g_t) (I - beta_t^0 k_t^0 k_t^0T) S_{t-1} + sum_l beta_t^l k_t^l v_t^lT

is, at step l = 0: gk = g_t (on every key), a = -k^0, b = exp(g_t) beta^0 k^0, k = k^0, v = beta^0 v^0;
at steps l = 1..L-1 pure writes: gk = 0, a = b = 0, k = k^l, v = beta^l v^l. The query sits on the last step
(zeros elsewhere) and the token's output is every L-th output.

    python benchmarks/dplr_peer.py --out DIR [--lengths 2048,8192,32768] [--writes 1,2,3] [--reps 10]
           [--budget_s 300] [--lower_bound -0.3] [--fla_chunk_size 64]

On the GPU with torch + fla-core: times forward and forward+backward (torch autograd, all six DPLR inputs
need grad) of the interleaved call, median of --reps after 2 warm-ups with CUDA events; the interleaving
itself is not timed. Checks the de-interleaved output and the input gradients (mapped back to PRISM's q, k,
v, beta, g through the vjp of `interleave`) against our `prism_recurrence(impl="chunk")` in float32 on the
same bf16-rounded inputs (benchmarks/kernels.py's `inputs` and `reference`). Without torch / fla (or a
CUDA device) it prints a note instead of rows.

Shapes for fla: bf16 q, k, v, a, b and float32 gk; the interleaved length is padded to a multiple of 64
with identity steps (all zeros), a no-op at the benchmark's lengths. fla's defaults pick chunk 16;
--lower_bound -0.3 (kernels.inputs draws g in [-0.3, -0.01]) licenses its chunk-64 tensor-core scheme,
though the pure-write steps have gk = 0 where fla documents gk < 0: the rel err columns say whether it holds.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # JAX (the reference) and torch (the peer) share the GPU: JAX must not take 75%
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

PRISM_GRADS = ("q", "k", "v", "beta", "g")
DPLR_ARGS = ("q", "k", "v", "a", "b", "gk")


def _xp(x):
    return np if isinstance(x, np.ndarray) else jnp


def interleave(q, k, v, beta, g, scale=None, pad_to=1):
    """PRISM inputs -> fla DPLR inputs on an L*T-long sequence (NumPy in, NumPy out; JAX in, JAX out).

    Args:
      q: [B, T, H, K]; k: [B, T, H, L, K] (k[..., 0, :] is the erase key); v: [B, T, H, L, V];
      beta: [B, T, H, L] (beta[..., 0] is the erase strength); g: [B, T, H] log-decay <= 0.
      scale: output scale, default K ** -0.5 (returned unchanged: fla takes it as an argument).
      pad_to: the interleaved length is padded up to a multiple of this with identity steps (all zeros),
        which change no output before them.
    Returns:
      dict q, k, a, b [B, N, H, K] in k's dtype (q in q's), v [B, N, H, V] in v's dtype, gk [B, N, H, K]
      in g's dtype, scale; N = L*T rounded up to pad_to. Step t*L + l is write l of token t.
      Products (beta * v, exp(g) * beta * k) are formed in float32 (or float64) and rounded once.
    """
    xp = _xp(k)
    B, T, H, L, K = k.shape
    if q.shape != (B, T, H, K):
        raise ValueError(f"`q` must have shape {(B, T, H, K)} (from k {k.shape}), got {q.shape}")
    if v.shape[:4] != (B, T, H, L):
        raise ValueError(f"`v` must have shape {(B, T, H, L)} + (V,), got {v.shape}")
    if beta.shape != (B, T, H, L):
        raise ValueError(f"`beta` must have shape {(B, T, H, L)}, got {beta.shape}")
    if g.shape != (B, T, H):
        raise ValueError(f"`g` must have shape {(B, T, H)}, got {g.shape}")
    scale = K ** -0.5 if scale is None else scale
    acc = xp.result_type(xp.float32, k.dtype, v.dtype, beta.dtype, g.dtype)
    rest = lambda x: xp.zeros((B, T, L - 1) + x.shape[2:], x.dtype)  # steps 1..L-1 of a per-token input
    first = lambda x: xp.concatenate([x[:, :, None], rest(x)], axis=2)  # [B, T, H, *] on step 0 only

    def steps(x):  # [B, T, L, H, D] -> [B, N, H, D]
        x = x.reshape((B, T * L) + x.shape[3:])
        n = -(-T * L // pad_to) * pad_to
        if n == T * L:
            return x
        return xp.concatenate([x, xp.zeros((B, n - T * L) + x.shape[2:], x.dtype)], axis=1)

    g_dtype = g.dtype
    k0, b0, g = k[:, :, :, 0].astype(acc), beta[:, :, :, 0].astype(acc), g.astype(acc)
    q_last = xp.concatenate([rest(q), q[:, :, None]], axis=2)
    v_scaled = (v.astype(acc) * beta.astype(acc)[..., None]).astype(v.dtype)
    b = (xp.exp(g)[..., None] * b0[..., None] * k0).astype(k.dtype)
    gk = xp.broadcast_to(g[..., None], (B, T, H, K)).astype(g_dtype)
    return dict(q=steps(q_last), k=steps(xp.moveaxis(k, 3, 2)), v=steps(xp.moveaxis(v_scaled, 3, 2)),
                a=steps(first(-k[:, :, :, 0])), b=steps(first(b)), gk=steps(first(gk)), scale=scale)


def deinterleave(o, writes, length=None):
    """DPLR outputs [B, N, H, V] -> PRISM outputs [B, T, H, V]: the last step of each token.

    length: T (needed when the sequence was padded); default N // writes."""
    B, N, H, V = o.shape
    T = N // writes if length is None else length
    if T * writes > N:
        raise ValueError(f"`o` has {N} steps, fewer than length * writes = {T * writes}")
    return o[:, :T * writes].reshape(B, T, writes, H, V)[:, :, writes - 1]


def spread_last(do, writes, n_steps=None):
    """The transpose of `deinterleave`: [B, T, H, V] cotangents on the last step of each token, zeros
    elsewhere, padded with zeros to n_steps -> [B, N, H, V]."""
    xp = _xp(do)
    B, T, H, V = do.shape
    x = xp.concatenate([xp.zeros((B, T, writes - 1, H, V), do.dtype), do[:, :, None]], axis=2)
    x = x.reshape(B, T * writes, H, V)
    n = T * writes if n_steps is None else n_steps
    return xp.concatenate([x, xp.zeros((B, n - T * writes, H, V), do.dtype)], axis=1) if n > T * writes else x


def dplr_recurrence_np(q, k, v, a, b, gk, scale, initial_state=None):
    """fla's DPLR recurrence step by step, in the inputs' precision (float64 NumPy in the tests).

    Args: q, k, a, b, gk [B, N, H, K]; v [B, N, H, V]; initial_state [B, H, K, V] or None.
    Per step: S = exp(gk)[:, None] * S + b (a^T S) + k v^T (the low-rank term reads the previous, undecayed
    S); o = scale * S^T q. Also accepts JAX arrays (a Python loop of jnp ops); `dplr_step` is one step.
    Returns: (o [B, N, H, V], final state [B, H, K, V]).
    """
    xp = _xp(k)
    B, N, H, K = k.shape
    V = v.shape[-1]
    S = xp.zeros((B, H, K, V), k.dtype) if initial_state is None else initial_state.astype(k.dtype)
    outs = []
    for t in range(N):
        o, S = dplr_step(S, q[:, t], k[:, t], v[:, t], a[:, t], b[:, t], gk[:, t], scale)
        outs.append(o)
    return xp.stack(outs, axis=1), S


def dplr_step(S, q, k, v, a, b, gk, scale):
    """One DPLR step: S [B, H, K, V]; q, k, a, b, gk [B, H, K]; v [B, H, V] -> (o [B, H, V], new S)."""
    xp = _xp(k)
    aS = xp.einsum("bhk,bhkv->bhv", a, S)
    S = xp.exp(gk)[..., None] * S + b[..., None] * aS[:, :, None] + k[..., None] * v[:, :, None]
    return scale * xp.einsum("bhk,bhkv->bhv", q, S), S


# --- GPU (torch + fla) -----------------------------------------------------------------------------------

def _kernels():
    """benchmarks/kernels.py (inputs, reference, rel), imported from beside this file."""
    here = str(pathlib.Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import kernels

    return kernels


def to_torch(x, device="cuda"):
    """A JAX / NumPy array -> a torch tensor on `device` (bf16 through an int16 view: torch does not read
    ml_dtypes' bfloat16)."""
    import torch

    x = np.asarray(x)
    if x.dtype == jnp.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


def to_numpy(t):
    """A torch tensor -> float32 NumPy."""
    return t.detach().float().cpu().numpy()


def cuda_ms(fn, reps):
    """Median milliseconds of `reps` calls after 2 warm-ups (the first also autotunes fla's kernels)."""
    import torch

    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_gib(fn):
    """torch.cuda.max_memory_allocated over one call (live inputs included), GiB."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def prism_grads_from_dplr(xs, dplr_grads, pad_to):
    """Chain rule through `interleave`: DPLR input gradients -> gradients of PRISM's q, k, v, beta, g.

    xs: the PRISM inputs (any float dtype; linearised in float32); dplr_grads: dict q, k, v, a, b, gk of
    float32 arrays shaped like interleave's outputs."""
    xs32 = [jnp.asarray(x, jnp.float32) for x in xs]
    cts = {n: jnp.asarray(dplr_grads[n], jnp.float32) for n in DPLR_ARGS}
    return _pull_back(xs32, cts, pad_to)


def _arrays(*xs, pad_to):
    return {n: d for n, d in interleave(*xs, pad_to=pad_to).items() if n != "scale"}


@jax.jit(static_argnums=1)
def _interleave_arrays(xs, pad_to):
    return _arrays(*xs, pad_to=pad_to)


@jax.jit(static_argnums=2)
def _pull_back(xs, cts, pad_to):
    return jax.vjp(lambda *x: _arrays(*x, pad_to=pad_to), *xs)[1](cts)


def check(xs, do, o_dplr, dplr_grads, writes, pad_to, ref):
    """Relative L2 errors of the de-interleaved output and of the mapped gradients against `ref` =
    (o, (dq, dk, dv, dbeta, dg)) of our float32 chunk form (kernels.reference)."""
    rel = _kernels().rel
    o_ref, grads_ref = ref
    out = dict(fwd_rel_err=rel(deinterleave(jnp.asarray(o_dplr), writes, xs[0].shape[1]), o_ref))
    if dplr_grads is not None:
        grads = prism_grads_from_dplr(xs, dplr_grads, pad_to)
        errs = {n: rel(a, b) for n, a, b in zip(PRISM_GRADS, grads, grads_ref)}
        out.update(grad_rel_err=errs, grad_rel_err_max=max(errs.values()))
    return out


def fla_runner(fla_kw):
    """run(d, do, reps) -> (timings dict, o, grads or None) with fla's chunk_dplr_delta_rule on the GPU.

    d: interleave's arrays (q, k, v, a, b, gk) and scale; do: [B, N, H, V] output cotangent (spread_last).
    Timings: fwd_ms, fwd_mem_gib, fwd_bwd_ms, fwd_bwd_mem_gib, or fwd_bwd_error when the backward raises.
    o: float32 NumPy [B, N, H, V]; grads: dict q, k, v, a, b, gk of float32 NumPy arrays."""
    import torch
    from fla.ops.generalized_delta_rule.dplr import chunk_dplr_delta_rule

    def run(d, do, reps):
        tin = {n: to_torch(d[n]).requires_grad_() for n in DPLR_ARGS}
        do_t, scale = to_torch(do), d["scale"]

        def fwd():
            with torch.no_grad():
                return chunk_dplr_delta_rule(**tin, scale=scale, **fla_kw)[0]

        def fwd_bwd():
            o = chunk_dplr_delta_rule(**tin, scale=scale, **fla_kw)[0]
            return o, torch.autograd.grad(o, [tin[n] for n in DPLR_ARGS], do_t)

        out = dict(fwd_ms=cuda_ms(fwd, reps), fwd_mem_gib=peak_gib(fwd))
        o, grads = to_numpy(fwd()), None
        try:
            out.update(fwd_bwd_ms=cuda_ms(fwd_bwd, reps), fwd_bwd_mem_gib=peak_gib(fwd_bwd))
            o_t, grads_t = fwd_bwd()
            o, grads = to_numpy(o_t), {n: to_numpy(gr) for n, gr in zip(DPLR_ARGS, grads_t)}
            del o_t, grads_t
        except Exception as e:  # fla's backward may refuse this Triton / GPU: keep the forward
            out["fwd_bwd_error"] = f"{type(e).__name__}: {str(e)[:400]}"
        del tin, do_t
        torch.cuda.empty_cache()
        return out, o, grads

    return run


def measure_point(L, T, shape, reps, runner, pad_to=64, dtype=jnp.bfloat16, reference=None, refs=None):
    """One row: `runner` (fla_runner) on the interleaved kernels.inputs(PRNGKey(T + L), ...), checked
    against `reference` (default kernels.reference: our float32 chunk form) on the same rounded inputs.

    refs: kernels.py's cache of the last reference (dict key=(T, L), val=(o, grads)); the inputs are the
    same as its rows' at that (T, L) (bf16), so a cached one is reused and a new one is stored there."""
    kernels = _kernels()
    H, K, V = shape["heads"], shape["dk"], shape["dv"]
    B = shape["tokens"] // T
    xs, do = kernels.inputs(jax.random.PRNGKey(T + L), B, T, L, H, K, V, dtype)
    refs = {} if refs is None else refs
    if refs.get("key") != (T, L):
        refs.clear()  # frees the previous shape's arrays first
        refs.update(key=(T, L), val=(reference or kernels.reference)(xs, do))
    ref = refs["val"]
    d = dict(_interleave_arrays(xs, pad_to), scale=K ** -0.5)
    N = d["q"].shape[1]
    row = dict(impl="dplr_fla", bwd=None, L=L, T=T, B=B, steps=N)
    timings, o, dplr_grads = runner(d, spread_last(do, L, N), reps)
    del d
    row.update(timings)
    flops = kernels.fwd_flops(T, B, L, H, K, V)  # PRISM's useful FLOPs, as for our rows (fwd+bwd = 3x)
    if "fwd_ms" in row:
        row["fwd_tflops"] = flops / (row["fwd_ms"] * 1e-3) / 1e12
    if "fwd_bwd_ms" in row:
        row["fwd_bwd_tflops"] = 3 * flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    row.update(check(xs, do, o, dplr_grads, L, pad_to, ref))
    return row


def run_dplr(lengths, writes, reps, shape, budget_s, fla_kw=None, on_row=None, refs=None):
    """Rows for the DPLR-interleaved exact PRISM peer, on the GPU with torch + fla-core.

    Args:
      lengths: T values; B = shape["tokens"] // T. writes: L values. reps: timed runs per median.
      shape: dict tokens, heads, dk, dv (kernels.SHAPE). budget_s: no point starts after this many seconds
        (a point is skipped when the last one's time would overrun it).
      fla_kw: extra chunk_dplr_delta_rule keywords, e.g. dict(lower_bound=-0.3) (fla's faster
        tensor-core A stage with chunk 64; the check row tells whether it stays correct) or chunk_size.
      on_row: called with each row (or skip / note dict) as it is made.
      refs: kernels.py's reference cache (see measure_point), shared to skip recompiling a reference.
    Returns:
      list of dicts. Measured: impl "dplr_fla", bwd None, L, T, B, steps (interleaved length), fla_kw,
      fwd_ms, fwd_mem_gib, fwd_bwd_ms, fwd_bwd_mem_gib (torch peak allocated, GiB, inputs included),
      fwd_tflops, fwd_bwd_tflops (PRISM's useful FLOPs, kernels.fwd_flops, over the time), fwd_rel_err,
      grad_rel_err {q, k, v, beta, g}, grad_rel_err_max, seconds: the keys of kernels.py's rows. A failed
      backward gives fwd_bwd_error instead of the fwd_bwd and grad entries; a failed point gives error.
      Not measured: dict(impl="dplr_fla", L, T, skipped=reason), or dict(impl="dplr_fla", note=...) as
      the only row when torch / fla do not import or see no GPU.
    Memory: torch allocates beside JAX in this process. JAX preallocates 75% of the GPU at its first
    GPU use unless XLA_PYTHON_CLIENT_PREALLOCATE=false (this script's __main__ sets it); the L = 3,
    T = 32K point needs some tens of GiB on the torch side.
    """
    fla_kw = dict(fla_kw or {})
    emit = on_row or (lambda r: None)
    try:
        import torch
        from fla.ops.generalized_delta_rule.dplr import chunk_dplr_delta_rule  # noqa: F401

        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        runner = fla_runner(fla_kw)
    except Exception as e:
        row = dict(impl="dplr_fla", note=f"DPLR peer skipped: torch / fla-core unavailable ({type(e).__name__}: {e})")
        emit(row)
        return [row]
    start, rows, last = time.time(), [], {}
    specs = [(L, T) for L in [w for w in writes if w == 2] + [w for w in writes if w != 2] for T in lengths]
    for L, T in specs:
        guess = last.get(T, 30.0)
        if time.time() - start + 1.2 * guess > budget_s:
            row = dict(impl="dplr_fla", L=L, T=T, skipped="time budget")
        else:
            t0 = time.time()
            try:
                row = dict(measure_point(L, T, shape, reps, runner, refs=refs), fla_kw=fla_kw)
            except Exception as e:
                row = dict(impl="dplr_fla", L=L, T=T, error=f"{type(e).__name__}: {str(e)[:400]}")
                torch.cuda.empty_cache()
            row["seconds"] = round(time.time() - t0, 1)
            last[T] = time.time() - t0
        rows.append(row)
        emit(row)
    return rows


def markdown(rows):
    """The rows as a markdown table (errors, skips and notes as lines below it)."""
    f = lambda x, p=".2f": "-" if x is None else format(x, p)
    lines = ["| impl | L | T | steps | fwd ms | fwd+bwd ms | mem fwd / fwd+bwd GiB | fwd rel err "
             "| grad rel err (max; q k v beta g) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "fwd_ms" not in r:
            continue
        ge = r.get("grad_rel_err")
        grad = (f"{r['grad_rel_err_max']:.1e}; " + " ".join(f"{ge[n]:.1e}" for n in PRISM_GRADS)) if ge else "-"
        lines.append(f"| {r['impl']} | {r['L']} | {r['T']} | {r['steps']} | {f(r['fwd_ms'])} | "
                     f"{f(r.get('fwd_bwd_ms'))} | {f(r['fwd_mem_gib'])} / {f(r.get('fwd_bwd_mem_gib'))} | "
                     f"{r['fwd_rel_err']:.1e} | {grad} |")
    for r in rows:
        if "fwd_ms" not in r or "fwd_bwd_error" in r:
            lines.append("NOTE " + json.dumps(r))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--lengths", default="2048,8192,32768")
    ap.add_argument("--writes", default="1,2,3")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--budget_s", type=float, default=300)
    ap.add_argument("--lower_bound", type=float, default=None, help="fla's gate bound (tensor-core A stage)")
    ap.add_argument("--fla_chunk_size", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=32768)
    args = ap.parse_args()
    shape = dict(tokens=args.tokens, heads=16, dk=128, dv=128)
    fla_kw = {k: v for k, v in (("lower_bound", args.lower_bound), ("chunk_size", args.fla_chunk_size))
              if v is not None}
    print(jax.devices(), flush=True)
    rows = run_dplr([int(t) for t in args.lengths.split(",")], [int(w) for w in args.writes.split(",")],
                    args.reps, shape, args.budget_s, fla_kw, on_row=lambda r: print(json.dumps(r), flush=True))
    with open(os.path.join(args.out, "dplr_peer.json"), "w") as fh:
        json.dump(dict(shape=shape, fla_kw=fla_kw, rows=rows), fh, indent=1)
    print(f"\nB*T = {shape['tokens']}, H = {shape['heads']}, K = {shape['dk']}, V = {shape['dv']}, bf16 inputs "
          f"(gk float32); fla chunk_dplr_delta_rule {fla_kw or 'defaults'}\n")
    print(markdown(rows))


if __name__ == "__main__":
    sys.exit(main())
