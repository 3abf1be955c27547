"""Training checkpoints with orbax's ``CheckpointManager``.

One checkpoint = the train state (student, teacher, optimizer state, step, rng), the data
iterator's state (JSON) and the resolved config (JSON). Orbax writes each step into a
temporary directory (``N.orbax-checkpoint-tmp``) and renames it to ``N`` only when every
item is committed, so a crash or ``kill -9`` mid-save leaves the previous checkpoint intact
and the unfinished one invisible. A checkpoint that fails to restore (truncated, corrupted)
is skipped with a warning in favour of the one before it, and moved aside so that the
resumed run can save that step again.

Retention: the newest ``keep`` checkpoints, plus (optionally) the one with the lowest value
of ``best_metric`` (each checkpoint carries the mean of the metric over the steps since the
previous checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from ilvr_jax import storage

logger = logging.getLogger(__name__)

STATE, DATA, CONFIG = "state", "data", "config"
CORRUPT_DIR = "corrupt_checkpoints"


class CheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be restored."""


def checkpoint_dir(workdir: str) -> str:
    return storage.join(storage.abspath(workdir), "checkpoints")


def make_manager(workdir: str, *, save_every: int = 1, keep: int = 3, async_save: bool = True,
                 best_metric: str = "") -> ocp.CheckpointManager:
    """Saves every ``save_every`` steps; keeps the newest ``keep`` (all when ``keep <= 0``)
    and, with ``best_metric``, also the checkpoint of the lowest metric value."""
    policies = [ocp_policies.LatestN(n=keep if keep and keep > 0 else None)]
    if best_metric:
        # BestN sorts ascending and keeps the tail: reverse=True keeps the smallest value.
        policies.append(ocp_policies.BestN(get_metric_fn=lambda m: float(m[best_metric]), reverse=True, n=1,
                                           keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(int(save_every), 1),
        # best_fn makes the manager store each save's metrics (read by BestN, also after a restart).
        best_fn=(lambda m: float(m[best_metric])) if best_metric else None,
        best_mode="min",
        preservation_policy=policies[0] if len(policies) == 1 else ocp_policies.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,   # unfinished saves of a killed run are deleted
        create=True,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=(STATE, DATA, CONFIG))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Any,
         config: dict, force: bool = False, metrics: dict[str, float] | None = None) -> bool:
    """Saves (asynchronously when enabled) if ``step`` is due or ``force``."""
    return manager.save(
        step,
        args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA: ocp.args.JsonSave(data_state),
            CONFIG: ocp.args.JsonSave(config),
        }),
        metrics=metrics,
        force=force,
    )


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[int, Any, Any] | None:
    """Restores the newest checkpoint that reads back whole: (step, state, data_state).

    ``abstract_state``: the state's tree of ``jax.ShapeDtypeStruct`` (with shardings) that
    tells orbax the layout to restore into. Returns None when there is no checkpoint.
    Newer checkpoints that failed to restore are moved to ``workdir/corrupt_checkpoints``
    (after a successful fallback only); if none restores, raises ``CheckpointError``.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    failed: list[int] = []
    last_error = ""
    for step in steps:
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(abstract_state),
                DATA: ocp.args.JsonRestore(),
            }))
            state = restored[STATE]
            jax.block_until_ready(state)
        except Exception as e:  # corrupted or partial checkpoint: fall back to the previous one
            last_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            logger.warning("checkpoint at step %d in %s could not be restored (%s); falling back to an "
                           "earlier one", step, manager.directory, last_error[:500])
            failed.append(step)
            continue
        if failed:
            _move_aside(manager, failed)
        return step, state, restored[DATA]
    if failed:
        raise CheckpointError(f"{manager.directory}: none of the checkpoints {sorted(failed)} can be restored "
                              f"(last error: {last_error[:500]}); move them away to start afresh")
    return None


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves unreadable step directories out of the checkpoint directory (kept for
    inspection), so the resumed run can write those steps again."""
    if jax.process_index() == 0:
        root = os.fspath(manager.directory)
        dest = storage.join(storage.dirname(root), CORRUPT_DIR)
        storage.makedirs(dest)
        for step in steps:
            src = storage.join(root, str(step))
            target = storage.join(dest, str(step))
            if storage.exists(target):
                storage.rmtree(target)
            if storage.isdir(src):
                storage.replace(src, target)
                logger.warning("moved the unreadable checkpoint %s to %s", src, target)
    manager.reload()


@contextlib.contextmanager
def _quiet_absl():
    """orbax's absl warnings off: a step's items have no metadata file of their own (the
    manager keeps it), which orbax reports on every direct read of an item."""
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def restore_state_item(path: str, abstract_tree: Any | None = None, *, only: tuple[str, ...] | None = None) -> Any:
    """Restores just the ``state`` item of one checkpoint step directory (for export and
    for stage 2 starting from stage 1). Without ``abstract_tree`` arrays come back on the
    first local device in their saved layout. ``only`` (e.g. ``("params", "teacher")``) reads
    just those top-level entries of the state, so an export never loads the optimizer moments
    (two more copies of the model)."""
    item = storage.join(path, STATE)
    if not storage.isdir(item):
        raise FileNotFoundError(f"{path}: not a training checkpoint step (no '{STATE}' item)")
    with _quiet_absl(), ocp.StandardCheckpointer() as ckptr:
        if abstract_tree is None:
            meta = ckptr.metadata(item)
            tree = getattr(meta, "item_metadata", meta)
            tree = getattr(tree, "tree", tree)
            abstract_tree = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                               sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0])),
                tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        if only is None:
            return ckptr.restore(item, abstract_tree)
    subtree = {k: abstract_tree[k] for k in only if k in abstract_tree}
    restore_args = ocp.checkpoint_utils.construct_restore_args(subtree)
    with _quiet_absl(), ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(item, args=ocp.args.PyTreeRestore(item=subtree, restore_args=restore_args,
                                                                partial_restore=True))


def restore_json_item(step_dir: str, name: str = CONFIG) -> Any:
    """The JSON item ``name`` (``config`` or ``data``) of one checkpoint step directory."""
    item = storage.join(step_dir, name)
    if not storage.isdir(item):
        raise FileNotFoundError(f"{step_dir}: checkpoint holds no '{name}' item")
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        return ckptr.restore(item, args=ocp.args.JsonRestore())


def finished_steps(root: str) -> list[int]:
    """Steps of ``root`` (a checkpoints directory) whose save completed, ascending."""
    if not storage.isdir(root):
        return []
    return sorted(int(d) for d in storage.listdir(root)
                  if d.isdigit() and storage.isdir(storage.join(root, d, STATE)))


def resolve_step_dir(path: str) -> str:
    """``WORKDIR`` (latest step), ``WORKDIR/checkpoints`` (latest) or ``.../checkpoints/STEP``."""
    path = storage.abspath(path)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: does not exist")
    if storage.isdir(storage.join(path, STATE)):
        return path
    root = path if storage.basename(path) == "checkpoints" else checkpoint_dir(path)
    if not storage.isdir(root):
        raise FileNotFoundError(f"{path}: no training checkpoints found (expected {root})")
    steps = finished_steps(root)
    if not steps:
        raise FileNotFoundError(f"{root}: holds no finished checkpoint step")
    return storage.join(root, str(steps[-1]))


def run_root(path: str) -> str:
    """The workdir of a workdir / checkpoints dir / step dir path."""
    path = storage.abspath(path)
    if storage.isdir(storage.join(path, STATE)):
        path = storage.dirname(path)
    if storage.basename(path) == "checkpoints":
        path = storage.dirname(path)
    return path
