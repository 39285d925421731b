"""Mechanistic probing suite (PRISM paper section 5.5, Appendix H): task generators and a small
train-and-evaluate CLI (`python -m train.probing --help`)."""

from train.probing.tasks import TASK_NAMES, chance_level, get_task, make_batch, oracle_answers

__all__ = ["TASK_NAMES", "chance_level", "get_task", "make_batch", "oracle_answers"]
