"""Zebra-CoT parquet shards -> canonical records (images written as PNG files).

Layout as downloaded: one folder per domain (names with spaces and ``&``, e.g.
``Visual Logic & Strategic Games``), each holding ``train-0000i-of-0000n.parquet`` shards.
Columns: ``Question``, ``Text Reasoning Trace``, ``Final Answer``, ``problem_image_1..n`` and
``reasoning_image_1..n``; image cells are HF-datasets Image structs ``{"bytes", "path"}``
(null where a row has fewer images).

Conversion of one row:

* ``text_input``: the question with every ``<image_start>[problem_image_k]<image_end>``
  placeholder removed; ``image_input``: the problem images in order of first appearance,
  then any non-null problem image the question does not mention (in column order).
* ``sequence_plan``: the trace cut at each ``<image_start>[reasoning_image_k]<image_end>``:
  the text between placeholders becomes text steps (stripped; empty ones dropped) and each
  reasoning placeholder a latent step whose helper image is ``reasoning_image_k``. A
  ``problem_image`` placeholder inside the trace is dropped (that image is a question image).
* ``original_final_answer``: ``Final Answer`` (stripped).
* ``id``: ``"<domain>/<shard stem>/<row>"``, ``task``: ``"zebra"``, ``domain``: the folder name.

Images go to ``out_dir/images/<domain slug>/<shard stem>/r<row>_<column>.png`` (PNG bytes are
copied as they are, other formats are decoded and re-encoded as PNG), so converting twice
gives the same files. A placeholder that does not parse, or that names a column that is
missing or null in that row, is a ``RecordError`` naming the shard and row.

Shards are read one row group at a time, so memory stays at one row group. ``max_records``
draws a deterministic sample (``random.Random(seed)``) of that many rows over all selected
shards and yields it in shard / row order.
"""

from __future__ import annotations

import bisect
import io
import itertools
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ilvr_jax import storage
from ilvr_jax.data.records import (
    MISSING_IMAGE,
    MISSING_KEY,
    UNREADABLE_IMAGE,
    WRONG_TYPE,
    DropPolicy,
    RecordError,
    latent_step,
    make_record,
    record_location,
    text_step,
    validate_record,
)

BAD_PLACEHOLDER = "bad_placeholder"
QUESTION, TRACE, ANSWER = "Question", "Text Reasoning Trace", "Final Answer"
# The paper's out-of-distribution tests, as the folders of the download are named.
HELD_OUT_DOMAINS = ("2D Visual Reasoning - Visual Jigsaw", "2D Visual Reasoning - Visual Search")

_PLACEHOLDER = re.compile(r"<image_start>(.*?)<image_end>", re.DOTALL)
_PLACEHOLDER_NAME = re.compile(r"^\[?\s*(problem|reasoning)_image_(\d+)\s*\]?$")
_IMAGE_COLUMN = re.compile(r"^(problem|reasoning)_image_(\d+)$")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _slug(name: str) -> str:
    """A file-system friendly folder name: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "domain"


def discover_shards(source: str | os.PathLike) -> list[tuple[str, str]]:
    """``(domain, shard path)`` pairs, sorted. ``source`` is the root holding domain folders,
    one domain folder, or one parquet file (its domain is its folder's name)."""
    source = storage.abspath(os.fspath(source))
    if storage.isfile(source):
        return [(storage.basename(storage.dirname(source)), source)]
    if not storage.isdir(source):
        raise FileNotFoundError(f"Zebra-CoT source {source!r} does not exist")
    direct = storage.glob(source, "*.parquet")
    if direct:
        return [(storage.basename(source), p) for p in direct]
    pairs = []
    for entry in sorted(storage.listdir(source)):
        folder = storage.join(source, entry)
        if storage.isdir(folder):
            pairs += [(entry, p) for p in storage.glob(folder, "*.parquet")]
    if not pairs:
        raise FileNotFoundError(f"no *.parquet shards in {source!r} or its sub-folders")
    return pairs


def resolve_domain(name: str, available: Sequence[str], what: str) -> str:
    """The domain folder ``name`` means: the folder of that name (case-insensitive), else
    the one folder whose name ends with it at a word boundary (``"Visual Jigsaw"`` for
    ``"2D Visual Reasoning - Visual Jigsaw"``). No match, or several, is a ``ValueError``:
    a name that matches nothing would otherwise select or exclude nothing, silently."""
    key = name.strip().lower()
    exact = [d for d in available if d.lower() == key]
    if exact:
        return exact[0]
    suffix = [d for d in available if key and len(d) > len(key) and d.lower().endswith(key)
              and not d[-len(key) - 1].isalnum()]
    if len(suffix) == 1:
        return suffix[0]
    if suffix:
        raise ValueError(f"ambiguous {what} domain {name!r}: matches {', '.join(suffix)}")
    raise ValueError(f"unknown {what} domain {name!r}; available: {', '.join(available)}")


def _select_domains(pairs, domains: Iterable[str] | None, exclude_domains: Iterable[str] | None):
    available = sorted({d for d, _ in pairs})
    keep = {resolve_domain(n, available, "selected") for n in domains} if domains else set(available)
    if exclude_domains:
        keep -= {resolve_domain(n, available, "excluded") for n in exclude_domains}
    return [(d, p) for d, p in pairs if d in keep]


def parse_placeholder(inner: str, where: str, field: str) -> tuple[str, int]:
    """``"[reasoning_image_2]"`` -> ``("reasoning", 2)``; anything else is a ``RecordError``."""
    m = _PLACEHOLDER_NAME.match(inner.strip())
    if not m:
        raise RecordError(where, BAD_PLACEHOLDER, f"unparsable image placeholder {inner!r} in {field!r}")
    return m.group(1), int(m.group(2))


def _clean(text: str) -> str:
    # Removing a placeholder leaves doubled spaces / trailing blanks; tidy them, keep newlines.
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    return text.strip()


def _image_bytes(cell: Any, shard_dir: str, where: str, column: str) -> bytes:
    if cell is None:
        raise RecordError(where, MISSING_IMAGE, f"image column {column!r} is null in this row")
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if not isinstance(cell, dict):
        raise RecordError(where, WRONG_TYPE, f"image column {column!r} holds {type(cell).__name__}, "
                                             "expected an Image struct {bytes, path}")
    if cell.get("bytes"):
        return cell["bytes"]
    path = cell.get("path")
    if path:
        full = path if storage.isabs(path) else storage.join(shard_dir, path)
        if storage.isfile(full):
            return storage.read_bytes(full)
    raise RecordError(where, MISSING_IMAGE, f"image column {column!r} has no bytes and no readable "
                                            f"path ({path!r})")


def write_png(data: bytes, path: str, where: str, column: str) -> None:
    """Writes image bytes as a PNG file (PNG input is copied byte for byte)."""
    storage.makedirs(storage.dirname(path))
    if data[:8] == _PNG_MAGIC:
        storage.write_bytes(path, data)
        return
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
                im = im.convert("RGB")
            png = io.BytesIO()
            im.save(png, format="PNG")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise RecordError(where, UNREADABLE_IMAGE, f"image column {column!r} is not a readable image: {e}") from None
    storage.write_bytes(path, png.getvalue())


def convert_row(row: dict, *, domain: str, shard: str, row_index: int, out_dir: str,
                check_images: bool = True) -> dict:
    """One parquet row (a dict of column -> value) -> a validated canonical record."""
    shard_stem = os.path.splitext(storage.basename(shard))[0]
    record_id = f"{domain}/{shard_stem}/{row_index}"
    where = f"{record_location(shard)}:row {row_index} (id={record_id})"
    for key in (QUESTION, TRACE, ANSWER):
        if row.get(key) is None:
            raise RecordError(where, MISSING_KEY, f"column {key!r} is missing or null")
        if not isinstance(row[key], str):
            raise RecordError(where, WRONG_TYPE, f"column {key!r} must be a string, got {type(row[key]).__name__}")
    image_dir = storage.join(storage.abspath(out_dir), "images", _slug(domain), shard_stem)
    shard_dir = storage.dirname(shard)
    written: dict[str, str] = {}

    def image_file(kind: str, index: int) -> str:
        column = f"{kind}_image_{index}"
        if column not in written:
            if column not in row:
                raise RecordError(where, MISSING_IMAGE, f"placeholder names column {column!r}, which the shard lacks")
            data = _image_bytes(row[column], shard_dir, where, column)
            path = storage.join(image_dir, f"r{row_index:06d}_{column}.png")
            write_png(data, path, where, column)
            written[column] = path
        return written[column]

    # Question: placeholders out, their images (in order of appearance) in.
    question_images: list[str] = []
    for m in _PLACEHOLDER.finditer(row[QUESTION]):
        kind, index = parse_placeholder(m.group(1), where, QUESTION)
        if kind != "problem":
            raise RecordError(where, BAD_PLACEHOLDER, f"reasoning image placeholder {m.group(0)!r} in the question")
        path = image_file(kind, index)
        if path not in question_images:
            question_images.append(path)
    problem_columns = sorted((int(m.group(2)), c) for c in row if (m := _IMAGE_COLUMN.match(c))
                             and m.group(1) == "problem")
    for index, column in problem_columns:
        if row[column] is not None and column not in written:
            question_images.append(image_file("problem", index))
    question = _clean(_PLACEHOLDER.sub(" ", row[QUESTION]))

    # Trace: text between placeholders, one latent step per reasoning image.
    plan: list[dict] = []
    trace = row[TRACE]
    pos = 0
    pending = ""
    for m in _PLACEHOLDER.finditer(trace):
        kind, index = parse_placeholder(m.group(1), where, TRACE)
        pending += trace[pos:m.start()]
        pos = m.end()
        if kind == "problem":
            image_file(kind, index)  # must exist; the image is already a question image
            pending += " "
            continue
        if _clean(pending):
            plan.append(text_step(_clean(pending)))
        pending = ""
        plan.append(latent_step(image_file(kind, index)))
    pending += trace[pos:]
    if _clean(pending):
        plan.append(text_step(_clean(pending)))

    rec = make_record(question, question_images, plan, row[ANSWER].strip(), id=record_id, task="zebra")
    rec["domain"] = domain
    return validate_record(rec, None, where=where, check_images=check_images)


def iter_records(
    source: str | os.PathLike,
    *,
    out_dir: str | os.PathLike,
    domains: Sequence[str] | None = None,
    exclude_domains: Sequence[str] | None = None,
    max_records: int | None = None,
    seed: int = 0,
    policy: DropPolicy | None = None,
    check_images: bool = True,
) -> Iterator[dict]:
    """Yields canonical records from Zebra-CoT shards, writing images under ``out_dir``.

    ``domains`` keeps only those domains, ``exclude_domains`` drops some (e.g.
    ``HELD_OUT_DOMAINS``); names are folder names or unambiguous suffixes of them, see
    :func:`resolve_domain` (unknown names raise, in both lists); ``max_records`` takes a
    deterministic sample of that many rows (seeded by ``seed``) over the selected shards.
    """
    import pyarrow.parquet as pq

    policy = policy if policy is not None else DropPolicy("error")
    out_dir = os.fspath(out_dir)
    pairs = _select_domains(discover_shards(source), domains, exclude_domains)
    files = [pq.ParquetFile(p if storage.is_local(p) else storage.open_file(p, "rb")) for _, p in pairs]
    sizes = [f.metadata.num_rows for f in files]
    total = sum(sizes)
    chosen: list[set[int]] | None = None
    if max_records is not None and max_records < total:
        picks = random.Random(seed).sample(range(total), max(0, max_records))
        chosen = [set() for _ in files]
        offsets = list(itertools.accumulate(sizes, initial=0))
        for g in picks:
            i = bisect.bisect_right(offsets, g) - 1  # the shard whose row range holds g
            chosen[i].add(g - offsets[i])

    for k, ((domain, shard), pf) in enumerate(zip(pairs, files)):
        names = pf.schema_arrow.names
        missing = [c for c in (QUESTION, TRACE, ANSWER) if c not in names]
        if missing:
            raise RecordError(record_location(shard), MISSING_KEY, f"shard lacks column(s) {missing}; has {names}")
        columns = [c for c in names if c in (QUESTION, TRACE, ANSWER) or _IMAGE_COLUMN.match(c)]
        start = 0
        for g in range(pf.num_row_groups):
            n_rows = pf.metadata.row_group(g).num_rows
            rows_here = range(start, start + n_rows)
            wanted = [r for r in rows_here if chosen is None or r in chosen[k]]
            if wanted:
                table = pf.read_row_group(g, columns=columns)
                if chosen is not None:
                    table = table.take([r - start for r in wanted])
                # Small batches: only a few rows' image bytes exist as Python objects at a time.
                rows = (row for batch in table.to_batches(max_chunksize=16) for row in batch.to_pylist())
                for row_index, row in zip(wanted, rows):
                    try:
                        rec = convert_row(row, domain=domain, shard=shard, row_index=row_index,
                                          out_dir=out_dir, check_images=check_images)
                    except RecordError as e:
                        policy.handle(e)
                        continue
                    yield rec
                del table, rows
            start += n_rows
