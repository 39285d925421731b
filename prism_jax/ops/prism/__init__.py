"""The PRISM recurrence: one public function, several interchangeable forms.

    S_t = exp(g_t) (I - beta_t^0 k_t^0 k_t^0T) S_{t-1} + sum_{l<L} beta_t^l k_t^l v_t^lT
    o_t = scale * S_t^T q_t

Forms (`impl=`), all with this signature and the same results:
  "reference"  token-by-token `lax.scan` in float32: the readable definition; O(T) sequential steps.
  "scan"       `lax.associative_scan` over per-token (A_t, B_t); K x K and K x V per token: tests, small K.
  "chunk"      exact chunkwise-parallel form (matmuls + one triangular solve per chunk): the default;
               `inter_chunk="scan" | "associative"` picks the pass that joins chunks.
  "pallas"     fused Pallas kernels (GPU / TPU; interpret mode on CPU), see `pallas_kernels`.
  "auto"       "pallas" where the kernels are the measured fast path (`resolve_impl`: a Hopper GPU, 16-bit
               inputs, K, V in (64, 128), the Mosaic GPU pipeline), else "chunk".
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from prism_jax.ops.prism.chunk import prism_chunk
from prism_jax.ops.prism.recurrent import prism_step
from prism_jax.ops.prism.reference import prism_reference
from prism_jax.ops.prism.scan import prism_scan

IMPLS = ("reference", "scan", "chunk", "pallas", "auto")
INTER_CHUNK = ("scan", "associative")

__all__ = ["IMPLS", "prism_recurrence", "prism_step", "check_inputs", "pallas_option_names", "resolve_impl"]
# prism_pallas arguments that prism_recurrence sets itself (not `pallas_options`).
_SET_HERE = frozenset({"q", "k", "v", "beta", "g", "scale", "initial_state", "segment_ids", "chunk_size"})


def pallas_option_names() -> tuple:
    """The keyword arguments of `pallas_kernels.prism_pallas` that `pallas_options` may set (kernel, bwd,
    mosaic_stages, mosaic_options, block sizes, ...): all but those `prism_recurrence` sets itself."""
    import inspect

    from pallas_kernels import prism_pallas  # lazy: kernels are optional at import time

    return tuple(n for n in inspect.signature(prism_pallas).parameters if n not in _SET_HERE)


def resolve_impl(impl, dtype, K, V, L, chunk_size=None, *, backend=None, hopper=None):
    """The form `impl` runs as: "auto" -> "pallas" on a Hopper GPU where `pallas_kernels.auto_kernel`
    takes the Mosaic GPU pipeline (16-bit inputs, K, V in (64, 128), chunk_size None or 64: 4-10x our
    XLA chunk form in docs/benchmarks.md), else "chunk" (CPU; the TPU kernels have not yet run on a TPU;
    other GPUs and shapes are untimed there). Other impls are returned as given.
    backend: None = `jax.default_backend()`; hopper: None detects the default device."""
    if impl != "auto":
        return impl
    import jax

    if (backend or jax.default_backend()) != "gpu":
        return "chunk"
    from pallas_kernels import auto_kernel  # lazy: kernels are optional at import time

    return "pallas" if auto_kernel(dtype, K, V, L, chunk_size, "gpu", hopper=hopper) == "mosaic" else "chunk"


def check_pallas_options(pallas_options, impl, where="prism_recurrence"):
    """ValueError unless `pallas_options` is None or a dict of `pallas_option_names` and impl is "pallas"
    (or "auto", where they apply when it takes the kernels) where it is not empty."""
    if pallas_options is None:
        return
    if not isinstance(pallas_options, dict):
        raise ValueError(f"{where}: `pallas_options` is {pallas_options!r}, expected None or a dict of "
                         f"prism_pallas keyword arguments")
    if pallas_options and impl not in ("pallas", "auto"):
        raise ValueError(f"{where}: `pallas_options` {sorted(pallas_options)} apply to impl='pallas' or 'auto', "
                         f"not {impl!r}")
    allowed = pallas_option_names()
    unknown = sorted(set(pallas_options) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: `pallas_options` has {unknown}, expected some of {list(allowed)}")


def _shape_error(name, got, expected):
    return ValueError(f"prism_recurrence: `{name}` has shape {tuple(got)}, expected {expected}")


def check_inputs(q, k, v, beta, g, initial_state=None, segment_ids=None):
    """Validate shapes at trace time. Returns (B, T, H, L, K, V)."""
    if q.ndim != 4:
        raise _shape_error("q", q.shape, "[B, T, H, K] (rank 4)")
    B, T, H, K = q.shape
    if k.ndim != 5:
        raise _shape_error("k", k.shape, "[B, T, H, L, K] (rank 5)")
    L = k.shape[3]
    if L < 1:
        raise _shape_error("k", k.shape, "L >= 1 write keys on axis 3")
    if k.shape != (B, T, H, L, K):
        raise _shape_error("k", k.shape, f"[B, T, H, L, K] = {(B, T, H, L, K)} (from q and k's L)")
    if v.ndim != 5:
        raise _shape_error("v", v.shape, "[B, T, H, L, V] (rank 5)")
    V = v.shape[4]
    if v.shape[:4] != (B, T, H, L):
        raise _shape_error("v", v.shape, f"[B, T, H, L, V] = {(B, T, H, L, 'V')}")
    if beta.shape != (B, T, H, L):
        raise _shape_error("beta", beta.shape, f"[B, T, H, L] = {(B, T, H, L)}")
    if g.shape != (B, T, H):
        raise _shape_error("g", g.shape, f"[B, T, H] = {(B, T, H)}")
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise _shape_error("initial_state", initial_state.shape, f"[B, H, K, V] = {(B, H, K, V)}")
    if segment_ids is not None:
        if segment_ids.shape != (B, T):
            raise _shape_error("segment_ids", segment_ids.shape, f"[B, T] = {(B, T)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(
                f"prism_recurrence: `segment_ids` has dtype {segment_ids.dtype}, expected an integer dtype")
    return B, T, H, L, K, V


def prism_recurrence(q, k, v, beta, g, *, scale=None, initial_state=None, output_final_state=False,
                     impl="chunk", chunk_size=None, inter_chunk="scan", segment_ids=None, pallas_options=None):
    """Exact PRISM recurrence over a sequence. With L = 1 this is Gated DeltaNet; with beta = 0 it is
    gated linear attention.

    Args:
      q:    [B, T, H, K]     queries.
      k:    [B, T, H, L, K]  write keys (L2-normalised by the caller); k[..., 0, :] is also the erase key.
      v:    [B, T, H, L, V]  write values (the solver's update directions).
      beta: [B, T, H, L]     write gates in [0, 1]; beta[..., 0] is also the erase strength.
      g:    [B, T, H]        log decay, <= 0 (alpha = exp(g)).
      scale: output scale, default K ** -0.5.
      initial_state: [B, H, K, V] or None (zeros).
      output_final_state: also return the state after the last token.
      impl: "reference" | "scan" | "chunk" | "pallas" | "auto" (`resolve_impl`: "pallas" on a Hopper GPU
        with 16-bit inputs and K, V in (64, 128), else "chunk").
      chunk_size: chunk length for "chunk" and "pallas", a positive power of two; None picks the form's
        default (64 for "chunk"; the kernels' tuned default for "pallas").
      inter_chunk: "scan" (sequential over chunks) or "associative" (log-depth), for "chunk".
      segment_ids: [B, T] int or None; where it changes between t-1 and t the state is reset to zero
        before token t (packed documents).
      pallas_options: None or a dict of further `pallas_kernels.prism_pallas` keyword arguments for
        impl="pallas" (`pallas_option_names`: kernel, bwd, mosaic_stages, mosaic_options, block sizes).
    Returns:
      o: [B, T, H, V] in v's dtype; final_state: [B, H, K, V] float32 (float64 for float64
        inputs), or None unless asked for.
    """
    B, T, H, L, K, V = check_inputs(q, k, v, beta, g, initial_state, segment_ids)
    if impl not in IMPLS:
        raise ValueError(f"prism_recurrence: `impl` is {impl!r}, expected one of {IMPLS}")
    power_of_two = isinstance(chunk_size, int) and chunk_size > 0 and chunk_size & (chunk_size - 1) == 0
    if chunk_size is not None and not power_of_two:
        raise ValueError(
            f"prism_recurrence: `chunk_size` is {chunk_size!r}, expected a positive power of two")
    if inter_chunk not in INTER_CHUNK:
        raise ValueError(f"prism_recurrence: `inter_chunk` is {inter_chunk!r}, expected one of {INTER_CHUNK}")
    check_pallas_options(pallas_options, impl)
    impl = resolve_impl(impl, q.dtype, K, V, L, chunk_size)
    if scale is None:
        scale = K ** -0.5
    out_dtype = v.dtype
    if impl == "pallas":
        options = dict(pallas_options or {})
        if chunk_size is not None:
            options["chunk_size"] = chunk_size
        python_scale = isinstance(scale, numbers.Real) and not isinstance(scale, bool)
        frozen = _freeze(options) if python_scale else None
        if frozen is None:  # an array scale or unhashable options: traced in place
            from pallas_kernels import prism_pallas  # lazy: kernels are optional at import time

            o, final = prism_pallas(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                    segment_ids=segment_ids, **options)
        else:
            o, final = _prism_pallas_shared(q, k, v, beta, g, initial_state, segment_ids, float(scale), frozen)
        return o.astype(out_dtype), (final if output_final_state else None)
    # float32 at least (bf16 inputs accumulate in fp32); float64 inputs stay float64 (tests).
    cdt = jnp.result_type(jnp.float32, q.dtype, k.dtype, v.dtype, beta.dtype, g.dtype)
    q, k, v, beta, g = (x.astype(cdt) for x in (q, k, v, beta, g))
    s0 = jnp.zeros((B, H, K, V), cdt) if initial_state is None else initial_state.astype(cdt)
    kw = dict(scale=scale, initial_state=s0, segment_ids=segment_ids)
    if impl == "reference":
        o, final = prism_reference(q, k, v, beta, g, **kw)
    elif impl == "scan":
        o, final = prism_scan(q, k, v, beta, g, **kw)
    else:
        o, final = prism_chunk(q, k, v, beta, g, chunk_size=chunk_size or 64, inter_chunk=inter_chunk, **kw)
    return o.astype(out_dtype), (final if output_final_state else None)


def _freeze(obj):
    """A hashable stand-in for pallas options (nested dicts / lists / tuples of hashables), or None where
    some leaf is not hashable."""
    try:
        return _freeze_or_raise(obj)
    except TypeError:
        return None


def _freeze_or_raise(obj):
    if isinstance(obj, dict):
        return ("dict", tuple(sorted((str(k), _freeze_or_raise(v)) for k, v in obj.items())))
    if type(obj) in (list, tuple):
        return (type(obj).__name__, tuple(_freeze_or_raise(x) for x in obj))
    hash(obj)  # TypeError for arrays and other unhashables
    return ("value", obj)


def _thaw(frozen):
    tag, body = frozen
    if tag == "dict":
        return {k: _thaw(v) for k, v in body}
    if tag in ("list", "tuple"):
        parts = [_thaw(x) for x in body]
        return parts if tag == "list" else tuple(parts)
    return body


def _call_prism_pallas(q, k, v, beta, g, initial_state, segment_ids, scale, frozen_options):
    from pallas_kernels import prism_pallas

    return prism_pallas(q, k, v, beta, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                        **_thaw(frozen_options))


# `prism_pallas` behind one module-level jit: every layer of a model with the same shapes and options reuses
# one trace and one lowering of the kernels. Their lowering for CUDA takes seconds per call, so an unrolled
# 12-layer model would otherwise lower them 12 times (minutes of compile).
_prism_pallas_shared = jax.jit(_call_prism_pallas, static_argnums=(7, 8))
