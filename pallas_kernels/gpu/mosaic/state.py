"""Mosaic GPU forward state pass (Hopper: TMA, wgmma): the chunk-start states and the final state.

Drop-in for `pallas_kernels.gpu.split.state_pass` at chunk_size=64, state_pieces=1, without outputs.
Per chunk n (prism-math.md section 3, `common.chunk_state_update`), with S [K, bv] the state's
value block at the chunk's start:

    E = P S + Qe                                           [C, bv]  (wgmma: M = C = 64, contraction K)
    S <- all * S + k_0^T (end * beta_0 * v_0 - end_m1 * E) + sum_{l>0} k_l^T (end * beta_l * v_l)
                                                           [K, bv]  (L wgmmas: M = K, contraction C)

One CTA (one warpgroup) per (b, h, value block) walks the N chunks in order; grid (B, H, V / bv).
Two implementations, picked by block_v:

block_v = 64 (default; `_register_pass`): the state is held TRANSPOSED, S^T [bv, K], in float32
registers, so that both products of a step take their dependent operand from registers as the wgmma
A operand (M = bv = 64):
    E^T = S^T P^T (+ Qe^T)        A = bf16(S^T) registers, B = P^T (transposed view of P's TMA tile)
    S^T <- all S^T + sum_l u_l^T k_l   A = u_l^T registers, B = k_l's TMA tile as it is
- The dependent chain per step is: cast S^T -> wgmma -> wait -> FMA (u_0^T) -> cast -> wgmma -> wait
  -> add. No register -> SMEM -> fence round trip is on it (the staged path below has two per step).
- Off the chain, issued while E^T computes: the start state's TMA store (S^T switched to the
  WGMMA_TRANSPOSED register layout by one lane shuffle, stored through a transposed view of a
  float32 SMEM tile, two such tiles alternating so the store never waits), the write terms l > 0
  (their wgmmas go into the state accumulator before E^T is read: `wgmma_accumulator_load(...,
  wait_n=L - 1)` waits for E^T only), and (end beta_0) v_0^T - end_m1 Qe^T.
- v_l and Qe are read transposed from their TMA tiles ([bv, C] in registers); the per-token scalings
  act on columns (COLS vectors); `all` is a [K] COLS vector.
- On the CPU interpreter (wgmma operands from SMEM only) the register operands are staged in SMEM
  (`a_operand`); the GPU path differs only there (checked by the CUDA lowering tests).
- SMEM (bf16, K = V = 128): 2 slots x (24 + 24 L) KiB of tiles + 2 x 32 KiB start-state staging:
  160 KiB at L = 1, 208 KiB at L = 2; K = 128 with L = 3 falls back to one slot.

block_v = 32 (`slots` as below; the phase-1 kernel): S [K, bv] in float32 registers (the wgmma
accumulator of the second product); each step stages it as a 16-bit SMEM operand (the B operand of
P S); E goes from its accumulator through registers to a 16-bit SMEM operand (u_0) for the second
product. Twice the CTAs of block_v = 64, but two register -> SMEM -> fence round trips per step.
- The row scalings (end_m1 of E's rows, end * beta_l of v_l's rows) are folded into the [C, bv]
  right-hand operands; the keys k_l go to wgmma straight from their TMA tile as transposed A
  operands (k_l^T). Per-token scalings come packed from XLA: rows [end_m1, end * beta_0, ...,
  end * beta_{L-1}] of one [L + 1, C] float32 tile per chunk; the chunk decay `all` as a [K] row.
- While the first wgmma (P S) runs, the L write terms are scaled and staged (`overlapped`).

Both: the next chunk's tiles (P, Qe, k_l, v_l, the scalings) are fetched by TMA into the other of
two SMEM slots while this chunk computes; block_v = 64 takes a ring of three slots where it fits
(two chunks in flight: a TMA round trip may take longer than one ~1 us step). When two slots do not
fit in SMEM (K = 128 with L = 3) the kernel falls back to one slot (the fetch is issued after the
chunk's last wgmma and waited for at the next step's start).

Expected cost (H200, bf16, K = V = 128, bv = 64): per chunk 2 + L small wgmmas (64 x 64 x 128 and
L x 64 x 128 x 64, ~2.1 MFLOP for L = 1) whose latency sets the step time, not the tensor-core
rate; ~24 KiB (L = 1) of TMA traffic per step, prefetched, plus 32 KiB of start state written. The
pass is latency-bound per CTA: its time is ~N * step latency when B * H * V / bv <= 132 (T = 32K,
B = 1, H = 16: 32 CTAs, one per SM, so halving bv only shortens the step by the smaller N of its
wgmmas; the register path removes the two SMEM round trips and fences from the chain instead).
Phase 1 (staged, bv = 64) measured 2.4 us per step at T = 32K; the register path is expected near
1 us (two dependent wgmma latencies plus a few hundred ns of register math). Two floors: per step a
CTA moves ~80 KiB (L = 1: 48 KiB in, 32 KiB of float32 start state out), so ~0.6-0.8 us per step at
one SM's share of L2 bandwidth; and with many CTAs (T = 2K, B = 16: 512) the pass is HBM-bound:
~1.3 GB in all (512 MiB of float32 starts, P and k read once per value block) is ~0.3 ms at 4.8 TB/s.
Knobs for the GPU A/B: registers=False (the staged kernel at the same block_v), block_v=32 (staged,
twice the CTAs), slots=1 (L = 1: 82 KiB, two CTAs per SM; no prefetch within a CTA).

Outputs in the pass (`factors=(Qf, Of)`, register kernel only; `output_factors.py`): the chunk outputs are
o = Qf S + Of with per-chunk factors that need no state, so each step issues one more wgmma with the
same A operand as E^T's (o^T - Of^T = S^T Qf^T, [bv, C]), reads it while S's update computes, adds Of^T
and sends o out by TMA through a transposed store (one or two [C, bv] staging tiles). This replaces the
outputs kernel: its own walk over the chunks and its second read of every start state. SMEM: Qf, Of per
slot; at K = V = 128 two slots at L = 1 (~218 KiB, one o tile), one at L >= 2.

16-bit start states (`starts_dtype` = the inputs' dtype): the state stays float32 in registers and is
rounded only on the way out; the consumers (outputs kernel, chunk backward) use the starts only as
16-bit wgmma operands. Register kernel: the two alternating staging tiles become 16-bit (16 KiB each
at K = V = 128; one float32 tile remains for s0 in and the final state out: the same SMEM as before
at slots >= 2, 16 KiB more at slots = 1),
so the per-step store is 16 KiB instead of 32 (per-step traffic ~64 KiB instead of ~80 at L = 1) and
the whole pass writes half the bytes (256 instead of 512 MiB at B*T = 32K, H = 16). Staged kernel:
the 16-bit operand copy of S (s_b) goes out by TMA itself; no float32 copy is written per step.
Rounding in the kernel is the same as XLA's cast of the float32 starts (bit-identical, tested).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.common import Prepared
from pallas_kernels.gpu.mosaic import common as mc

f32 = jnp.float32
C = mc.CHUNK
KEY_SIZES = (64, 128)
BLOCK_V_SIZES = (32, 64)
SMEM_BUDGET = 220 * 1024  # of the 227 KiB a CTA may have: room for barriers and alignment


def accumulate(init, pairs, shape):
    """`init + sum(a @ b for a, b in pairs)` [M, N] float32: len(pairs) wgmmas into one zeroed
    accumulator, one wait, then the add in registers. (`pl.run_state` with `plgpu.ACC.init` would
    skip the add, but the Mosaic GPU interpreter has no rule for the wgmma it discharges to; the
    result passes an optimization barrier as in `common.matmul`.)"""

    def scoped(acc):
        for a, b in pairs:
            plgpu.wgmma(acc, a, b)
        return acc[...]

    out = lax.optimization_barrier(pl.run_scoped(scoped, plgpu.ACC(shape, f32)))
    return out if init is None else init + out


def overlapped(a, b, shape, meanwhile):
    """(a @ b [M, N] float32, meanwhile()): the wgmma is issued, then `meanwhile` (register / SMEM
    work that does not touch the product) runs while the tensor cores compute, then the accumulator
    is read (waiting for the wgmma; the product passes an optimization barrier as in `common.matmul`)."""

    def scoped(acc):
        plgpu.wgmma(acc, a, b)
        other = meanwhile()
        return acc[...], other

    out, other = pl.run_scoped(scoped, plgpu.ACC(shape, f32))
    return lax.optimization_barrier(out), other


def operand_smem(shape, dtype, block_v):
    """SMEM for a 16-bit wgmma operand of a kernel whose B operands are block_v columns wide.

    Mosaic GPU's wgmma takes one swizzle for both operands, and a [*, block_v] B operand allows at
    most block_v * 2 bytes (64 for block_v = 32): the A operands ([C, K] tiles) get the same."""
    return mc.smem(shape, dtype, max_swizzle=min(128, block_v * jnp.dtype(dtype).itemsize))


def check_inputs(name, *, dtype, chunk, K, V, block_v):
    """ValueError for what the Mosaic state kernels do not support."""
    if jnp.dtype(dtype) not in mc.DTYPES:
        raise ValueError(f"{name}: inputs must be bfloat16 or float16 (got {jnp.dtype(dtype)}); float32 inputs "
                         "use the Triton kernels")
    if chunk != C:
        raise ValueError(f"{name}: chunk size must be {C} (got {chunk})")
    if K not in KEY_SIZES:
        raise ValueError(f"{name}: key size K must be one of {KEY_SIZES} (got {K})")
    if block_v not in BLOCK_V_SIZES:
        raise ValueError(f"{name}: block_v must be one of {BLOCK_V_SIZES} (got {block_v})")
    if V % block_v:
        raise ValueError(f"{name}: value size V={V} must be a multiple of block_v={block_v}")


def out_dtype(name, arg, requested, dtype):
    """The dtype of a per-chunk state output: float32 (requested None or float32) or the inputs' 16-bit
    `dtype`; `requested` may be a dtype or its name ("bfloat16")."""
    if requested is None:
        return jnp.dtype(f32)
    try:
        requested = jnp.dtype(requested)
    except TypeError as e:
        raise ValueError(f"{name}: `{arg}` must be None, 'float32' or the inputs' dtype {jnp.dtype(dtype)} "
                         f"(got {requested!r})") from e
    if requested not in (jnp.dtype(f32), jnp.dtype(dtype)):
        raise ValueError(f"{name}: `{arg}` must be None, 'float32' or the inputs' dtype {jnp.dtype(dtype)} "
                         f"(got {requested})")
    return requested


def _smem_bytes(slots, L, K, bv, itemsize, starts_dtype=f32):
    tiles = slots * (C * K + C * bv + L * C * K + L * C * bv) * itemsize  # p, qe, k_l, v_l
    tiles += slots * ((L + 1) * C + K) * 4  # scalings
    return tiles + (L * C * bv + K * bv) * itemsize + K * bv * 4  # u_l, S (16-bit), S (f32)


def state_pass(x: Prepared, tv: mc.TokenVectors, p, qe, *, block_v=64, with_starts=True, slots=None,
               registers=None, starts_dtype=None, factors=None, acc_state=False, interpret=False):
    """(starts [B, H, N, K, V] float32 (or `starts_dtype`) or None unless `with_starts`, final [B, H, K, V]
    float32), and with `factors` also o [B, Tp, H, V] in v's dtype.

    x: the padded inputs (k [B, Tp, H, L, K], v [B, Tp, H, L, V] 16-bit, s0 [B, H, K, V] float32);
    tv: `common.token_vectors(x)`; p [B, Tp, H, K], qe [B, Tp, H, V] in the input dtype (the intra
    kernel's). Grid (B, H, V / block_v), sequential over the N = Tp / 64 chunks in each CTA.
    block_v: value columns per CTA, 32 or 64 (32: twice the CTAs, for long T at small B * H; its wgmma
    operands use the 64-byte swizzle, `operand_smem`; the staged kernel, see the module docstring).
    slots: SMEM slots of the chunk tiles in a ring: 3 (block_v = 64 only: chunks n + 1 and n + 2 in
    flight while chunk n computes), 2 (chunk n + 1 in flight) or 1 (fetched after this one's last
    wgmma: least SMEM); None = the most that fit in SMEM_BUDGET (block_v = 64, bf16, K = 128: 3 at
    L = 1, 2 at L = 2, 1 at L = 3). registers: the state transposed in registers (`_register_pass`,
    block_v = 64 only) or the staged kernel; None = registers at block_v = 64.
    starts_dtype: None / float32, or the inputs' 16-bit dtype (also as a string, "bfloat16"): the start
    states are rounded to it on the way out (the state stays float32 in registers; `final` is float32).
    Its consumers use them only as 16-bit wgmma operands: half the bytes written and read.
    factors: None, or (Qf [B, Tp, H, K], Of [B, Tp, H, V]) in the inputs' dtype
    (`output_factors.output_factors`, scale folded in): the pass then also writes the chunk outputs
    o = Qf S + Of, one more product per chunk (`_register_pass`, block_v = 64 only), in place of the
    outputs kernel.
    acc_state: the register kernel's update accumulator starts from the decayed state (`plgpu.ACC.init`),
    so S^T is not held beside it through the step: ptxas (sm_90a, K = V = 128) then spills nothing, where
    the default form spills 332 / 196 / 480 bytes at L = 1 / 2 / 3, 42-44 stores and 84-107 loads in every
    chunk step. GPU only (the interpreter has no rule for the wgmma an initialised accumulator becomes: it
    runs the default form); off until its GPU tests pass.
    """
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    check_inputs("state_pass", dtype=x.k.dtype, chunk=C, K=K, V=V, block_v=block_v)
    if Tp % C:
        raise ValueError(f"state_pass: the padded length Tp={Tp} of `x` must be a multiple of {C} "
                         f"(prepare with chunk_size={C})")
    named = [("p", p, (B, Tp, H, K)), ("qe", qe, (B, Tp, H, V))]
    if factors is not None:
        if len(factors) != 2:
            raise ValueError("state_pass: `factors` must be the pair (Qf, Of) of `output_factors`")
        named += [("factors[0] (Qf)", factors[0], (B, Tp, H, K)), ("factors[1] (Of)", factors[1], (B, Tp, H, V))]
    for name, t, shape in named:
        if t.shape != shape or t.dtype != x.k.dtype:
            raise ValueError(f"state_pass: `{name}` must be {shape} {x.k.dtype} (got {t.shape} {t.dtype})")
    N = Tp // C
    dt = x.k.dtype
    sdt = out_dtype("state_pass", "starts_dtype", starts_dtype, dt) if with_starts else jnp.dtype(f32)
    bv = block_v
    registers = bv == 64 if registers is None else registers
    if registers and bv != 64:
        raise ValueError(f"state_pass: registers=True needs block_v=64 (got block_v={bv})")
    fused = factors is not None
    if fused and not registers:
        raise ValueError(f"state_pass: `factors` (the outputs in the pass) need the register kernel: block_v=64, "
                         f"registers=None or True (got block_v={bv}, registers={registers})")
    smem_bytes = (lambda *a: _register_smem_bytes(*a, fused=fused)) if registers else _smem_bytes
    allowed = (1, 2, 3) if registers else (1, 2)
    if slots is None:
        slots = max(n for n in allowed if n == 1 or smem_bytes(n, L, K, bv, dt.itemsize, sdt) <= SMEM_BUDGET)
    if slots not in allowed or smem_bytes(slots, L, K, bv, dt.itemsize, sdt) > SMEM_BUDGET:
        raise ValueError(f"state_pass: slots={slots} must be one of {allowed} at block_v={bv}, registers={registers} and fit in "
                         f"{SMEM_BUDGET} bytes of SMEM "
                         f"(it needs {smem_bytes(slots, L, K, bv, dt.itemsize, sdt)} at L={L}, K={K}, block_v={bv})")
    # [B, H, N, L + 1, C]: per chunk the rows end_m1, end * beta_l; all as a [K] row per chunk
    scal = jnp.stack([tv.end_m1] + [tv.end * tv.beta[:, :, l] for l in range(L)], axis=2)
    scal = jnp.swapaxes(scal.reshape(B, H, L + 1, N, C), 2, 3)
    all_rows = jnp.broadcast_to(tv.all[..., None], (B, H, N, K))
    if not isinstance(acc_state, bool) or (acc_state and not registers):
        raise ValueError(f"state_pass: `acc_state` = {acc_state!r} must be True or False, and True needs the "
                         f"register kernel (block_v=64, registers=None or True)")
    if registers:
        return _register_pass(x, p, qe, scal, all_rows, slots=slots, with_starts=with_starts, starts_dtype=sdt,
                              factors=factors, acc_state=acc_state, interpret=interpret)
    low_starts = with_starts and sdt != jnp.dtype(f32)  # the start states leave from s_b, the 16-bit operand

    def body(p_ref, qe_ref, k_ref, v_ref, scal_ref, all_ref, s0_ref, *outs, p_s, qe_s, k_s, v_s, scal_s,
             all_s, u_s, s_b, s_f, bar, s0_bar):
        starts_ref, final_ref = outs if with_starts else (None, outs[0])
        b, h, vb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
        vs = pl.ds(vb * bv, bv)

        def issue(n, slot):
            rows = pl.ds(n * C, C)
            plgpu.copy_gmem_to_smem(p_ref.at[b, rows, h], p_s.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(qe_ref.at[b, rows, h, vs], qe_s.at[slot], bar.at[slot])
            for l in range(L):
                plgpu.copy_gmem_to_smem(k_ref.at[b, rows, h, l], k_s.at[slot, l], bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, rows, h, l, vs], v_s.at[slot, l], bar.at[slot])
            plgpu.copy_gmem_to_smem(scal_ref.at[b, h, n], scal_s.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(all_ref.at[b, h, n], all_s.at[slot], bar.at[slot])

        plgpu.copy_gmem_to_smem(s0_ref.at[b, h, :, vs], s_f, s0_bar)
        issue(0, 0)
        plgpu.barrier_wait(s0_bar)
        s0 = plgpu.load(s_f, layout=mc.WGMMA)

        def step(n, s):
            slot = lax.rem(n, 2) if slots == 2 else 0
            plgpu.barrier_wait(bar.at[slot])
            if slots == 2:
                @pl.when(n + 1 < N)
                def _prefetch():
                    plgpu.commit_smem()
                    issue(n + 1, 1 - slot)

            if with_starts:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous start state has left s_f / s_b
                if not low_starts:
                    s_f[...] = s
            s_b[...] = s.astype(dt)
            plgpu.commit_smem()
            if with_starts:
                plgpu.copy_smem_to_gmem(s_b if low_starts else s_f, starts_ref.at[b, h, n, :, vs])
            rows = lambda i: mc.rows_of(plgpu.load(scal_s.at[slot, i], layout=mc.ROWS), (C, bv))
            v_f = lambda l: plgpu.load(v_s.at[slot, l], layout=mc.WGMMA).astype(f32)

            def meanwhile():  # while P S computes: the write terms, and Qe's part of the erase term
                for l in range(1, L):
                    u_s.at[l][...] = (rows(l + 1) * v_f(l)).astype(dt)
                qe_f = plgpu.load(qe_s.at[slot], layout=mc.WGMMA).astype(f32)
                return rows(1) * v_f(0) - rows(0) * qe_f

            ps, u0 = overlapped(p_s.at[slot], s_b, (C, bv), meanwhile)
            u_s.at[0][...] = (u0 - rows(0) * ps).astype(dt)  # end * beta_0 * v_0 - end_m1 * (P S + Qe)
            plgpu.commit_smem()
            decayed = mc.rows_of(plgpu.load(all_s.at[slot], layout=mc.ROWS), (K, bv)) * s
            s = accumulate(decayed, [(k_s.at[slot, l].T, u_s.at[l]) for l in range(L)], (K, bv))
            if slots == 1:
                @pl.when(n + 1 < N)
                def _fetch():
                    plgpu.commit_smem()
                    issue(n + 1, 0)
            return s

        s = lax.fori_loop(0, N, step, s0)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        s_f[...] = s
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s_f, final_ref.at[b, h, :, vs])
        plgpu.wait_smem_to_gmem(0)

    operand = lambda shape: operand_smem(shape, dt, bv)
    scratch = dict(
        p_s=operand((slots, C, K)), qe_s=mc.smem((slots, C, bv), dt), k_s=operand((slots, L, C, K)),
        v_s=mc.smem((slots, L, C, bv), dt), scal_s=plgpu.SMEM((slots, L + 1, C), f32),
        all_s=plgpu.SMEM((slots, K), f32), u_s=operand((L, C, bv)), s_b=operand((K, bv)),
        s_f=plgpu.SMEM((K, bv), f32), bar=plgpu.Barrier(num_arrivals=2 * L + 4, num_barriers=slots),
        s0_bar=plgpu.Barrier(num_arrivals=1))
    out_type = [jax.ShapeDtypeStruct((B, H, K, V), f32)]
    if with_starts:
        out_type.insert(0, jax.ShapeDtypeStruct((B, H, N, K, V), sdt))
    outs = mc.kernel(body, name="prism_mosaic_state", out_type=tuple(out_type), scratch=scratch,
                     grid=(B, H, V // bv), grid_names=("b", "h", "v"), interpret=interpret)(
        p, qe, x.k, x.v, scal, all_rows, x.s0.astype(f32))
    return (outs[0], outs[1]) if with_starts else (None, outs[0])


def a_operand(value, staging, interpret):
    """A 16-bit register tile as a wgmma A operand: the registers themselves on the GPU (no SMEM round
    trip, no fence); on the CPU interpreter, which takes operands from SMEM only, `staging` (an SMEM
    buffer of the same shape) after a store and a fence."""
    if not interpret:
        return value
    staging[...] = value
    plgpu.commit_smem()
    return staging


def store_transposed(ref, value):
    """ref[...] = value.T for a float32 WGMMA-layout tile `value` [M, N] and an SMEM ref [N, M] (float32
    or 16-bit: the value is rounded to ref's dtype): the register layout is switched to WGMMA_TRANSPOSED
    (one lane shuffle per register pair), which stores through the transposed view."""
    ref.T[...] = plgpu.layout_cast(value, plgpu.Layout.WGMMA_TRANSPOSED).astype(ref.dtype)


def send_last_state(ref, value, dst):
    """A register walk's last state out: once every earlier TMA store has read its SMEM, value.T
    (`store_transposed`) into ref and from there to dst, waited for before the kernel ends."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    store_transposed(ref, value)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(ref, dst)
    plgpu.wait_smem_to_gmem(0)


def _register_smem_bytes(slots, L, K, bv, itemsize, starts_dtype=f32, *, fused=False, o_buffers=1):
    tiles = slots * (C * K + C * bv + L * C * K + L * C * bv) * itemsize  # p, qe, k_l, v_l
    tiles += slots * ((L + 1) * C + K) * 4  # scalings
    if fused:  # Qf, Of per slot; o staged on its way out
        tiles += slots * (C * K + C * bv) * itemsize + o_buffers * C * bv * itemsize
    staging = min(slots, 2) * K * bv * jnp.dtype(starts_dtype).itemsize  # start states out (two alternating)
    return tiles + staging + (K * bv * 4 if jnp.dtype(starts_dtype) != f32 else 0)  # + s0 / final in float32


def _register_pass(x, p, qe, scal, all_rows, *, slots, with_starts, starts_dtype, factors=None, acc_state=False,
                   interpret=False):
    """The state pass at block_v = 64 with the state transposed in registers (see the module docstring):

        E^T = S^T P^T + Qe^T                        [bv, C]  (A = S^T from registers, B = P^T in SMEM)
        S^T <- all * S^T + sum_l u_l^T k_l          [bv, K]  (A = u_l^T from registers, B = k_l in SMEM)
        u_0^T = (end beta_0) v_0^T - end_m1 E^T,  u_l^T = (end beta_l) v_l^T   (scalings on columns)

    With `factors` (Qf, Of) also o^T = S^T Qf^T + Of^T [bv, C]: its product is issued right after E^T's
    (same A operand), read while S's update computes, and o leaves by TMA from a transposed store.
    """
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    N = Tp // C
    dt = x.k.dtype
    bv = 64
    low_starts = jnp.dtype(starts_dtype) != f32  # 16-bit start states: staged in s_o, s_f keeps s0 / final
    fused = factors is not None
    o_buffers = 0
    if fused:
        o_buffers = 2 if _register_smem_bytes(slots, L, K, bv, dt.itemsize, starts_dtype, fused=True,
                                              o_buffers=2) <= SMEM_BUDGET else 1
    # TMA stores per chunk, in this order: the start state, then o. Before a staging buffer is rewritten
    # the store that last read it must be done: `pending` stores issued after it may still be in flight.
    per_step = int(with_starts) + int(fused)
    starts_pending = per_step * min(slots, 2) - 1
    o_pending = per_step * o_buffers - 1

    def body(p_ref, qe_ref, k_ref, v_ref, scal_ref, all_ref, s0_ref, *refs, p_s, qe_s, k_s, v_s, scal_s, all_s,
             s_f, bar, s0_bar, s_o=None, qf_s=None, of_s=None, o_s=None, st_b=None, u_b=None):
        refs = list(refs)
        qf_ref, of_ref = (refs.pop(0), refs.pop(0)) if fused else (None, None)
        starts_ref = refs.pop(0) if with_starts else None
        final_ref = refs.pop(0)
        o_ref = refs.pop(0) if fused else None
        stage = s_o if low_starts else s_f
        b, h, vb = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("v")
        vs = pl.ds(vb * bv, bv)

        def issue(n, slot):
            rows = pl.ds(n * C, C)
            plgpu.copy_gmem_to_smem(p_ref.at[b, rows, h], p_s.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(qe_ref.at[b, rows, h, vs], qe_s.at[slot], bar.at[slot])
            for l in range(L):
                plgpu.copy_gmem_to_smem(k_ref.at[b, rows, h, l], k_s.at[slot, l], bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, rows, h, l, vs], v_s.at[slot, l], bar.at[slot])
            plgpu.copy_gmem_to_smem(scal_ref.at[b, h, n], scal_s.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(all_ref.at[b, h, n], all_s.at[slot], bar.at[slot])
            if fused:
                plgpu.copy_gmem_to_smem(qf_ref.at[b, rows, h], qf_s.at[slot], bar.at[slot])
                plgpu.copy_gmem_to_smem(of_ref.at[b, rows, h, vs], of_s.at[slot], bar.at[slot])

        plgpu.copy_gmem_to_smem(s0_ref.at[b, h, :, vs], s_f.at[0], s0_bar)
        for j in range(min(max(slots - 1, 1), N)):  # chunks 0 .. slots - 2 in flight before the walk
            issue(j, j)
        plgpu.barrier_wait(s0_bar)
        st0 = plgpu.load(s_f.at[0].T, layout=mc.WGMMA)  # S^T [bv, K]

        def step(n, st):
            slot = lax.rem(n, slots)
            plgpu.barrier_wait(bar.at[slot])

            cols = lambda i, width: mc.cols_of(plgpu.load(scal_s.at[slot, i], layout=mc.COLS), (bv, width))
            v_t = lambda l: plgpu.load(v_s.at[slot, l].T, layout=mc.WGMMA).astype(f32)  # v_l^T [bv, C]
            st_lo = a_operand(st.astype(dt), st_b, interpret)
            out = lax.rem(n, 2) if slots > 1 else 0  # the start-state staging buffer of this step

            def scoped(acc_e, *acc_o, acc_s=None):
                plgpu.wgmma(acc_e, st_lo, p_s.at[slot].T)  # E^T - Qe^T: the dependent product, first
                if fused:  # o^T - Of^T: the same A operand, off the chain
                    plgpu.wgmma(acc_o[0], st_lo, qf_s.at[slot].T)
                if slots > 1:  # chunk n + slots - 1 into the slot chunk n - 1 used (its reads are done)
                    @pl.when(n + slots - 1 < N)
                    def _prefetch():
                        plgpu.commit_smem()
                        issue(n + slots - 1, lax.rem(n + slots - 1, slots))
                # while it computes: the TMA prefetch (issued after the wgmma: off the chain), the start
                # state out, the write terms l > 0 into acc_s, Qe's part
                if with_starts:
                    plgpu.wait_smem_to_gmem(starts_pending, wait_read_only=True)  # stage[out] has left
                    store_transposed(stage.at[out], st)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(stage.at[out], starts_ref.at[b, h, n, :, vs])
                decay = lambda: mc.cols_of(plgpu.load(all_s.at[slot], layout=mc.COLS), (bv, K))

                def update(acc_s):
                    for l in range(1, L):
                        u = a_operand((cols(l + 1, C) * v_t(l)).astype(dt), None if u_b is None else u_b.at[l],
                                      interpret)
                        plgpu.wgmma(acc_s, u, k_s.at[slot, l])
                    qe_t = plgpu.load(qe_s.at[slot].T, layout=mc.WGMMA).astype(f32)
                    end_m1 = cols(0, C)  # loaded before the wait: only an FMA and a cast follow E^T
                    w0 = cols(1, C) * v_t(0) - end_m1 * qe_t
                    e = lax.optimization_barrier(plgpu.wgmma_accumulator_load(acc_e, wait_n=L - 1 + int(fused)))
                    u0 = a_operand((w0 - end_m1 * e).astype(dt), None if u_b is None else u_b.at[0], interpret)
                    plgpu.wgmma(acc_s, u0, k_s.at[slot, 0])
                    if fused:  # while S's update computes: o^T = (S^T Qf^T) + Of^T out through SMEM
                        o_t = lax.optimization_barrier(plgpu.wgmma_accumulator_load(acc_o[0], wait_n=1))
                        o_t = o_t + plgpu.load(of_s.at[slot].T, layout=mc.WGMMA).astype(f32)
                        ob = lax.rem(n, 2) if o_buffers == 2 else 0
                        plgpu.wait_smem_to_gmem(o_pending, wait_read_only=True)  # o_s[ob] has left
                        store_transposed(o_s.at[ob], o_t)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(o_s.at[ob], o_ref.at[b, pl.ds(n * C, C), h, vs])

                if acc_s is None:
                    # The update's accumulator starts from the decayed state: S^T is dead once it has gone
                    # out, not held beside the accumulator through the step (GPU only: the interpreter
                    # does not continue an accumulator).
                    return lax.optimization_barrier(pl.run_state(update)(plgpu.ACC.init(decay() * st)))
                update(acc_s)
                return decay() * st + lax.optimization_barrier(plgpu.wgmma_accumulator_load(acc_s, wait_n=0))

            accs = [plgpu.ACC((bv, C), f32)] + ([plgpu.ACC((bv, C), f32)] if fused else [])
            if acc_state and not interpret:
                st = pl.run_scoped(scoped, *accs)
            else:
                st = pl.run_scoped(lambda acc_e, acc_s, *acc_o: scoped(acc_e, *acc_o, acc_s=acc_s),
                                   accs[0], plgpu.ACC((bv, K), f32), *accs[1:])
            if slots == 1:
                @pl.when(n + 1 < N)
                def _fetch():
                    plgpu.commit_smem()
                    issue(n + 1, 0)
            return st

        st = lax.fori_loop(0, N, step, st0)
        send_last_state(s_f.at[0], st, final_ref.at[b, h, :, vs])

    operand = lambda shape: mc.smem(shape, dt)
    scratch = dict(
        p_s=operand((slots, C, K)), qe_s=operand((slots, C, bv)), k_s=operand((slots, L, C, K)),
        v_s=operand((slots, L, C, bv)), scal_s=plgpu.SMEM((slots, L + 1, C), f32),
        all_s=plgpu.SMEM((slots, K), f32), s_f=mc.smem((1 if low_starts else min(slots, 2), K, bv), f32),
        bar=plgpu.Barrier(num_arrivals=2 * L + 4 + 2 * int(fused), num_barriers=slots),
        s0_bar=plgpu.Barrier(num_arrivals=1))
    if low_starts:
        scratch.update(s_o=mc.smem((min(slots, 2), K, bv), starts_dtype))
    if fused:
        scratch.update(qf_s=operand((slots, C, K)), of_s=operand((slots, C, bv)), o_s=operand((o_buffers, C, bv)))
    if interpret:  # SMEM copies of the register operands (the interpreter's wgmma reads SMEM only)
        scratch.update(st_b=operand((bv, K)), u_b=operand((L, bv, C)))
    out_type = [jax.ShapeDtypeStruct((B, H, K, V), f32)]
    if with_starts:
        out_type.insert(0, jax.ShapeDtypeStruct((B, H, N, K, V), starts_dtype))
    if fused:
        out_type.append(jax.ShapeDtypeStruct((B, Tp, H, V), x.v.dtype))
    outs = mc.kernel(body, name="prism_mosaic_state_registers" + ("_outputs" if fused else ""),
                     out_type=tuple(out_type), scratch=scratch, grid=(B, H, V // bv), grid_names=("b", "h", "v"),
                     interpret=interpret)(p, qe, x.k, x.v, scal, all_rows, x.s0.astype(f32), *(factors or ()))
    starts = outs[0] if with_starts else None
    final = outs[1] if with_starts else outs[0]
    return (starts, final, outs[-1]) if fused else (starts, final)
