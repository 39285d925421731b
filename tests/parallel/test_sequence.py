"""Sequence parallelism: the sharded op equals the single-device op (8 fake CPU devices, subprocess)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from prism_jax.ops import prism_recurrence
from prism_jax.parallel import (check_sequence_mesh, prism_recurrence_sharded, sequence_parallel_prism,
                                short_conv_halo)

CHECKS = Path(__file__).with_name("sp_checks.py")


def run_check(name):
    """Run one check of sp_checks.py on 8 fake CPU devices (XLA_FLAGS is set there before jax loads)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # XLA_FLAGS pass through (tests/conftest.py sets -O0)
    proc = subprocess.run([sys.executable, str(CHECKS), name], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, f"check {name} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return proc.stdout


@pytest.mark.slow  # CI runs it in its second step (`pytest -m slow tests/parallel`)
def test_matches_single_device_on_2_4_8_devices():
    out = run_check("single_device")
    for n in (2, 4, 8):
        assert f"{n} devices" in out, out


def test_matches_float64_reference_on_8_devices():
    assert "float64 reference" in run_check("float64")


@pytest.mark.slow  # CI runs it in its second step (`pytest -m slow tests/parallel`)
def test_rows_parallel_on_data_tensor_mesh():
    out = run_check("rows")
    for impl in ("chunk", "pallas"):
        assert f"rows-parallel {impl}" in out, out


def test_halo_conv_matches_global_conv():
    assert "halo conv" in run_check("halo")


@pytest.mark.slow
def test_batch_and_sequence_mesh_and_bf16():
    assert "2x2x2 mesh" in run_check("batch_axis")


@pytest.mark.slow
def test_train_step_same_loss_on_meshes():
    out = run_check("train_meshes")
    for shape in ("(8, 1, 1, 1)", "(2, 2, 2, 1)", "(1, 2, 1, 4)", "(1, 2, 1, 4), sequence-parallel op"):
        assert f"mesh {shape}" in out, out


def _args(T=36, B=2, H=2, L=1, K=4, V=4):
    z = lambda *s: jnp.zeros(s, jnp.float32)
    return z(B, T, H, K), z(B, T, H, L, K), z(B, T, H, L, V), z(B, T, H, L), z(B, T, H)


@pytest.mark.parametrize("kw, message", [
    (dict(mesh=AbstractMesh((8,), ("sequence",))), "T = 36 is not divisible by the mesh axis 'sequence' of size 8"),
    (dict(mesh=AbstractMesh((4,), ("sequence",)), axis="seq"), "`axis` 'seq' is not a mesh axis"),
    (dict(mesh=AbstractMesh((3, 2), ("data", "sequence")), batch_axis="data"),
     "batch size B = 2 is not divisible"),
    (dict(mesh=AbstractMesh((2, 2), ("data", "sequence")), batch_axis="model"),
     "`batch_axis` 'model' is not a mesh axis"),
    (dict(mesh=AbstractMesh((2, 2), ("data", "sequence")), batch_axis="sequence"),
     "`batch_axis` 'sequence' is already used"),
    (dict(mesh=AbstractMesh((4, 2), ("tensor", "sequence")), head_axis="tensor"),
     "head count H = 2 is not divisible by the mesh axes ('tensor',) of total size 4"),
    (dict(), "no mesh; pass `mesh=`"),
])
@pytest.mark.parametrize("jit", [False, True])
def test_bad_mesh_raises_before_compiling(kw, message, jit):
    f = lambda *a: sequence_parallel_prism(*a, **kw)
    with pytest.raises(ValueError, match=re.escape(message)):
        (jax.jit(f) if jit else f)(*_args())


def test_check_sequence_mesh_accepts_divisible():
    check_sequence_mesh(AbstractMesh((2, 2, 4), ("data", "tensor", "sequence")), "sequence", 40, "data", 2,
                        "tensor", 4)


def test_halo_wider_than_slice_raises():
    mesh = Mesh(np.array(jax.devices()[:1]), ("sequence",))
    f = jax.shard_map(lambda x: short_conv_halo(x, 5, "sequence"), mesh=mesh,
                      in_specs=P(None, "sequence"), out_specs=P(None, "sequence"))
    with pytest.raises(ValueError, match="`width` is 4"):
        f(jnp.zeros((1, 3, 2)))


def test_halo_single_device_is_causal_padding():
    mesh = Mesh(np.array(jax.devices()[:1]), ("sequence",))
    x = jnp.arange(12.0).reshape(1, 6, 2)
    f = jax.shard_map(lambda x: short_conv_halo(x, 3, "sequence"), mesh=mesh,
                      in_specs=P(None, "sequence"), out_specs=P(None, "sequence"))
    np.testing.assert_array_equal(f(x), jnp.pad(x, ((0, 0), (2, 0), (0, 0))))


def test_sharded_drop_in_without_sequence_axis_is_prism_recurrence():
    """No mesh, or a mesh whose sequence axis has size 1: the very program of the single-device op."""
    args = _args(T=12)
    kw = dict(chunk_size=4, output_final_state=True, segment_ids=jnp.zeros((2, 12), jnp.int32))
    jaxpr = lambda f: str(jax.make_jaxpr(lambda *a: f(*a, **kw))(*args))
    assert jaxpr(prism_recurrence_sharded) == jaxpr(prism_recurrence)
    with jax.set_mesh(jax.make_mesh((1,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))):
        assert jaxpr(prism_recurrence_sharded) == jaxpr(prism_recurrence)
    # (a sequence axis of size > 1 takes the shard_map path: sp_checks.py check_batch_axis, slow)
