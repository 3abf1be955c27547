"""Parameter trees <-> orbax checkpoints, with the model config stored in the same checkpoint.

Layout of a checkpoint directory ``path`` (one orbax composite checkpoint):

    path/params/   the parameter tree (orbax PyTree, OCDBT)
    path/config/   ``ModelConfig.to_hf_dict()`` as JSON (when a config is given)

Orbax writes into a temporary directory and renames it to ``path`` once every item is
committed, so a crash mid-save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ilvr_jax import storage
from ilvr_jax.model.config import ModelConfig

PARAMS_ITEM = "params"
CONFIG_ITEM = "config"


def _checkpointer() -> ocp.Checkpointer:
    # Handlers named per item, so metadata and partial restores know how to read each item.
    handler = ocp.CompositeCheckpointHandler(
        **{PARAMS_ITEM: ocp.PyTreeCheckpointHandler(), CONFIG_ITEM: ocp.JsonCheckpointHandler()}
    )
    return ocp.Checkpointer(handler)


def _abs(path: str) -> str:
    # orbax wants absolute paths (a gs:// path is one already).
    return storage.abspath(os.fspath(path))


def save_params(path: str, params: Any, cfg: ModelConfig | None = None, *, overwrite: bool = False) -> str:
    """Saves ``params`` (any pytree of NumPy/JAX arrays) and ``cfg`` to ``path``; returns it.

    ``overwrite=False`` refuses an existing ``path`` (``FileExistsError``).
    """
    path = _abs(path)
    if storage.exists(path):
        if not overwrite:
            raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    items: dict[str, Any] = {PARAMS_ITEM: ocp.args.PyTreeSave(params)}
    if cfg is not None:
        items[CONFIG_ITEM] = ocp.args.JsonSave(cfg.to_hf_dict())
    with _checkpointer() as ckptr:
        ckptr.save(path, args=ocp.args.Composite(**items), force=overwrite)
    return path


def _check_checkpoint(path: str) -> None:
    if not storage.isdir(storage.join(path, PARAMS_ITEM)):
        raise FileNotFoundError(f"{path}: not a parameter checkpoint (no {PARAMS_ITEM}/ directory)")


def restore_params(path: str, like: Any = None) -> Any:
    """Restores the parameter tree saved by ``save_params``.

    ``like=None``: NumPy arrays on the host, with the saved dtypes. Otherwise ``like`` is a
    tree of the same structure whose leaves (arrays or ``jax.ShapeDtypeStruct`` with a
    ``sharding``) give the dtype and placement of each restored leaf, e.g. for restoring
    straight into a sharded layout without a host copy of the whole model.
    """
    path = _abs(path)
    _check_checkpoint(path)
    if like is None:
        with _checkpointer() as ckptr:
            tree = ckptr.metadata(path).item_metadata[PARAMS_ITEM].tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        args = ocp.args.PyTreeRestore(restore_args=restore_args)
    else:
        args = ocp.args.PyTreeRestore(item=like, restore_args=ocp.checkpoint_utils.construct_restore_args(like))
    with _checkpointer() as ckptr:
        restored = ckptr.restore(path, args=ocp.args.Composite(**{PARAMS_ITEM: args}))
    return restored[PARAMS_ITEM]


def restore_config(path: str) -> ModelConfig:
    """The ``ModelConfig`` saved with ``save_params`` at ``path``."""
    path = _abs(path)
    _check_checkpoint(path)
    if not storage.isdir(storage.join(path, CONFIG_ITEM)):
        raise FileNotFoundError(f"{path}: checkpoint holds no model config ({CONFIG_ITEM}/ missing)")
    with _checkpointer() as ckptr:
        restored = ckptr.restore(path, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
    return ModelConfig.from_hf(restored[CONFIG_ITEM])
