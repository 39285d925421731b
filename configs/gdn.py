"""Mixer 'gdn': `--config configs/gdn.py` (tiny) or `--config configs/gdn.py:130m` (any preset name)."""

from train.config_lib import sized_config


def get_config(size="tiny"):
    return sized_config(size or "tiny", mixer="gdn")
