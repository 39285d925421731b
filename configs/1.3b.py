"""The 1.3b PRISM preset: bf16 compute, float32 params, FSDP over all devices (docs/training.md)."""

from train.config_lib import large_config


def get_config():
    return large_config("1.3b")
