"""Pallas kernels for the PRISM recurrence: `prism_pallas`, the `impl="pallas"` form of `prism_recurrence`.

    GPU  -> `gpu/split.py` (default) or `gpu/forward.py` (fused), Pallas with the Triton lowering
    TPU  -> `tpu/forward.py` and `tpu/backward.py`, Pallas Mosaic TPU (sequential chunk grid axis, the
            state / its cotangent in VMEM scratch); checked on CPU in TPU interpret mode and by
            lowering for TPU, not yet run on a TPU
    CPU  -> the GPU kernel in interpret mode (so CI runs the kernel code)

Gradients come from `jax.custom_vjp`: the forward kernels save each chunk's start state (and its
triangular inverse), and the backward (`backward.py`) pulls the output cotangent back through them:
a state pull-back kernel, a reverse state pass kernel, then per chunk the hand-derived gradients of
`grads.py` as the Triton kernel `gpu/chunk_grads.py` (`bwd="explicit"`, the default via "auto"), or
the autodiff forms (`bwd="xla"`: vmapped `jax.vjp` in XLA; `bwd="fused"`: that vjp traced inside a
Triton kernel, `gpu/chunk_bwd.py`). On a TPU the default backward is one kernel that walks the chunks
in reverse (`tpu/backward.py`: recompute, per-chunk gradients and the state cotangent's pass in one
step); bwd="explicit" runs the explicit gradients vmapped in XLA there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import backward as _backward
from prism_jax.ops.prism import check_inputs
from pallas_kernels.common import Prepared, matmul_dtype, prepare

__all__ = ["prism_pallas", "check_blocks"]

_SIZES = (16, 32, 64, 128, 256)
_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _platform(platform):
    return jax.default_backend() if platform is None else platform


# Largest chunk tile (chunk_size x max(K, V) elements times the matmul operand's bytes) that the
# Triton kernels fit in an H200's shared memory: bf16 64 x 128 compiled and ran; float32 64 x 128
# asked for 256 KiB of the 227 KiB there is.
_GPU_TILE_BYTES = 64 * 128 * 2


def check_blocks(K, V, chunk_size, block_v, platform, itemsize=2):
    """Raises ValueError for shapes the kernels do not support (before anything compiles)."""
    if K not in _SIZES:
        raise ValueError(f"prism_pallas: key dim `K` = {K} (last axis of `q` and `k`), expected one of {_SIZES}")
    if V not in _SIZES:
        raise ValueError(f"prism_pallas: value dim `V` = {V} (last axis of `v`), expected one of {_SIZES}")
    if chunk_size not in (16, 32, 64, 128):
        raise ValueError(f"prism_pallas: `chunk_size` = {chunk_size}, expected one of (16, 32, 64, 128)")
    if block_v is not None and (block_v not in _SIZES or V % block_v):
        raise ValueError(f"prism_pallas: `block_v` = {block_v}, expected a power of two >= 16 dividing V = {V}")
    if platform not in ("gpu", "cuda", "rocm", "cpu", "tpu", "tpu-interpret"):
        raise ValueError(f"prism_pallas: platform {platform!r} has no PRISM kernel (gpu, tpu; cpu runs "
                         "the GPU kernels in interpret mode); use impl='chunk' there")
    if platform in ("gpu", "cuda", "rocm") and chunk_size * max(K, V) * itemsize > _GPU_TILE_BYTES:
        raise ValueError(
            f"prism_pallas: `chunk_size` = {chunk_size} with K = {K}, V = {V} and {itemsize}-byte matmul "
            f"operands needs chunk tiles over the GPU's shared memory; use chunk_size <= "
            f"{_GPU_TILE_BYTES // (max(K, V) * itemsize)}")


def _forward(x: Prepared, *, scale, chunk_size, platform, block_v, num_warps, num_stages, kernel, bwd,
             save_inverse=False, forward_inverse="rows", state_pieces=1, forward_outputs="kernel",
             save_starts=True, mosaic_stages=(), mosaic_options=(), resets=True, **_bwd_block_opts):
    """(o, final, starts, ainv): ainv [B, H, N, C, C] the chunks' (I + m)^{-1} when `save_inverse`
    and the kernel can keep them (the split GPU kernels), else None (the backward recomputes them).
    resets: whether x may hold document resets (segment_ids given); the Mosaic intra kernel skips
    their correction without them."""
    if platform in ("tpu", "tpu-interpret"):
        from pallas_kernels.tpu.forward import forward as tpu_forward

        return tpu_forward(x, scale=scale, chunk_size=chunk_size, save_starts=save_starts,
                           interpret=platform == "tpu-interpret")
    if kernel == "mosaic":
        from pallas_kernels.gpu.mosaic import pipeline

        return pipeline.forward(x, scale=scale, stages=mosaic_stages, inverse=forward_inverse,
                                save_inverse=save_inverse, interpret=platform == "cpu", options=mosaic_options,
                                resets=resets)
    kw = dict(scale=scale, chunk_size=chunk_size, block_v=block_v, num_warps=num_warps,
              num_stages=num_stages, interpret=platform == "cpu")
    if kernel == "fused":
        from pallas_kernels.gpu.forward import forward as gpu_forward

        return (*gpu_forward(x, inverse=forward_inverse, **kw), None)
    from pallas_kernels.gpu.split import forward as split_forward

    in_state = forward_outputs == "state"
    return split_forward(x, save_inverse=save_inverse, inverse=forward_inverse, state_pieces=state_pieces,
                         outputs_in_state=in_state, save_starts=save_starts or not in_state, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(opts, q, k, v, beta, g, r, rm1, s0):
    o, final, _, _ = _forward(Prepared(q, k, v, beta, g, r, rm1, s0), save_starts=False, **opts)
    return o, final


def _core_fwd(opts, q, k, v, beta, g, r, rm1, s0):
    x = Prepared(q, k, v, beta, g, r, rm1, s0)
    save_inverse = opts["bwd"] in ("fused", "explicit") or opts["kernel"] == "mosaic"
    o, final, starts, ainv = _forward(x, save_inverse=save_inverse, **opts)
    return (o, final), (x, starts, ainv)


def _core_bwd(opts, res, cot):
    x, starts, ainv = res
    do, dfinal = cot
    dq, dk, dv, dbeta, dg, ds0 = _gradients(opts, x, starts, ainv, do, dfinal)
    cast = lambda d, ref: d.astype(ref.dtype)
    return (cast(dq, x.q), cast(dk, x.k), cast(dv, x.v), cast(dbeta, x.beta), cast(dg, x.g), None, None, ds0)


def _gradients(opts, x, starts, ainv, do, dfinal):
    """(dq, dk, dv, dbeta, dg, ds0) of the padded inputs by the backward that `opts` names."""
    if opts["platform"] in ("tpu", "tpu-interpret") and opts["bwd"] == "fused":
        from pallas_kernels.tpu.backward import backward as tpu_backward

        return tpu_backward(x, starts, do, dfinal, ainv=ainv, scale=opts["scale"], chunk_size=opts["chunk_size"],
                            interpret=opts["platform"] == "tpu-interpret")
    if opts["kernel"] == "mosaic":
        from pallas_kernels.gpu.mosaic import pipeline

        return pipeline.backward(x, starts, ainv, do, dfinal, scale=opts["scale"], stages=opts["mosaic_stages"],
                                 interpret=opts["platform"] == "cpu", options=opts["mosaic_options"])
    reverse = {"gpu": "gpu", "cpu": "interpret"}.get(opts["platform"], "scan")
    if opts["bwd"] == "explicit":  # TPU: the same hand-derived gradients, vmapped in XLA
        chunk = "explicit-" + ("xla" if reverse == "scan" else reverse)
    else:
        chunk = reverse if opts["bwd"] == "fused" and reverse != "scan" else "xla"
    return _backward.backward(x, starts, do, dfinal, scale=opts["scale"], chunk_size=opts["chunk_size"],
                              reverse=reverse, chunk=chunk, block_v=opts["bwd_block_v"],
                              num_warps=opts["bwd_num_warps"], ainv=ainv, v_split=opts["bwd_v_split"])


_core.defvjp(_core_fwd, _core_bwd)


def auto_backward(n_writes, chunk_size, mm_dtype):
    """The backward `bwd="auto"` picks, from H200 runs (docs/benchmarks.md, session 3: bf16, B*T = 32K,
    H = 16, K = V = 128, fwd+bwd ms at T = 2K): the hand-written "explicit" kernel (chunk 32: L = 1 8.9
    vs 16.9 "xla", L = 2 14.0 vs 21.1, L = 3 24.5 at 8 warps vs 24.1 with less memory, 4.95 vs 7.09 GiB;
    chunk 64: L = 2 36.8 vs 72.5 "fused", L = 3 46.3 vs 56.5 "xla" and 94.6 "fused"). float32 takes
    "xla" except at chunk <= 32 with L <= 2, where the explicit kernel's float32 GPU tests ran."""
    if mm_dtype == jnp.float32 and (chunk_size > 32 or n_writes > 2):
        return "xla"
    return "explicit"


_MOSAIC_SIZES = (64, 128)


def _check_mosaic(q, K, V, L, chunk_size, platform, stages):
    """kernel="mosaic"'s requirements, checked before anything compiles; returns the stages tuple."""
    from pallas_kernels.gpu.mosaic.pipeline import check_stages

    if platform not in ("gpu", "cuda", "cpu"):
        raise ValueError(f"prism_pallas: kernel='mosaic' runs on NVIDIA GPUs (Hopper) and on CPU in "
                         f"interpret mode, not on platform {platform!r}")
    if chunk_size != 64:
        raise ValueError(f"prism_pallas: kernel='mosaic' needs `chunk_size` = 64, got {chunk_size}")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"prism_pallas: kernel='mosaic' needs 16-bit inputs (bfloat16, float16), `q` is "
                         f"{q.dtype}; float32 runs on kernel='split'")
    if K not in _MOSAIC_SIZES or V not in _MOSAIC_SIZES:
        raise ValueError(f"prism_pallas: kernel='mosaic' supports K, V in {_MOSAIC_SIZES}, got K = {K}, V = {V}")
    return check_stages(stages, K, L, q.dtype)


def _is_hopper():
    try:
        return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")
    except RuntimeError:
        return False


def auto_kernel(dtype, K, V, L, chunk_size, platform, *, split_options=False, hopper=None):
    """kernel="auto" (the default): "mosaic" on a Hopper GPU for 16-bit inputs with K, V in (64, 128),
    chunk_size None or 64, no Triton-only option set (`split_options`) and every stage's Mosaic kernel
    but the chunk backward's taking the shape (where the chunk backward's does not, L = 4 at K = 128,
    the hand-derived chunk backward vmapped in XLA stands in: `prism_pallas`; L = 3 at K = 128 takes the
    chunk backward's work split at 32 value columns per CTA);
    else "split".
    H200, bf16, B*T = 32K, H = 16, K = V = 128, fwd+bwd ms (docs/benchmarks.md, session 4): L = 1
    5.49 vs 8.95, L = 2 10.94 vs 13.43 (T = 2K) and 11.67 at 32K vs 19.67 (session 3). Mosaic since
    then (H100, session 10): L = 1 3.85, L = 2 7.03 (T = 2K); L = 3 with the XLA chunk backward 22.65
    vs 27.48 for "split" (one run; 7.17 against 4.95 GiB for the op's fwd+bwd: the XLA backward's
    intermediates), and 53.07 with the Triton chunk backward at chunk 64 standing in. Session 19 (H100,
    output kept): L = 1 3.51, L = 2 7.89, L = 3 13.45 with the Mosaic chunk backward (23.27 with the XLA
    one; our XLA chunk form 53.04).
    hopper: None detects the default device (compute capability 9.x)."""
    from pallas_kernels.gpu.mosaic.pipeline import STAGES, supported_stages

    if (platform not in ("gpu", "cuda") or split_options or chunk_size not in (None, 64)
            or jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            or K not in _MOSAIC_SIZES or V not in _MOSAIC_SIZES):
        return "split"
    if not (_is_hopper() if hopper is None else hopper):
        return "split"
    return "mosaic" if set(STAGES) - set(supported_stages(K, L, dtype)) <= {"grads"} else "split"


def prism_pallas(q, k, v, beta, g, *, scale, initial_state=None, chunk_size=None, segment_ids=None,
                 block_v=None, num_warps=None, num_stages=None, kernel="auto", bwd="auto",
                 bwd_block_v=None, bwd_num_warps=None, platform=None, forward_inverse="blocked8",
                 state_pieces=1, bwd_v_split=None, forward_outputs="kernel", mosaic_stages=None,
                 mosaic_options=None):
    """PRISM recurrence with fused Pallas kernels. Shapes as in `prism_recurrence`:

    q [B, T, H, K], k [B, T, H, L, K], v [B, T, H, L, V], beta [B, T, H, L], g [B, T, H],
    initial_state [B, H, K, V] or None, segment_ids [B, T] int or None.
    chunk_size: None = 64 for kernel "mosaic" and on a TPU, 32 for the Triton kernels (their fastest on an H200
    for bf16, K = V = 128; docs/benchmarks.md).
    kernel: "auto" (default, `auto_kernel`: "mosaic" on Hopper where it is measured faster, else
    "split"), "split", "fused" or "mosaic" (below).
    Block kwargs: block_v (value columns per program of the sequential state pass), num_warps /
    num_stages (Triton); kernel: "split" (the Triton default: parallel solve, sequential state pass,
    parallel outputs; `gpu/split.py`) or "fused" (one kernel per head, `gpu/forward.py`);
    bwd: "xla" (vmapped `jax.vjp` of the chunk math over all chunks, with the Triton state
    pull-back and reverse-pass kernels), "fused" (the per-chunk pull-back as one Triton kernel,
    `gpu/chunk_bwd.py`, with its own bwd_block_v / bwd_num_warps; float32 with K or V >= 128 exceeds
    an H200's shared memory and raises), "explicit": hand-derived chunk gradients (`grads.py`) as one
    Triton kernel (`gpu/chunk_grads.py`: bwd_block_v value columns per step, bwd_v_split programs per
    chunk along V, bwd_num_warps), vmapped in XLA on a TPU; or "auto" (default, `auto_backward`):
    "explicit", except float32 beyond chunk 32 or L = 2, which takes "xla". H200 figures in
    `auto_backward` and docs/benchmarks.md. On a TPU "auto" and "fused" are `tpu/backward.py`, one
    Mosaic TPU kernel for the whole backward (a reverse walk over chunks);
    platform: None (jax.default_backend()), "gpu", "tpu", "cpu" (the GPU kernels in interpret
    mode) or "tpu-interpret" (the TPU kernel in TPU interpret mode; tests).
    GPU forward options (`gpu/split.py`): forward_inverse "rows" (C - 1 substitution steps),
    "blocked" / "blocked8" (default; 16- / 8-row diagonal blocks, merged by matmuls; also in the fused
    kernel; H200, L = 2, T = 2K: forward 4.12 ms blocked8, 4.31 blocked, 4.43-4.64 rows); state_pieces: 1 (one sequential state pass over all chunks) or P > 1 (P pieces' affine
    maps in parallel, composed in order, then each piece's chunks from its start; "auto": P > 1
    only where the plain pass has < 2 programs per SM; split kernel only); forward_outputs: "kernel"
    (a parallel output kernel reads the saved chunk start states) or "state" (the state pass writes
    the outputs as it walks; without differentiation no start states are written; split only).
    block_v=None lets the split state pass use fewer value columns when it has few programs.
    kernel="mosaic": the chunk-64 pipeline of `gpu/mosaic/pipeline.py` (Hopper; 16-bit inputs,
    K, V in (64, 128), chunk_size 64): forward and backward stages in Mosaic GPU (TMA, wgmma);
    mosaic_stages (a subset of its STAGES; None = every stage whose Mosaic kernel takes the shape,
    `pipeline.supported_stages`) picks which, the rest run the Triton kernels at chunk 64 (bwd
    options do not apply), except that with mosaic_stages=None a chunk backward left out (L = 3 at
    K = 128) runs as the hand-derived gradients vmapped in XLA (`mosaic_options={"grads": {"impl":
    "triton"}}` asks for the Triton kernel); mosaic_options {stage: {keyword: value}} passes block
    sizes and other keywords to those stages' kernels (`pipeline.resolve_options`);
    mosaic_options={"outputs": {"fused": True}} has the state pass write the outputs from per-chunk
    factors (formed by the intra kernel; "xla": in XLA) and the reverse
    pass form the pull-back's terms, so neither the outputs nor the pull-back kernel runs
    (the default at L = 1: `pipeline.FUSED_OUTPUTS_WRITES`; False turns it off).
    Returns (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32); differentiable.
    """
    B, T, H, L, K, V = check_inputs(q, k, v, beta, g, initial_state, segment_ids)
    platform = _platform(platform)
    if kernel == "auto":
        split_options = (bwd != "auto" or block_v is not None or num_warps is not None or state_pieces != 1
                         or forward_outputs != "kernel" or bwd_block_v is not None or bwd_v_split is not None)
        kernel = auto_kernel(q.dtype, K, V, L, chunk_size, platform, split_options=split_options)
    if chunk_size is None:
        # TPU: [64, 64] products for a 128-wide MXU rather than [32, 32] ones (not measured: no TPU yet).
        chunk_size = 64 if kernel == "mosaic" or platform in ("tpu", "tpu-interpret") else 32
    check_blocks(K, V, chunk_size, block_v, platform, jnp.dtype(matmul_dtype(q.dtype)).itemsize)
    if kernel not in ("split", "fused", "mosaic"):
        raise ValueError(f"prism_pallas: `kernel` is {kernel!r}, expected 'auto', 'split', 'fused' or 'mosaic'")
    if kernel == "mosaic":
        from pallas_kernels.gpu.mosaic.pipeline import resolve_options

        stages_given = mosaic_stages is not None
        mosaic_stages = _check_mosaic(q, K, V, k.shape[3], chunk_size, platform, mosaic_stages)
        mosaic_options = resolve_options(mosaic_options, mosaic_stages, stages_given)
    if forward_inverse not in ("rows", "blocked", "blocked8"):
        raise ValueError(f"prism_pallas: `forward_inverse` is {forward_inverse!r}, expected 'rows', "
                         "'blocked' or 'blocked8'")
    if (state_pieces != "auto" and (not isinstance(state_pieces, int) or state_pieces < 1)
            or (state_pieces != 1 and kernel != "split")):
        raise ValueError(f"prism_pallas: `state_pieces` = {state_pieces!r}, expected an int >= 1 or "
                         "'auto' (other than 1 only with kernel='split')")
    if forward_outputs not in ("kernel", "state") or (forward_outputs == "state" and kernel != "split"):
        raise ValueError(f"prism_pallas: `forward_outputs` is {forward_outputs!r}, expected 'kernel' or "
                         "'state' (only with kernel='split')")
    if bwd not in ("auto", "fused", "xla", "explicit"):
        raise ValueError(f"prism_pallas: `bwd` is {bwd!r}, expected 'auto', 'fused', 'xla' or 'explicit'")
    if bwd == "auto":
        bwd = "fused" if platform in ("tpu", "tpu-interpret") else auto_backward(L, chunk_size, matmul_dtype(q.dtype))
    if (bwd == "fused" and platform in ("gpu", "cuda", "rocm") and matmul_dtype(q.dtype) == jnp.float32
            and max(K, V) >= 128):
        raise ValueError(f"prism_pallas: bwd='fused' in float32 with K = {K}, V = {V} needs more GPU shared "
                         "memory than an H200 has (measured); use bwd='xla' or bf16 inputs")
    if bwd_block_v is not None and (bwd_block_v not in _SIZES or V % bwd_block_v):
        raise ValueError(f"prism_pallas: `bwd_block_v` = {bwd_block_v}, expected a power of two >= 16 "
                         f"dividing V = {V}")
    if bwd_v_split is not None and (not isinstance(bwd_v_split, int) or bwd_v_split < 1
                                    or V % ((bwd_block_v or min(V, 32)) * bwd_v_split)):
        raise ValueError(f"prism_pallas: `bwd_v_split` = {bwd_v_split!r}, expected an int >= 1 with "
                         f"bwd_block_v x bwd_v_split dividing V = {V}")
    for name, arr in dict(q=q, k=k, v=v, beta=beta, g=g).items():
        if arr.dtype not in _DTYPES:
            raise ValueError(f"prism_pallas: `{name}` has dtype {arr.dtype}, expected one of "
                             "bfloat16, float16, float32 (float64: use impl='reference' or 'chunk')")
    if platform in ("cuda", "rocm"):
        platform = "gpu"
    x = prepare(q, k, v, beta, g, initial_state, segment_ids, chunk_size)
    opts = dict(scale=float(scale), chunk_size=chunk_size, platform=platform, block_v=block_v,
                num_warps=num_warps, num_stages=num_stages, kernel=kernel, bwd=bwd,
                bwd_block_v=bwd_block_v, bwd_num_warps=bwd_num_warps, forward_inverse=forward_inverse,
                state_pieces=state_pieces, bwd_v_split=bwd_v_split, forward_outputs=forward_outputs,
                mosaic_stages=mosaic_stages if kernel == "mosaic" else (),
                mosaic_options=mosaic_options if kernel == "mosaic" else (), resets=segment_ids is not None)
    o, final = _core(_Opts(opts), *x)
    return o[:, :T], final


class _Opts(dict):
    """Static kernel options, hashable so that they can be a custom_vjp non-differentiable argument."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))
