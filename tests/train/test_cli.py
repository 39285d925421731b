"""Front ends: config files, --config.* overrides, gin bindings, sweep expansion."""

from __future__ import annotations

import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from train import config_lib, gin_frontend, sweep

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
CONFIG_FILES = sorted(p.name for p in CONFIGS.glob("*.py"))


def load(arg: str, *overrides: str):
    argv = ["prog", f"--config={arg}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


def test_there_is_a_config_per_preset_and_baseline_mixer():
    assert {"tiny.py", "130m.py", "370m.py", "1.3b.py", "prism.py", "gdn.py", "gla.py", "attention.py",
            "ttt.py"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_loads_and_validates(name):
    config = load(str(CONFIGS / name))
    config_lib.validate(config, num_devices=1)
    config_lib.validate(config, num_devices=8)


@pytest.mark.parametrize("size", ["130m", "1.3b"])
def test_mixer_config_takes_a_size(size):
    config = load(f"{CONFIGS / 'gdn.py'}:{size}")
    assert config.model.mixer == "gdn" and config.model_preset == size and config.model.dtype == "bfloat16"


def test_command_line_overrides_every_level():
    config = load(str(CONFIGS / "tiny.py"), "--config.model.solver_steps=3", "--config.total_steps=7",
                  "--config.data.document_boundaries=False", "--config.mesh_shape=(1,1,-1,1)")
    assert config.model.solver_steps == 3 and config.total_steps == 7
    assert config.data.document_boundaries is False and tuple(config.mesh_shape) == (1, 1, -1, 1)
    assert config_lib.model_config(config).solver_steps == 3
    with pytest.raises(Exception, match="solver_stepz"):
        load(str(CONFIGS / "tiny.py"), "--config.model.solver_stepz=3")


def test_kernel_options_come_from_the_command_line():
    """--config.model.pallas_options: a JSON object of prism_pallas keyword arguments, checked with the
    rest of the model config before anything compiles."""
    stages = '["intra", "state", "outputs", "pullback", "reverse", "grads"]'
    config = load(str(CONFIGS / "tiny.py"), "--config.model.op_impl=pallas",
                  f'--config.model.pallas_options={{"mosaic_stages": {stages}}}')
    config_lib.validate(config, 1)
    assert config_lib.model_config(config).pallas_options == f'{{"mosaic_stages": {stages}}}'
    config = load(str(CONFIGS / "tiny.py"), '--config.model.pallas_options={"bwd": "xla"}')  # op_impl chunk
    with pytest.raises(ValueError, match="pallas_options"):
        config_lib.validate(config, 1)


def test_invalid_model_field_is_named():
    config = load(str(CONFIGS / "tiny.py"), "--config.model.mixer=lstm")
    with pytest.raises(ValueError, match="mixer"):
        config_lib.validate(config, 1)


def test_gin_sets_the_same_fields(tmp_path):
    gin_file = tmp_path / "run.gin"
    gin_file.write_text("train.total_steps = 11\ntrain.warmup_steps = 2\nmodel.solver_steps = 3\ntrain.mesh_shape = (1, 2, 1, 1)\n")
    config = gin_frontend.apply_gin(load(str(CONFIGS / "tiny.py")), [str(gin_file)],
                                    ["data.seq_len = 64", "sample.prompt = 'class '"])
    assert (config.total_steps, config.model.solver_steps, config.data.seq_len) == (11, 3, 64)
    assert tuple(config.mesh_shape) == (1, 2, 1, 1) and config.sample.prompt == "class "
    config_lib.validate(config, 2)


def test_gin_unknown_field_fails():
    with pytest.raises(ValueError, match="config.model.solver_stepz"):
        gin_frontend.apply_gin(load(str(CONFIGS / "tiny.py")), [], ["model.solver_stepz = 3"])


def test_sweep_expands_the_grid():
    runs = sweep.expand_grid(["model.solver_steps=1,2", "learning_rate=1e-3,3e-3,1e-2"])
    assert len(runs) == 6 and runs[0] == {"model.solver_steps": "1", "learning_rate": "1e-3"}
    assert len({sweep.run_name(r) for r in runs}) == 6
    assert sweep.expand_grid([]) == [{}]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sweep.expand_grid(["model.solver_steps"])
    command = sweep.run_command("configs/tiny.py", pathlib.Path("w/x"), runs[0])
    assert command[-2:] == ["--config.model.solver_steps=1", "--config.learning_rate=1e-3"]


def test_sweep_table_reads_finished_runs(tmp_path, capsys):
    import json

    for name, loss in (("solver_steps-1", 1.5), ("solver_steps-2", 1.25)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(
            {"step": 10, "train_loss": loss, "eval_loss": loss, "eval_perplexity": 3.0,
             "eval_bits_per_byte": 2.0, "seconds": 1.0}))
    rows = sweep.sweep("configs/tiny.py", tmp_path, ["model.solver_steps=1,2"])
    assert [r["status"] for r in rows] == ["done", "done"]
    table = (tmp_path / "summary.md").read_text()
    assert "1.2500" in table and "solver_steps-2" in table


def test_chunk_size_defaults_to_the_op_form_and_is_overridable():
    """`model.chunk_size` None means the op form's own default (pallas 32, chunk 64); an int overrides it
    from the command line and a bad one fails validation."""
    config = load(str(CONFIGS / "130m.py"))
    assert config.model.chunk_size is None
    config = load(str(CONFIGS / "130m.py"), "--config.model.chunk_size=32")
    assert config.model.chunk_size == 32
    assert config_lib.model_config(config).chunk_size == 32
    config = load(str(CONFIGS / "130m.py"), "--config.model.chunk_size=48")
    with pytest.raises(ValueError, match="chunk_size"):
        config_lib.model_config(config)
