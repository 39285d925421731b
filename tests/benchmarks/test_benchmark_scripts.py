"""Pieces of benchmarks/throughput.py and benchmarks/lm_compare.py that decide what gets measured.

The scripts themselves run on the GPU; here: the optimizer of the LM comparison equals the training
stack's, the per-model token counts, argument forwarding to the compile workers, and the tables.
"""

import importlib.util
import io
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


throughput = _load("throughput")
lm_compare = _load("lm_compare")


def test_injected_learning_rate_matches_training_optimizer():
    """lm_compare's AdamW with the schedule set from the host gives train.optim's updates."""
    from train import config_lib, optim

    config = config_lib.base_config(model={})
    config.total_steps, config.warmup_steps, config.learning_rate = 6, 2, 1e-2
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
              "norm": {"scale": jnp.ones((3,), jnp.float32)}}
    reference, injected = optim.make_optimizer(config), lm_compare.make_optimizer(config)
    schedule = optim.learning_rate_schedule(config)
    ref_p, inj_p = params, params
    ref_s, inj_s = reference.init(params), injected.init(params)
    for step in range(config.total_steps):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32) * 3.0, params)
        upd, ref_s = reference.update(grads, ref_s, ref_p)
        ref_p = optax.apply_updates(ref_p, upd)
        lr = np.float32(schedule(step))
        inj_s = optax.tree_utils.tree_set(inj_s, learning_rate=jnp.asarray(lr))
        upd, inj_s = injected.update(grads, inj_s, inj_p)
        inj_p = optax.apply_updates(inj_p, upd)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), ref_p, params)
    assert min(jax.tree.leaves(moved)) > 1e-4  # the test can fail: parameters really moved
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ref_p, inj_p)


def test_lm_compare_configs_share_shape_and_differ_in_mixer():
    from train import config_lib

    path = ROOT / "configs" / "lm_compare.py"
    spec = importlib.util.spec_from_file_location("lm_compare_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    configs = {name: module.get_config(name) for name in lm_compare.MODEL_NAMES}
    for name, config in configs.items():
        config_lib.validate(config, num_devices=1)
        assert config.model.mixer == module.MIXERS[name]["mixer"]
        for key in ("d_model", "num_layers", "num_heads", "mlp_hidden_dim", "vocab_size"):
            assert config.model[key] == configs["prism"].model[key]
    assert configs["prism"].model.solver_steps == 2
    with pytest.raises(ValueError, match="not one of"):
        module.get_config("mamba")


def test_strip_flags_both_forms():
    argv = ["--smoke", "--out", "x.json", "--models=a,b", "--compile-workers=3", "--lengths", "32"]
    expected = ["--smoke", "--models=a,b", "--lengths", "32"]
    assert throughput.strip_flag_values(argv, ("--out", "--compile-workers")) == expected
    assert lm_compare.strip_flag_values is throughput.strip_flag_values  # one shared runner module


def test_compile_workers_statuses_crashes_and_time_limit(tmp_path):
    """run_workers: a worker's own status is returned as written; a crash and a worker killed at the
    time limit get a no-verdict status (killed, with the log's tail); jobs run max_parallel at a time."""
    from benchmarks.compile_workers import run_workers

    script = tmp_path / "worker.py"
    script.write_text(
        "import json, sys, time\n"
        "mode, path = sys.argv[1], sys.argv[sys.argv.index('--status-file') + 1]\n"
        "if mode == 'crash':\n    print('boom'); sys.exit(3)\n"
        "if mode == 'slow':\n    time.sleep(60)\n"
        "json.dump(dict(ok=True, mode=mode), open(path, 'w'))\n")
    jobs = [("a", ["ok"]), ("b", ["crash"]), ("c", ["slow"]), ("d", ["ok"])]
    statuses = run_workers(jobs, script=str(script), argv=[], cache_dir=str(tmp_path / "cache"), max_parallel=2,
                           timeout_s=8.0)
    assert statuses["a"] == dict(ok=True, mode="ok") and statuses["d"] == dict(ok=True, mode="ok")
    assert statuses["b"]["ok"] is False and statuses["b"]["killed"] and not statuses["b"]["timed_out"]
    assert "worker exit 3" in statuses["b"]["error"] and "boom" in statuses["b"]["error"]
    assert statuses["c"]["ok"] is False and statuses["c"]["timed_out"]


def test_tokens_per_step_overrides():
    args = throughput.parse_args(["--tokens-per-step", "32768"])
    args.tokens_per_step = 32768
    assert throughput.tokens_per_step_for("attention", args) == 32768
    assert throughput.tokens_per_step_for("ttt_token", args) == throughput.DEFAULT_MODEL_TOKENS["ttt_token"]
    args = throughput.parse_args(["--model-tokens-per-step", "ttt_token=2048,gdn=16384"])
    args.tokens_per_step = 32768
    assert throughput.tokens_per_step_for("ttt_token", args) == 2048
    assert throughput.tokens_per_step_for("gdn", args) == 16384


def test_throughput_table_ratio_and_merge(tmp_path):
    def point(model, t, rate, tokens=32768):
        return dict(model=model, seq_len=t, tokens_per_s=rate, tokens_per_step=tokens)

    a = [point("prism_l2", 2048, 74000.0), point("ttt_token", 2048, 500.0, 4096),
         dict(model="prism_l2", seq_len=4096, error="skipped (budget)")]
    b = [point("prism_l2", 4096, 70000.0)]
    for name, results in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps({"results": results}))
    merged = throughput.merge_results([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    by = {(r["model"], r["seq_len"]): r for r in merged}
    assert by[("prism_l2", 4096)]["tokens_per_s"] == 70000.0  # the later file wins
    out = io.StringIO()
    throughput.print_table(merged, ["prism_l2", "ttt_token"], [2048, 4096], file=out)
    text = out.getvalue()
    assert "| prism_l2 / ttt_token | 148x | - |" in text
    assert "500.0 (4K/step)" in text
    png = tmp_path / "fig2.png"
    throughput.plot_results(merged, ["prism_l2", "ttt_token"], [2048, 4096], str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lm_compare_table_lists_every_model():
    rows = [dict(model="prism", num_params=29e6, steps=10, tokens_seen=655360, eval_bits_per_byte=2.5,
                 eval_loss=1.7, train_loss=1.8, tokens_per_s=3e5, step_s=0.2, compile_s=3.0),
            dict(model="ttt", num_params=28e6, error="OOM")]
    table = lm_compare.fmt_table(rows)
    assert "| prism | 29.00M | 10 | 0.66M | 2.5000 |" in table
    assert "| ttt |" in table and "OOM" in table


@pytest.mark.slow
def test_throughput_timing_process_hits_the_workers_cache(tmp_path):
    """The pre-compile worker fills the persistent cache; the timing process adds no train-step entry."""
    import subprocess
    import sys

    cache, out = tmp_path / "cache", tmp_path / "tp.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--smoke", "--models", "attention",
           "--lengths", "32", "--compile-workers", "1", "--cache-dir", str(cache), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=900)
    steps = sorted(cache.glob("jit_step-*"))
    assert len(steps) == 1, [p.name for p in steps]
    worker_done = max(p.stat().st_mtime for p in cache.glob("status_*/*.json"))
    assert steps[0].stat().st_mtime <= worker_done  # written by the worker, not by the timing process
    (result,) = json.loads(out.read_text())["results"]
    assert result["precompiled"] and result["tokens_per_s"] > 0
    assert result["compile_s"] < result["worker_compile_s"]


def test_compile_worker_failures_retried_only_when_transient():
    assert not throughput.worker_failed_for_good(None)
    assert not throughput.worker_failed_for_good(dict(ok=True))
    assert not throughput.worker_failed_for_good(dict(ok=False, killed=True, errors=["worker exit -9"]))
    oom = "pallas: JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.92GiB"
    assert not throughput.worker_failed_for_good(dict(ok=False, errors=[oom]))
    assert throughput.worker_failed_for_good(dict(ok=False, errors=["pallas: ValueError: bad shape"]))


def test_pallas_backward_knob_sets_the_op_default():
    from pallas_kernels import prism_pallas

    before = prism_pallas.__kwdefaults__["bwd"]
    try:
        throughput.set_pallas_backward("xla")
        assert prism_pallas.__kwdefaults__["bwd"] == "xla"
        throughput.set_pallas_backward(None)
        assert prism_pallas.__kwdefaults__["bwd"] == "xla"
    finally:
        prism_pallas.__kwdefaults__["bwd"] = before


def test_forward_kernels_times_every_kernel_on_cpu():
    forward_kernels = _load("forward_kernels")  # imports benchmarks/kernels.py from beside itself
    row = forward_kernels.time_kernels(32, 2, forward_kernels.SMOKE, 16, reps=1, interpret=True)
    keys = ("intra_rows_ms", "intra_blocked8_ms", "state_ms", "outputs_ms")
    assert all(row[k] > 0 for k in keys), row


def test_mosaic_stages_times_triton_beside_mosaic_and_reports_failures_on_cpu():
    mosaic_stages = _load("mosaic_stages")
    shape = dict(mosaic_stages.SMOKE, dk=64, dv=64, tokens=128)
    rows = mosaic_stages.run_point(128, 1, shape, ["reverse"], reps=1, interpret=True,
                                   tries=[("reverse", {"block_v": 32}), ("reverse", {"no_such_option": 1})])
    assert [r["stage"] for r in rows] == ["reverse"] * 3
    assert all(r["triton_ms"] > 0 for r in rows)
    assert rows[0]["mosaic_ms"] > 0 and rows[0]["err"] < 1e-2 and rows[1]["err"] < 1e-2
    assert "TypeError" in rows[2]["error"]  # a bad setting is a reported row, not a crash


def test_train_step_times_each_variant_and_reports_bad_options_as_rows(tmp_path):
    train_step = _load("train_step")  # imports benchmarks/compile_time.py from beside itself
    with pytest.raises(ValueError, match="JSON object"):
        train_step.parse_variant('p=pallas:["bwd"]')
    out = tmp_path / "train_step.json"
    payload = train_step.main(["--layers", "1", "--steps", "1", "--seq-len", "32", "--batch", "2",
                               "--variant", "chunk=chunk", "--variant", 'xla_bwd=pallas:{"bwd": "xla"}',
                               "--variant", 'bad=pallas:{"warps": 1}', "--out", str(out)])
    rows = {r["name"]: r for r in payload["rows"]}
    assert rows["chunk"]["step_ms"] > 0 and rows["xla_bwd"]["step_ms"] > 0
    assert abs(rows["chunk"]["loss"] - rows["xla_bwd"]["loss"]) < 1e-2  # the same model, two op forms
    assert "warps" in rows["bad"]["error"]  # a bad setting is a reported row, not a crash
    assert json.loads(out.read_text())["rows"][0]["name"] == "chunk"


def test_op_phases_times_each_phase_and_compares_with_the_float32_chunk_form(tmp_path, capsys):
    op_phases = _load("op_phases")
    out = tmp_path / "op.json"
    result = op_phases.main(["--smoke", "--impl", "reference", "--check", "--reps", "2", "--out", str(out)])
    assert result["shape"] == dict(B=2, T=37, H=2, L=2, K=16, V=8)
    assert all(result[k] >= 0 for k in ("lower_s", "compile_s", "first_call_s", "ms"))
    # bf16 inputs through the reference against the float32 chunk form: close, but not equal
    assert all(1e-5 < e < 2e-2 for e in result["rel_err"].values()), result["rel_err"]
    assert json.loads(out.read_text())["impl"] == "reference"
    err = capsys.readouterr().err
    assert all(phase in err for phase in ("lower took", "compile took", "first call took")), err
