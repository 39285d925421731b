"""The tiny PRISM preset on the embedded stdlib corpus: README command one (a few minutes on 2 CPU cores)."""

from train.config_lib import tiny_config


def get_config():
    return tiny_config()
