"""Command line: `prism-train --config configs/tiny.py --workdir DIR [--config.x=y ...]`.

Also `python -m train`. gin front end: `--gin_file F.gin`, `--gin_bindings "model.solver_steps = 3"`.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from train import gin_frontend

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config(), e.g. configs/tiny.py (or configs/gdn.py:130m).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the prepared data.")
_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "gin files that set config fields (see train/gin_frontend.py).")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "gin bindings, e.g. 'model.solver_steps = 3'.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/tiny.py")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # jax/orbax INFO lines would bury the progress bar
    config = gin_frontend.apply_gin(_CONFIG.value, _GIN_FILES.value, _GIN_BINDINGS.value)

    from train import loop  # noqa: PLC0415  (imports jax: after flag parsing)

    loop.train_and_evaluate(config, _WORKDIR.value)


def run():
    """Console-script entry point (`prism-train`)."""
    app.run(main)


if __name__ == "__main__":
    run()
