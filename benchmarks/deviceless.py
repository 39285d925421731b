"""Compile for an H100 on a machine without a GPU: XLA's whole pipeline, the Mosaic GPU kernels and ptxas
included, so that ptxas' register and spill report of every kernel (`mosaic_diag.py ptxas --deviceless`)
needs no device time. Nothing runs: there is no GPU to run on.

Needs, besides this project's environment: the CUDA plugin of the same jax version and CUDA's ptxas on PATH,

    pip install jax-cuda13-plugin==0.11.2 jax-cuda13-pjrt==0.11.2     # no CUDA libraries needed
    export JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1                          # the plugin's cuDNN check
    export PATH=/usr/local/cuda/bin:$PATH                             # ptxas (CUDA 13)

`h100()` is the compile-only device (a topology built from `h100_target.txtpb`); lower with
`jax.ShapeDtypeStruct(..., sharding=SingleDeviceSharding(h100()))` arguments and call `.compile()`.
"""

from __future__ import annotations

import functools
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGET = os.path.join(HERE, "h100_target.txtpb")


@functools.cache
def h100():
    """The compile-only H100 device (RuntimeError naming what is missing when the plugin is not there)."""
    from jax.experimental import topologies

    with open(TARGET) as f:
        config = f.read()
    try:
        topo = topologies.get_topology_desc("h100", "cuda", target_config=config, topology="1x1x1")
    except (NotImplementedError, RuntimeError) as e:
        raise RuntimeError("deviceless: no CUDA plugin to compile with (pip install jax-cuda13-plugin==0.11.2 "
                           "jax-cuda13-pjrt==0.11.2; export JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1)") from e
    return topo.devices[0]


def abstract(*arrays):
    """Each array as a ShapeDtypeStruct on `h100()` (inputs of a lowering that is compiled, never run)."""
    import jax
    from jax.sharding import SingleDeviceSharding

    sharding = SingleDeviceSharding(h100())
    return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in arrays)


def child_env(deviceless: bool = True, **extra) -> dict:
    """The environment of a benchmark's child process: this one's, with `extra`, the repository first on
    PYTHONPATH and, where `deviceless`, PRISM_DEVICELESS=1 (the child compiles for `h100()`) and the CUDA
    plugin's cuDNN check off."""
    env = dict(os.environ, **extra, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    if deviceless:
        env["PRISM_DEVICELESS"] = "1"
        env.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    return env
