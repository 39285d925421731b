"""Test-wide settings. Imported by pytest before any test module, so before JAX."""

import os

# Tests compile many small programs and run each once: XLA's CPU backend at optimisation level 0 compiles
# them about twice as fast; the results are the same programs' results. Set XLA_FLAGS yourself to override.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
