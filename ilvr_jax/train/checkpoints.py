"""Training checkpoints with orbax's ``CheckpointManager``.

One checkpoint = the train state (student, teacher, optimizer state, step, rng), the data
iterator's state (JSON) and the resolved config (JSON). Orbax writes each step into a
temporary directory and renames it when complete, so a crash mid-save leaves the previous
checkpoint intact; a checkpoint that fails to restore (truncated, corrupted) is skipped
with a warning in favour of the one before it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)

STATE, DATA, CONFIG = "state", "data", "config"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, *, save_every: int = 1, keep: int = 3,
                 async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None,
        save_interval_steps=max(int(save_every), 1),
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=(STATE, DATA, CONFIG))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Any,
         config: dict, force: bool = False) -> bool:
    """Saves (asynchronously when enabled) if ``step`` is due or ``force``."""
    return manager.save(
        step,
        args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA: ocp.args.JsonSave(data_state),
            CONFIG: ocp.args.JsonSave(config),
        }),
        force=force,
    )


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[int, Any, Any] | None:
    """Restores the newest checkpoint that reads back whole: (step, state, data_state).

    ``abstract_state``: the state's tree of ``jax.ShapeDtypeStruct`` (with shardings) that
    tells orbax the layout to restore into. Returns None when there is no usable checkpoint.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(abstract_state),
                DATA: ocp.args.JsonRestore(),
            }))
            return step, restored[STATE], restored[DATA]
        except Exception as e:  # corrupted or partial checkpoint: fall back to the previous one
            logger.warning("checkpoint at step %d in %s could not be restored (%s: %s); "
                           "falling back to an earlier one", step, manager.directory,
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    return None


def restore_state_item(path: str, abstract_tree: Any | None = None) -> Any:
    """Restores just the ``state`` item of one checkpoint step directory (for export and
    for stage 2 starting from stage 1). Without ``abstract_tree`` arrays come back as
    host numpy arrays in their saved layout."""
    item = os.path.join(path, STATE)
    if not os.path.isdir(item):
        raise FileNotFoundError(f"{path}: not a training checkpoint step (no '{STATE}' item)")
    with ocp.StandardCheckpointer() as ckptr:
        if abstract_tree is None:
            meta = ckptr.metadata(item)
            tree = getattr(meta, "item_metadata", meta)
            tree = getattr(tree, "tree", tree)
            abstract_tree = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                               sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
                tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        return ckptr.restore(item, abstract_tree)


def resolve_step_dir(path: str) -> str:
    """``WORKDIR`` (latest step), ``WORKDIR/checkpoints`` (latest) or ``.../checkpoints/STEP``."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, STATE)):
        return path
    root = path if os.path.basename(path) == "checkpoints" else checkpoint_dir(path)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{path}: no training checkpoints found (expected {root})")
    steps = sorted((int(d) for d in os.listdir(root) if d.isdigit()
                    and os.path.isdir(os.path.join(root, d, STATE))), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{root}: holds no finished checkpoint step")
    return os.path.join(root, str(steps[0]))
