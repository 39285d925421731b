"""benchmarks/dplr_peer.py on CPU (no torch): the interleaved DPLR sequence is exact PRISM.

fla's DPLR recurrence (transcribed in float64) on `interleave`'s inputs equals our float64 reference, the
perturbations a wrong interleaving would make are caught, and the check that the GPU run applies (output and
gradients mapped back through the vjp of `interleave`) passes on a correct peer and fails on a wrong one.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax.ops import prism_recurrence

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("dplr_peer", ROOT / "benchmarks" / "dplr_peer.py")
dplr_peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dplr_peer)


def make_inputs(seed, B, T, H, L, K, V):
    """float64 NumPy PRISM inputs: unit keys, gates in [0, 1], log-decays in [log 0.5, 0], a start state."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, K))
    k = rng.normal(size=(B, T, H, L, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(B, T, H, L, V))
    beta = rng.uniform(size=(B, T, H, L))
    g = np.log(rng.uniform(0.5, 1.0, size=(B, T, H)))
    s0 = rng.normal(size=(B, H, K, V))
    return (q, k, v, beta, g), s0


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def prism_f64(xs, s0, scale):
    with jax.enable_x64(True):
        o, final = prism_recurrence(*(jnp.asarray(x) for x in xs), scale=scale, initial_state=jnp.asarray(s0),
                                    output_final_state=True, impl="reference")
        return np.asarray(o), np.asarray(final)


def dplr_f64(d, s0):
    d = dict(d)
    return dplr_peer.dplr_recurrence_np(**d, initial_state=s0)


@pytest.mark.parametrize("L", [1, 2, 3])
def test_interleaved_dplr_equals_prism_float64(L):
    B, T, H, K, V = 2, 7, 2, 6, 4
    xs, s0 = make_inputs(L, B, T, H, L, K, V)
    o_ref, final_ref = prism_f64(xs, s0, scale=0.7)
    d = dplr_peer.interleave(*xs, scale=0.7)
    assert d["q"].shape == (B, T * L, H, K) and d["v"].shape == (B, T * L, H, V) and d["gk"].shape == (B, T * L, H, K)
    assert all(d[n].dtype == np.float64 for n in dplr_peer.DPLR_ARGS)
    o, final = dplr_f64(d, s0)
    assert rel(dplr_peer.deinterleave(o, L), o_ref) < 1e-12
    assert rel(final, final_ref) < 1e-12
    # padding with identity steps (fla's chunk multiple) changes neither the outputs nor the final state
    d = dplr_peer.interleave(*xs, scale=0.7, pad_to=16)
    assert d["q"].shape[1] == 16 * -(-T * L // 16)
    o, final = dplr_f64(d, s0)
    assert rel(dplr_peer.deinterleave(o, L, length=T), o_ref) < 1e-12
    assert rel(final, final_ref) < 1e-12


def test_wrong_interleavings_are_caught():
    """Each mistake the mapping could make changes the result: writes before the decay/erase step, the
    output of a step other than the token's last, the decay missing from the low-rank part, the write
    gate missing from v."""
    B, T, H, L, K, V = 1, 5, 2, 3, 6, 4
    xs, s0 = make_inputs(7, B, T, H, L, K, V)
    o_ref, _ = prism_f64(xs, s0, scale=0.7)
    d = dplr_peer.interleave(*xs, scale=0.7)
    assert rel(dplr_peer.deinterleave(dplr_f64(d, s0)[0], L), o_ref) < 1e-12

    def per_token(x):
        return x.reshape((B, T, L) + x.shape[2:])

    rolled = {n: (np.roll(per_token(x), 1, axis=2).reshape(x.shape) if n not in ("q", "scale") else x)
              for n, x in d.items()}  # the erase / decay step moves after the writes
    assert rel(dplr_peer.deinterleave(dplr_f64(rolled, s0)[0], L), o_ref) > 1e-2
    o = per_token(dplr_f64(dict(d, q=np.repeat(xs[0][:, :, None], L, axis=2).reshape(d["q"].shape)), s0)[0])
    assert rel(o[:, :, 0], o_ref) > 1e-2  # the first step's output is not the token's output
    undecayed = dict(d, b=d["b"] / np.exp(d["gk"]))  # low-rank term without exp(g)
    assert rel(dplr_peer.deinterleave(dplr_f64(undecayed, s0)[0], L), o_ref) > 1e-2
    ungated = dplr_peer.interleave(xs[0], xs[1], xs[2] / xs[3][..., None], xs[3], xs[4], scale=0.7)
    assert rel(dplr_peer.deinterleave(dplr_f64(ungated, s0)[0], L), o_ref) > 1e-2


def test_spread_last_is_the_transpose_of_deinterleave():
    rng = np.random.default_rng(0)
    o, do = rng.normal(size=(2, 3 * 5 + 4, 2, 3)), rng.normal(size=(2, 5, 2, 3))
    lhs = np.sum(dplr_peer.deinterleave(o, 3, length=5) * do)
    rhs = np.sum(o * dplr_peer.spread_last(do, 3, o.shape[1]))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)


def test_measure_point_passes_for_the_exact_peer_and_fails_for_a_wrong_one():
    """The GPU run's pipeline on CPU (kernels.inputs, interleave, padding, spread_last, check): a float32
    JAX scan of the DPLR step stands in for fla; its output and its input gradients, mapped back through
    interleave's vjp, match our float32 reference (on the GPU: kernels.reference, the chunk form)."""
    B, T, H, L, K, V = 1, 9, 2, 2, 8, 4
    shape = dict(tokens=B * T, heads=H, dk=K, dv=V)

    @jax.jit
    def reference(xs, do):
        o, pull = jax.vjp(lambda *a: prism_recurrence(*a, impl="reference")[0], *xs)
        return o, pull(do)

    @jax.jit
    def scan_vjp(args, do, scale):  # dplr_peer.dplr_step over the sequence
        def run(*a):
            step = lambda S, x: dplr_peer.dplr_step(S, *x, scale)[::-1]
            S0 = jnp.zeros((B, H, K, V))
            return jnp.moveaxis(jax.lax.scan(step, S0, [jnp.moveaxis(x, 1, 0) for x in a])[1], 0, 1)

        o, pull = jax.vjp(run, *args)
        return o, pull(do)

    def runner(erase=1.0, backward=True):
        def run(d, do, reps):
            assert d["q"].shape == (B, 24, H, K) and do.shape == (B, 24, H, V)  # 18 steps padded to 24
            o, grads = scan_vjp([d[n] * (erase if n == "b" else 1) for n in dplr_peer.DPLR_ARGS], do, d["scale"])
            grads = dict(zip(dplr_peer.DPLR_ARGS, grads)) if backward else None
            return dict(fwd_ms=1.0), np.asarray(o), grads

        return run

    refs = {}
    measure = lambda run: dplr_peer.measure_point(L, T, shape, 1, run, pad_to=8, dtype=jnp.float32,
                                                  reference=reference, refs=refs)
    good = measure(runner())
    assert refs["key"] == (T, L)  # kept for the next point at this (T, L)
    assert good["fwd_rel_err"] < 1e-5 and good["grad_rel_err_max"] < 1e-4, good
    assert set(good["grad_rel_err"]) == {"q", "k", "v", "beta", "g"} and good["steps"] == 24
    assert "fwd_tflops" in good and "fwd_bwd_tflops" not in good  # the stand-in times no backward
    bad = measure(runner(erase=0.5))  # half the erase
    assert bad["fwd_rel_err"] > 1e-2 and bad["grad_rel_err"]["k"] > 1e-2, bad
    fwd_only = measure(runner(backward=False))  # a failed backward: output check only
    assert "grad_rel_err" not in fwd_only and fwd_only["fwd_rel_err"] < 1e-5


def test_bad_shapes_raise_named_errors():
    (q, k, v, beta, g), _ = make_inputs(0, 1, 3, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="`beta` must have shape"):
        dplr_peer.interleave(q, k, v, beta[..., :1], g)
    with pytest.raises(ValueError, match="`q` must have shape"):
        dplr_peer.interleave(q[..., :3], k, v, beta, g)


def test_run_dplr_without_torch_returns_a_note():
    rows = dplr_peer.run_dplr([64], [2], 1, dict(tokens=64, heads=2, dk=8, dv=8), budget_s=10)
    if "note" not in rows[0]:
        pytest.skip("torch with CUDA is present: run_dplr measures on the GPU")
    assert len(rows) == 1 and "torch / fla-core unavailable" in rows[0]["note"]
    assert "NOTE" in dplr_peer.markdown(rows)
    measured = dict(impl="dplr_fla", bwd=None, L=2, T=64, B=1, steps=128, fwd_ms=1.5, fwd_mem_gib=0.1,
                    fwd_bwd_ms=4.25, fwd_bwd_mem_gib=0.2, fwd_rel_err=3e-3, grad_rel_err_max=5e-3,
                    grad_rel_err=dict(q=1e-3, k=2e-3, v=3e-3, beta=4e-3, g=5e-3))
    fwd_only = dict(measured, fwd_bwd_error="RuntimeError: no backward")
    for key in ("fwd_bwd_ms", "fwd_bwd_mem_gib", "grad_rel_err", "grad_rel_err_max"):
        fwd_only.pop(key)
    table = dplr_peer.markdown([measured, fwd_only]).splitlines()
    assert table[2] == ("| dplr_fla | 2 | 64 | 128 | 1.50 | 4.25 | 0.10 / 0.20 | 3.0e-03 | "
                        "5.0e-03; 1.0e-03 2.0e-03 3.0e-03 4.0e-03 5.0e-03 |")
    assert table[3].startswith("| dplr_fla | 2 | 64 | 128 | 1.50 | - |") and "no backward" in table[4]


@pytest.mark.gpu
def test_run_dplr_on_gpu_matches_our_chunk_form():
    """On the device (torch + fla-core): small shapes, every L; fla's bf16 DPLR kernel on the interleaved
    inputs agrees with our float32 chunk form, forward and (where fla's backward runs) gradients."""
    pytest.importorskip("torch")
    pytest.importorskip("fla")
    rows = dplr_peer.run_dplr([128], [1, 2, 3], 3, dict(tokens=256, heads=2, dk=64, dv=64), budget_s=600)
    assert [r["L"] for r in rows] == [2, 1, 3], rows
    for r in rows:
        assert "error" not in r and r["fwd_ms"] > 0, r
        assert r["fwd_rel_err"] < 2e-2, r
        if "fwd_bwd_error" not in r:
            assert r["grad_rel_err_max"] < 5e-2, r
