"""Loop level with a small stand-in model: loss falls, masks, accumulation, resume, bad configs."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import config_lib, loop, optim
from train import mesh as mesh_lib
from train import metrics as metrics_lib

from train_standin import STANDIN_RULES, StandinConfig, StandinLM, small_run, standin_fields


def standin_config(data_dir, **overrides):
    config = config_lib.base_config(model=standin_fields())
    config.sample.max_new_tokens = 0
    return small_run(config, data_dir, overrides, total_steps=8, eval_every_steps=4,
                     checkpoint_every_steps=4, async_checkpointing=False)


def run(config, workdir):
    return loop.train_and_evaluate(config, workdir, model=StandinLM(StandinConfig()), rules=STANDIN_RULES)


def test_target_mask_skips_cross_document_and_padding_targets():
    seg = jnp.array([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0]])
    want = np.array([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0]], bool)
    np.testing.assert_array_equal(loop.target_mask(seg), want)


def test_packed_loss_equals_documents_alone():
    """The summed nll of a packed row equals the sum over its documents run alone (model honours segments)."""
    model = StandinLM(StandinConfig())
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, n) for n in (5, 1, 9)]
    tokens = np.concatenate(docs + [np.zeros(3, int)])[None]
    seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(3, int)])[None]
    pos = np.concatenate([np.arange(len(d)) for d in docs] + [np.zeros(3, int)])[None]
    params = jax.jit(lambda r: nn.unbox(model.init(r, jnp.asarray(tokens))["params"]))(jax.random.key(0))

    @jax.jit
    def summed_jit(batch):
        logits = model.apply({"params": params}, batch["tokens"], segment_ids=batch["segment_ids"])
        nll, mask, _ = loop.nll_terms(logits, batch)
        return nll.sum(), mask.sum()

    def summed(batch):
        nll, count = summed_jit(batch)
        return float(nll), int(count)

    packed = summed({"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos)})
    alone = [summed({"tokens": jnp.asarray(d[None]), "segment_ids": jnp.ones((1, len(d)), jnp.int32),
                     "positions": jnp.arange(len(d))[None]}) for d in docs]
    assert packed[1] == sum(a[1] for a in alone) == 4 + 0 + 8
    np.testing.assert_allclose(packed[0], sum(a[0] for a in alone), rtol=1e-5)


def test_weight_decay_mask_spares_norms_and_biases():
    params = {"embedding": jnp.ones((4, 3)), "norm_0": {"scale": jnp.ones(3), "bias": jnp.ones(3)},
              "up_0": {"kernel": jnp.ones((3, 5)), "bias": jnp.ones(5)}}
    mask = optim.weight_decay_mask(params)
    assert mask == {"embedding": True, "norm_0": {"scale": False, "bias": False},
                    "up_0": {"kernel": True, "bias": False}}


@pytest.mark.parametrize("mixer", ["prism", "gdn", "gla", "attention", "ttt"])
def test_weight_decay_mask_same_for_scanned_and_unrolled_layers(mixer):
    """The scanned layout's leading layer axis does not turn per-layer vectors (e.g. GDN's a_log)
    into decayed matrices: the mask, unstacked, equals the unrolled model's mask."""
    from prism_jax.models import PrismLM, get_preset, stack_layer_params  # noqa: PLC0415

    config = get_preset("tiny", mixer=mixer, num_layers=2, d_model=32, num_heads=2, head_k_dim=16,
                        mlp_hidden_dim=64, vocab_size=64)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(PrismLM(config).init(jax.random.key(0),
                                                                        jnp.zeros((1, 8), jnp.int32))))
    unrolled = optim.weight_decay_mask(shapes["params"])
    stacked_shapes = stack_layer_params(shapes["params"])
    scanned = optim.weight_decay_mask(stacked_shapes)
    want = jax.tree.map(lambda *leaves: leaves[0], *[unrolled[f"blocks_{i}"] for i in range(2)])
    assert scanned["blocks"] == want
    assert any(not m for m in jax.tree.leaves(want)) and any(jax.tree.leaves(want))


def test_schedule_warms_up_then_decays():
    c = config_lib.base_config(model={})
    c.learning_rate, c.warmup_steps, c.total_steps, c.min_lr_ratio = 1.0, 10, 100, 0.1
    s = optim.learning_rate_schedule(c)
    assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1.0)
    assert float(s(100)) == pytest.approx(0.1) and float(s(5)) == pytest.approx(0.5)


def test_eval_summary_bits_per_byte():
    m = metrics_lib.eval_summary(nll_sum=2.0 * np.log(2) * 10, tokens=10, num_bytes=20)
    assert m["eval_loss"] == pytest.approx(2 * np.log(2))
    assert m["eval_bits_per_byte"] == pytest.approx(1.0)
    assert m["eval_perplexity"] == pytest.approx(4.0)


def test_loss_falls_and_run_writes_metrics_and_checkpoints(small_corpus, tmp_path):
    data_dir, _, _ = small_corpus
    summary = run(standin_config(data_dir, total_steps=12, eval_every_steps=12, checkpoint_every_steps=6),
                  tmp_path)
    records = metrics_lib.read_metrics(tmp_path)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3
    assert (tmp_path / "checkpoints" / "12").is_dir() and (tmp_path / "summary.json").is_file()
    assert {"eval_loss", "eval_perplexity", "eval_bits_per_byte"} <= set(summary)


def test_kill_and_resume_is_bit_identical(small_corpus, tmp_path):
    data_dir, _, _ = small_corpus
    # async_checkpointing on: the saved state must not alias buffers the next (donating) step reuses
    straight = run(standin_config(data_dir, async_checkpointing=True), tmp_path / "straight")
    run(standin_config(data_dir, stop_at_step=3, async_checkpointing=True), tmp_path / "resumed")  # "killed"
    resumed = run(standin_config(data_dir, async_checkpointing=True), tmp_path / "resumed")
    assert int(resumed["state"].step) == 8
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(straight["state"].params),
                 jax.device_get(resumed["state"].params))
    losses = {name: {r["step"]: r["loss"] for r in metrics_lib.read_metrics(tmp_path / name) if "loss" in r}
              for name in ("straight", "resumed")}
    assert losses["straight"] == losses["resumed"]
    assert straight["eval_loss"] == resumed["eval_loss"]


def test_gradient_accumulation_matches_one_batch(small_corpus):
    data_dir, _, _ = small_corpus
    model = StandinLM(StandinConfig())
    mesh = mesh_lib.make_mesh((1, 1, 1, 1), jax.devices()[:1])
    config = standin_config(data_dir)
    optimizer = optim.make_optimizer(config)
    rng = np.random.default_rng(1)
    batch = {"tokens": rng.integers(0, 256, (4, 32)).astype(np.int32),
             "segment_ids": np.repeat(np.array([[1] * 20 + [2] * 12]), 4, 0).astype(np.int32)}
    batch["segment_ids"][3, 25:] = 0
    batch["positions"] = np.zeros_like(batch["tokens"])
    results = []
    for accum in (1, 2):
        state, _ = loop.create_train_state(model, optimizer, mesh, STANDIN_RULES, jax.random.key(0), 32)
        step = jax.jit(loop.make_train_step(model, optimizer))
        micro = {k: jnp.asarray(v.reshape(accum, -1, 32)) for k, v in batch.items()}
        results.append(step(state, micro))
    (s1, m1), (s2, m2) = results
    assert int(m1["target_tokens"]) == int(m2["target_tokens"])
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s1.params, s2.params)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mesh_shape=(3, 1, 1, 1)), "mesh_shape"),
        (dict(mesh_shape=(-1, -1, 1, 1)), "at most one -1"),
        (dict(batch_size=6, grad_accum_steps=4), "grad_accum_steps"),
        (dict(warmup_steps=50), "warmup_steps"),
        (dict(distributed="maybe"), "distributed"),
        (dict(init_on="gpu"), "init_on"),
    ],
)
def test_bad_configs_fail_before_compiling(overrides, message, small_corpus):
    data_dir, _, _ = small_corpus
    with pytest.raises(ValueError, match=message):
        config_lib.validate(standin_config(data_dir, **overrides), num_devices=1, check_model=False)


def test_batch_not_divisible_by_data_axes_fails(small_corpus):
    data_dir, _, _ = small_corpus
    config = standin_config(data_dir, batch_size=6, mesh_shape=(4, 1, 1, 1))
    with pytest.raises(ValueError, match="data axes"):
        config_lib.validate(config, num_devices=4, check_model=False)
    config_lib.validate(standin_config(data_dir, batch_size=8, mesh_shape=(2, 2, 1, 1)), 4, check_model=False)


def test_unknown_config_field_fails(small_corpus):
    data_dir, _, _ = small_corpus
    config = standin_config(data_dir)
    config.unlock()
    config.totl_steps = 3
    with pytest.raises(ValueError, match="unknown field config.totl_steps"):
        config_lib.validate(config, 1, check_model=False)


def test_missing_data_dir_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        run(standin_config(tmp_path / "nope"), tmp_path / "w")
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_checkpointer_keeps_latest_and_best_and_restores_iterator(small_corpus, tmp_path):
    from train import checkpoint as checkpoint_lib
    from train.data import pipeline

    data_dir, _, _ = small_corpus
    spec = pipeline.PipelineSpec(str(data_dir), "train", seq_len=16, batch_size=2, seed=0)
    it = iter(pipeline.make_dataset(spec))
    ckpt = checkpoint_lib.Checkpointer(tmp_path, save_every=1, keep_last=2, keep_best=1, async_save=True)
    eval_losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 2.2}
    for step, eval_loss in eval_losses.items():
        next(it)
        ckpt.save(step, {"w": jnp.full((3,), float(step))}, it, metrics={"eval_loss": eval_loss}, force=True)
    expected_next = next(it)
    ckpt.wait()
    assert sorted(ckpt.all_steps()) == [2, 4, 5]  # best (2) + latest two
    fresh = iter(pipeline.make_dataset(spec))
    state = ckpt.restore(5, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}, fresh)
    np.testing.assert_array_equal(state["w"], np.full(3, 5.0))
    got = next(fresh)
    for key in expected_next:
        np.testing.assert_array_equal(got[key], expected_next[key])
    ckpt.close()


def test_distributed_init_only_when_asked_or_detected(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(k))
    for key in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    assert not loop.maybe_initialize_distributed("auto") and not loop.maybe_initialize_distributed("off")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    assert not loop.maybe_initialize_distributed("auto")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
    assert loop.maybe_initialize_distributed("auto")
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    assert loop.maybe_initialize_distributed("on")
    assert calls == [{}, {}]
    # a plain launch: coordinator, job size and rank from the environment
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert loop.maybe_initialize_distributed("auto")
    assert calls[-1] == {"num_processes": 2, "process_id": 1}


@pytest.mark.parametrize("mixer", ["prism", "gdn", "gla", "attention", "ttt"])
def test_init_on_a_short_dummy_gives_the_params_of_the_full_length(mixer, monkeypatch):
    """`loop._init_fn` traces the model on at most INIT_TOKENS tokens (a smaller init program to compile):
    the parameters and optimizer state equal those of an init on the full training length."""
    from prism_jax.models import PrismLM, get_preset  # noqa: PLC0415

    config = get_preset("tiny", mixer=mixer, num_layers=2, d_model=32, num_heads=2, head_k_dim=16,
                        mlp_hidden_dim=64, vocab_size=64, max_seq_len=256)
    model, optimizer = PrismLM(config), optax.adamw(1e-3)
    short = jax.jit(lambda r: nn.unbox(loop._init_fn(model, optimizer, 200)(r)))(jax.random.key(3))
    monkeypatch.setattr(loop, "INIT_TOKENS", 10 ** 6)
    full = jax.jit(lambda r: nn.unbox(loop._init_fn(model, optimizer, 200)(r)))(jax.random.key(3))
    assert loop.INIT_TOKENS > 200 and jax.tree.structure(short) == jax.tree.structure(full)
    for a, b in zip(jax.tree.leaves(short), jax.tree.leaves(full)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_placement_resolves_auto_and_rejects_unknown_places():
    assert loop.init_placement("auto") == ("host" if jax.default_backend() == "gpu" else "device")
    assert loop.init_placement("host") == "host" and loop.init_placement("device") == "device"
    with pytest.raises(ValueError, match="init_on"):
        loop.init_placement("cpu")
