"""The device mesh from `config.mesh_shape` and the shardings of batches.

Mesh axes are always ("data", "fsdp", "tensor", "sequence"); `mesh_shape` gives one size per
axis and -1 for at most one axis meaning "all the remaining devices". Batches are split over
("data", "fsdp"); parameters follow the logical-axis rules of `prism_jax.sharding`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces the -1 in `mesh_shape` and checks that the product is `num_devices`."""
    shape = tuple(int(s) for s in mesh_shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh_shape must have {len(MESH_AXES)} entries for axes {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh_shape may hold at most one -1 (the rest), got {shape}")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh_shape entries must be positive or -1, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh_shape {shape}: the fixed axes ({known} devices) do not divide the {num_devices} devices"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh_shape {shape} needs {math.prod(shape)} devices but {num_devices} are available"
        )
    return shape


def make_mesh(mesh_shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with Auto axis types over `devices` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    try:
        from jax.experimental import mesh_utils  # noqa: PLC0415

        device_grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # topology-unaware fallback (e.g. odd CPU device counts)
        device_grid = np.asarray(devices).reshape(shape)
    return Mesh(device_grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many ways a batch is split: the product of the data-parallel axes."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
    """Sharding for a [*leading, B, T] batch array: B over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, P(*([None] * leading_dims), BATCH_AXES, None))


def logical_axis_rules():
    """THE logical-axis rules table of the project (lives in the library, shared with parallel/)."""
    from prism_jax.sharding import LOGICAL_AXIS_RULES  # noqa: PLC0415

    return tuple(LOGICAL_AXIS_RULES)
