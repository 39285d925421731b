"""Default-suite budget for the Mosaic GPU kernel tests (CI: 2 CPU cores, the whole suite < 10 min).

The Mosaic GPU interpreter is slow (10-45 s per kernel case), so by default this folder runs:
the shared pieces (`test_common.py`), the whole op through every Mosaic stage in the interpreter
against the reference, forward and gradients (`test_pipeline.py`), and per kernel its input checks,
its defaults and the CUDA lowering of its first configuration. Every other case of a kernel file
(the per-kernel interpreter comparisons with float64 and the Triton kernels, further lowerings) is
marked slow here: `pytest -m slow tests/kernels/mosaic` runs them; `-m gpu` the device tests.
"""

import pytest

_WHOLE_FILES = ("test_common.py", "test_pipeline.py")
_CHEAP = ("reject", "bad_inputs", "defaults", "default_chunks")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    first_lowering = set()
    for item in items:
        if item.path.parent.name != "mosaic" or item.path.name in _WHOLE_FILES:
            continue
        if item.get_closest_marker("gpu") or item.get_closest_marker("slow"):
            continue
        name = item.originalname
        if any(word in name for word in _CHEAP):
            continue
        if "lower" in name and (item.path.name, name) not in first_lowering:
            first_lowering.add((item.path.name, name))
            continue
        item.add_marker(pytest.mark.slow)
