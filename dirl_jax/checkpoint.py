"""Orbax checkpoints of a training run: train state, data-iterator position and metadata.

The data streams yield the same global sequence on every host (each host takes its rows), so one
copy of the iterator state, written by process 0, restores a run on any number of hosts.

Orbax writes each step to a temporary directory and commits it atomically, so a crash during
a save leaves the previous checkpoint usable.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dirl_jax.mesh import on_mesh


class Checkpointer:
    """Saves every ``every_steps`` steps (asynchronously) and keeps the last ``keep``."""

    def __init__(self, directory: str | os.PathLike, *, every_steps: int, keep: int):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.fspath(directory)),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps,
                                                 enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any], *,
             force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=ocp.args.JsonSave(data_iterator.get_state()),
            meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, dict[str, Any]]:
        """Restores ``step`` into arrays shaped (and sharded) like ``abstract_state``; moves
        ``data_iterator`` to the saved position."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_iter=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        data_iterator.set_state(restored.data_iter)
        return restored.state, restored.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _reader(directory: str | os.PathLike) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)),
                                 options=ocp.CheckpointManagerOptions(
                                     read_only=True, create=False, save_interval_steps=0))


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The committed steps in ``directory`` (a run's ``checkpoints/``), ascending; the temporary
    directories of interrupted saves are not steps."""
    manager = _reader(directory)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def restore_params(directory: str | os.PathLike, step: int, abstract_params: Any) -> Any:
    """Only ``params`` of checkpoint ``step`` in ``directory`` (neither the optimizer state nor
    the data-iterator position), restored into the structure and dtypes of ``abstract_params``
    (ShapeDtypeStructs, e.g. ``nnx.state(abstract_model, nnx.Param)``): sharded jax.Arrays where
    a leaf has a sharding, host NumPy arrays where it has none."""
    target = {"params": abstract_params}
    manager = _reader(directory)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
    finally:
        manager.close()
    return restored.state["params"]


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays, for restoring into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def start_or_resume(model: Any, tx: Any, run_dir: str, checkpoint_config: Any,
                    data_iterator: Any, *, mesh: jax.sharding.Mesh | None = None
                    ) -> tuple[Any, Any, Any, Checkpointer, int]:
    """Splits ``model`` into ``(graphdef, params)``, initialises ``tx``'s state (its moments
    sharded like the parameters, the rest replicated over ``mesh``) and restores the latest
    checkpoint of ``run_dir`` (parameters, optimizer, ``data_iterator`` position) if any, into
    those shardings — whatever mesh the checkpoint was written from.

    Returns ``graphdef, params, opt_state, checkpointer, start_step``.
    """
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)
    if mesh is not None:
        opt_state = on_mesh(opt_state, mesh)
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"),
                                every_steps=checkpoint_config.every_steps, keep=checkpoint_config.keep)
    start = checkpointer.latest_step() or 0
    if start:
        state, _ = checkpointer.restore(start, abstract_like({"params": params, "opt_state": opt_state}),
                                        data_iterator)
        params, opt_state = state["params"], state["opt_state"]
        print(f"resumed from {run_dir}/checkpoints/{start}", flush=True)
    return graphdef, params, opt_state, checkpointer, start
