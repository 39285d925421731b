"""benchmarks/op_profile.py: reading a Perfetto trace back into per-kernel times (the GPU run is the
device call's; here a synthetic trace), and kernels.with_vjp's two forms."""

import gzip
import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
_spec = importlib.util.spec_from_file_location("op_profile", ROOT / "benchmarks" / "op_profile.py")
op_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(op_profile)


def _trace(tmp_path, events):
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    return tmp_path


def test_kernel_times_count_stream_lanes_once(tmp_path):
    meta = [dict(ph="M", name="process_name", pid=1, args=dict(name="/device:GPU:0")),
            dict(ph="M", name="process_name", pid=2, args=dict(name="/host:CPU")),
            dict(ph="M", name="thread_name", pid=1, tid=7, args=dict(name="Stream #14(Compute)")),
            dict(ph="M", name="thread_name", pid=1, tid=8, args=dict(name="XLA Ops")),
            dict(ph="M", name="thread_name", pid=2, tid=1, args=dict(name="main"))]
    ev = lambda name, pid, tid, dur: dict(ph="X", name=name, pid=pid, tid=tid, ts=0, dur=dur)
    events = meta + [ev("prism_chunk_grads_mgpu_mosaic_gpu_kernel", 1, 7, 3000.0),
                     ev("prism_chunk_grads_mgpu_mosaic_gpu_kernel", 1, 7, 1000.0),
                     ev("wrapped_convert", 1, 7, 500.0),
                     ev("fusion.1", 1, 8, 9000.0),  # the op lane repeats the kernels' time
                     ev("PjitFunction(fwd_bwd)", 2, 1, 7000.0)]
    found, names, threads = op_profile.trace_events(str(_trace(tmp_path, events)))
    lanes = op_profile.device_lanes(names, threads)
    assert lanes == {(1, 7)}
    times = op_profile.kernel_times(found, lanes, calls=2)
    assert list(times) == ["prism_chunk_grads_mgpu_mosaic_gpu_kernel", "wrapped_convert"]
    np.testing.assert_allclose(times["prism_chunk_grads_mgpu_mosaic_gpu_kernel"], (2.0, 1.0))
    np.testing.assert_allclose(times["wrapped_convert"], (0.25, 0.5))
    assert op_profile.is_ours("prism_chunk_grads_mgpu_mosaic_gpu_kernel")
    assert not op_profile.is_ours("wrapped_convert")


def test_rows_parse_and_bad_rows_name_themselves():
    assert op_profile.parse_row("jla_gdn:2048") == ("jla_gdn", 1, 2048, None)
    assert op_profile.parse_row("mosaic:2:4096") == ("pallas", 2, 4096, "mosaic")
    assert op_profile.parse_row("chunk:3:64") == ("chunk", 3, 64, None)
    for bad in ("mosaic:2", "nope:1:64"):
        try:
            op_profile.parse_row(bad)
        except ValueError as e:
            assert bad in str(e)
        else:
            raise AssertionError(bad)


def test_with_vjp_keeps_the_output_only_when_asked():
    kb = op_profile.kb
    fwd = lambda a, b: jnp.sin(a) * b
    args, do = (jnp.arange(3.0), jnp.ones(3) * 2), jnp.ones(3)
    grads = kb.with_vjp(fwd)(args, do)
    o, grads_kept = kb.with_vjp(fwd, keep_output=True)(args, do)
    np.testing.assert_allclose(o, fwd(*args))
    for a, b in zip(grads, grads_kept):
        np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(grads[0], jnp.cos(args[0]) * 2)
    assert jax.tree.structure(grads) == jax.tree.structure(tuple(grads_kept))
