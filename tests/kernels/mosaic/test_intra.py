"""The Mosaic GPU intra-chunk kernel (`pallas_kernels/gpu/mosaic/intra.py`) against the float64 chunk
math (`common.chunk_solve` vmapped over chunks on float64 casts of the same 16-bit inputs) and the
Triton kernel (`split.intra`, interpret mode, chunk 64); run in the Mosaic GPU interpreter on CPU,
lowered for CUDA on CPU, and (`gpu` mark) on the device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import chunk_decays, chunk_solve, prepare
from pallas_kernels.gpu import split
from pallas_kernels.gpu.mosaic import common as mc
from pallas_kernels.gpu.mosaic.intra import intra

C = mc.CHUNK


def _inputs(T=100, H=2, K=64, V=64, L=2, B=1, seed=0, resets=True, adversarial=False, dtype=jnp.bfloat16):
    """Padded inputs (chunk 64) with L2-normalised keys; `resets`: a document boundary inside the
    second chunk and one at a chunk's first token. adversarial: beta = 1, no decay and nearly
    parallel keys of alternating sign (k0 k0^T entries near +-1: the largest growth of (I + m)^{-1}
    a PRISM chunk can reach)."""
    rng = np.random.default_rng(seed)  # numpy, then one jitted prepare: eager jax ops are slow on CPU
    q = rng.normal(size=(B, T, H, K))
    k = rng.normal(size=(B, T, H, L, K))
    beta = rng.uniform(size=(B, T, H, L))
    g = -rng.uniform(size=(B, T, H)) * 0.3
    if adversarial:
        sign = (-1.0) ** np.arange(T)[None, :, None, None, None]
        k = sign * (rng.normal(size=K) + 0.05 * k)
        beta = np.ones_like(beta)
        g = np.zeros_like(g)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(B, T, H, L, V))
    seg = None
    if resets:
        seg = np.zeros((B, T), np.int32)
        seg[:, 90:] = 1
        seg[:, 2 * C:] = 2
    cast = lambda a: jnp.asarray(a, dtype)
    return _prepare(cast(q), cast(k), cast(v), cast(beta), jnp.asarray(g, jnp.float32), None,
                    None if seg is None else jnp.asarray(seg), C)


_prepare = jax.jit(prepare, static_argnums=7)
_token_vectors = jax.jit(mc.token_vectors)


def _reference(x):
    """(P, Qe, ainv) in float64 from `common.chunk_solve` per chunk, on float64 casts of x, with the
    inverse by `jnp.linalg.inv`; computed on the CPU (NumPy inputs, CPU default device)."""
    B, Tp, H, K = x.q.shape
    L, V = x.v.shape[-2:]
    N = Tp // C
    cpu = jax.devices("cpu")[0]  # float64 GEMMs do not run on the GPU ("not supported by cublasLt")
    with jax.enable_x64(True), jax.default_device(cpu):
        f64 = lambda a: jnp.asarray(np.asarray(a.astype(jnp.float32), np.float64))
        chunked = lambda a: jnp.moveaxis(a.reshape(B, N, C, *a.shape[2:]), 2, -1)  # chunk axis last
        k = jnp.moveaxis(chunked(f64(x.k)), -1, -2)  # [B, N, H, L, C, K]
        v = jnp.moveaxis(chunked(f64(x.v)), -1, -2)
        beta = chunked(f64(x.beta))  # [B, N, H, L, C]
        g = chunked(f64(x.g))  # [B, N, H, C]
        r, rm1 = (jnp.asarray(np.asarray(a)).reshape(B, N, C) for a in (x.r, x.rm1))

        def one(k, v, beta, g, r, rm1):
            d = chunk_decays(g, r, rm1)
            vws = [beta[l][:, None] * v[l] for l in range(L)]
            return chunk_solve(k[0], list(k), vws, beta[0], d, mm_dtype=jnp.float64,
                               inverse=lambda m: jnp.linalg.inv(jnp.eye(C, dtype=m.dtype) + m))

        per_head = jax.vmap(one, in_axes=(0, 0, 0, 0, None, None))
        p, qe, ainv = jax.jit(jax.vmap(jax.vmap(per_head)))(k, v, beta, g, r, rm1)  # [B, N, H, C, .]
        unchunk = lambda a: np.asarray(jnp.moveaxis(a, 3, 2).reshape(B, Tp, H, -1))
        return unchunk(p), unchunk(qe), np.asarray(jnp.moveaxis(ainv, 2, 1))


def rel(got, want):
    got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
    return np.abs(got - want).max() / np.abs(want).max()


def _check(x, interpret=True, tol=1e-2, save_inverse=True, **kw):
    """Runs the kernel, checks dtypes and the relative errors of (P, Qe[, ainv]) against float64."""
    out = intra(x, _token_vectors(x), interpret=interpret, save_inverse=save_inverse, **kw)
    assert out[0].dtype == x.k.dtype and out[1].dtype == x.k.dtype
    assert (out[2].dtype == jnp.float32) if save_inverse else (out[2] is None)
    errs = [rel(got, w) for got, w in zip(out[:2 + save_inverse], _reference(x))]
    assert max(errs) < tol, errs
    return out, errs


H0, H1 = dict(hold_m=False), dict(hold_m=True)
EVERY, ONLY = dict(reset_chunks_only=False), dict(reset_chunks_only=True)


@pytest.mark.parametrize("L,V,block,merge_split,save_inverse,chunks_per_cta,resets,opts", [
    (1, 64, 4, True, False, None, True, {}), (2, 128, 16, True, True, 1, True, H0),
    (3, 64, 32, False, True, 2, True, H1), (1, 128, 16, True, True, 2, False, H0),
    (2, 64, 8, True, True, 1, False, H1), (1, 64, 2, True, True, 1, True, H1),
    (1, 64, 16, True, True, 2, True, {**ONLY, **H1}), (2, 64, 16, True, False, 1, True, {**EVERY, **H0}),
    (1, 64, 16, True, True, 1, True, dict(step_columns=2, **H1)),
    (2, 64, 8, True, True, 1, True, dict(step_columns=2, **H0)),
    (1, 64, 16, True, True, 2, True, dict(step_columns=4, **H0)),
    (3, 64, 32, True, True, 1, True, dict(step_columns=4))])
def test_intra_matches_float64_chunk_solve(L, V, block, merge_split, save_inverse, chunks_per_cta, resets, opts):
    """merge_split=False: one 16-bit product per doubling matmul (the inverse to ~4e-3, not ~1e-5);
    chunks_per_cta=2: both chunks in one CTA, the second prefetched into the other SMEM slot;
    block 4: three substitution steps and four doublings; block 2: none, five doublings; resets:
    documents end inside a chunk and at a chunk's first token (the reset columns' correction of Qe),
    else none (and none corrected); reset_chunks_only (the default): corrected only in the chunks
    with a reset (the first of the three has none), else in every chunk; step_columns 2 at block
    16: seven pairs of substitution columns and one single column, at block 8: three and one; 4 at
    block 16: three groups of 4 and one of 3; hold_m: m0 staged once (True) or formed again (False)."""
    _, errs = _check(_inputs(L=L, V=V, seed=L, resets=resets), block=block, merge_split=merge_split,
                     save_inverse=save_inverse, chunks_per_cta=chunks_per_cta, resets=resets, **opts)
    if save_inverse:
        assert errs[2] < (1e-4 if merge_split else 1e-2), errs


@pytest.mark.slow
@pytest.mark.parametrize("block,merge_split,chunks_per_cta", [(2, True, 2), (8, True, 1), (2, False, 1)])
def test_intra_blocks_match_float64_chunk_solve(block, merge_split, chunks_per_cta):
    """block 2: the 2 x 2 diagonal blocks directly, five doublings; block 8: seven substitution steps."""
    _, errs = _check(_inputs(L=2, V=128, seed=5), block=block, merge_split=merge_split,
                     chunks_per_cta=chunks_per_cta)
    assert errs[2] < (1e-4 if merge_split else 1e-2), errs


@pytest.mark.parametrize("L", [1, 2])
def test_intra_adversarial_growth_matches_float64_and_triton_intra(L):
    """beta = 1, no decay, nearly parallel keys of alternating sign. The inverse (8-row blocks, three
    hi/lo doublings) stays float32-accurate; P and Qe are at least as close to float64 as the Triton
    kernel at chunk 64 gets, and P close to the Triton kernel itself. Qe's rows cancel in the Triton
    kernel's X (R) (~5e-2 off float64 here); the first write's (I - X0) form does not cancel (3e-3
    at L = 1, 3e-2 at L = 2 where the second write goes through X R), so Qe is not compared with it."""
    x = _inputs(L=L, V=64, seed=3, resets=False, adversarial=True)
    want = _reference(x)
    got = intra(x, _token_vectors(x), interpret=True, block=8, resets=False)
    triton = split.intra(x, chunk_size=C, interpret=True)
    as64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
    assert rel(got[2], want[2]) < 1e-4
    for name, g, t, w in zip(("p", "qe", "ainv"), got, triton, want):
        assert rel(g, w) <= 1.2 * rel(t, w) + 1e-4, name
    assert rel(got[0], as64(triton[0])) < 1e-2
    assert rel(got[1], want[1]) < (1e-2 if L == 1 else 4e-2)


def test_default_chunks_per_cta_fits_two_ctas_per_sm():
    """Two input slots only where two CTAs still fit on an H200 SM and the grid fills the SMs; m0
    held through the inverse where two one-slot CTAs fit."""
    from pallas_kernels.gpu.mosaic.intra import SMEM_PER_SM, default_chunks_per_cta, default_hold_m, smem_bytes
    assert default_hold_m(1, 128, 128) and not default_hold_m(2, 128, 128)
    assert default_chunks_per_cta(16, 16, 32, 1, 128, 128, hold_m=False) == 4  # B * T = 32 K, H = 16, L = 1
    assert default_chunks_per_cta(16, 16, 32, 1, 128, 128, hold_m=True) == 1  # two slots and m0: 117 KiB
    assert default_chunks_per_cta(16, 16, 32, 2, 128, 128, hold_m=False) == 1  # two slots: 173 KiB
    assert default_chunks_per_cta(1, 2, 4, 1, 128, 128) == 1  # 4 CTAs: keep them apart
    assert default_chunks_per_cta(32, 16, 2, 1, 64, 64) == 2  # N = 2
    assert 2 * (smem_bytes(2, 128, 128, slots=1, hold_m=False) + 1024) <= SMEM_PER_SM  # two CTAs per SM at L = 2
    assert 2 * (smem_bytes(2, 128, 128, slots=1, hold_m=True) + 1024) > SMEM_PER_SM


def test_intra_defaults_to_rows_in_the_interpreter(monkeypatch):
    """diagonal=None: `DEFAULT_DIAGONAL` on a GPU, rows in the interpreter (which cannot run the column
    solve's inline code), so a GPU default of "columns" leaves the interpreter's results unchanged."""
    from pallas_kernels.gpu.mosaic import intra as intra_mod

    x = _inputs(T=64, L=1, H=1)
    tv = _token_vectors(x)
    rows = intra(x, tv, diagonal="rows", interpret=True)
    monkeypatch.setattr(intra_mod, "DEFAULT_DIAGONAL", "columns")
    default = intra(x, tv, interpret=True)
    for a, b in zip(rows, default):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    seen = []
    real = intra_mod._inverse
    monkeypatch.setattr(intra_mod, "_inverse", lambda *a, **kw: seen.append(kw["diagonal"]) or real(*a, **kw))
    jax.jit(lambda x, tv: intra(x, tv)).trace(x, tv).lower(lowering_platforms=("cuda",))
    assert seen == ["columns"]  # lowered for a GPU, the default is DEFAULT_DIAGONAL


def test_intra_rejects_unsupported_inputs():
    x = _inputs(T=64, L=1)
    tv = _token_vectors(x)
    with pytest.raises(ValueError, match="dtype"):
        intra(x._replace(k=x.k.astype(jnp.float32), v=x.v.astype(jnp.float32)), tv)
    with pytest.raises(ValueError, match="key size"):
        intra(x._replace(k=jnp.zeros((*x.k.shape[:-1], 32), x.k.dtype)), tv)
    with pytest.raises(ValueError, match="block"):
        intra(x, tv, block=64)
    with pytest.raises(ValueError, match="step_columns"):
        intra(x, tv, step_columns=3)
    with pytest.raises(ValueError, match="diagonal"):
        intra(x, tv, diagonal="cols")
    with pytest.raises(ValueError, match="interpret"):
        intra(x, tv, diagonal="columns", interpret=True)
    with pytest.raises(ValueError, match="chunk_size"):
        intra(x, tv, chunk_size=32)
    with pytest.raises(ValueError, match="chunks_per_cta"):
        intra(x, tv, chunks_per_cta=2)  # T = 64: one chunk
    z = _inputs(T=128, L=3, K=128, V=128)
    with pytest.raises(ValueError, match="SMEM"):
        intra(z, _token_vectors(z), chunks_per_cta=2)  # two slots of 3 x 64 KiB
    y = _inputs(T=64, L=5)
    with pytest.raises(ValueError, match="writes"):
        intra(y, _token_vectors(y))
    with pytest.raises(ValueError, match="token_vectors"):
        intra(x, tv._replace(beta=tv.beta[..., :32]))


@pytest.mark.parametrize("L,K,V,dtype,opts", [
    (3, 128, 128, jnp.bfloat16, {}),
    (1, 64, 128, jnp.float16, dict(block=32, merge_split=False, save_inverse=False, chunks_per_cta=2)),
    (1, 128, 128, jnp.bfloat16, dict(block=2, chunks_per_cta=2)),
    (2, 64, 64, jnp.bfloat16, dict(resets=False, hold_m=True, chunks_per_cta=2)),
    (1, 128, 128, jnp.bfloat16, dict(resets=False, hold_m=False, block=8)),
    (1, 128, 128, jnp.bfloat16, dict(reset_chunks_only=True, chunks_per_cta=2)),
    (1, 128, 128, jnp.bfloat16, dict(step_columns=4, resets=False)),
    (1, 128, 128, jnp.bfloat16, dict(diagonal="columns", resets=False)),  # inline Mosaic GPU: lowering only here
    (2, 128, 128, jnp.bfloat16, dict(diagonal="columns", block=8, hold_m=False, chunks_per_cta=2)),
    (1, 128, 128, jnp.bfloat16, dict(diagonal="columns", factors=True, scale=0.3))])
def test_intra_lowers_for_cuda(L, K, V, dtype, opts):
    x = _inputs(L=L, V=V, K=K, dtype=dtype)
    tv = _token_vectors(x)
    f = functools.partial(intra, interpret=False, **opts)
    lowered = jax.jit(f).trace(x, tv).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("block,merge_split,chunks_per_cta", [
    (2, True, 1), (4, True, 1), (8, True, 1), (16, True, 1), (32, True, 1), (16, True, 4), (8, True, 2),
    (16, False, 2), (16, True, None)])
def test_intra_on_gpu_matches_float64(block, merge_split, chunks_per_cta):
    """B = 2, T = 500 (8 chunks), H = 4, K = V = 128, L = 2; the adversarial chunks only with the
    hi/lo doubling (one 16-bit product per matmul puts P ~1e-2 off there, see the module docstring)."""
    _, errs = _check(_inputs(B=2, T=500, H=4, K=128, V=128, L=2, seed=11), interpret=False, block=block,
                     merge_split=merge_split, chunks_per_cta=chunks_per_cta)
    assert errs[2] < (1e-4 if merge_split else 1e-2), errs
    if merge_split:
        x = _inputs(B=1, T=256, H=2, K=128, V=128, L=2, seed=12, resets=False, adversarial=True)
        want = _reference(x)
        got = intra(x, _token_vectors(x), block=block, chunks_per_cta=chunks_per_cta)
        triton = split.intra(x, chunk_size=C)
        assert rel(got[2], want[2]) < 1e-4
        for name, g, t, w in zip(("p", "qe", "ainv"), got, triton, want):
            assert rel(g, w) <= 1.2 * rel(t, w) + 1e-4, name


def test_intra_reset_columns_need_their_correction():
    """With documents ending inside a chunk and at a chunk's first token, Qe without the reset
    columns' correction (resets=False) is far off float64, and right with it: the correction is
    what the resets case of the float64 test exercises."""
    x = _inputs(T=200, L=1, V=64, seed=7)  # resets at 90 (inside chunk 1) and 128 (chunk 2's first token)
    want = _reference(x)[1]
    wrong = intra(x, _token_vectors(x), interpret=True, resets=False)[1]
    assert rel(wrong, want) > 5e-2
    for only in (False, True):
        right = intra(x, _token_vectors(x), interpret=True, resets=True, reset_chunks_only=only)[1]
        assert rel(right, want) < 1e-2


def _gpu_id(opts):
    if opts.get("reset_chunks_only") is False:
        return "every"
    return f"cols{opts.get('step_columns', 1)}-hold{opts.get('hold_m')}-{opts.get('diagonal', 'rows')}{opts.get('block', 16)}"


@pytest.mark.gpu
@pytest.mark.parametrize("L,resets,opts", [
    (1, False, {}), (1, True, {}), (1, False, H0), (2, False, {}), (2, True, {}), (2, False, H1), (1, True, EVERY),
    (2, True, EVERY), (1, True, dict(step_columns=2)), (2, True, dict(step_columns=2)),
    (1, True, dict(step_columns=4)), (1, True, dict(diagonal="columns")), (2, True, dict(diagonal="columns")),
    (1, False, dict(diagonal="columns", block=8))], ids=lambda v: _gpu_id(v) if isinstance(v, dict) else None)
def test_intra_on_gpu_without_and_with_documents(L, resets, opts):
    """K = V = 128: m0 held or formed again (`default_hold_m`: held at L = 1 only), with and without the
    reset columns' correction (inputs with documents only where it is on; by default only in the
    chunks that have a reset, "every": in every chunk); 2 or 4 substitution columns per step."""
    _, errs = _check(_inputs(B=2, T=500, H=4, K=128, V=128, L=L, seed=13, resets=resets), interpret=False,
                     resets=resets, **opts)
    assert errs[2] < 1e-4, errs


SCALE = 0.3


def _factors_check(x, interpret=True, **kw):
    """intra(factors=True): P, Qe, ainv as without factors, and Qf, Of against `output_factors` formed
    in XLA from the kernel's own P and Qe (that one is checked against the float64 outputs in
    test_outputs.py)."""
    from pallas_kernels.gpu.mosaic.output_factors import output_factors

    tv = _token_vectors(x)
    p, qe, ainv, qf, of = intra(x, tv, interpret=interpret, factors=True, scale=SCALE, **kw)
    plain = intra(x, tv, interpret=interpret, **kw)
    for a, b in zip((p, qe, ainv), plain):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    want_qf, want_of = output_factors(x, tv, p, qe, scale=SCALE)
    as64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
    assert qf.dtype == of.dtype == x.q.dtype
    assert rel(qf, as64(want_qf)) < 1e-2 and rel(of, as64(want_of)) < 1e-2, (rel(qf, as64(want_qf)),
                                                                              rel(of, as64(want_of)))


@pytest.mark.parametrize("L,V,resets,chunks_per_cta", [(1, 64, True, 1), (1, 128, False, 2), (2, 64, True, 2),
                                                     (3, 64, False, 1)])
def test_intra_output_factors_match_xla(L, V, resets, chunks_per_cta):
    """At L > 1 the writes' right-hand side has its own tile and Of sums every write's v_l: using v_1's
    tile (overwritten by the right-hand side) or leaving a write out of Of fails here."""
    _factors_check(_inputs(L=L, V=V, seed=21 + L, resets=resets), resets=resets, chunks_per_cta=chunks_per_cta)


def test_intra_output_factors_reject():
    x = _inputs(T=64, L=1)
    with pytest.raises(ValueError, match="scale"):
        intra(x, _token_vectors(x), factors=True)


@pytest.mark.parametrize("L", [1, 2, 3])
def test_intra_output_factors_lower_for_cuda(L):
    x = _inputs(L=L, V=128, K=128)
    f = functools.partial(intra, interpret=False, factors=True, scale=SCALE, resets=False)
    lowered = jax.jit(f).trace(x, _token_vectors(x)).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text() and len(lowered.out_info) == 5


@pytest.mark.gpu
@pytest.mark.parametrize("L,resets", [(1, False), (1, True), (2, True), (3, False)])
def test_intra_output_factors_on_gpu(L, resets):
    _factors_check(_inputs(B=2, T=500, H=4, K=128, V=128, L=L, seed=23, resets=resets), interpret=False,
                   resets=resets)


@pytest.mark.parametrize("L,resets,factors,chunks_per_cta", [(1, True, True, 1), (1, False, False, 2),
                                                            (2, True, False, 1)])
def test_intra_saves_the_inverse_in_16_bits_as_xla_would_round_it(L, resets, factors, chunks_per_cta):
    """inverse_dtype = k's dtype: X rounded once in the kernel, equal to the float32 X rounded by XLA
    (what the chunk backward took before), with P, Qe (and the factors) unchanged; with documents the
    reset correction's float32 tile and X's 16-bit tile are both in use."""
    x = _inputs(L=L, V=64, seed=31 + L, resets=resets)
    kw = dict(interpret=True, resets=resets, chunks_per_cta=chunks_per_cta,
              **(dict(factors=True, scale=SCALE) if factors else {}))
    tv = _token_vectors(x)
    want = intra(x, tv, **kw)
    got = intra(x, tv, inverse_dtype=x.k.dtype, **kw)
    assert want[2].dtype == jnp.float32 and got[2].dtype == x.k.dtype
    np.testing.assert_array_equal(np.asarray(got[2].astype(jnp.float32)),
                                  np.asarray(want[2].astype(x.k.dtype).astype(jnp.float32)))
    for a, b in zip(got[:2] + got[3:], want[:2] + want[3:]):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    assert rel(got[2], _reference(x)[2]) < 1e-2


def test_intra_inverse_dtype_rejects_other_dtypes():
    x = _inputs(T=64, L=1)
    with pytest.raises(ValueError, match="inverse_dtype"):
        intra(x, _token_vectors(x), inverse_dtype=jnp.float16)  # k is bfloat16


@pytest.mark.parametrize("L,factors", [(1, True), (2, False)])
def test_intra_16_bit_inverse_lowers_for_cuda(L, factors):
    x = _inputs(L=L, V=128, K=128)
    f = functools.partial(intra, interpret=False, inverse_dtype=x.k.dtype,
                          **(dict(factors=True, scale=SCALE) if factors else {}))
    lowered = jax.jit(f).trace(x, _token_vectors(x)).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text() and lowered.out_info[2].dtype == x.k.dtype
