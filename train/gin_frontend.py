"""gin-config as a second front end for the same config fields.

Every top-level section of the config is a gin configurable of the same name, and the top-level
scalar fields belong to `train`:

    # my.gin
    train.total_steps = 500
    train.mesh_shape = (2, 2, 2, 1)
    model.solver_steps = 3
    data.seq_len = 256
    sample.max_new_tokens = 0

`prism-train --config configs/tiny.py --gin_file my.gin --gin_bindings "model.mixer = 'gdn'"`
applies the gin values on top of the config file and its `--config.*` overrides.
"""

from __future__ import annotations

from collections.abc import Sequence

import gin
import ml_collections

TOP_LEVEL = "train"


def _sections(config: ml_collections.ConfigDict) -> list[str]:
    return [k for k, v in config.items() if isinstance(v, ml_collections.ConfigDict)]


def _register(name: str) -> None:
    def section(**kwargs):
        return kwargs

    section.__name__ = name
    try:
        gin.external_configurable(section, name=name, module="prism_train")
    except ValueError:  # already registered in this process
        pass


def apply_gin(config: ml_collections.ConfigDict, files: Sequence[str] = (), bindings: Sequence[str] = ()):
    """Returns a copy of `config` with the gin files and bindings applied. Unknown fields raise."""
    if not files and not bindings:
        return config
    sections = [TOP_LEVEL, *_sections(config)]
    for name in sections:
        _register(name)
    gin.clear_config()
    gin.parse_config_files_and_bindings(list(files), list(bindings), skip_unknown=False)
    config = ml_collections.ConfigDict(config.to_dict())
    for name in sections:
        values = gin.get_bindings(f"prism_train.{name}")
        target = config if name == TOP_LEVEL else config[name]
        for key, value in values.items():
            where = key if name == TOP_LEVEL else f"{name}.{key}"
            if key not in target or (name == TOP_LEVEL and isinstance(target[key], ml_collections.ConfigDict)):
                raise ValueError(f"gin binding {name}.{key}: unknown config field config.{where}")
            if isinstance(target[key], tuple) and isinstance(value, list):
                value = tuple(value)
            target[key] = value
    gin.clear_config()
    return config
