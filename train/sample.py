"""Generate text from a training run's latest checkpoint.

    python -m train.sample --workdir workdirs/tiny --prompt "def " [--max_new_tokens 200]
"""

from __future__ import annotations

import json
import pathlib

import ml_collections
from absl import app, flags

def load_run(workdir: str | pathlib.Path, step: int | None = None):
    """(config, model, params, tokenizer, step) of the run in `workdir`."""
    import flax.linen as nn  # noqa: F401,PLC0415

    from prism_jax.models import PrismLM  # noqa: PLC0415
    from train import checkpoint as checkpoint_lib  # noqa: PLC0415
    from train import config_lib  # noqa: PLC0415
    from train.data import prepare as prepare_lib  # noqa: PLC0415
    from train.data import tokenizers  # noqa: PLC0415

    workdir = pathlib.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{workdir} has no config.json: not a prism-train workdir")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    data_dir = pathlib.Path(config.data.data_dir) if config.data.data_dir else workdir / "data"
    tokenizer = tokenizers.tokenizer_from_spec(prepare_lib.load_meta(data_dir)["tokenizer"])
    ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", save_every=1, keep_last=1, keep_best=0,
                                       async_save=False)
    params, step = ckpt.restore_params(step)
    ckpt.close()
    return config, PrismLM(config_lib.model_config(config)), params, tokenizer, step


def sample(workdir, prompt: str, *, max_new_tokens=200, temperature=0.8, top_k=40, seed=0, step=None,
           num_samples=1) -> list[str]:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from prism_jax.generation import generate  # noqa: PLC0415

    _, model, params, tokenizer, _ = load_run(workdir, step)
    ids = tokenizer.encode(prompt.encode("utf-8"))
    if ids.size == 0:
        raise ValueError("--prompt must not be empty")
    prompt_ids = jnp.asarray(np.repeat(ids[None], num_samples, 0), jnp.int32)
    out = generate(model, {"params": params}, prompt_ids, max_new_tokens, jax.random.key(seed), temperature,
                   top_k or None)
    return [tokenizer.decode(row) for row in np.asarray(out)]


def main(argv):
    del argv
    texts = sample(_WORKDIR.value, _PROMPT.value, max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                   top_k=_TOP_K.value, seed=_SEED.value, step=_STEP.value, num_samples=_NUM.value)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i}")
        print(text)


def _define_flags():
    """The CLI's flags, defined only when the module runs as a program."""
    global _WORKDIR, _PROMPT, _MAX_NEW, _TEMPERATURE, _TOP_K, _SEED, _STEP, _NUM
    _WORKDIR = flags.DEFINE_string("workdir", None, "A prism-train workdir (holds config.json and checkpoints/).",
                                   required=True)
    _PROMPT = flags.DEFINE_string("prompt", "def ", "Text to continue.")
    _MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
    _TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.")
    _TOP_K = flags.DEFINE_integer("top_k", 40, "Keep the k most likely tokens; 0 = all.")
    _SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
    _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    _NUM = flags.DEFINE_integer("num_samples", 1, "How many continuations.")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
