"""The device mesh (data, fsdp, tensor) and shardings of parameter and batch pytrees.

Logical names come from the model's ``param_axes`` tree; the mapping to mesh axes lives
in :mod:`ilvr_jax.sharding` alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ilvr_jax import sharding as sh


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes (data, fsdp, tensor). ``-1`` in one entry takes the rest."""
    devices = list(devices if devices is not None else jax.devices())
    shape = [int(s) for s in shape]
    if len(shape) != 3:
        raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        if rest <= 0 or len(devices) % rest:
            raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // rest
    if any(s < 1 for s in shape) or int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh shape {tuple(shape)} (data, fsdp, tensor) needs {int(np.prod(shape))} devices, "
            f"but {len(devices)} are available"
        )
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # CPU / fake devices have no physical topology
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, sh.MESH_AXES)


def tree_shardings(mesh: Mesh, axes_tree: Any, shapes_tree: Any) -> Any:
    """NamedShardings for a pytree given matching trees of logical names and shapes."""
    return jax.tree.map(
        lambda names, s: sh.named_sharding(mesh, names, getattr(s, "shape", s)),
        axes_tree, shapes_tree, is_leaf=lambda x: isinstance(x, tuple) and all(
            isinstance(n, (str, type(None))) for n in x),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, sh.logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh))
