"""Orbax checkpoints of a training run: train state, data-iterator position and metadata.

The data streams yield the same global sequence on every host (each host takes its rows), so one
copy of the iterator state, written by process 0, restores a run on any number of hosts.

Orbax writes each step to a temporary directory and commits it atomically, so a crash during
a save leaves the previous checkpoint usable. Every save also records a fingerprint of the
train state's bits (:func:`fingerprint`) in its metadata; a restore recomputes it, and a step that
does not match, or that orbax cannot read (truncated or missing files), is reported with its path
and the next older step is tried, never silently nothing; once one restores, the unreadable newer
steps are moved to ``<checkpoints>_unreadable/`` so the resumed run can save them again. A save
that fails in orbax's
background thread (a full disk, an I/O error) stops the run at the next step's
:meth:`Checkpointer.save` call (or at :meth:`Checkpointer.wait`) with :class:`CheckpointWriteError`
naming the step's directory.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from dirl_jax.mesh import on_mesh

log = logging.getLogger(__name__)
_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


class CheckpointCorrupt(RuntimeError):
    """No committed checkpoint of a run can be restored intact; the message lists each one's problem."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, I/O error); the message names its directory."""


@jax.jit
def fingerprint(tree: Any) -> list[jax.Array]:
    """Per leaf, the wrapping uint32 sum of its raw bits: one flipped bit anywhere changes it, and
    the sum does not depend on how the leaf is sharded."""
    def bits_sum(x: jax.Array) -> jax.Array:
        bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize])
        return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)
    return [bits_sum(x) for x in jax.tree.leaves(tree)]


def fingerprints(state: dict[str, Any]) -> dict[str, list[int]]:
    """:func:`fingerprint` of each part of a train state (``params``, ``opt_state``), as ints
    (every process holds the replicated sums)."""
    return {key: [int(np.asarray(v.addressable_data(0))) for v in fingerprint(part)]
            for key, part in state.items()}


def check_fingerprints(restored: dict[str, Any], saved: dict[str, list[int]] | None, where: str) -> None:
    """ValueError naming ``where`` when a restored part's bits differ from the saved fingerprint."""
    bad = [key for key, value in fingerprints(restored).items()
           if saved is not None and key in saved and saved[key] != value]
    if bad:
        raise ValueError(f"{where}: the restored {' and '.join(bad)} differ from the fingerprint "
                         "saved with them (a corrupted file)")


class Checkpointer:
    """Saves every ``every_steps`` steps (asynchronously) and keeps the last ``keep``."""

    def __init__(self, directory: str | os.PathLike, *, every_steps: int, keep: int):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.fspath(directory)),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps,
                                                 enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` at ``step`` writes a checkpoint (without ``force``)."""
        return self.manager.should_save(step)

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any], *,
             force: bool = False) -> bool:
        """Saves when the interval (or ``force``) says so, with the state's :func:`fingerprint`."""
        self.check()
        if not (force or self.should_save(step)):
            return False
        with self._write_errors():  # the previous save's outcome first (orbax would wait for it
            self.manager.wait_until_finished()  # anyway): its failure stops the run here
        self.check_free_space(step, state)
        meta = {**meta, "fingerprint": fingerprints(state)}
        with self._write_errors():
            return self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data_iter=ocp.args.JsonSave(data_iterator.get_state()),
                meta=ocp.args.JsonSave(meta)), force=force)

    def check_free_space(self, step: int, state: Any) -> None:
        """:class:`CheckpointWriteError` before writing when the disk cannot hold this process's
        share of ``state`` (a lower bound: orbax adds metadata)."""
        directory = os.fspath(self.manager.directory)
        needed = sum(x.nbytes for x in jax.tree.leaves(state)) // jax.process_count()
        free = free_bytes(directory)
        if free < needed:
            raise CheckpointWriteError(
                errno.ENOSPC, f"cannot write the checkpoint of step {step} under {directory}: it needs "
                f"at least {needed / 2**20:.2f} MiB and the disk has {free / 2**20:.2f} MiB free")

    def check(self) -> None:
        """Raises :class:`CheckpointWriteError` if a background save has failed (never blocks)."""
        with self._write_errors():
            self.manager.check_for_errors()
            if not self.manager.is_saving_in_progress():
                self.manager.wait_until_finished()  # returns at once; raises the commit's error

    @contextlib.contextmanager
    def _write_errors(self) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            raise CheckpointWriteError(
                f"cannot write a checkpoint under {os.fspath(self.manager.directory)}: {e}") from e

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, dict[str, Any]]:
        """Restores ``step`` into arrays shaped (and sharded) like ``abstract_state`` and checks
        its fingerprint (ValueError naming the step's directory); then moves ``data_iterator`` to
        the saved position."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_iter=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        check_fingerprints(restored.state, restored.meta.get("fingerprint"), self.step_dir(step))
        data_iterator.set_state(restored.data_iter)
        return restored.state, restored.meta

    def step_dir(self, step: int) -> str:
        return os.path.join(os.fspath(self.manager.directory), str(step))

    def restore_latest_intact(self, abstract_state: Any, data_iterator: Any) -> tuple[Any, int]:
        """The newest committed step that restores intact, and its number (0: no checkpoint).
        Each step that fails is logged with its path and problem, and once an older step restores
        it is moved aside (:meth:`set_aside`) so the resumed run can save those steps again;
        :class:`CheckpointCorrupt` when every one fails."""
        problems, unreadable = [], []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, _ = self.restore(step, abstract_state, data_iterator)
            except Exception as e:  # noqa: BLE001 - reported, and the older step tried
                problems.append(f"{self.step_dir(step)}: {type(e).__name__}: {e}")
                unreadable.append(step)
                log.warning("checkpoint %s cannot be restored (%s: %s); trying the previous one",
                            self.step_dir(step), type(e).__name__, e)
                continue
            if problems:
                print(f"skipped {len(problems)} unreadable checkpoint(s): " + "; ".join(problems), flush=True)
                self.set_aside(unreadable)
            return state, step
        if problems:
            raise CheckpointCorrupt("no checkpoint can be restored: " + "; ".join(problems))
        return None, 0

    def set_aside(self, steps: list[int]) -> None:
        """Moves unreadable ``steps`` to ``<checkpoints>_unreadable/`` (kept for inspection): left in
        place, orbax would skip every interval save up to the newest of them and refuse the final
        save of that step."""
        directory = os.fspath(self.manager.directory)
        aside = directory.rstrip(os.sep) + "_unreadable"
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                target, copy = os.path.join(aside, str(step)), 1
                while os.path.exists(target):  # set aside before: keep both
                    target, copy = os.path.join(aside, f"{step}.{copy}"), copy + 1
                os.replace(self.step_dir(step), target)
                print(f"moved {self.step_dir(step)} to {target}", flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("dirl_jax: unreadable checkpoints set aside")
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until the last save is committed (:class:`CheckpointWriteError` if it failed)."""
        with self._write_errors():
            self.manager.wait_until_finished()
            self.manager.check_for_errors()

    def close(self) -> None:
        self.manager.close()


def free_bytes(directory: str) -> int:
    """Bytes available to this user on the filesystem of ``directory`` (or its nearest existing
    ancestor)."""
    while not os.path.exists(directory):
        directory = os.path.dirname(directory)
    return shutil.disk_usage(directory).free


def _not_the_read_only_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


def _reader(directory: str | os.PathLike) -> ocp.CheckpointManager:
    """A manager that only reads (orbax's notice that the directory is read only, which is the
    point, is dropped; nothing else)."""
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_not_the_read_only_notice)
    try:
        return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)),
                                     options=ocp.CheckpointManagerOptions(
                                         read_only=True, create=False, save_interval_steps=0))
    finally:
        absl_logger.removeFilter(_not_the_read_only_notice)


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
    a leaf has a sharding, host NumPy arrays where it has none. Checked against the fingerprint
    saved with them (ValueError naming the step's directory)."""
    target = {"params": abstract_params}
    manager = _reader(directory)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True), meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    check_fingerprints(restored.state, restored.meta.get("fingerprint"),
                       os.path.join(os.path.abspath(os.fspath(directory)), str(step)))
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
    state, start = checkpointer.restore_latest_intact(
        abstract_like({"params": params, "opt_state": opt_state}), data_iterator)
    if start:
        params, opt_state = state["params"], state["opt_state"]
        print(f"resumed from {checkpointer.step_dir(start)}", flush=True)
    return graphdef, params, opt_state, checkpointer, start
