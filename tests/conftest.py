"""Test-wide settings. Imported by pytest before any test module, so before JAX."""

import os

# Tests compile many small programs and run each once: XLA's CPU backend at optimisation level 0 compiles
# them about twice as fast; the results are the same programs' results. Set XLA_FLAGS yourself to override.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

# The Mosaic GPU interpreter runs each warpgroup of a CTA as a thread that blocks inside a host callback
# while it waits on a barrier. XLA's CPU client sizes its thread pool from NPROC (else the core count):
# with 2 threads (a 2-core CI machine) waiting warpgroups can hold every thread, and the one that would
# arrive never runs (the "deadlocked with the CPU idle" runs of the multi-warpgroup kernels).
os.environ.setdefault("NPROC", "8")
