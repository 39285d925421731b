"""One process of a local two-process JAX job (CPU devices, loopback coordinator).

    python multiprocess_worker.py COORDINATOR PROCESS_ID NUM_PROCESSES TASK [WORKDIR STOP_AT]

TASK "psum": a cross-process psum and all-gather over every device of the job.
TASK "train": `train.loop.train_and_evaluate` on a tiny config over a (data=2, fsdp=2) mesh that
spans both processes, stopping at STOP_AT (saves a checkpoint there); rerunning resumes from it.
Run by tests/parallel/test_multiprocess.py; prints lines the test checks.
"""

from __future__ import annotations

import json
import os
import sys

LOCAL_DEVICES = 2
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES} --xla_backend_optimization_level=0"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402


def psum_task(pid: int, nproc: int) -> None:
    mesh = jax.make_mesh((jax.device_count(),), ("hosts",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("hosts"))
    # Each process contributes rows (process_id + 1) * 10 + local device index.
    local = np.array([(pid + 1) * 10 + i for i in range(LOCAL_DEVICES)], np.float32)
    x = jax.make_array_from_process_local_data(sharding, local)
    total = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "hosts"), mesh=mesh, in_specs=P("hosts"),
                                  out_specs=P()))(x)
    gathered = jax.jit(lambda v: v, out_shardings=NamedSharding(mesh, P()))(x)
    want = sum((p + 1) * 10 + i for p in range(nproc) for i in range(LOCAL_DEVICES))
    print(json.dumps({"process": pid, "process_count": jax.process_count(),
                      "device_count": jax.device_count(), "psum": float(total[0]),
                      "want": float(want), "gathered": np.asarray(gathered).tolist()}), flush=True)


def train_task(workdir: str, stop_at: int) -> None:
    from train import config_lib, loop  # noqa: PLC0415

    config = config_lib.tiny_config()
    config.distributed = "off"  # already initialised above, with explicit loopback parameters
    config.model.num_layers = 1
    config.model.d_model = 32
    config.model.num_heads = 2
    config.model.head_k_dim = 16
    config.model.mlp_hidden_dim = 64
    config.model.chunk_size = 16
    config.data.seq_len = 32
    config.batch_size = 4
    config.total_steps = 3
    config.warmup_steps = 1
    config.stop_at_step = stop_at
    config.log_every_steps = 1
    config.eval_every_steps = 3
    config.eval_batches = 1
    config.checkpoint_every_steps = 2
    config.mesh_shape = (2, 2, 1, 1)
    config.progress_bar = False
    config.tensorboard = False
    config.sample.max_new_tokens = 0
    summary = loop.train_and_evaluate(config, workdir)
    print(json.dumps({"process": jax.process_index(), "step": summary["step"],
                      "train_loss": summary["train_loss"], "eval_loss": summary.get("eval_loss")}),
          flush=True)


def main() -> None:
    coordinator, pid, nproc, task = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=nproc, process_id=pid,
                               initialization_timeout=120)
    assert jax.process_count() == nproc and jax.local_device_count() == LOCAL_DEVICES
    if task == "psum":
        psum_task(pid, nproc)
    elif task == "train":
        train_task(sys.argv[5], int(sys.argv[6]))
    else:
        raise SystemExit(f"unknown task {task!r}")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
