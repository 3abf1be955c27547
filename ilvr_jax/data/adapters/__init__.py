"""Adapters: each turns one data set as released into canonical records (see ``records.py``).

Every adapter exposes ``iter_records(source, **options) -> Iterator[dict]``; the records it
yields have passed ``records.validate_record`` and carry **absolute** image paths, so they can
be written anywhere (``python -m ilvr_jax.data convert`` rewrites paths relative to the output
file when the images lie below it). Options common to all adapters:

* ``policy``: a ``records.DropPolicy``; ``"error"`` (default) raises the first bad record's
  ``RecordError`` (its message names the file and the line / row), ``"skip"`` counts it;
* ``check_images``: check that every image exists and PIL can open it (default True).

Adapters (``get_adapter(name)``):

* ``canonical``: a JSONL file already in the canonical layout (image paths relative to
  ``image_root``, default the file's directory);
* ``comt``: CoMT as released (the canonical layout; ``task`` defaults to ``"comt"``);
* ``vsp``: VSP spatial planning (FrozenLake maps with ``map_desc``), see ``vsp.py``;
* ``maze``: a data set written by ``maze.generate_maze_dataset`` (the VSP layout);
* ``zebra``: Zebra-CoT parquet shards, one folder per domain, see ``zebra.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ilvr_jax import storage
from ilvr_jax.data.records import resolve_image_path

# name -> (module, function, one-line description); modules load on first use (zebra needs pyarrow).
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "canonical": ("ilvr_jax.data.adapters.comt", "iter_canonical",
                  "canonical JSONL (text_input, image_input, sequence_plan, original_final_answer)"),
    "comt": ("ilvr_jax.data.adapters.comt", "iter_records", "CoMT JSONL as released"),
    "vsp": ("ilvr_jax.data.adapters.vsp", "iter_records",
            "VSP spatial planning JSONL (map_desc, helper_images or sequence_plan, \\boxed{moves})"),
    "maze": ("ilvr_jax.data.adapters.vsp", "iter_maze_records",
             "synthetic maze data set written by ilvr_jax.data.maze"),
    "zebra": ("ilvr_jax.data.adapters.zebra", "iter_records",
              "Zebra-CoT parquet shards (one folder per domain)"),
}

ADAPTER_NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A named record source: ``adapter.iter_records(source, **options)``."""

    name: str
    iter_records: Callable[..., Iterator[dict]]
    description: str


def get_adapter(name: str) -> Adapter:
    """The adapter called ``name``; raises ValueError listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown adapter {name!r}; known adapters: {', '.join(ADAPTER_NAMES)}")
    module, fn, description = _REGISTRY[name]
    return Adapter(name, getattr(importlib.import_module(module), fn), description)


def map_image_paths(rec: Mapping[str, Any], fix: Callable[[str], str]) -> dict[str, Any]:
    """A copy of ``rec`` with ``fix`` applied to every question and helper image path."""
    out = dict(rec)
    out["image_input"] = [fix(p) for p in rec["image_input"]]
    out["sequence_plan"] = [
        dict(step, helper_image=fix(step["helper_image"])) if step.get("type") == "latent" else dict(step)
        for step in rec["sequence_plan"]
    ]
    if "helper_images" in rec:
        out["helper_images"] = [fix(p) for p in rec["helper_images"]]
    return out


def absolute_paths(rec: Mapping[str, Any], root: str | os.PathLike | None) -> dict[str, Any]:
    """A copy of ``rec`` whose question and helper image paths are absolute (relative paths are
    resolved against ``root``)."""
    return map_image_paths(rec, lambda path: storage.abspath(resolve_image_path(path, root)))


def relative_paths(rec: Mapping[str, Any], base_dir: str | os.PathLike) -> dict[str, Any]:
    """A copy of ``rec`` whose absolute image paths below ``base_dir`` are made relative to it
    (paths elsewhere stay absolute), so a JSONL and its image folder can move together."""
    base = storage.abspath(os.fspath(base_dir))

    def fix(path: str) -> str:
        if not storage.isabs(path) or storage.scheme(path) != storage.scheme(base):
            return path
        if storage.is_local(base):
            rel = os.path.relpath(path, base)
            return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel
        prefix = base.rstrip("/") + "/"   # same bucket: below the base or elsewhere
        return path[len(prefix):] if path.startswith(prefix) else path

    return map_image_paths(rec, fix)


__all__ = ["ADAPTER_NAMES", "Adapter", "absolute_paths", "get_adapter", "map_image_paths", "relative_paths"]


def convert_to_jsonl(adapter: str, source: str, out: str, image_root: str | None = None) -> str:
    """Canonical records of ``source`` (read by ``adapter``) written to ``out`` (atomically),
    image paths relative to its directory; Zebra-CoT's embedded images are extracted there.
    Returns ``out``."""
    from ilvr_jax.data.records import write_jsonl

    out_dir = storage.dirname(storage.abspath(out))
    storage.makedirs(out_dir)
    kwargs = {"image_root": image_root} if adapter != "zebra" else {"out_dir": out_dir}
    write_jsonl(out + ".tmp", (relative_paths(r, out_dir) for r in get_adapter(adapter).iter_records(source, **kwargs)))
    storage.replace(out + ".tmp", out)
    return out
