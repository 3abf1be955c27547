"""The canonical ILVR record: one chat with interleaved helper images, one JSON object per line.

A record (CoMT's released layout, which every adapter writes)::

    {"id": "comt-17",                      # optional, str or int
     "task": "comt/selection",              # optional, str
     "text_input": "Which shape ...? A. ... B. ...",
     "image_input": ["images/q17.png"],     # question images, in order (may be empty)
     "sequence_plan": [                     # the assistant's interleaved reasoning, in order
         {"type": "text", "content": "First remove the red square."},
         {"type": "latent", "helper_image": "images/h17_1.png"},
         {"type": "text", "content": "Now count the circles."},
         {"type": "latent", "helper_image": "images/h17_2.png"}],
     "original_final_answer": "B"}

``text_input`` may place its question images with literal ``<image>`` placeholders, one per
image in ``image_input`` order; without any, the images go before the text.

Image paths are absolute or relative to a root directory (usually the JSONL's directory).
Every ``latent`` step is one latent segment whose helper image is the picture the teacher
sees; ``text`` steps are verbatim assistant text. A record may also carry ``helper_images``
(the helper paths as a separate list, as some releases do); it must then list exactly the
latent steps' helper images in order. Other keys (e.g. a maze's ``map_desc``) are kept and
ignored here.

Bad records raise ``RecordError`` (a ``ValueError``) whose message names the file, the
line / id and what is wrong; ``DropPolicy`` decides whether the pipeline raises it or skips
the record and counts it under ``RecordError.reason``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

from ilvr_jax import storage

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("text_input", "image_input", "sequence_plan", "original_final_answer")
OPTIONAL_KEYS = ("id", "task", "helper_images")

# Short reason codes (the keys under which skipped records are counted).
MISSING_KEY = "missing_key"
WRONG_TYPE = "wrong_type"
BAD_STEP = "bad_step"
EMPTY_PLAN = "empty_plan"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
HELPER_COUNT = "helper_count"
BAD_JSON = "bad_json"
IMAGE_PLACEHOLDERS = "image_placeholders"

# A question image's place in ``text_input`` (optional; without any the images go first).
IMAGE_PLACEHOLDER = "<image>"


class RecordError(ValueError):
    """A record that cannot be used. ``reason`` is a short code, ``where`` names the record."""

    def __init__(self, where: str, reason: str, detail: str):
        detail = " ".join(str(detail).splitlines())  # one line per record in every report
        super().__init__(f"{where}: {detail} [{reason}]")
        self.where = where
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable across worker processes
        return (RecordError, (self.where, self.reason, self.detail))


def record_location(path: str | os.PathLike | None, line: int | None = None, rec: Any = None) -> str:
    """A human-readable name for a record: ``file.jsonl:line 12 (id=abc)``."""
    parts = [os.fspath(path) if path is not None else "<records>"]
    if line is not None:
        parts[0] += f":line {line}"
    if isinstance(rec, Mapping) and rec.get("id") is not None:
        parts.append(f"(id={rec['id']})")
    return " ".join(parts)


def text_step(content: str) -> dict[str, str]:
    """A plan step of assistant text."""
    return {"type": "text", "content": content}


def latent_step(helper_image: str) -> dict[str, str]:
    """A plan step that becomes one latent segment (its helper image goes to the teacher)."""
    return {"type": "latent", "helper_image": helper_image}


def make_record(
    text_input: str,
    image_input: Iterable[str],
    sequence_plan: Iterable[Mapping[str, str]],
    original_final_answer: str,
    *,
    id: str | int | None = None,  # noqa: A002 (the record's field name)
    task: str | None = None,
) -> dict[str, Any]:
    """Builds a canonical record dict (keys in the canonical order, optional keys omitted when None)."""
    rec: dict[str, Any] = {}
    if id is not None:
        rec["id"] = id
    if task is not None:
        rec["task"] = task
    rec["text_input"] = text_input
    rec["image_input"] = [os.fspath(p) for p in image_input]
    rec["sequence_plan"] = [dict(s) for s in sequence_plan]
    rec["original_final_answer"] = original_final_answer
    return rec


def resolve_image_path(path: str, root: str | os.PathLike | None) -> str:
    """Absolute paths (and URIs such as ``gs://...``) stay; relative ones are joined to ``root``
    (the current directory if None)."""
    if storage.isabs(path) or root is None:
        return path
    return storage.join(os.fspath(root), path)


def helper_images(rec: Mapping[str, Any]) -> list[str]:
    """The helper image paths of a record, one per latent step, in plan order."""
    return [s["helper_image"] for s in rec["sequence_plan"] if s["type"] == "latent"]


def num_segments(rec: Mapping[str, Any]) -> int:
    """Number of latent segments (= latent steps) of a record."""
    return sum(1 for s in rec["sequence_plan"] if s["type"] == "latent")


def _check_image(path: str, root, where: str, what: str, verify: bool) -> None:
    from PIL import Image, UnidentifiedImageError

    full = resolve_image_path(path, root)
    if not storage.isfile(full):
        raise RecordError(where, MISSING_IMAGE, f"{what} {path!r} not found (resolved to {full!r})")
    try:
        with Image.open(storage.path_or_file(full)) as im:
            # Opening parses the header only; load() decodes the data as building a batch does
            # (PIL's verify() would not decode a JPEG, so a truncated one would pass).
            w, h = im.size
            if verify:
                im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise RecordError(where, UNREADABLE_IMAGE, f"{what} {path!r} is not a readable image: {e}") from None
    if w < 1 or h < 1:
        raise RecordError(where, UNREADABLE_IMAGE, f"{what} {path!r} has empty size {w}x{h}")


def validate_record(
    rec: Any,
    root: str | os.PathLike | None,
    *,
    where: str,
    check_images: bool = True,
    verify_images: bool = False,
) -> dict[str, Any]:
    """Checks one record and returns it (the same dict). Raises ``RecordError`` naming ``where``.

    Checks: it is an object; required keys present with the right types (``text_input`` and
    ``original_final_answer`` str, ``image_input`` list of str, ``sequence_plan`` a non-empty
    list of steps, each ``{"type": "text", "content": str}`` or ``{"type": "latent",
    "helper_image": str}``); optional ``id`` str/int, ``task`` str; ``helper_images`` (if
    present) equal to the latent steps' helper images; ``<image>`` placeholders in
    ``text_input``, if any, one per question image; with ``check_images`` every question and
    helper image exists and PIL recognises it (``verify_images`` also decodes it in full).
    """
    if isinstance(rec, Mapping) and rec.get("id") is not None and "(id=" not in where:
        where = f"{where} (id={rec['id']})"
    if not isinstance(rec, Mapping):
        raise RecordError(where, WRONG_TYPE, f"record must be a JSON object, got {type(rec).__name__}")
    for key in REQUIRED_KEYS:
        if key not in rec:
            raise RecordError(where, MISSING_KEY, f"missing key {key!r}")
    for key in ("text_input", "original_final_answer"):
        if not isinstance(rec[key], str):
            raise RecordError(where, WRONG_TYPE, f"{key!r} must be a string, got {type(rec[key]).__name__}")
    if "id" in rec and rec["id"] is not None and (
        not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool)
    ):
        raise RecordError(where, WRONG_TYPE, f"'id' must be a string or int, got {type(rec['id']).__name__}")
    if "task" in rec and rec["task"] is not None and not isinstance(rec["task"], str):
        raise RecordError(where, WRONG_TYPE, f"'task' must be a string, got {type(rec['task']).__name__}")
    images = rec["image_input"]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise RecordError(where, WRONG_TYPE, "'image_input' must be a list of path strings")
    n_placeholders = rec["text_input"].count(IMAGE_PLACEHOLDER)
    if n_placeholders and n_placeholders != len(images):
        raise RecordError(
            where, IMAGE_PLACEHOLDERS,
            f"'text_input' has {n_placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} question images",
        )
    plan = rec["sequence_plan"]
    if not isinstance(plan, list):
        raise RecordError(where, WRONG_TYPE, f"'sequence_plan' must be a list, got {type(plan).__name__}")
    if not plan:
        raise RecordError(where, EMPTY_PLAN, "'sequence_plan' is empty")
    for i, step in enumerate(plan):
        if not isinstance(step, Mapping) or "type" not in step:
            raise RecordError(where, BAD_STEP, f"sequence_plan[{i}] must be an object with a 'type'")
        if step["type"] == "text":
            if not isinstance(step.get("content"), str):
                raise RecordError(where, BAD_STEP, f"sequence_plan[{i}] (text) needs a string 'content'")
        elif step["type"] == "latent":
            hp = step.get("helper_image")
            if not isinstance(hp, str) or not hp:
                raise RecordError(
                    where, HELPER_COUNT, f"sequence_plan[{i}] (latent) has no 'helper_image' path"
                )
        else:
            raise RecordError(where, BAD_STEP, f"sequence_plan[{i}] has unknown type {step['type']!r}")
    helpers = helper_images(rec)
    if "helper_images" in rec:
        listed = rec["helper_images"]
        if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
            raise RecordError(where, WRONG_TYPE, "'helper_images' must be a list of path strings")
        if len(listed) != len(helpers):
            raise RecordError(
                where, HELPER_COUNT, f"{len(listed)} helper images for {len(helpers)} latent steps"
            )
        if listed != helpers:
            raise RecordError(where, HELPER_COUNT, "'helper_images' differ from the latent steps' helper images")
    if check_images:
        for i, p in enumerate(images):
            _check_image(p, root, where, f"image_input[{i}]", verify_images)
        for i, p in enumerate(helpers):
            _check_image(p, root, where, f"helper image {i}", verify_images)
    return rec


@dataclasses.dataclass(frozen=True)
class LocatedRecord:
    """A record with where it came from (``where`` is used in every error message).

    ``source`` / ``line``: the file's base name and the line number (``read_jsonl`` sets them),
    a name for the record that does not depend on where the data directory lies.
    """

    record: Any
    where: str
    root: str | None
    source: str | None = None
    line: int | None = None


def read_jsonl(
    path: str | os.PathLike, root: str | os.PathLike | None = None
) -> Iterator[LocatedRecord]:
    """Yields the records of a JSONL file with their locations (blank lines are skipped).

    ``root`` resolves relative image paths; default: the file's directory. Lines that are not
    JSON are yielded as ``LocatedRecord(record=RecordError(...))`` so that the caller's
    drop policy decides (``validate_located`` re-raises them).
    """
    path = os.fspath(path)
    root = os.fspath(root) if root is not None else storage.dirname(storage.abspath(path))
    source = storage.basename(path)
    with storage.open_file(path, "r") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = record_location(path, lineno)
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield LocatedRecord(RecordError(where, BAD_JSON, f"not valid JSON: {e}"), where, root, source, lineno)
                continue
            yield LocatedRecord(rec, record_location(path, lineno, rec), root, source, lineno)


def validate_located(loc: LocatedRecord, *, check_images: bool = True, verify_images: bool = False) -> dict:
    """``validate_record`` on a ``LocatedRecord`` (re-raises a JSON error stored by ``read_jsonl``)."""
    if isinstance(loc.record, RecordError):
        raise loc.record
    return validate_record(
        loc.record, loc.root, where=loc.where, check_images=check_images, verify_images=verify_images
    )


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Writes records one JSON object per line (UTF-8, non-ASCII kept); returns the count."""
    n = 0
    with storage.open_file(os.fspath(path), "w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False))
            f.write("\n")
            n += 1
    return n


class DropCounter:
    """Counts dropped records per reason; keeps the first message per reason for the report."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.first_message: dict[str, str] = {}

    def add(self, err: RecordError) -> None:
        self.counts[err.reason] += 1
        self.first_message.setdefault(err.reason, str(err))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def summary(self) -> str:
        if not self.counts:
            return "no records dropped"
        body = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return f"dropped {self.total} records ({body})"

    def __repr__(self) -> str:
        return f"DropCounter({self.as_dict()})"


@dataclasses.dataclass
class DropPolicy:
    """What to do with a bad record: ``"error"`` raises its ``RecordError``; ``"skip"`` counts
    it under its reason in ``counter`` and logs a warning (the first few per reason)."""

    mode: Literal["error", "skip"] = "error"
    counter: DropCounter = dataclasses.field(default_factory=DropCounter)
    log_first: int = 5

    def __post_init__(self) -> None:
        if self.mode not in ("error", "skip"):
            raise ValueError(f"drop policy must be 'error' or 'skip', got {self.mode!r}")

    def handle(self, err: RecordError) -> None:
        """Raises ``err`` (mode "error") or counts and logs it (mode "skip")."""
        if self.mode == "error":
            raise err
        self.counter.add(err)
        if self.counter.counts[err.reason] <= self.log_first:
            logger.warning("skipping record: %s", err)


def load_records(
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    policy: DropPolicy | None = None,
    check_images: bool = True,
    verify_images: bool = False,
) -> list[tuple[dict[str, Any], str, str]]:
    """Reads and validates a JSONL file: a list of ``(record, where, root)`` for the good records.

    Bad records are handled by ``policy`` (default: raise).
    """
    policy = policy if policy is not None else DropPolicy("error")
    out = []
    for loc in read_jsonl(path, root):
        try:
            rec = validate_located(loc, check_images=check_images, verify_images=verify_images)
        except RecordError as e:
            policy.handle(e)
            continue
        out.append((rec, loc.where, loc.root))
    return out
