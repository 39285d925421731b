"""The parsers of benchmarks/mosaic_diag.py (the script itself needs a Hopper GPU)."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("mosaic_diag", ROOT / "benchmarks" / "mosaic_diag.py")
diag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diag)

# ptxas -v output as Mosaic GPU printed it on the H100 (two kernels of the op, abridged).
PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'prism_mosaic_state_pullback_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for prism_mosaic_state_pullback_mosaic_gpu_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 218 registers, used 2 barriers, 1 bytes smem
ptxas info    : Compile time = 812.000 ms
ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the function 'prism_chunk_grads_mgpu_mosaic_gpu_kernel'
ptxas warning : Registers are spilled to local memory in function 'prism_chunk_grads_mgpu_mosaic_gpu_kernel', 996 bytes spill stores, 1168 bytes spill loads
ptxas info    : Compiling entry function 'prism_chunk_grads_mgpu_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for prism_chunk_grads_mgpu_mosaic_gpu_kernel
    856 bytes stack frame, 996 bytes spill stores, 1168 bytes spill loads
ptxas info    : Used 255 registers, used 2 barriers, 856 bytes cumulative stack size, 1 bytes smem
"""


def test_parse_ptxas_gives_a_row_per_kernel():
    rows = diag.parse_ptxas(PTXAS)
    assert rows == [
        {"kernel": "prism_mosaic_state_pullback", "stack": 0, "spill_stores": 0, "spill_loads": 0,
         "registers": 218, "wgmma_serialized": False},
        {"kernel": "prism_chunk_grads_mgpu", "stack": 856, "spill_stores": 996, "spill_loads": 1168,
         "registers": 255, "wgmma_serialized": True}]
    assert diag.parse_ptxas("nothing compiled\n") == []


def test_phase_times_per_cta():
    # Two CTAs (tids), two phases each: "loads" 2 and 4 us, "block" 6 and 10 us.
    events = []
    for tid, (t0, loads, block) in enumerate([(100.0, 2.0, 6.0), (101.0, 4.0, 10.0)]):
        events += [{"tid": tid, "name": "loads", "ph": "B", "ts": t0},
                   {"tid": tid, "name": "loads", "ph": "E", "ts": t0 + loads},
                   {"tid": tid, "name": "block", "ph": "B", "ts": t0 + loads},
                   {"tid": tid, "name": "block", "ph": "E", "ts": t0 + loads + block}]
    res = diag.phase_times(events)
    assert res["ctas"] == 2
    assert list(res["phases"]) == ["loads", "block"]
    assert res["phases"]["loads"] == pytest.approx((3.0, 3.0, 4.0))
    assert res["phases"]["block"] == pytest.approx((8.0, 8.0, 10.0))
    assert res["cta_us"] == pytest.approx((11.0, 11.0, 14.0))
