"""Pallas kernels for the PRISM recurrence: `prism_pallas`, the `impl="pallas"` form of `prism_recurrence`.

    GPU  -> `gpu/forward.py`, Pallas with the Triton lowering
    TPU  -> `tpu/forward.py`, Pallas Mosaic TPU (sequential chunk grid axis, state in VMEM scratch)
    CPU  -> the GPU kernel in interpret mode (so CI runs the kernel code)

Gradients come from `jax.custom_vjp`: the forward kernel saves each chunk's start state, and the
backward (`backward.py`, plain JAX) recomputes chunk quantities from them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import backward as _backward
from prism_jax.ops.prism import check_inputs
from pallas_kernels.common import Prepared, prepare

__all__ = ["prism_pallas", "check_blocks"]

_SIZES = (16, 32, 64, 128, 256)


def _platform(platform):
    return jax.default_backend() if platform is None else platform


def check_blocks(K, V, chunk_size, block_v, platform):
    """Raises ValueError for shapes the kernels do not support (before anything compiles)."""
    if K not in _SIZES:
        raise ValueError(f"prism_pallas: key dim `K` = {K} (last axis of `q` and `k`), expected one of {_SIZES}")
    if V not in _SIZES:
        raise ValueError(f"prism_pallas: value dim `V` = {V} (last axis of `v`), expected one of {_SIZES}")
    if chunk_size not in (16, 32, 64, 128):
        raise ValueError(f"prism_pallas: `chunk_size` = {chunk_size}, expected one of (16, 32, 64, 128)")
    if block_v is not None and (block_v not in _SIZES or V % block_v):
        raise ValueError(f"prism_pallas: `block_v` = {block_v}, expected a power of two >= 16 dividing V = {V}")
    if platform not in ("gpu", "cuda", "rocm", "tpu", "cpu"):
        raise ValueError(f"prism_pallas: platform {platform!r} has no PRISM kernel (gpu, tpu, cpu)")


def _forward(x: Prepared, *, scale, chunk_size, platform, block_v, num_warps, num_stages):
    if platform == "tpu":
        from pallas_kernels.tpu.forward import forward as tpu_forward

        return tpu_forward(x, scale=scale, chunk_size=chunk_size, block_v=block_v)
    if platform == "tpu-interpret":
        from pallas_kernels.tpu.forward import forward as tpu_forward

        return tpu_forward(x, scale=scale, chunk_size=chunk_size, block_v=block_v, interpret=True)
    from pallas_kernels.gpu.forward import forward as gpu_forward

    return gpu_forward(x, scale=scale, chunk_size=chunk_size, block_v=block_v, num_warps=num_warps,
                       num_stages=num_stages, interpret=platform == "cpu")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(opts, q, k, v, beta, g, r, rm1, s0):
    o, final, _ = _forward(Prepared(q, k, v, beta, g, r, rm1, s0), **opts)
    return o, final


def _core_fwd(opts, q, k, v, beta, g, r, rm1, s0):
    x = Prepared(q, k, v, beta, g, r, rm1, s0)
    o, final, starts = _forward(x, **opts)
    return (o, final), (x, starts)


def _core_bwd(opts, res, cot):
    x, starts = res
    do, dfinal = cot
    dq, dk, dv, dbeta, dg, ds0 = _backward.backward(x, starts, do, dfinal, scale=opts["scale"],
                                          chunk_size=opts["chunk_size"])
    cast = lambda d, ref: d.astype(ref.dtype)
    return (cast(dq, x.q), cast(dk, x.k), cast(dv, x.v), cast(dbeta, x.beta), cast(dg, x.g),
            None, None, ds0)


_core.defvjp(_core_fwd, _core_bwd)


def prism_pallas(q, k, v, beta, g, *, scale, initial_state=None, chunk_size=64, segment_ids=None,
                 block_v=None, num_warps=None, num_stages=None, platform=None):
    """PRISM recurrence with fused Pallas kernels. Shapes as in `prism_recurrence`:

    q [B, T, H, K], k [B, T, H, L, K], v [B, T, H, L, V], beta [B, T, H, L], g [B, T, H],
    initial_state [B, H, K, V] or None, segment_ids [B, T] int or None.
    Block kwargs: block_v (value columns per program, default V), num_warps / num_stages (Triton);
    platform: None (jax.default_backend()), "gpu", "tpu", "cpu" (GPU kernel, interpret mode) or
    "tpu-interpret" (TPU kernel, interpret mode; tests).
    Returns (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32); differentiable.
    """
    B, T, H, L, K, V = check_inputs(q, k, v, beta, g, initial_state, segment_ids)
    platform = _platform(platform)
    check_blocks(K, V, chunk_size, block_v, "tpu" if platform == "tpu-interpret" else platform)
    if platform in ("cuda", "rocm"):
        platform = "gpu"
    x = prepare(q, k, v, beta, g, initial_state, segment_ids, chunk_size)
    opts = dict(scale=float(scale), chunk_size=chunk_size, platform=platform, block_v=block_v,
                num_warps=num_warps, num_stages=num_stages)
    o, final = _core(_Opts(opts), *x)
    return o[:, :T], final


class _Opts(dict):
    """Static kernel options, hashable so that they can be a custom_vjp non-differentiable argument."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))
