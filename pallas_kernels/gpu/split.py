"""Chunkwise forward as three Pallas (Triton-lowered) kernels; the GPU default.

The fused kernel (`forward.py`) puts the triangular solve, a chain of C dependent row steps, on the
sequential path of every program; with few programs (long T, small batch) that latency dominates.
Here only cheap matmuls stay sequential:

  1. intra  grid (B*H, N)        per chunk, all in parallel: the solve, P [C, K] and Qe [C, V]
                                 (E = P S_0 + Qe), written in the matmul dtype; the inverse
                                 (I + m)^{-1} [C, C] f32 is kept for the backward. The inverse is
                                 `inverse="rows"` (C - 1 dependent row steps) or "blocked" (16-row
                                 diagonal blocks by substitution, merged by matmuls).
  2. state  grid (B*H, P, V/bv)  sequential over chunks: S <- a S - ek^T (P S + Qe) + writes;
                                 writes every chunk's start state (also kept for the backward).
                                 With `state_pieces` P > 1 the N chunks are cut into P pieces and
                                 two kernels run first: `prism_piece_maps` (grid (B*H, P, K/bk +
                                 V/bv), each piece's affine map S_end = A S_start + B, in parallel)
                                 and `prism_compose_pieces` (grid (B*H, V/bv), the P maps applied in
                                 order: every piece's true start state); then each piece walks its
                                 own chunks (N / P sequential steps instead of N).
  3. output grid (B*H, N)        per chunk, all in parallel: o from q, the chunk inputs, P, Qe and
                                 the chunk's start state. With `outputs_in_state` the state walk
                                 (kernel 2's last) writes o instead, and without a backward the
                                 start states are never written.

Each kernel can be called (and timed) alone: `intra`, `state_pass`, `outputs`.

Plain-JAX reference beside it: `prism_jax.ops.prism.chunk.prism_chunk` (same algebra, XLA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import (Prepared, chunk_decays, chunk_end_decays, chunk_output,
                                   chunk_solve, chunk_state_update, lower_inverse, matmul_dtype, mm,
                                   triton_params)

f32 = jnp.float32


def _load_writes(k_ref, v_ref, beta_ref, b, ts, h, vs, n_writes):
    ks = [k_ref[b, ts, h, l, :] for l in range(n_writes)]
    betas = [beta_ref[b, ts, h, l].astype(f32) for l in range(n_writes)]
    vws = [betas[l][:, None] * v_ref[b, ts, h, l, vs].astype(f32) for l in range(n_writes)]
    return ks, betas, vws


def _intra_kernel(k_ref, v_ref, beta_ref, g_ref, r_ref, rm1_ref, p_ref, qe_ref, *ainv_ref, heads,
                  n_writes, chunk, mm_dtype, inverse):
    bh, n = pl.program_id(0), pl.program_id(1)
    b, h = bh // heads, bh % heads
    ts = pl.ds(n * chunk, chunk)
    ks, betas, vws = _load_writes(k_ref, v_ref, beta_ref, b, ts, h, slice(None), n_writes)
    d = chunk_decays(g_ref[b, ts, h], r_ref[b, ts], rm1_ref[b, ts])
    p, qe, a_inv = chunk_solve(ks[0], ks, vws, betas[0], d, mm_dtype=mm_dtype, inverse=inverse)
    if ainv_ref:  # only when the backward will use it (bwd="fused" under differentiation)
        ainv_ref[0][b, h, n] = a_inv
    p_ref[b, ts, h, :] = p.astype(p_ref.dtype)
    qe_ref[b, ts, h, :] = qe.astype(qe_ref.dtype)


def _state_kernel(k_ref, v_ref, beta_ref, g_ref, r_ref, rm1_ref, p_ref, qe_ref, s0_ref, *refs, heads,
                  n_writes, chunk, block_v, n_chunks, piece_len, mm_dtype, scale=None, with_outputs=False,
                  with_starts=True):
    """Grid (B*H, pieces, V/block_v): walks the chunks of one piece from its start state s0_ref
    [B, H, pieces, K, V], writing each chunk's start state (`with_starts`) and the piece's end state.
    `with_outputs`: also each chunk's outputs for this value block (the output kernel's work, here
    on the sequential path); refs then begin with q_ref and end with o_ref."""
    q_ref = refs[0] if with_outputs else None
    refs = refs[1:] if with_outputs else refs
    starts_ref = refs[0] if with_starts else None
    ends_ref = refs[1 if with_starts else 0]
    o_ref = refs[-1] if with_outputs else None
    bh, piece, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = bh // heads, bh % heads
    vs = pl.ds(vb * block_v, block_v)

    def body(n, s):
        ts = pl.ds(n * chunk, chunk)
        ks, _, vws = _load_writes(k_ref, v_ref, beta_ref, b, ts, h, vs, n_writes)
        decays = chunk_decays if with_outputs else chunk_end_decays
        d = decays(g_ref[b, ts, h], r_ref[b, ts], rm1_ref[b, ts])
        p, qe = p_ref[b, ts, h, :], qe_ref[b, ts, h, vs].astype(f32)
        if with_starts:
            starts_ref[b, h, n, :, vs] = s
        if with_outputs:
            o = chunk_output(s, p, qe, q_ref[b, ts, h, :], ks[0], ks, vws, d, mm_dtype=mm_dtype)
            o_ref[b, ts, h, vs] = (scale * o).astype(o_ref.dtype)
        return chunk_state_update(s, p, qe, ks[0], ks, vws, d, mm_dtype=mm_dtype)

    s0 = s0_ref[b, h, piece, :, vs].astype(f32)
    if piece_len == n_chunks:  # one piece: static bounds (a plain counted loop)
        s = jax.lax.fori_loop(0, n_chunks, body, s0)
    else:
        lo = piece * piece_len
        s = jax.lax.fori_loop(lo, jnp.minimum(lo + piece_len, n_chunks), body, s0)
    ends_ref[b, h, piece, :, vs] = s


def _piece_map_kernel(k_ref, v_ref, beta_ref, g_ref, r_ref, rm1_ref, p_ref, qe_ref, amap_ref, bmap_ref,
                      *, heads, n_writes, chunk, block_k, block_v, key_blocks, n_chunks, piece_len,
                      mm_dtype):
    """Grid (B*H, pieces, K/block_k + V/block_v): each piece's affine map S_end = A S_start + B.

    Column blocks below `key_blocks` carry columns of A [K, K] (start: the identity's columns; per
    chunk S <- a S - ek^T P S), the rest columns of B [K, V] (start: zero; the full chunk update).
    """
    bh, piece, cb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = bh // heads, bh % heads
    lo = piece * piece_len
    hi = jnp.minimum(lo + piece_len, n_chunks)
    K = amap_ref.shape[-1]

    @pl.when(cb < key_blocks)
    def _linear_part():
        def body(n, s):
            ts = pl.ds(n * chunk, chunk)
            d = chunk_end_decays(g_ref[b, ts, h], r_ref[b, ts], rm1_ref[b, ts])
            return chunk_state_update(s, p_ref[b, ts, h, :], 0.0, k_ref[b, ts, h, 0, :], [], [], d,
                                      mm_dtype=mm_dtype)

        rows = jax.lax.broadcasted_iota(jnp.int32, (K, block_k), 0)
        cols = jax.lax.broadcasted_iota(jnp.int32, (K, block_k), 1)
        eye = (rows == cols + cb * block_k).astype(f32)
        amap_ref[b, h, piece, :, pl.ds(cb * block_k, block_k)] = jax.lax.fori_loop(lo, hi, body, eye)

    @pl.when(cb >= key_blocks)
    def _affine_part():
        vs = pl.ds((cb - key_blocks) * block_v, block_v)

        def body(n, s):
            ts = pl.ds(n * chunk, chunk)
            ks, _, vws = _load_writes(k_ref, v_ref, beta_ref, b, ts, h, vs, n_writes)
            d = chunk_end_decays(g_ref[b, ts, h], r_ref[b, ts], rm1_ref[b, ts])
            return chunk_state_update(s, p_ref[b, ts, h, :], qe_ref[b, ts, h, vs].astype(f32), ks[0],
                                      ks, vws, d, mm_dtype=mm_dtype)

        bmap_ref[b, h, piece, :, vs] = jax.lax.fori_loop(lo, hi, body, jnp.zeros((K, block_v), f32))


def _compose_kernel(amap_ref, bmap_ref, s0_ref, piece_starts_ref, *, heads, block_v, pieces):
    """Grid (B*H, V/block_v), sequential over pieces: S_{p+1} = A_p S_p + B_p in float32 (IEEE)."""
    bh, vb = pl.program_id(0), pl.program_id(1)
    b, h = bh // heads, bh % heads
    vs = pl.ds(vb * block_v, block_v)

    def body(p, s):
        piece_starts_ref[b, h, p, :, vs] = s
        return mm(amap_ref[b, h, p], s, dtype=f32) + bmap_ref[b, h, p, :, vs]

    s = jax.lax.fori_loop(0, pieces - 1, body, s0_ref[b, h, :, vs])
    piece_starts_ref[b, h, pieces - 1, :, vs] = s


def _output_kernel(q_ref, k_ref, v_ref, beta_ref, g_ref, r_ref, rm1_ref, p_ref, qe_ref, starts_ref,
                   o_ref, *, heads, n_writes, chunk, scale, mm_dtype):
    bh, n = pl.program_id(0), pl.program_id(1)
    b, h = bh // heads, bh % heads
    ts = pl.ds(n * chunk, chunk)
    ks, _, vws = _load_writes(k_ref, v_ref, beta_ref, b, ts, h, slice(None), n_writes)
    d = chunk_decays(g_ref[b, ts, h], r_ref[b, ts], rm1_ref[b, ts])
    o = chunk_output(starts_ref[b, h, n], p_ref[b, ts, h, :], qe_ref[b, ts, h, :].astype(f32),
                     q_ref[b, ts, h, :], ks[0], ks, vws, d, mm_dtype=mm_dtype)
    o_ref[b, ts, h, :] = (scale * o).astype(o_ref.dtype)


def state_block_v(B, H, V, pieces=1, sm_count=None):
    """Value columns per program of the state pass: 64 (or V), halved down to 16 while the pass has
    fewer than 2 programs per SM (B * H * pieces * V / block_v < 2 * sm_count; an H200 has 132)."""
    sm_count = sm_count or _sm_count()
    block_v = min(V, 64)
    while block_v > 16 and B * H * pieces * (V // block_v) < 2 * sm_count:
        block_v //= 2
    return block_v


def _sm_count():
    return getattr(jax.devices()[0], "core_count", None) or 132  # CPU (interpret, lowering): H200's


def state_pieces_for(n_chunks, pieces):
    """(pieces, chunks per piece) actually used for `pieces` requested over n_chunks chunks: every
    piece has piece_len chunks but the last, which has 1 to piece_len."""
    pieces = max(1, min(pieces, n_chunks))
    piece_len = -(-n_chunks // pieces)
    return -(-n_chunks // piece_len), piece_len


def auto_state_pieces(B, H, V, n_chunks, sm_count=None, min_piece_len=8):
    """state_pieces="auto": 1 while the plain state pass has >= 2 programs per SM (B * H * V / 64),
    else the smallest power of two that gets there, keeping >= min_piece_len chunks per piece."""
    sm_count = sm_count or _sm_count()
    programs = B * H * (V // min(V, 64))
    pieces = 1
    while programs * pieces < 2 * sm_count and n_chunks // (2 * pieces) >= min_piece_len:
        pieces *= 2
    return pieces


def _compiler_params(interpret, num_warps, num_stages, chunk_size):
    if num_warps is None:  # H200 sweep (docs/benchmarks.md): 8 warps at chunk 32, 4 at chunk 64
        num_warps = 8 if chunk_size <= 32 else 4
    return triton_params(interpret, num_warps, num_stages)


def intra(x: Prepared, *, chunk_size, inverse="rows", save_inverse=True, num_warps=None, num_stages=None,
          interpret=False):
    """Kernel 1: (P [B, Tp, H, K], Qe [B, Tp, H, V] in the matmul dtype, ainv [B, H, N, C, C] f32 or
    None unless `save_inverse`). inverse: "rows", "blocked" or "blocked8" (`common.lower_inverse`)."""
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    N = Tp // chunk_size
    mm_dtype = matmul_dtype(x.q.dtype)
    out_shape = [jax.ShapeDtypeStruct((B, Tp, H, K), mm_dtype), jax.ShapeDtypeStruct((B, Tp, H, V), mm_dtype)]
    if save_inverse:
        out_shape.append(jax.ShapeDtypeStruct((B, H, N, chunk_size, chunk_size), f32))
    p, qe, *ainv = pl.pallas_call(
        functools.partial(_intra_kernel, inverse=lower_inverse(inverse), heads=H, n_writes=L, chunk=chunk_size,
                          mm_dtype=mm_dtype),
        grid=(B * H, N), name="prism_intra", out_shape=tuple(out_shape), interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps, num_stages, chunk_size),
    )(x.k, x.v, x.beta, x.g, x.r, x.rm1)
    return p, qe, (ainv[0] if save_inverse else None)


def state_pass(x: Prepared, p, qe, *, chunk_size, block_v=None, state_pieces=1, num_warps=None,
               num_stages=None, interpret=False, scale=None, with_starts=True):
    """Kernel 2 (with state_pieces > 1: three kernels): (starts [B, H, N, K, V] f32 or None unless
    `with_starts`, final [B, H, K, V] f32, o [B, Tp, H, V] in v's dtype or None). With `scale` given
    the walk also writes the outputs (no separate output kernel), else o is None.
    state_pieces: an int or "auto" (`auto_state_pieces`); block_v None: `state_block_v`."""
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    N = Tp // chunk_size
    if state_pieces == "auto":
        state_pieces = auto_state_pieces(B, H, V, N)
    pieces, piece_len = state_pieces_for(N, state_pieces)
    block_v = state_block_v(B, H, V, pieces) if block_v is None else block_v
    common = dict(heads=H, n_writes=L, chunk=chunk_size, mm_dtype=matmul_dtype(x.q.dtype))
    call = functools.partial(pl.pallas_call, interpret=interpret,
                             compiler_params=_compiler_params(interpret, num_warps, num_stages, chunk_size))
    writes = (x.k, x.v, x.beta, x.g, x.r, x.rm1)
    piece_starts = x.s0[:, :, None]
    if pieces > 1:
        block_k = min(block_v, K)
        amap, bmap = call(
            functools.partial(_piece_map_kernel, block_k=block_k, block_v=block_v, key_blocks=K // block_k,
                              n_chunks=N, piece_len=piece_len, **common),
            grid=(B * H, pieces, K // block_k + V // block_v), name="prism_piece_maps",
            out_shape=(jax.ShapeDtypeStruct((B, H, pieces, K, K), f32),
                       jax.ShapeDtypeStruct((B, H, pieces, K, V), f32)),
        )(*writes, p, qe)
        piece_starts = call(
            functools.partial(_compose_kernel, heads=H, block_v=block_v, pieces=pieces),
            grid=(B * H, V // block_v), name="prism_compose_pieces",
            out_shape=jax.ShapeDtypeStruct((B, H, pieces, K, V), f32),
        )(amap, bmap, x.s0)
    with_outputs = scale is not None
    out_shape = [jax.ShapeDtypeStruct((B, H, pieces, K, V), f32)]
    if with_starts:
        out_shape.insert(0, jax.ShapeDtypeStruct((B, H, N, K, V), f32))
    if with_outputs:
        out_shape.append(jax.ShapeDtypeStruct((B, Tp, H, V), x.v.dtype))
    outs = call(
        functools.partial(_state_kernel, block_v=block_v, n_chunks=N, piece_len=piece_len, scale=scale,
                          with_outputs=with_outputs, with_starts=with_starts, **common),
        grid=(B * H, pieces, V // block_v), name="prism_state_outputs" if with_outputs else "prism_state",
        out_shape=tuple(out_shape),
    )(*writes, p, qe, piece_starts, *([x.q] if with_outputs else []))
    starts = outs[0] if with_starts else None
    ends = outs[1 if with_starts else 0]
    return starts, ends[:, :, -1], (outs[-1] if with_outputs else None)


def outputs(x: Prepared, p, qe, starts, *, scale, chunk_size, num_warps=None, num_stages=None,
            interpret=False):
    """Kernel 3: o [B, Tp, H, V] in v's dtype."""
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    return pl.pallas_call(
        functools.partial(_output_kernel, scale=scale, heads=H, n_writes=L, chunk=chunk_size,
                          mm_dtype=matmul_dtype(x.q.dtype)),
        grid=(B * H, Tp // chunk_size), name="prism_output", interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps, num_stages, chunk_size),
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, V), x.v.dtype),
    )(x.q, x.k, x.v, x.beta, x.g, x.r, x.rm1, p, qe, starts)


def forward(x: Prepared, *, scale, chunk_size, block_v=None, num_warps=None, num_stages=None,
            interpret=False, save_inverse=True, inverse="rows", state_pieces=1, state_num_warps=None,
            outputs_in_state=False, save_starts=True):
    """Returns (o [B, Tp, H, V] in v's dtype, final [B, H, K, V] f32, starts [B, H, N, K, V] f32,
    ainv [B, H, N, C, C] f32: each chunk's (I + m)^{-1}, saved for the backward; None unless
    `save_inverse`): `intra`, `state_pass`, `outputs` in turn.

    inverse: the intra kernel's triangular inverse, "rows" (C - 1 row steps), "blocked" or
    "blocked8" (`common.blocked_unit_lower_inverse` with 16- / 8-row diagonal blocks).
    state_pieces: 1 = one sequential walk over all N chunks per (head, value block); P > 1 = the
    chunks cut into P pieces: each piece's affine map (A [K, K], B [K, V]) in parallel, the P maps
    composed in order (float32), then every piece walks its chunks from its true start in parallel;
    "auto" = `auto_state_pieces`.
    block_v: the state pass's value columns per program; None = `state_block_v` (fewer columns when
    there are few programs). state_num_warps: the state-pass kernels' warps (default num_warps).
    outputs_in_state: the state walk writes the outputs too (no output kernel, no re-read of the
    start states; the output work sits on the walk's sequential path: pair it with state_pieces).
    save_starts=False (only with outputs_in_state): starts are not written and come back None (the
    forward without a backward).
    """
    if not save_starts and not outputs_in_state:
        raise ValueError("split.forward: save_starts=False needs outputs_in_state=True (the output kernel "
                         "reads the start states)")
    kw = dict(chunk_size=chunk_size, num_stages=num_stages, interpret=interpret)
    p, qe, ainv = intra(x, inverse=inverse, save_inverse=save_inverse, num_warps=num_warps, **kw)
    starts, final, o = state_pass(x, p, qe, block_v=block_v, state_pieces=state_pieces,
                                  num_warps=state_num_warps or num_warps, with_starts=save_starts,
                                  scale=scale if outputs_in_state else None, **kw)
    if not outputs_in_state:
        o = outputs(x, p, qe, starts, scale=scale, num_warps=num_warps, **kw)
    return o, final, starts, ainv
