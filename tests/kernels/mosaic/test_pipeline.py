"""prism_pallas(kernel="mosaic"): the chunk-64 pipeline, each Mosaic stage inside the whole op (the
others on the Triton kernels at chunk 64), forward and gradients against the float32 reference on
the same bf16-rounded inputs. CPU: interpreters; -m gpu: the H200."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import prism_pallas
from pallas_kernels.gpu.mosaic import pipeline
from pallas_kernels.gpu.mosaic.pipeline import STAGES, stage_options, supported_stages

import sys, os  # noqa: E401
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from test_pallas import _grads, make_inputs, rel  # noqa: E402

# Stage sets run in the CPU interpreters: None is every supported Mosaic stage, () the all-Triton
# chunk-64 pipeline.
CPU_STAGE_SETS = [None, pytest.param((), marks=pytest.mark.slow)]


def _check(stages, L, T, H, K, V, seed, with_state, tol, options=None, segments=True):
    q, k, v, beta, g, s0 = make_inputs(seed, 1, T, H, L, K, V, dtype=jnp.bfloat16)
    s0 = s0 if with_state else None
    seg = jnp.asarray((np.arange(T) >= T // 2 + 3)[None], jnp.int32) if segments else None  # a reset inside a chunk
    w = jax.random.normal(jax.random.PRNGKey(seed + 1), (1, T, H, V))
    args = (q, k, v, beta, g, s0 if s0 is not None else jnp.zeros((1, H, K, V)))
    gp = _grads("pallas", args, seg, w, chunk_size=64, kernel="mosaic", mosaic_stages=stages, mosaic_options=options)
    up = [x.astype(jnp.float32) for x in args[:4]] + list(args[4:])
    gr = _grads("reference", up, seg, w, chunk_size=64)
    o, fin = prism_pallas(*args[:5], scale=K ** -0.5, initial_state=args[5], segment_ids=seg, chunk_size=64,
                          kernel="mosaic", mosaic_stages=stages, mosaic_options=options)
    from prism_jax.ops import prism_recurrence

    with jax.default_matmul_precision("highest"):
        o_ref, fin_ref = prism_recurrence(*up[:5], initial_state=up[5], output_final_state=True,
                                          impl="reference", segment_ids=seg)
    assert rel(o.astype(jnp.float32), o_ref) < tol and rel(fin, fin_ref) < tol
    for name, a, b in zip("q k v beta g s0".split(), gp, gr):
        assert rel(a, b) < tol, (name, rel(a, b))


@pytest.mark.parametrize("stages", CPU_STAGE_SETS)
def test_mosaic_pipeline_interpreted_matches_reference(stages):
    _check(stages, L=2, T=93, H=1, K=64, V=64, seed=3, with_state=True, tol=2e-2)


@pytest.mark.parametrize("kw,match", [
    (dict(chunk_size=32), "chunk_size"),
    (dict(dtype=jnp.float32), "16-bit"),
    (dict(K=32), "K, V"),
    (dict(mosaic_stages=("intra", "solve")), "mosaic_stages"),
    (dict(mosaic_options={"inverse": {}}), "mosaic_options"),
    (dict(mosaic_options={"intra": {"block": 3}}), "block"),  # options reach the stage's kernel
    (dict(mosaic_stages=STAGES[:-1], mosaic_options={"grads": {"impl": "cuda"}}), "expected one of"),
    (dict(mosaic_stages=STAGES[:-1], mosaic_options={"grads": {"impl": "xla", "v_split": 2}}), "no other keywords"),
    (dict(mosaic_options={"grads": {"impl": "xla"}}), "stands in"),  # L = 1: the Mosaic chunk backward runs
    (dict(mosaic_options={"outputs": {"fused": True, "block_v": 64}}), "no other keywords"),
    (dict(mosaic_options={"outputs": {"fused": "triton"}}), "fused"),
])
def test_mosaic_bad_arguments_fail_before_compiling(kw, match):
    dtype, K = kw.pop("dtype", jnp.bfloat16), kw.pop("K", 64)
    q, k, v, beta, g, _ = make_inputs(0, 1, 8, 1, 1, K, 64, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        prism_pallas(q, k, v, beta, g, scale=1.0, kernel="mosaic", **{"chunk_size": 64, **kw})


def test_grads_options_reach_the_triton_chunk_backward_when_it_stands_in():
    """With "grads" left out of mosaic_stages, mosaic_options["grads"] are the Triton kernel's block
    settings: a bad one is refused when the backward is traced (before compiling)."""
    q, k, v, beta, g, _ = make_inputs(0, 1, 70, 1, 1, 64, 64, dtype=jnp.bfloat16)
    stages = tuple(s for s in STAGES if s != "grads")

    def loss(options):
        def f(q):
            o, _ = prism_pallas(q, k, v, beta, g, scale=1.0, kernel="mosaic", chunk_size=64, mosaic_stages=stages,
                                mosaic_options=options)
            return jnp.sum(o.astype(jnp.float32))
        return jax.eval_shape(jax.grad(f), q)

    assert loss({"grads": {"v_split": 2, "block_v": 32}}).shape == q.shape
    assert loss({"grads": {"impl": "xla"}}).shape == q.shape
    with pytest.raises(ValueError, match="v_split"):
        loss({"grads": {"v_split": 3}})


def test_chunk_backward_that_does_not_fit_runs_in_xla_by_default():
    """L = 4 at K = 128 (no Mosaic chunk backward fits): with mosaic_stages=None the XLA chunk backward
    stands in, no Triton chunk-backward kernel is traced; impl "triton" brings that kernel back."""
    q, k, v, beta, g, _ = make_inputs(0, 1, 70, 1, 4, 128, 64, dtype=jnp.bfloat16)

    def traced(options):
        def f(q):
            o, _ = prism_pallas(q, k, v, beta, g, scale=1.0, kernel="mosaic", chunk_size=64, mosaic_options=options)
            return jnp.sum(o.astype(jnp.float32))
        return str(jax.make_jaxpr(jax.grad(f))(q))

    assert "prism_chunk_grads" not in traced(None)
    assert "prism_chunk_grads" not in traced({"intra": {"block": 16}})
    assert "prism_chunk_grads" in traced({"grads": {"impl": "triton"}})


def test_mosaic_pipeline_without_documents_matches_reference():
    """No segment_ids: the intra kernel leaves out the reset columns' correction of Qe."""
    _check(None, L=1, T=93, H=1, K=64, V=64, seed=6, with_state=False, tol=2e-2, segments=False)


@pytest.mark.parametrize("L,fused", [(1, True), (2, True), pytest.param(3, True, marks=pytest.mark.slow),
                                     pytest.param(1, "xla", marks=pytest.mark.slow)])
def test_mosaic_pipeline_with_outputs_in_the_state_pass_matches_reference(L, fused, monkeypatch):
    """mosaic_options={"outputs": {"fused": ...}}: o = Qf S + Of written by the state pass, no outputs
    kernel; the factors from the intra kernel (True) or XLA ("xla"); forward and gradients."""
    options = {"outputs": {"fused": fused}}
    _check(None, L=L, T=93, H=1, K=64, V=64, seed=8, with_state=True, tol=2e-2, options=options)
    q, k, v, beta, g, _ = make_inputs(0, 1, 70, 1, L, 64, 64, dtype=jnp.bfloat16)
    kernels = lambda options: str(jax.make_jaxpr(lambda q: prism_pallas(
        q, k, v, beta, g, scale=1.0, kernel="mosaic", chunk_size=64, mosaic_options=options))(q))
    from pallas_kernels.gpu.mosaic import intra as intra_mod

    seen = []
    real = intra_mod.intra
    monkeypatch.setattr(intra_mod, "intra", lambda *a, **kw: seen.append(kw.get("factors", False)) or real(*a, **kw))
    unfused = {"outputs": {"fused": False}}
    got, plain, default = kernels(options), kernels(unfused), kernels(None)
    assert "prism_mosaic_state_registers_outputs" in got and "prism_mosaic_outputs" not in got
    assert "prism_mosaic_state_registers_outputs" not in plain and "prism_mosaic_outputs" in plain
    by_default = L in pipeline.FUSED_OUTPUTS_WRITES  # fused by default at L = 1 only (timed there)
    assert ("prism_mosaic_state_registers_outputs" in default) == by_default
    assert ("prism_mosaic_outputs" in default) == (not by_default)
    # the factors from the intra kernel with fused=True, from XLA with "xla"
    assert seen == [fused is True, False, by_default]

    def backward(options):  # the reverse pass forms the pull-back's terms from P and Qf: no pull-back kernel
        def loss(q):
            return jnp.sum(prism_pallas(q, k, v, beta, g, scale=1.0, kernel="mosaic", chunk_size=64,
                                        mosaic_options=options)[0].astype(jnp.float32))
        return str(jax.make_jaxpr(jax.grad(loss))(q))

    got, plain = backward(options), backward(unfused)
    assert "prism_mosaic_reverse_factors" in got and "prism_mosaic_state_pullback" not in got
    assert "prism_mosaic_reverse_factors" not in plain and "prism_mosaic_state_pullback" in plain


def test_mosaic_pipeline_with_three_warpgroup_chunk_backward_matches_reference():
    """The chunk backward the GPU takes by default at L = 1 (three warpgroups; the interpreter takes
    one unless asked) inside the whole op, forward and gradients; register budgets given as a list, as
    a JSON config gives them (the interpreter ignores them)."""
    _check(None, L=1, T=93, H=1, K=64, V=64, seed=4, with_state=True, tol=2e-2,
           options={"grads": {"warpgroups": 3, "registers": [152, 208, 144]}})


@pytest.mark.slow
def test_mosaic_pipeline_with_three_warpgroup_chunk_backward_at_two_writes_matches_reference():
    """mosaic_options={"grads": {"warpgroups": 3}} at L = 2 (`chunk_grads_wg3w`) inside the whole op, forward
    and gradients, two value blocks (V = 128: the dq / dk shares summed in XLA in the interpreter)."""
    _check(None, L=2, T=93, H=1, K=64, V=128, seed=6, with_state=True, tol=2e-2,
           options={"grads": {"warpgroups": 3}})


@pytest.mark.parametrize("L", [3])
def test_mosaic_pipeline_with_xla_chunk_backward_matches_reference(L):
    """mosaic_options={"grads": {"impl": "xla"}}: the Mosaic stages with the hand-derived chunk backward
    vmapped in XLA standing in for the Mosaic one (the path where no Mosaic chunk backward fits: L = 4
    at K = 128)."""
    stages = tuple(s for s in STAGES if s != "grads")
    _check(stages, L=L, T=93, H=1, K=64, V=64, seed=5, with_state=True, tol=2e-2, options={"grads": {"impl": "xla"}})


@pytest.mark.slow
def test_mosaic_pipeline_at_three_writes_and_k128_matches_reference():
    """L = 3 at K = 128 (the paper presets' shape): every stage Mosaic (named), the chunk backward the
    work split at 32 value columns per CTA, interpreted."""
    _check(STAGES, L=3, T=70, H=1, K=128, V=64, seed=8, with_state=True, tol=2e-2)
    q, k, v, beta, g, _ = make_inputs(0, 1, 70, 1, 3, 128, 64, dtype=jnp.bfloat16)
    f = lambda q: jnp.sum(prism_pallas(q, k, v, beta, g, scale=1.0, kernel="mosaic", chunk_size=64,
                                       mosaic_stages=STAGES)[0].astype(jnp.float32))
    assert "prism_chunk_grads_mgpu_wg2_work" in str(jax.make_jaxpr(jax.grad(f))(q))
    # by default too (mosaic_stages=None): no XLA chunk backward behind the Mosaic stages
    f = lambda q: jnp.sum(prism_pallas(q, k, v, beta, g, scale=1.0, kernel="mosaic", chunk_size=64)[0]
                          .astype(jnp.float32))
    assert "prism_chunk_grads_mgpu_wg2_work" in str(jax.make_jaxpr(jax.grad(f))(q))


def test_stage_options_are_hashable_with_json_lists():
    """The options travel in the hashable `_Opts` of the custom_vjp: list values become tuples."""
    opts = stage_options({"grads": {"registers": [152, 208, 144]}})
    assert dict(dict(opts)["grads"])["registers"] == (152, 208, 144)
    hash(opts)


def test_supported_stages_leave_out_what_does_not_fit():
    assert supported_stages(128, 2, jnp.bfloat16) == STAGES
    from pallas_kernels.gpu.mosaic import chunk_grads

    # L = 3 at K = 128: the work split at 32 value columns (the default since session 19's GPU timing)
    assert chunk_grads.NARROW_BY_DEFAULT and supported_stages(128, 3, jnp.bfloat16) == STAGES
    assert "grads" not in supported_stages(128, 4, jnp.bfloat16)  # the chunk backward's SMEM plan
    assert "intra" not in supported_stages(64, 5, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("L,segments,fused", [(1, True, False), (2, True, False), (3, True, False), (1, False, False),
                                              (2, False, False), (1, True, True), (2, True, True), (3, False, True),
                                              (1, True, "xla")])
def test_gpu_mosaic_pipeline_matches_reference(L, segments, fused):
    _check(None, L=L, T=1000, H=4, K=128, V=128, seed=10 + L, with_state=True, tol=2e-2, segments=segments,
           options={"outputs": {"fused": True}} if fused else None)


@pytest.mark.gpu
@pytest.mark.parametrize("segments", [True, False])
def test_gpu_mosaic_pipeline_with_narrow_chunk_backward_matches_reference(segments):
    """L = 3 at K = 128 with every stage Mosaic: the chunk backward's work split at 32 value columns."""
    _check(STAGES, L=3, T=1000, H=4, K=128, V=128, seed=21, with_state=True, tol=2e-2, segments=segments)


def test_auto_kernel_picks_mosaic_only_where_it_was_measured_faster():
    from pallas_kernels import auto_kernel

    bf16 = jnp.bfloat16
    assert auto_kernel(bf16, 128, 128, 2, None, "gpu", hopper=True) == "mosaic"
    assert auto_kernel(jnp.float16, 64, 128, 1, 64, "cuda", hopper=True) == "mosaic"
    assert auto_kernel(bf16, 128, 128, 3, None, "gpu", hopper=True) == "mosaic"
    # L = 4 at K = 128: no Mosaic chunk backward fits; the XLA one stands in
    assert auto_kernel(bf16, 128, 128, 4, None, "gpu", hopper=True) == "mosaic"
    assert auto_kernel(bf16, 64, 128, 5, None, "gpu", hopper=True) == "split"  # the intra kernel stops at L = 4
    assert auto_kernel(bf16, 128, 128, 2, None, "gpu", hopper=False) == "split"  # not Hopper
    assert auto_kernel(jnp.float32, 128, 128, 2, None, "gpu", hopper=True) == "split"
    assert auto_kernel(bf16, 128, 128, 2, 32, "gpu", hopper=True) == "split"  # a Triton chunk asked for
    assert auto_kernel(bf16, 32, 128, 2, None, "gpu", hopper=True) == "split"
    assert auto_kernel(bf16, 128, 128, 2, None, "gpu", split_options=True, hopper=True) == "split"
    assert auto_kernel(bf16, 128, 128, 2, None, "cpu", hopper=True) == "split"  # CPU: Triton interpret


@pytest.mark.parametrize("segments", [True, False])
def test_intra_is_told_whether_documents_reset(monkeypatch, segments):
    """The intra kernel leaves out the reset columns' correction of Qe only without segment_ids."""
    from pallas_kernels.gpu.mosaic import intra as intra_mod

    seen = []
    real = intra_mod.intra
    monkeypatch.setattr(intra_mod, "intra", lambda *a, **kw: seen.append(kw["resets"]) or real(*a, **kw))
    q, k, v, beta, g, _ = make_inputs(0, 1, 70, 1, 1, 64, 64, dtype=jnp.bfloat16)
    seg = jnp.asarray((np.arange(70) >= 20)[None], jnp.int32) if segments else None
    jax.eval_shape(lambda: prism_pallas(q, k, v, beta, g, scale=0.125, segment_ids=seg, chunk_size=64,
                                        kernel="mosaic", platform="cpu"))
    assert seen == [segments]


def test_intra_saves_16_bit_inverses_only_for_the_mosaic_chunk_backward(monkeypatch):
    """With fused outputs (the L = 1 default) the inverses' one reader is the Mosaic chunk backward, so the
    intra kernel saves them in 16 bits (`INVERSE16_BY_DEFAULT`, on since session 21); unfused (the pull-back kernel
    reads them in float32) or with the XLA chunk backward standing in, float32."""
    from pallas_kernels.gpu.mosaic import intra as intra_mod

    monkeypatch.setattr(pipeline, "INVERSE16_BY_DEFAULT", True)

    seen = []
    real = intra_mod.intra
    monkeypatch.setattr(intra_mod, "intra", lambda *a, **kw: seen.append(kw.get("inverse_dtype")) or real(*a, **kw))
    q, k, v, beta, g, _ = make_inputs(0, 1, 70, 1, 1, 64, 64, dtype=jnp.bfloat16)
    no_grads = tuple(s for s in STAGES if s != "grads")
    for stages, options in [(None, None), (None, {"outputs": {"fused": False}}),
                            (no_grads, {"grads": {"impl": "xla"}}), (None, {"intra": {"inverse_dtype": "float32"}})]:
        def loss(q):
            return jnp.sum(prism_pallas(q, k, v, beta, g, scale=0.125, chunk_size=64, kernel="mosaic",
                                        platform="cpu", mosaic_stages=stages,
                                        mosaic_options=options)[0].astype(jnp.float32))
        jax.eval_shape(jax.grad(loss), q)
    assert seen == [jnp.bfloat16, None, None, "float32"], seen  # the option overrides the default


def test_16_bit_inverses_on_request_match_reference():
    """`{"intra": {"inverse_dtype": "bfloat16"}}` (JSON, as a config gives it) with the L = 1 defaults
    (fused outputs, every stage Mosaic): forward and gradients against the reference."""
    _check(None, L=1, T=93, H=1, K=64, V=64, seed=12, with_state=True, tol=2e-2,
           options={"intra": {"inverse_dtype": "bfloat16"}})


@pytest.mark.gpu
@pytest.mark.parametrize("segments", [True, False])
def test_gpu_16_bit_inverses_match_reference(segments):
    _check(None, L=1, T=1000, H=4, K=128, V=128, seed=13, with_state=True, tol=2e-2, segments=segments,
           options={"intra": {"inverse_dtype": "bfloat16"}})
