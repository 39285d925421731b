"""The 370m PRISM preset: bf16 compute, float32 params, FSDP over all devices (docs/training.md)."""

from train.config_lib import large_config


def get_config():
    return large_config("370m")
