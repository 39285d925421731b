"""Convert PrismLM params between the unrolled layout (scan_layers=False: "blocks_0" ... "blocks_{N-1}")
and the scanned layout (scan_layers=True: one "blocks" subtree whose leaves have a leading layer axis
of size N).

Both functions take the params tree (the dict holding the "blocks..." keys) or the variables dict
{"params": ...} from `init`, with arrays, jax.ShapeDtypeStructs (abstract params from jax.eval_shape) or `nn.Partitioned` boxes (the logical name "layers" is
added / removed on the stacked axis). Any other key (embed, final_norm, lm_head) is passed through.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

UNROLLED_PREFIX = "blocks_"
SCANNED_NAME = "blocks"
LAYER_AXIS_NAME = "layers"

_LAYER_KEY = re.compile(rf"^{UNROLLED_PREFIX}(\d+)$")


def _is_box(x):
    return isinstance(x, nn.Partitioned)


def _variables_wrapper(params, fn, **kwargs):
    if isinstance(params, Mapping) and set(params) == {"params"}:
        return {"params": fn(params["params"], **kwargs)}
    return None


def _stack_arrays(arrays):
    if isinstance(arrays[0], jax.ShapeDtypeStruct):  # abstract params (jax.eval_shape)
        return jax.ShapeDtypeStruct((len(arrays),) + tuple(arrays[0].shape), arrays[0].dtype)
    return jnp.stack(arrays)


def _take(array, i):
    if isinstance(array, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(array.shape[1:]), array.dtype)
    return array[i]


def _layer_keys(params) -> list[str]:
    return [key for key in params if _LAYER_KEY.match(key)]


def stack_layer_params(params, num_layers: int | None = None):
    """Unrolled params ("blocks_0" ... "blocks_{N-1}") -> scanned params ("blocks", leaves [N, ...])."""
    wrapped = _variables_wrapper(params, stack_layer_params, num_layers=num_layers)
    if wrapped is not None:
        return wrapped
    if not isinstance(params, Mapping):
        raise ValueError(f"stack_layer_params: `params` is a {type(params).__name__}, expected a dict")
    if SCANNED_NAME in params:
        raise ValueError(f"stack_layer_params: `params` already has a stacked {SCANNED_NAME!r} entry "
                         "(scan_layers layout)")
    keys = _layer_keys(params)
    n = len(keys)
    expected = [f"{UNROLLED_PREFIX}{i}" for i in range(n)]
    if n == 0 or sorted(keys, key=lambda k: int(k[len(UNROLLED_PREFIX):])) != expected:
        raise ValueError(f"stack_layer_params: `params` has layer keys {sorted(keys)}, expected "
                         f"{UNROLLED_PREFIX}0 ... {UNROLLED_PREFIX}N-1 (N >= 1)")
    if num_layers is not None and n != num_layers:
        raise ValueError(f"stack_layer_params: `params` has {n} layers, expected num_layers = {num_layers}")

    def stack(*leaves):
        if _is_box(leaves[0]):
            first = leaves[0]
            return nn.Partitioned(_stack_arrays([leaf.value for leaf in leaves]),
                                  (LAYER_AXIS_NAME,) + tuple(first.names), first.mesh)
        return _stack_arrays(leaves)

    stacked = jax.tree.map(stack, *[params[key] for key in expected], is_leaf=_is_box)
    out = {key: value for key, value in params.items() if key not in expected}
    out[SCANNED_NAME] = stacked
    return out


def unstack_layer_params(params):
    """Scanned params ("blocks", leaves [N, ...]) -> unrolled params ("blocks_0" ... "blocks_{N-1}")."""
    wrapped = _variables_wrapper(params, unstack_layer_params)
    if wrapped is not None:
        return wrapped
    if not isinstance(params, Mapping) or SCANNED_NAME not in params:
        raise ValueError(f"unstack_layer_params: `params` has no {SCANNED_NAME!r} entry, expected the "
                         "scan_layers layout")
    stacked = params[SCANNED_NAME]
    leaves = jax.tree.leaves(stacked, is_leaf=_is_box)
    sizes = {(leaf.value if _is_box(leaf) else leaf).shape[0] for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(f"unstack_layer_params: stacked leaves have leading sizes {sorted(sizes)}, "
                         "expected one layer count")
    n = sizes.pop()
    for leaf in leaves:
        if _is_box(leaf) and (not leaf.names or leaf.names[0] != LAYER_AXIS_NAME):
            raise ValueError(f"unstack_layer_params: a stacked leaf has logical axes {leaf.names}, "
                             f"expected {LAYER_AXIS_NAME!r} first")

    def take(i):
        def one(leaf):
            if _is_box(leaf):
                return nn.Partitioned(_take(leaf.value, i), tuple(leaf.names[1:]), leaf.mesh)
            return _take(leaf, i)
        return jax.tree.map(one, stacked, is_leaf=_is_box)

    out = {key: value for key, value in params.items() if key != SCANNED_NAME}
    out.update({f"{UNROLLED_PREFIX}{i}": take(i) for i in range(n)})
    return out
