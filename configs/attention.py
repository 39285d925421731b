"""Mixer 'attention': `--config configs/attention.py` (tiny) or `--config configs/attention.py:130m` (any preset name)."""

from train.config_lib import sized_config


def get_config(size="tiny"):
    return sized_config(size or "tiny", mixer="attention")
