"""prism-jax: the PRISM sequence model in JAX/Flax.

Subpackages:
  ops     the exact PRISM recurrence (reference, scan, chunk and pallas forms)
  layers  Flax linen mixers (PRISM and baselines)
  models  the language model and its presets
"""

__version__ = "0.1.0"
