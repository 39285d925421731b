"""Left halos across a sharded sequence axis: the tokens a causal op needs from the previous device.

Inside `jax.shard_map` each device holds a contiguous slice of the sequence. A causal op with a
receptive field of n tokens (a depthwise conv of kernel size n + 1, a segment-boundary test with
n = 1) needs the previous slice's last n tokens; `jax.lax.ppermute` sends them one device to the
right, and device 0 receives zeros (the sequence's own left padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def left_halo(x, width: int, axis_name: str, *, time_axis: int = 1):
    """The previous device's last `width` entries of `x` along `time_axis` (zeros on device 0).

    Call inside `jax.shard_map` over `axis_name`. x: [..., T_local, ...]; returns the same shape with
    T_local replaced by `width`. Needs width <= T_local (a halo never spans two devices).
    """
    t_local = x.shape[time_axis]
    if not (isinstance(width, int) and 0 <= width <= t_local):
        raise ValueError(f"left_halo: `width` is {width!r}, expected an int in [0, T_local = {t_local}] "
                         f"(the halo must come from the previous device alone)")
    tail = jax.lax.slice_in_dim(x, t_local - width, t_local, axis=time_axis)
    n = jax.lax.axis_size(axis_name)
    if n == 1 or width == 0:
        return jnp.zeros_like(tail)
    return jax.lax.ppermute(tail, axis_name, perm=[(i, i + 1) for i in range(n - 1)])


def short_conv_halo(x, kernel_size: int, axis_name: str = "sequence", *, time_axis: int = 1):
    """Prepend the previous device's last `kernel_size - 1` tokens to the local slice.

    Call inside `jax.shard_map` over `axis_name`. x: [B, T_local, D] (time on `time_axis`).
    Returns [B, T_local + kernel_size - 1, D]: a causal depthwise conv applied to it with VALID
    padding (no further left padding) gives the local T_local outputs of the global causal conv.
    On device 0 the halo is zeros, i.e. the usual causal left padding.
    """
    if not (isinstance(kernel_size, int) and kernel_size >= 1):
        raise ValueError(f"short_conv_halo: `kernel_size` is {kernel_size!r}, expected an int >= 1")
    halo = left_halo(x, kernel_size - 1, axis_name, time_axis=time_axis)
    return jnp.concatenate([halo, x], axis=time_axis)
