"""The chunk-64 GPU pipeline of `prism_pallas(kernel="mosaic")`: six stages, each the Mosaic GPU kernel
of this package or, for stages left out of `stages`, the Triton kernel with the same contract (for the
chunk backward, `options["grads"]["impl"]` may instead pick the hand-derived one vmapped in XLA:
`GRADS_FALLBACKS`).

    forward   intra (solve, P, Qe, saved inverse)  ->  state (sequential chunk walk, start states)
              ->  outputs
    backward  pullback (P, ek, a, Y per chunk)  ->  reverse (end-state cotangents)  ->  grads

With fused outputs (`mosaic_options={"outputs": {"fused": True}}`, the default at L = 1:
`FUSED_OUTPUTS_WRITES`) the
forward is intra (also the output factors Qf, Of; with fused="xla" XLA forms them) -> state (also o =
Qf S + Of), and the backward reverse (the pull-back's terms formed from the kept P and Qf) -> grads:
the outputs and pull-back kernels do not run (`Residuals`).

Stage names: `STAGES`. Mixing lets every Mosaic kernel be timed and checked alone inside the whole
op (`benchmarks/kernels.py` variants). Shapes as `pallas_kernels.backward.backward`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.common import Prepared
from pallas_kernels.gpu.mosaic.common import CHUNK, token_vectors

STAGES = ("intra", "state", "outputs", "pullback", "reverse", "grads")
# What stands in for the chunk backward outside `stages` (mosaic_options["grads"]["impl"]): the Triton
# kernel at chunk 64, or the same hand-derived gradients vmapped in XLA (`backward.explicit_xla_grads`).
GRADS_FALLBACKS = ("triton", "xla")
# The outputs written by the state pass from per-chunk factors (`output_factors`) instead of by the outputs
# kernel (mosaic_options["outputs"]["fused"]): True = the factors formed by the intra kernel, "xla" = in XLA.
# The default at the write counts in FUSED_OUTPUTS_WRITES: at L = 1 the whole op was 16% faster with it and
# the column solve on an H100 in session 18 (3.29 against 3.91 ms, same gradient error). At L = 2 with the
# factors from XLA (before the intra kernel formed them at L > 1) it was 17% slower (session 19, H100: 9.25
# against 7.89 ms); with the intra kernel's factors (session 19, H100, one run) 7.66 against 7.77 ms at L = 2
# and 13.21 against 13.41 at L = 3: within the runs' noise, with a slower forward at L = 2 and more memory.
FUSED_OUTPUTS_WRITES = (1,)


class Residuals(NamedTuple):
    """What the forward with fused outputs keeps for the backward besides the start states (in the
    place of the saved inverse): the reverse pass then forms the pull-back's terms itself
    (`reverse.reverse_from_factors`) and the pull-back kernel does not run."""

    ainv: jax.Array | None  # [B, H, N, C, C] float32, or 16-bit where `inverse16`
    p: jax.Array  # [B, Tp, H, K] the intra kernel's P, 16-bit
    qf: jax.Array  # [B, Tp, H, K] the output factor Qf, 16-bit


def supported_stages(K, L, dtype):
    """The stages whose Mosaic kernel takes this key width, write count and dtype by default: all but
    the chunk backward where no value block fits (L = 3 at K = 128 takes its work split at 32 value
    columns per CTA while `chunk_grads.NARROW_BY_DEFAULT` is set, as it is; L = 4 at K = 128: nothing
    fits) and the intra kernel beyond L = 4."""
    from pallas_kernels.gpu.mosaic import chunk_grads, intra

    return tuple(s for s in STAGES
                 if not (s == "grads" and not chunk_grads.supported(K, L, dtype))
                 and not (s == "intra" and L > intra.MAX_WRITES))


def check_stages(stages, K, L, dtype):
    """`stages` as a tuple of stage names: None = `supported_stages` (the others run on Triton);
    named stages must exist (ValueError) and their kernels check the shapes themselves."""
    if stages is None:
        return supported_stages(K, L, dtype)
    stages = tuple(stages)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"prism_pallas: `mosaic_stages` has {bad}, expected a subset of {STAGES}")
    return stages


def stage_options(options):
    """{stage: {keyword: value}} (block sizes etc. of the Mosaic kernels; for "grads" outside `stages`,
    "impl" in `GRADS_FALLBACKS` and the Triton chunk backward's block_v, v_split, num_warps,
    num_stages) as a hashable tuple; None or {} = the kernels' defaults. ValueError for an unknown
    stage."""
    options = options or {}
    if isinstance(options, tuple):
        return options
    bad = [s for s in options if s not in STAGES]
    if bad:
        raise ValueError(f"prism_pallas: `mosaic_options` has stages {bad}, expected some of {STAGES}")
    grads = dict(options.get("grads", {}))
    impl = grads.pop("impl", None)
    if impl is not None and impl not in GRADS_FALLBACKS:
        raise ValueError(f"prism_pallas: mosaic_options['grads']['impl'] = {impl!r}, expected one of "
                         f"{GRADS_FALLBACKS} (what stands in for the Mosaic chunk backward)")
    if impl == "xla" and grads:
        raise ValueError(f"prism_pallas: mosaic_options['grads'] with impl 'xla' takes no other keywords, "
                         f"got {sorted(grads)}")
    frozen = lambda v: tuple(v) if isinstance(v, list) else v  # JSON configs give lists (grads' `registers`)
    return tuple(sorted((s, tuple(sorted((k, frozen(v)) for k, v in kw.items()))) for s, kw in options.items()))


def resolve_options(options, stages, stages_given):
    """`stage_options` of the caller's `options` for these `stages`, with the pipeline's rule for the
    chunk backward: where it is not a Mosaic stage because its kernel does not take the shape
    (`stages_given` False), the XLA one stands in unless options["grads"]["impl"] names another
    (H100, L = 3, K = 128, before its Mosaic kernel fitted there: 22.65 ms fwd+bwd against 53.07 with
    the Triton kernel at chunk 64);
    "impl" while the Mosaic chunk backward runs is a ValueError. A tuple (already hashed) passes."""
    if isinstance(options, tuple):
        return options
    options = dict(options or {})
    grads = dict(options.get("grads", {}))
    if "grads" in stages and "impl" in grads:
        raise ValueError("prism_pallas: mosaic_options['grads']['impl'] picks what stands in for the Mosaic "
                         "chunk backward; here it runs (it is in `mosaic_stages`): leave 'impl' out or "
                         "leave 'grads' out of `mosaic_stages`")
    if "grads" not in stages and not stages_given:
        options["grads"] = {"impl": "xla", **grads}
    return stage_options(options)


def starts16(stages):
    """Whether the state pass writes 16-bit start states: only when their readers, the outputs
    kernel and the chunk backward, are both Mosaic (they use S only as a 16-bit operand; the Triton
    kernels read float32)."""
    return {"state", "outputs", "grads"} <= set(stages)


# The intra kernel saves the inverses in 16 bits where `inverse16` allows it (session 21, H100, L = 1,
# T = 2K: op fwd+bwd 3.26 ms against 3.36 with float32 inverses cast by XLA, 1.61 against 1.73 GiB, the
# same gradients to every printed digit). `mosaic_options={"intra": {"inverse_dtype": "float32"}}` keeps float32.
INVERSE16_BY_DEFAULT = True


def inverse16(stages, fused):
    """Whether the intra kernel may save the inverses X in the inputs' 16-bit dtype: with fused outputs
    (`fused` True or "xla") when their one reader is the Mosaic chunk backward (which uses X only as a 16-bit operand; the reverse
    pass then works from the output factors, so no pull-back kernel reads X in float32). Saves XLA's cast
    of float32 X and half of X's bytes."""
    return bool(fused) and {"pullback", "reverse", "grads"} <= set(stages)


def _kw(options, stage):
    return dict(dict(options or ()).get(stage, ()))


def forward(x: Prepared, *, scale, stages, inverse="blocked8", save_inverse=True, interpret=False,
            options=(), resets=True):
    """(o [B, Tp, H, V], final [B, H, K, V] f32, starts [B, H, N, K, V] f32, ainv [B, H, N, C, C] f32
    or None) of the padded inputs at chunk 64; with fused outputs `Residuals` (ainv, P, Qf) in ainv's
    place. options: `stage_options` (Mosaic stages' keywords);
    resets: whether x may hold document resets (the intra kernel's `resets`).
    The start states come back in the inputs' 16-bit dtype when every stage that reads them (outputs,
    chunk backward) is Mosaic (`starts16`), else float32."""
    tv = token_vectors(x) if {"intra", "state", "outputs"} & set(stages) else None
    out_kw = _kw(options, "outputs")
    fused = (out_kw.pop("fused", x.v.shape[-2] in FUSED_OUTPUTS_WRITES) if {"state", "outputs"} <= set(stages)
             else False)
    if fused not in (False, True, "xla"):
        raise ValueError(f"prism_pallas: mosaic_options['outputs']['fused'] = {fused!r}, expected True (the "
                         "intra kernel forms the output factors), 'xla' (XLA forms them) or False")
    if fused and out_kw:
        raise ValueError(f"prism_pallas: mosaic_options['outputs'] with 'fused' takes no other keywords (the outputs "
                         f"kernel does not run), got {sorted(out_kw)}")
    factors = None
    if "intra" in stages:
        from pallas_kernels.gpu.mosaic.intra import intra

        in_intra = fused is True
        inverse_dtype = x.k.dtype if INVERSE16_BY_DEFAULT and inverse16(stages, fused) else None
        out = intra(x, tv, save_inverse=save_inverse, interpret=interpret,
                    **{"resets": resets, "inverse_dtype": inverse_dtype, **_kw(options, "intra"),
                       **({"factors": True, "scale": scale} if in_intra else {})})
        p, qe, ainv = out[:3]
        factors = out[3:] if in_intra else None
    else:
        from pallas_kernels.gpu import split

        p, qe, ainv = split.intra(x, chunk_size=CHUNK, inverse=inverse, save_inverse=save_inverse,
                                  interpret=interpret)
    if "state" in stages:
        from pallas_kernels.gpu.mosaic.state import state_pass

        kw = {"starts_dtype": x.q.dtype if starts16(stages) else None, **_kw(options, "state")}
        if fused:  # o = Qf S + Of written by the state pass (`output_factors`)
            from pallas_kernels.gpu.mosaic.output_factors import output_factors

            kw["factors"] = factors if factors is not None else output_factors(x, tv, p, qe, scale=scale)
            starts, final, o = state_pass(x, tv, p, qe, interpret=interpret, **kw)
            return o, final, starts, Residuals(ainv, p, kw["factors"][0])
        starts, final = state_pass(x, tv, p, qe, interpret=interpret, **kw)
    else:
        from pallas_kernels.gpu import split

        starts, final, _ = split.state_pass(x, p, qe, chunk_size=CHUNK, interpret=interpret)
    if "outputs" in stages:
        from pallas_kernels.gpu.mosaic.outputs import outputs

        o = outputs(x, tv, p, qe, starts, scale=scale, interpret=interpret, **out_kw)
    else:
        from pallas_kernels.gpu import split

        o = split.outputs(x, p, qe, starts, scale=scale, chunk_size=CHUNK, interpret=interpret)
    return o, final, starts, ainv


def backward(x: Prepared, starts, ainv, do, dfinal, *, scale, stages, interpret=False, options=()):
    """(dq, dk, dv, dbeta, dg, ds0) of the padded inputs from the forward's start states and saved
    inverses (or its `Residuals`); do [B, Tp, H, V], dfinal [B, H, K, V]. Between Mosaic stages the
    per-chunk Y of the pull-back and the end-state cotangents travel in the inputs' 16-bit dtype (each
    rounded once from its float32 accumulator; their readers use them as 16-bit operands or add them
    to float32). With `Residuals` and Mosaic pull-back and reverse stages, the reverse pass forms the
    pull-back's terms from P and Qf (`reverse_from_factors`): no pull-back kernel."""
    saved = ainv if isinstance(ainv, Residuals) else None
    ainv = saved.ainv if saved is not None else ainv
    tv = token_vectors(x) if {"pullback", "grads"} & set(stages) else None
    mm_dtype = x.q.dtype
    dfinal = dfinal.astype(jnp.float32)
    if saved is not None and {"pullback", "reverse"} <= set(stages):
        from pallas_kernels.gpu.mosaic.reverse import reverse_from_factors

        cot_end, ds0 = reverse_from_factors(x, tv, saved.p, saved.qf, do, dfinal, interpret=interpret,
                                            cot_dtype=mm_dtype if "grads" in stages else None)
        return _chunk_grads(x, tv, starts, ainv, do, cot_end, ds0, scale=scale, stages=stages, interpret=interpret,
                            options=options)
    if "pullback" in stages:
        from pallas_kernels.gpu.mosaic.pullback import state_pullback

        kw = {"y_dtype": mm_dtype if "reverse" in stages else None, **_kw(options, "pullback")}
        p, ek, a, y = state_pullback(x, tv, do, scale=scale, ainv=ainv, interpret=interpret, **kw)
    else:
        from pallas_kernels.gpu.pullback import state_pullback

        p, ek, a, y = state_pullback(x.q, x.k, x.beta, x.g, x.r, x.rm1, do, scale=scale, chunk_size=CHUNK,
                                     ainv=ainv, interpret=interpret)
    if "reverse" in stages:
        from pallas_kernels.gpu.mosaic.reverse import reverse_pass

        kw = {"cot_dtype": mm_dtype if "grads" in stages else None, **_kw(options, "reverse")}
        cot_end, ds0 = reverse_pass(p.astype(mm_dtype), ek.astype(mm_dtype), a, y, dfinal, interpret=interpret,
                                    **kw)
    else:
        from pallas_kernels.gpu.state_bwd import reverse_pass

        cot_end, ds0 = reverse_pass(p, ek, a, y, dfinal, mm_dtype=mm_dtype, interpret=interpret)
    return _chunk_grads(x, tv, starts, ainv, do, cot_end, ds0, scale=scale, stages=stages, interpret=interpret,
                        options=options)


def _chunk_grads(x, tv, starts, ainv, do, cot_end, ds0, *, scale, stages, interpret, options):
    """The last stage of `backward`: (dq, dk, dv, dbeta, dg, ds0)."""
    if "grads" in stages:
        from pallas_kernels.gpu.mosaic.chunk_grads import chunk_grads_backward

        grads = chunk_grads_backward(x, tv, starts, do, cot_end, scale=scale, ainv=ainv, interpret=interpret,
                                     **_kw(options, "grads"))
    else:
        kw = _kw(options, "grads")  # checked by `stage_options`
        if kw.pop("impl", "triton") == "xla":
            from pallas_kernels.backward import explicit_xla_grads

            if ainv is None:
                from pallas_kernels.gpu.mosaic.chunk_grads import chunk_inverses

                ainv = chunk_inverses(x)
            grads = explicit_xla_grads(x, starts, do, cot_end, ainv, scale=scale, chunk_size=CHUNK)
        else:
            from pallas_kernels.gpu.chunk_grads import chunk_grads_backward

            # the Triton kernel's block settings (block_v, v_split, num_warps, num_stages)
            grads = chunk_grads_backward(x.q, x.k, x.v, x.beta, x.g, x.r, x.rm1, starts, do, cot_end, scale=scale,
                                         chunk_size=CHUNK, ainv=ainv, interpret=interpret, **kw)
    return (*grads, ds0)
