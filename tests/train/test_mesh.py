"""8 fake CPU devices with a 2x2x2 (data, fsdp, tensor) mesh give the same losses as 1 device."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from train import mesh as mesh_lib

HERE = pathlib.Path(__file__).resolve().parent


def run_check(kind, tmp_path):
    out = tmp_path / f"{kind}.json"
    # The subprocess appends the 8-device flag to the suite's XLA_FLAGS (tests/conftest.py).
    proc = subprocess.run([sys.executable, str(HERE / "mesh_check.py"), kind, str(out)], env=dict(os.environ),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def check(result):
    np.testing.assert_allclose(result["mesh"]["losses"], result["one"]["losses"], rtol=2e-5)
    np.testing.assert_allclose(result["mesh"]["param_norm"], result["one"]["param_norm"], rtol=2e-5)
    assert result["one"]["losses"][-1] < result["one"]["losses"][0]
    assert any("fsdp" in s or "tensor" in s for s in result["mesh"]["specs"])  # really sharded
    host = result["host_init"]  # config.init_on="host" against "device" on the 2x2x2 mesh
    assert host["same_values"] and host["same_shardings"] and host["sharded_leaves"] > 0, host


def test_2x2x2_mesh_matches_one_device_standin(tmp_path):
    check(run_check("standin", tmp_path))


@pytest.mark.slow
def test_2x2x2_mesh_matches_one_device_prism(tmp_path):
    check(run_check("prism", tmp_path))


def test_resolve_mesh_shape():
    assert mesh_lib.resolve_mesh_shape((-1, 1, 1, 1), 8) == (8, 1, 1, 1)
    assert mesh_lib.resolve_mesh_shape((2, -1, 2, 1), 8) == (2, 2, 2, 1)
    with pytest.raises(ValueError, match="do not divide"):
        mesh_lib.resolve_mesh_shape((3, -1, 1, 1), 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        mesh_lib.resolve_mesh_shape((2, 2, 1, 1), 8)
    with pytest.raises(ValueError, match="4 entries"):
        mesh_lib.resolve_mesh_shape((8,), 8)
