"""Logical axis names and the one place that maps them onto the device mesh.

Every parameter and activation is described by logical axis names ("embed", "mlp",
"heads", ...). ``LOGICAL_AXIS_RULES`` maps them to the mesh axes ``(data, fsdp, tensor)``.
The model calls :func:`constrain` on its activations; outside a mesh context (plain CPU
runs, tests) it is the identity, so the model runs unchanged on one device.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("patches", None),
    ("segments", None),
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("qkv", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("patch_in", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("merger_in", "fsdp"),
)

_state = threading.local()


def _rules_dict(rules=LOGICAL_AXIS_RULES) -> dict[str, Any]:
    return dict(rules)


def logical_to_spec(names: Sequence[str | None], mesh: Mesh | None = None,
                    rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names. A mesh axis is used at most once
    per array (later dims that would reuse it stay replicated); mesh axes of size 1 are
    dropped so specs stay minimal."""
    table = _rules_dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape.get(a, 1) > 1))
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int] | None = None,
                   rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    """NamedSharding for logical names; dims that the mesh axes do not divide stay replicated."""
    spec = logical_to_spec(names, mesh, rules)
    if shape is not None:
        fixed = []
        for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
            if axes is None:
                fixed.append(None)
                continue
            size = 1
            for a in (axes,) if isinstance(axes, str) else axes:
                size *= mesh.shape[a]
            fixed.append(axes if dim % size == 0 else None)
        spec = PartitionSpec(*fixed)
    return NamedSharding(mesh, spec)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None):
    """Within this context :func:`constrain` places sharding constraints on ``mesh``."""
    prev = getattr(_state, "mesh", None)
    _state.mesh = mesh
    try:
        yield
    finally:
        _state.mesh = prev


def current_mesh() -> Mesh | None:
    return getattr(_state, "mesh", None)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; identity outside :func:`activation_mesh`."""
    mesh = current_mesh()
    if mesh is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} names {tuple(names)} for an array of rank {x.ndim}")
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape))
