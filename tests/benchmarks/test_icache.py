"""benchmarks/icache.py's kernel in the interpreter: each warpgroup's FMA chain, straight-line and looped."""

import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("icache", ROOT / "benchmarks" / "icache.py")
icache = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(icache)


@pytest.mark.parametrize("loop", [None, 3])
def test_chains_match_plain_jax(loop):
    f = icache.make(2, 6, loop, pad_kib=1, interpret=True)
    out = np.asarray(f(jnp.zeros((), jnp.float32)))
    ref = np.asarray(icache.reference(2, 6, loop))
    assert out.shape == (2, icache.WARPGROUPS, icache.TILE[0])
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    # Each warpgroup runs its own chain: their results differ.
    assert not np.allclose(out[:, 0], out[:, 1])


def test_shared_code_runs_warpgroup_zeros_chain_everywhere():
    f = icache.make(2, 5, None, pad_kib=1, shared=True, interpret=True)
    out = np.asarray(f(jnp.zeros((), jnp.float32)))
    np.testing.assert_allclose(out, np.asarray(icache.reference(2, 5, None, shared=True)), rtol=1e-6)
    np.testing.assert_array_equal(out[:, 0], out[:, 2])


def test_loop_must_divide_steps():
    with pytest.raises(ValueError, match="`loop` = 4 must divide `steps` = 6"):
        icache.make(1, 6, 4, interpret=True)


def test_steps_for_inverts_code_kib():
    for kib in (24, 96, 144, 240):
        assert abs(icache.code_kib(icache.steps_for(kib)) - kib) < 1.6  # one step of three warpgroups: 1.5 KiB
