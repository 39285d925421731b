"""Sequence-parallel checks on 8 fake CPU devices; run as a script: `python sp_checks.py CHECK [SEED]`.

XLA_FLAGS must be set before jax is imported, so the tests run this file in a subprocess
(test_sequence.py). Each check asserts and exits non-zero on failure, printing the seed.
"""

from __future__ import annotations

import os
import sys

_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
os.environ["XLA_FLAGS"] = " ".join(_flags + ["--xla_force_host_platform_device_count=8"])

import jax  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

from prism_jax.ops import prism_recurrence  # noqa: E402
from prism_jax.ops.prism.reference import prism_reference  # noqa: E402
from prism_jax.parallel import (prism_recurrence_sharded, sequence_parallel_prism,  # noqa: E402
                                short_conv_halo)

B, T, H, L, K, V = 2, 40, 2, 2, 8, 6  # T = 8 * 5: odd slice length on 8 devices
CHUNK = 4  # several chunks per slice, and a padded last chunk


def inputs(rng, dtype=np.float32):
    """Fresh random inputs: normalised keys, gates in [0, 1], log decays <= 0, packed segments."""
    k = rng.standard_normal((B, T, H, L, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    x = dict(
        q=rng.standard_normal((B, T, H, K)),
        k=k,
        v=rng.standard_normal((B, T, H, L, V)),
        beta=rng.uniform(0, 1, (B, T, H, L)),
        g=np.log(rng.uniform(0.5, 1.0, (B, T, H))),
        initial_state=rng.standard_normal((B, H, K, V)),
    )
    x = {n: jnp.asarray(a, dtype) for n, a in x.items()}
    # Row 0: document starts exactly at device boundaries (10, 20 on 2/4/8 devices) and inside
    # slices (23, 31). Row 1: one document spanning many devices (5..34), boundaries at 5 and 35.
    seg = np.zeros((B, T), np.int32)
    for t in (10, 20, 23, 31):
        seg[0, t:] += 1
    for t in (5, 35):
        seg[1, t:] += 1
    x["segment_ids"] = jnp.asarray(seg)
    return x


def cotangents(rng, dtype):
    return (jnp.asarray(rng.standard_normal((B, T, H, V)), dtype),
            jnp.asarray(rng.standard_normal((B, H, K, V)), dtype))


DIFF_ARGS = ("q", "k", "v", "beta", "g", "initial_state")


def outputs_and_grads(op, x, cot):
    """(o, final, grads of <o, co> + <final, cf> w.r.t. every float input), one jitted program."""
    seg = x["segment_ids"]

    def f(*args):
        kw = dict(zip(DIFF_ARGS, args))
        o, final = op(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("beta"), kw.pop("g"),
                      segment_ids=seg, **kw)
        return o, final

    def both(*args):
        (o, final), vjp = jax.vjp(f, *args)
        return o, final, vjp(cot)

    return jax.jit(both)(*(x[n] for n in DIFF_ARGS))


def assert_close(name, got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want)))
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.1e}"
    return err


def compare(label, a, b, tol):
    (oa, fa, ga), (ob, fb, gb) = a, b
    errs = [assert_close(f"{label} o", oa, ob, tol), assert_close(f"{label} final_state", fa, fb, tol)]
    errs += [assert_close(f"{label} d{n}", x, y, tol) for n, x, y in zip(DIFF_ARGS, ga, gb)]
    print(f"{label}: max relative error {max(errs):.2e} over o, final_state and {len(DIFF_ARGS)} grads")


def seq_mesh(n):
    return Mesh(np.array(jax.devices()[:n]), ("sequence",))


def check_matches_single_device(rng):
    """float32: sharded over 2, 4, 8 devices == prism_recurrence(impl="chunk") on one device."""
    x = inputs(rng)
    cot = cotangents(rng, jnp.float32)
    single = lambda *a, **kw: prism_recurrence(*a, output_final_state=True, chunk_size=CHUNK, **kw)
    want = outputs_and_grads(single, x, cot)
    for n, inter_chunk in ((2, "scan"), (4, "associative"), (8, "scan")):
        sharded = lambda *a, **kw: sequence_parallel_prism(
            *a, mesh=seq_mesh(n), output_final_state=True, chunk_size=CHUNK, inter_chunk=inter_chunk, **kw)
        compare(f"{n} devices ({inter_chunk}) vs single device", outputs_and_grads(sharded, x, cot), want,
                2e-5)


def check_float64_reference(rng):
    """float64: sharded over 8 devices == the token-by-token reference (definition), tight tolerance."""
    jax.config.update("jax_enable_x64", True)  # this check only: the training code assumes 32-bit ints
    x = inputs(rng, np.float64)
    cot = cotangents(rng, jnp.float64)
    mesh = seq_mesh(8)
    sharded = lambda *a, **kw: sequence_parallel_prism(*a, mesh=mesh, output_final_state=True,
                                                       chunk_size=CHUNK, **kw)
    reference = lambda *a, **kw: prism_reference(*a, scale=K ** -0.5, **kw)
    got = outputs_and_grads(sharded, x, cot)
    assert got[0].dtype == jnp.float64 and got[1].dtype == jnp.float64
    compare("8 devices float64 vs float64 reference", got, outputs_and_grads(reference, x, cot), 1e-10)


def check_batch_axis(rng):
    """A (data=2, tensor=2, sequence=2) mesh set with jax.set_mesh (mesh=None): batch over "data",
    heads over "tensor", sequence over "sequence"; bfloat16 inputs keep o in bf16."""
    x = inputs(rng)
    mesh = jax.make_mesh((2, 2, 2), ("data", "tensor", "sequence"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    kw = dict(initial_state=x["initial_state"], segment_ids=x["segment_ids"], output_final_state=True,
              chunk_size=CHUNK)
    args = [x[n] for n in ("q", "k", "v", "beta", "g")]
    op = jax.jit(lambda *a: sequence_parallel_prism(*a, batch_axis="data", head_axis="tensor", **kw))
    ro, rf = prism_recurrence(*args, impl="reference", **kw)
    with jax.set_mesh(mesh):
        o, final = op(*args)
        ob, fb = op(*[a.astype(jnp.bfloat16) for a in args])
    assert_close("2x2x2 mesh o", o, ro, 2e-5)
    assert_close("2x2x2 mesh final_state", final, rf, 2e-5)
    assert o.sharding.spec == P("data", "sequence", "tensor"), o.sharding.spec
    assert ob.dtype == jnp.bfloat16 and fb.dtype == jnp.float32, (ob.dtype, fb.dtype)
    assert_close("2x2x2 mesh bf16 o", ob, ro, 5e-2)
    print("2x2x2 mesh (data, tensor, sequence) from jax.set_mesh: matches the reference; bf16 in, bf16 o")

    # The layer-facing drop-in: the training mesh (data, fsdp, tensor, sequence) = (1, 2, 1, 4).
    cot = cotangents(rng, jnp.float32)
    single = lambda *a, **kw: prism_recurrence(*a, output_final_state=True, chunk_size=CHUNK, **kw)
    want = outputs_and_grads(single, x, cot)
    train_mesh = jax.make_mesh((1, 2, 1, 4), ("data", "fsdp", "tensor", "sequence"),
                               axis_types=(jax.sharding.AxisType.Auto,) * 4)
    drop_in = lambda *a, **kw: prism_recurrence_sharded(*a, output_final_state=True, chunk_size=CHUNK, **kw)
    with jax.set_mesh(train_mesh):
        got = outputs_and_grads(drop_in, x, cot)
    compare("prism_recurrence_sharded on mesh (1, 2, 1, 4) vs single device", got, want, 2e-5)
    with jax.set_mesh(train_mesh):
        jaxpr = str(jax.make_jaxpr(lambda *a: drop_in(*a, initial_state=x["initial_state"],
                                                      segment_ids=x["segment_ids"]))(*args))
    assert "shard_map" in jaxpr and "all_gather" in jaxpr, "the sequence-parallel path was not taken"


def causal_depthwise_conv(x, w):
    """Global reference: y_t = sum_j w[j] x_{t - (k-1) + j}, zeros before t = 0. x [B, T, D], w [k, D]."""
    ksz = w.shape[0]
    xp = jnp.pad(x, ((0, 0), (ksz - 1, 0), (0, 0)))
    return sum(w[j] * xp[:, j:j + x.shape[1]] for j in range(ksz))


def valid_depthwise_conv(xh, w):
    ksz = w.shape[0]
    t = xh.shape[1] - (ksz - 1)
    return sum(w[j] * xh[:, j:j + t] for j in range(ksz))


def check_halo_conv(rng):
    """Halo + VALID conv per slice == global causal conv, for kernel sizes 1..5 and 2, 4, 8 devices."""
    x = jnp.asarray(rng.standard_normal((B, T, 3)), jnp.float32)
    for ksz in (1, 2, 4, 5):
        w = jnp.asarray(rng.standard_normal((ksz, 3)), jnp.float32)
        want = causal_depthwise_conv(x, w)
        for n in (2, 4, 8):
            f = jax.shard_map(lambda xl: valid_depthwise_conv(short_conv_halo(xl, ksz, "sequence"), w),
                              mesh=seq_mesh(n), in_specs=P(None, "sequence"), out_specs=P(None, "sequence"))
            assert_close(f"halo conv k={ksz} n={n}", jax.jit(f)(x), want, 1e-6)
    print("halo conv == global causal conv for k in (1, 2, 4, 5), n in (2, 4, 8)")


def check_train_meshes(rng):
    """Three training steps (tiny PRISM model, the training stack's step) on meshes (8,1,1,1), (2,2,2,1),
    (1,2,1,4) give the loss, gradient norm and parameters of one device on the same batch. (Adam turns
    float32 rounding in near-zero gradients into steps of up to the learning rate, hence the params
    tolerance.)"""
    from train import config_lib, loop, optim  # noqa: PLC0415
    from train import mesh as mesh_lib  # noqa: PLC0415

    config = config_lib.tiny_config()
    config.model.num_layers, config.model.chunk_size = 1, 8
    config.data.seq_len, config.batch_size, config.grad_accum_steps = 32, 8, 1
    T, rows = config.data.seq_len, config.batch_size
    seg = np.sort(rng.integers(1, 4, (1, rows, T)), axis=-1).astype(np.int32)
    host = {"tokens": rng.integers(1, config.model.vocab_size, (1, rows, T)).astype(np.int32),
            "segment_ids": seg,
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (1, rows, T)).copy()}
    results = {}
    # The layer calls prism_recurrence_sharded: on (1, 2, 1, 4) that is the explicit sequence-parallel form.
    runs = [((1, 1, 1, 1), False), ((8, 1, 1, 1), False), ((2, 2, 2, 1), False), ((1, 2, 1, 4), True)]
    for shape, explicit in runs:
        devices = jax.devices()[:int(np.prod(shape))]
        mesh = mesh_lib.make_mesh(shape, devices)
        rules = mesh_lib.logical_axis_rules()
        model = loop.build_model(config)
        optimizer = optim.make_optimizer(config)
        state, shardings = loop.create_train_state(model, optimizer, mesh, rules, jax.random.key(0), T)
        sharding = mesh_lib.batch_sharding(mesh, leading_dims=1)
        batch = {k: jax.device_put(v, sharding) for k, v in host.items()}
        with loop.sharding_context(mesh, rules):
            step = jax.jit(loop.make_train_step(model, optimizer), in_shardings=(shardings, sharding),
                           out_shardings=(shardings, None))
            for _ in range(3):  # the warm-up's first learning rate is 0: step 3 sees two updates
                state, metrics = step(state, batch)
        results[(shape, explicit)] = (float(metrics["loss"]), float(metrics["grad_norm"]),
                                      jax.tree.map(np.asarray, state.params))
    loss0, norm0, params0 = results[((1, 1, 1, 1), False)]
    for (shape, explicit), (loss, norm, params) in results.items():
        assert abs(loss - loss0) < 1e-5 * max(1.0, abs(loss0)), (shape, loss, loss0)
        assert abs(norm - norm0) < 1e-4 * max(1.0, norm0), (shape, norm, norm0)
        err = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, params0)))
        assert err < 1e-3, (shape, err)  # the two updates move params by up to 3e-4
        how = ", sequence-parallel op in the layer" if explicit else ""
        print(f"train step on mesh {shape}{how}: loss {loss:.6f} (one device {loss0:.6f}), params max diff {err:.1e}")


def check_rows_parallel(rng):
    """A mesh without a sequence axis, (data=2, tensor=2) set with jax.set_mesh: the layer's drop-in
    splits B over "data" and H over "tensor" with shard_map (no XLA auto-partitioning of the op), for
    the chunk form and the Pallas kernels (interpret mode), and equals one device, gradients included."""
    global K, V
    mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    for impl, (k_dim, v_dim) in (("chunk", (K, V)), ("pallas", (16, 16))):
        K, V = k_dim, v_dim
        x = inputs(rng)
        cot = cotangents(rng, jnp.float32)
        kw = dict(output_final_state=True, chunk_size=16 if impl == "pallas" else CHUNK, impl=impl)
        want = outputs_and_grads(lambda *a, **k: prism_recurrence(*a, **kw, **k), x, cot)

        def sharded(*a, **k):
            return prism_recurrence_sharded(*a, **kw, **k)

        with jax.set_mesh(mesh):
            jaxpr = str(jax.make_jaxpr(lambda *a: sharded(*a, segment_ids=x["segment_ids"]))(
                x["q"], x["k"], x["v"], x["beta"], x["g"]))
            assert "shard_map" in jaxpr, "no shard_map in the (data, tensor) mesh path"
            got = outputs_and_grads(sharded, x, cot)
        compare(f"rows-parallel {impl} on (data=2, tensor=2) vs one device", got, want, 2e-5)
    K, V = 8, 6


CHECKS = {
    "single_device": check_matches_single_device,
    "float64": check_float64_reference,
    "batch_axis": check_batch_axis,
    "halo": check_halo_conv,
    "train_meshes": check_train_meshes,
    "rows": check_rows_parallel,
}

if __name__ == "__main__":
    assert len(jax.devices()) == 8, jax.devices()
    name = sys.argv[1]
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else int.from_bytes(os.urandom(4), "little")
    print(f"check {name} seed {seed}")
    for check in (CHECKS if name == "all" else [name]):
        CHECKS[check](np.random.default_rng(seed))
