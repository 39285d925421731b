"""Sequence parallelism for the PRISM op: one sequence split over a mesh axis (prism-math.md section 3).

Each device holds a contiguous slice of T. The chunk maps S_0 -> S_C = A S_0 + B compose
associatively, so every device

  1. runs the chunk form's state-independent terms on its slice (`_chunk_terms`),
  2. reduces its chunks to one affine pair (A [K, K], B [K, V]) per batch row and head,
  3. `all_gather`s the pairs over the axis (P pairs: P (K^2 + K V) floats per row and head),
  4. folds the pairs of the devices before it onto `initial_state` to get its incoming state,
  5. finishes its chunk start states and outputs from that state.

Every device also folds all P pairs, so the final state comes out replicated over the axis.
A document boundary (segment_ids change) between the previous device's last token and this
device's first zeroes the incoming state; resets inside a slice are handled by the chunk masks.
Work per device: the single-device chunk form on T / P tokens plus one K x K product per chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from prism_jax.ops.prism import INTER_CHUNK, check_inputs
from prism_jax.ops.prism.chunk import (_chunk_outputs, _chunk_terms, _transition, chunk_inputs,
                                       chunk_start_states, unchunk_outputs)
from prism_jax.parallel.halo import left_halo

__all__ = ["sequence_parallel_prism", "sequence_parallel_prism_local"]


def _local_pair(terms):
    """Compose a slice's chunk maps into one pair: (A [B, H, K, K], B [B, H, K, V]).

    Chunk n maps S -> decay_n S - erase_keys_n^T (p_n S + q_n) + writes_n; applied to the running
    pair (starting from chunk 0's own pair) it gives A <- decay A - ek^T (p A),
    B <- decay B - ek^T (p B + q) + writes: C x K x K work per chunk, no K x K chunk matrix.
    """

    def body(carry, t):
        a, b = carry
        decay = t.decay_all[..., None, None]
        a = decay * a - jnp.einsum("...ck,...cj->...kj", t.erase_keys, t.p @ a)
        b = decay * b - jnp.einsum("...ck,...cv->...kv", t.erase_keys, t.p @ b + t.q) + t.writes
        return (a, b), None

    first = jax.tree.map(lambda x: x[:, :, 0], terms)
    rest = jax.tree.map(lambda x: jnp.moveaxis(x[:, :, 1:], 2, 0), terms)
    (a, b), _ = jax.lax.scan(body, _transition(first), rest)
    return a, b


def _incoming_states(a_all, b_all, initial_state):
    """Fold gathered pairs [P, B, H, ...] left to right from `initial_state`.

    Returns (incoming [P, B, H, K, V]: the state before each device's slice, final [B, H, K, V])."""

    def body(s, ab):
        a, b = ab
        return a @ s + b, s

    final, incoming = jax.lax.scan(body, initial_state, (a_all, b_all))
    return incoming, final


def sequence_parallel_prism_local(q, k, v, beta, g, *, axis_name="sequence", scale=None,
                                  initial_state=None, segment_ids=None, chunk_size=64,
                                  inter_chunk="scan"):
    """The PRISM op on this device's slice of the sequence; call inside `jax.shard_map`.

    Arguments as in `prism_recurrence`, with T replaced by the local slice length T_local (the
    slices are contiguous and ordered by the index along `axis_name`). `initial_state`
    [B, H, K, V] is the state before the global sequence (the same on every device of the axis);
    `segment_ids` [B, T_local] is the local slice of the global ids.

    Returns (o [B, T_local, H, V] in v's dtype, final_state [B, H, K, V] float32): the outputs for
    the local tokens and the state after the global sequence (identical on every device).
    """
    B, T, H, L, K, V = check_inputs(q, k, v, beta, g, initial_state, segment_ids)
    if inter_chunk not in INTER_CHUNK:
        raise ValueError(f"sequence_parallel_prism: `inter_chunk` is {inter_chunk!r}, "
                         f"expected one of {INTER_CHUNK}")
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"sequence_parallel_prism: `chunk_size` is {chunk_size!r}, expected an int > 0")
    scale = K ** -0.5 if scale is None else scale
    out_dtype = v.dtype
    dt = jnp.result_type(jnp.float32, *(x.dtype for x in (q, k, v, beta, g)))  # f32, f64 in x64 tests
    q, k, v, beta, g = (x.astype(dt) for x in (q, k, v, beta, g))
    s0 = jnp.zeros((B, H, K, V), dt) if initial_state is None else initial_state.astype(dt)

    # Local chunking, as in the single-device chunk form; a short slice is one (shorter) chunk.
    x = chunk_inputs(q, k, v, beta, g, segment_ids, min(chunk_size, T))
    terms = _chunk_terms(x.k, x.vw, x.beta[..., 0], x.g, x.r, x.r_prev)

    # A document starting exactly at this slice's first token zeroes the incoming state.
    if segment_ids is None:
        keep = jnp.ones((B,), dt)
    else:
        prev_last = left_halo(segment_ids, 1, axis_name)[:, 0]
        boundary = (segment_ids[:, 0] != prev_last) & (jax.lax.axis_index(axis_name) > 0)
        keep = 1.0 - boundary.astype(dt)
    keep = keep[:, None, None, None]

    a_loc, b_loc = _local_pair(terms)
    a_all = jax.lax.all_gather(keep * a_loc, axis_name, to="invarying")  # [P, B, H, K, K]
    b_all = jax.lax.all_gather(b_loc, axis_name, to="invarying")  # [P, B, H, K, V]
    incoming, final = _incoming_states(a_all, b_all, s0)
    s_in = keep * incoming[jax.lax.axis_index(axis_name)]

    starts, _ = chunk_start_states(terms, s_in, inter_chunk)
    o = _chunk_outputs(x.q, x.k, x.vw, x.g, x.r, x.r_prev, terms, starts)  # [B, H, N, C, V]
    o = scale * unchunk_outputs(o, T)
    return o.astype(out_dtype), final.astype(jnp.result_type(jnp.float32, dt))


def _axis_names(value):
    return () if value is None else ((value,) if isinstance(value, str) else tuple(value))


def check_sequence_mesh(mesh, axis: str | None, seq_len: int, batch_axis=None, batch: int | None = None,
                        head_axis=None, heads: int | None = None, caller: str = "sequence_parallel_prism"):
    """Raise ValueError unless `mesh` (a Mesh or AbstractMesh) has `axis` and its size divides
    `seq_len`, and the same for the batch axes / `batch` and the head axes / `heads` (`axis=None`: no
    sequence axis, only the batch and head checks). Plain Python: runs before anything is traced or
    compiled; `caller` names the function in the messages."""
    sizes = dict(mesh.shape)
    if not sizes:
        raise ValueError(f"{caller}: no mesh; pass `mesh=` or call under `jax.set_mesh(mesh)`")
    used = set()
    if axis is not None:
        if axis not in sizes:
            raise ValueError(f"{caller}: `axis` {axis!r} is not a mesh axis; "
                             f"mesh axes are {tuple(mesh.axis_names)}")
        if seq_len % sizes[axis]:
            raise ValueError(f"{caller}: sequence length T = {seq_len} is not divisible by "
                             f"the mesh axis {axis!r} of size {sizes[axis]}; pad T to a multiple of it")
        used.add(axis)
    for what, value, dim, dim_name in (("batch_axis", batch_axis, batch, "batch size B"),
                                       ("head_axis", head_axis, heads, "head count H")):
        names = _axis_names(value)
        for name in names:
            if name not in sizes:
                raise ValueError(f"{caller}: `{what}` {name!r} is not a mesh axis; "
                                 f"mesh axes are {tuple(mesh.axis_names)}")
            if name in used:
                raise ValueError(f"{caller}: `{what}` {name!r} is already used "
                                 f"(sequence / batch / head axes must differ)")
            used.add(name)
        n = 1
        for name in names:
            n *= sizes[name]
        if names and dim % n:
            raise ValueError(f"{caller}: {dim_name} = {dim} is not divisible by the "
                             f"mesh axes {names} of total size {n}")


def sequence_parallel_prism(q, k, v, beta, g, *, mesh=None, axis: str = "sequence", batch_axis=None,
                            head_axis=None, scale=None, initial_state=None, output_final_state=False,
                            segment_ids=None, chunk_size=None, inter_chunk="scan"):
    """`prism_recurrence(impl="chunk")` on global arrays, with T split over the mesh axis `axis`.

    Shapes as in `prism_recurrence` (global T). `mesh`: a Mesh, or None for the mesh set with
    `jax.set_mesh` (so a layer can call this inside the jitted model). `batch_axis` / `head_axis`:
    optional mesh axis name (or tuple of names) that B / H are split over as well (heads are
    independent, so a `tensor` axis over heads needs no communication). Other mesh axes see the op
    replicated. T, B, H must be divisible by their axes (checked before compiling). Differentiable.

    Returns (o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32 or None).
    """
    B, T, H, L, K, V = check_inputs(q, k, v, beta, g, initial_state, segment_ids)
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    check_sequence_mesh(mesh, axis, T, batch_axis, B, head_axis, H)
    if inter_chunk not in INTER_CHUNK:
        raise ValueError(f"sequence_parallel_prism: `inter_chunk` is {inter_chunk!r}, "
                         f"expected one of {INTER_CHUNK}")
    chunk_size = 64 if chunk_size is None else chunk_size  # None: the chunk form's default
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"sequence_parallel_prism: `chunk_size` is {chunk_size!r}, expected an int > 0")
    if initial_state is None:
        initial_state = jnp.zeros((B, H, K, V), jnp.float32)
    seq = P(batch_axis, axis, head_axis)  # [B, T, H, ...]
    rows = P(batch_axis, head_axis)  # [B, H, K, V]
    ids = P(batch_axis, axis)  # [B, T]
    local = functools.partial(sequence_parallel_prism_local, axis_name=axis, scale=scale,
                              chunk_size=chunk_size, inter_chunk=inter_chunk)
    args = [q, k, v, beta, g, initial_state]
    specs = [seq, seq, seq, seq, seq, rows]
    if segment_ids is not None:
        args.append(segment_ids)
        specs.append(ids)

    def body(q, k, v, beta, g, s0, seg=None):
        return local(q, k, v, beta, g, initial_state=s0, segment_ids=seg)

    o, final = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=(seq, rows))(*args)
    return o, (final if output_final_state else None)


def prism_recurrence_sharded(q, k, v, beta, g, *, axis="sequence", batch_axes=("data", "fsdp"),
                             head_axes=("tensor",), impl="chunk", **kwargs):
    """Drop-in for `prism_recurrence` inside a model jitted under `jax.set_mesh(mesh)`.

    When the ambient mesh has `axis` of size > 1, runs `sequence_parallel_prism` with B split over
    those of `batch_axes` present in the mesh (size > 1) and H over `head_axes` when they divide H.
    Without a sequence axis but with such batch / head axes it runs `rows_parallel_prism` (the op
    under `shard_map`, impl kept); with none (or no mesh) it is `prism_recurrence(..., impl=impl)`.
    The rest of a block (projections, norms, the causal ShortConv) needs no change: under `jit` the
    auto-partitioner exchanges the conv's halo itself; only the recurrence needs this explicit form.
    """
    from prism_jax.ops import prism_recurrence  # noqa: PLC0415

    mesh = jax.sharding.get_abstract_mesh()
    sizes = dict(mesh.shape) if mesh is not None else {}
    B, H = q.shape[0], q.shape[2]
    batch, heads = _split_axes(sizes, batch_axes, B), _split_axes(sizes, head_axes, H)
    if sizes.get(axis, 1) > 1:
        kwargs.pop("pallas_options", None)  # the sequence-parallel form runs the chunk form
        return sequence_parallel_prism(q, k, v, beta, g, mesh=mesh, axis=axis, batch_axis=batch,
                                       head_axis=heads, **kwargs)
    if batch is None and heads is None:
        return prism_recurrence(q, k, v, beta, g, impl=impl, **kwargs)
    return rows_parallel_prism(q, k, v, beta, g, mesh=mesh, batch_axis=batch, head_axis=heads, impl=impl,
                               **kwargs)


def _split_axes(sizes, names, dim):
    """Those of `names` in the mesh with size > 1, if their product divides `dim`; else None."""
    used = tuple(a for a in names if sizes.get(a, 1) > 1)
    n = 1
    for a in used:
        n *= sizes[a]
    return used if used and dim % n == 0 else None


def rows_parallel_prism(q, k, v, beta, g, *, mesh, batch_axis=None, head_axis=None, impl="chunk",
                        initial_state=None, output_final_state=False, segment_ids=None, **kwargs):
    """`prism_recurrence` with B split over `batch_axis` and H over `head_axis` by `shard_map`.

    Batch rows and heads are independent, so each device runs the op on its own rows and heads with no
    communication. Under plain `jit` XLA would do the same for the `chunk` form, but a `pallas_call` is
    opaque to its partitioner, which then gathers the whole batch onto every device and runs it there
    (measured: 2 GPUs at 58% of the 1-GPU rate per device for the 130m preset). Shapes and result as
    in `prism_recurrence`; B and H must be divisible by their axes.
    """
    from prism_jax.ops import prism_recurrence  # noqa: PLC0415

    B, T, H, L, K, V = check_inputs(q, k, v, beta, g, initial_state, segment_ids)
    check_sequence_mesh(mesh, None, T, batch_axis, B, head_axis, H, caller="rows_parallel_prism")
    seq = P(batch_axis, None, head_axis)  # [B, T, H, ...]
    rows = P(batch_axis, head_axis)  # [B, H, K, V]
    args, specs = [q, k, v, beta, g], [seq] * 5
    if initial_state is not None:
        args.append(initial_state)
        specs.append(rows)
    if segment_ids is not None:
        args.append(segment_ids)
        specs.append(P(batch_axis, None))
    has_s0, has_seg = initial_state is not None, segment_ids is not None

    def body(q, k, v, beta, g, *rest):
        rest = list(rest)
        s0 = rest.pop(0) if has_s0 else None
        seg = rest.pop(0) if has_seg else None
        o, final = prism_recurrence(q, k, v, beta, g, impl=impl, initial_state=s0, segment_ids=seg,
                                    output_final_state=output_final_state, **kwargs)
        return (o, final) if output_final_state else o

    out_specs = (seq, rows) if output_final_state else seq
    # check_vma=False: the op builds fresh (device-invariant) scan carries; every value here is local
    out = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=out_specs, check_vma=False)(*args)
    return out if output_final_state else (out, None)
