"""Scale-out: sequence parallelism over a mesh axis (shard_map) and the halos it needs."""

from prism_jax.parallel.halo import left_halo, short_conv_halo
from prism_jax.parallel.sequence import (check_sequence_mesh, prism_recurrence_sharded,
                                         rows_parallel_prism,
                                         sequence_parallel_prism, sequence_parallel_prism_local)

__all__ = ["check_sequence_mesh", "left_halo", "prism_recurrence_sharded", "rows_parallel_prism", "sequence_parallel_prism",
           "sequence_parallel_prism_local", "short_conv_halo"]
