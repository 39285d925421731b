"""THE logical-axis rules table: how model axis names map onto the device mesh.

Mesh axes are exactly MESH_AXES = ("data", "fsdp", "tensor", "sequence"). Parameters carry names from
PARAM_AXES (see prism_jax.layers.common); activations use "batch", "length" and "embed". A mesh axis
is used at most once per array: for an activation ("batch", "length", "embed") the batch takes
data x fsdp and the embed axis stays replicated (flax assigns rules in order).
"layers" is the leading axis of the stacked block params of a scan_layers model; it stays replicated
(each device holds every layer's slice of the other axes).
"""

from __future__ import annotations

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
PARAM_AXES = ("vocab", "embed", "mlp", "heads", "qkv", "conv", "rank", "norm", "layers")

LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("conv", None),
    ("rank", "fsdp"),  # the low-rank solver up-projections [rank, heads, ...]; in the down-projection
                       # [embed, rank] fsdp is already taken by embed, so rank stays replicated there
    ("norm", None),
    ("layers", None),
)
