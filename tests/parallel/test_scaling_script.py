"""benchmarks/scaling.py: the plan of points, the table, and the training config's sequence check.

The script's full smoke run (`--smoke`, 8 fake CPU devices, compiles every point) is marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train import config_lib

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scaling.py"


def load_script():
    spec = importlib.util.spec_from_file_location("scaling_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_points_meshes_and_order():
    s = load_script()
    points = s.plan_points(smoke=False, parts=["train", "long"], impl="pallas", rows=8, steps=4,
                           long_T=65536, long_layers=[12, 6], long_steps=2)
    names = [p["name"] for p in points]
    assert names == ["train-1gpu", "train-data2", "train-fsdp2", "long-seq2-L12", "long-seq2-L6",
                     "long-1gpu-L12", "long-1gpu-L6"]
    by = {p["name"]: p for p in points}
    assert by["train-1gpu"]["mesh"] == [1, 1, 1, 1] and by["train-1gpu"]["devices"] == 1
    assert by["train-data2"]["mesh"] == [2, 1, 1, 1] and by["train-fsdp2"]["mesh"] == [1, 2, 1, 1]
    assert all(by[n]["T"] == 2048 and by[n]["rows"] == 8 and by[n]["impl"] == "pallas" for n in names[:3])
    assert by["long-seq2-L12"]["mesh"] == [1, 1, 1, 2] and by["long-seq2-L12"]["T"] == 65536
    assert by["long-1gpu-L6"]["devices"] == 1 and by["long-1gpu-L6"]["layers"] == 6
    json.dumps(points)  # the worker receives them as JSON
    assert [p["name"] for p in s.plan_points(smoke=True, parts=["long"], impl="x", rows=1, steps=1, long_T=64,
                                             long_layers=[1], long_steps=1)] == ["long-seq2-L1", "long-1gpu-L1"]


def _point(name, part, devices, mesh, tps, **kw):
    spec = dict(name=name, part=part, devices=devices, mesh=mesh, T=2048, rows=8, layers=None, impl="pallas")
    return dict(spec=spec, status="ok", impl="pallas", note=None, compile_s=40.0, xla_peak_bytes=30e9,
                tokens_per_s=tps, tokens_per_s_per_device=tps / devices, step_s=16384 * devices / tps,
                runtime_peaks=[31e9] * devices, **kw)


def test_training_table_efficiency_and_failures():
    s = load_script()
    doc = {"meta": {"platform": "gpu"}, "points": {
        "train-1gpu": _point("train-1gpu", "train", 1, [1, 1, 1, 1], 60_000.0),
        "train-data2": _point("train-data2", "train", 2, [2, 1, 1, 1], 114_000.0),
        "long-1gpu-L12": dict(spec=dict(name="long-1gpu-L12", part="long", devices=1, mesh=[1, 1, 1, 1],
                                        T=65536, rows=1, layers=12, impl="chunk"),
                              status="oom", impl="chunk", note="XLA needs 180.0 GB per device > 134.0 GB (not run)",
                              compile_s=50.0, xla_peak_bytes=180e9),
    }}
    table = s.training_table(doc).splitlines()
    assert len(table) == 5
    assert "| 95.0% |" in table[3] and "| 57,000 |" in table[3] and "(2, 1, 1, 1)" in table[3]
    assert "| 100.0% |" in table[2]
    assert "out of memory: XLA needs 180.0 GB" in table[4] and "| 180.00 |" in table[4]


def test_is_oom_and_short_error():
    s = load_script()
    assert s.is_oom("XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    assert not s.is_oom("INVALID_ARGUMENT: shapes")
    assert len(s.short_error(RuntimeError("x" * 1000))) < 260


def test_validate_checks_sequence_axis_divides_seq_len():
    config = config_lib.tiny_config()
    config.mesh_shape = (1, 1, 1, 4)
    config.data.seq_len = 130
    with pytest.raises(ValueError, match=r"seq_len=130 is not divisible by the sequence axis of the mesh "
                                         r"\(sequence = 4"):
        config_lib.validate(config, 4)
    config.data.seq_len = 128
    config_lib.validate(config, 4)


@pytest.mark.slow
def test_smoke_run_writes_json_and_table(tmp_path):
    """The whole script on 8 fake CPU devices (tiny model): every point compiles, runs and lands in the
    JSON and the table."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out-dir", str(tmp_path), "--budget-s", "900",
                           "--long-layers", "1"],
                          capture_output=True, text=True, env=env, timeout=1000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "scaling.json").read_text())
    points = doc["points"]
    assert set(points) == {"train-1gpu", "train-data2", "train-fsdp2", "long-seq2-L1", "long-1gpu-L1"}
    for name, p in points.items():
        assert p["status"] == "ok", (name, p)
        assert p["tokens_per_s"] > 0 and p["loss"] == p["loss"]
    assert points["train-data2"]["scaling_efficiency"] > 0
    assert "| train | 2 | (1, 2, 1, 1) |" in doc["table_md"]
    assert "| long | 2 | (1, 1, 1, 2) | tiny, 1 layer(s) | chunk (sequence-parallel) |" in doc["table_md"]
