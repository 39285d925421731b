"""Orbax checkpoints of the train state together with the data iterator's state.

Each step directory holds two items: `state` (params, optimizer state, step; sharded arrays) and
`data` (grain's per-process iterator state), so a resumed run reads exactly the batches an
uninterrupted run would. Saves are asynchronous and atomic (orbax writes to a temporary
directory and renames it when complete); the manager keeps the latest `keep_last` steps plus the
`keep_best` steps with the lowest eval loss.
"""

from __future__ import annotations

import pathlib

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

BEST_METRIC = "eval_loss"


class Checkpointer:
    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        save_every: int,
        keep_last: int,
        keep_best: int,
        async_save: bool = True,
    ):
        policies = [ocm.LatestN(n=keep_last)]
        if keep_best > 0:
            policies.append(
                ocm.BestN(
                    get_metric_fn=lambda metrics: metrics[BEST_METRIC],
                    reverse=True,  # BestN keeps the largest; reversing keeps the lowest loss
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, data_iterator=None, *, metrics=None, force: bool = False) -> bool:
        """Saves when `step` is due (or `force`); returns whether a save started."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

    def restore(self, step: int, abstract_state, data_iterator=None):
        """The state at `step` (shaped and sharded like `abstract_state`); sets the iterator's position."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_params(self, step: int | None = None):
        """Only the parameters, as stored (for sampling); `step` defaults to the latest."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        return restored["state"]["params"], step

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
