"""CoMT (and any canonical JSONL): validate each record and resolve its image paths.

CoMT's released JSONL is already the canonical layout::

    {"text_input": ..., "image_input": [paths], "sequence_plan": [{"type": "text", ...},
     {"type": "latent", "helper_image": path}, ...], "original_final_answer": ...}

with image paths relative to the data set's root (``image_root``; default: the JSONL's
directory). One latent step is one segment; a record that also lists ``helper_images`` must
list exactly the latent steps' images (``helper_count`` error otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from ilvr_jax import storage
from ilvr_jax.data.adapters import absolute_paths
from ilvr_jax.data.records import DropPolicy, RecordError, read_jsonl, validate_located


def jsonl_files(source: str | os.PathLike) -> list[str]:
    """``source`` itself if it is a file, else the ``*.jsonl`` files in the directory (sorted)."""
    source = os.fspath(source)
    if storage.isfile(source):
        return [source]
    if storage.isdir(source):
        files = storage.glob(source, "*.jsonl")
        if not files:
            raise FileNotFoundError(f"no *.jsonl files in directory {source!r}")
        return files
    raise FileNotFoundError(f"data source {source!r} does not exist")


def iter_canonical(
    source: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    policy: DropPolicy | None = None,
    check_images: bool = True,
    verify_images: bool = False,
    task: str | None = None,
) -> Iterator[dict]:
    """Yields the validated records of a canonical JSONL file (or directory of them) with
    absolute image paths. ``task`` fills the ``task`` field of records that have none."""
    policy = policy if policy is not None else DropPolicy("error")
    for path in jsonl_files(source):
        for loc in read_jsonl(path, image_root):
            try:
                rec = validate_located(loc, check_images=check_images, verify_images=verify_images)
            except RecordError as e:
                policy.handle(e)
                continue
            rec = absolute_paths(rec, loc.root)
            if task is not None and rec.get("task") is None:
                rec["task"] = task
            yield rec


def iter_records(
    source: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    policy: DropPolicy | None = None,
    check_images: bool = True,
    verify_images: bool = False,
    task: str = "comt",
) -> Iterator[dict]:
    """CoMT records as released (see module doc); ``task`` defaults to ``"comt"``."""
    yield from iter_canonical(source, image_root=image_root, policy=policy, check_images=check_images,
                              verify_images=verify_images, task=task)
