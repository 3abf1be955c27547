"""Canonical JSONL records -> fixed-shape training batches (the contract layout), with grain.

Data flow::

    JSONL files --read--> records --checks.RecordChecker (validate, measure, fit)--> sizes
        --> buckets (lengths and patch budgets, given or derived from the sizes)
        --> global batch plan per epoch (seeded shuffle, one bucket per batch)
        --> this process's slice of each global batch
        --> grain MapDataset[batch index] .map(build batch: decode, preprocess, tokenise, pad)
        --> to_iter_dataset (threads) --> mp_prefetch (worker processes) --> BatchIterator

* Everything that decides *which* records form a batch is computed up front in the main
  process from record sizes alone (no pixels), so the plan is deterministic, identical on
  every process, independent of the worker count, and the drop counts are exact.
* Bad records (invalid, unreadable, too long, too many patches/segments/images) are raised or
  skipped and counted per reason before training starts (``DataConfig.drop_policy``): nothing
  of the wrong shape reaches jit. ``validate`` runs the same checks (``checks.py``).
* A record that fails while its batch is built (an image corrupt past its header, a file
  changed since indexing) leaves its slot as padding; the iterator counts it in ``drops``
  once (not once per epoch) or, under drop_policy "error", raises its ``RecordError``
  in the main process: one line naming the record and the reason, wherever the batch was built.
* A global batch has ``batch_size * process_count`` slots, all of one length bucket; process
  ``p`` takes slots ``[p*B, (p+1)*B)``, so every process sees the same shapes at the same step
  and the processes' records are disjoint and together cover the epoch.
* Per epoch the batch count is fixed (``sum_b ceil(n_b / GB)``, or ``floor`` with
  ``drop_remainder``): a bucket's last short batch is filled with padding samples
  (``sample_mask`` False) at the end of the epoch. Epoch ``e`` shuffles with
  ``(seed, e)``.
* The iterator's state is the index of the next batch (JSON) and the pipeline's fingerprint;
  restoring rebuilds the grain pipeline from that index and yields exactly the batches that
  would have come next. The fingerprint leaves out absolute paths, so a moved or copied data
  directory (or workdir) restores.

Batch (numpy, per process, B = ``batch_size``; S, Pq, Ph = the bucket's length and patch budgets)::

    input_ids [B,S] int32 (pad: <|endoftext|>), attention_mask [B,S] int32, labels [B,S] int32,
    pixel_values [B,Pq,patch_dim] f32, image_grid_thw [B,Iq,3] i32,
    helper_pixel_values [B,Ph,patch_dim] f32, helper_grid_thw [B,M,3] i32,
    latent_starts [B,M] i32, segment_mask [B,M] bool, assistant_start [B] i32, sample_mask [B] bool

Padding samples have all-zero masks/grids/pixels, input_ids = pad id, labels -100,
assistant_start 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import grain
import numpy as np

from ilvr_jax import storage
from ilvr_jax.data import buckets as bucket_lib
from ilvr_jax.data import checks
from ilvr_jax.data import processor as proc
from ilvr_jax.data import records as rec_lib
from ilvr_jax.data import segments as seg_lib
from ilvr_jax.data import workers
from ilvr_jax.data.adapters import relative_paths
from ilvr_jax.data.buckets import Bucket
from ilvr_jax.data.config import DataConfig  # noqa: F401 (the pipeline's config, re-exported)
from ilvr_jax.data.checks import (  # noqa: F401 (the drop reasons of the fit check)
    TOO_LONG,
    TOO_MANY_HELPER_PATCHES,
    TOO_MANY_QUESTION_IMAGES,
    TOO_MANY_QUESTION_PATCHES,
    TOO_MANY_SEGMENTS,
)
from ilvr_jax.data.records import DropPolicy, RecordError

logger = logging.getLogger(__name__)

# A record whose file changed between indexing and building its batch.
CHANGED_SINCE_INDEXING = "changed_since_indexing"
# Batch key (removed by the iterator) carrying the records that failed to build.
_FAILURES_KEY = "_failed_records"

THROUGHPUT_KEYS = ("worker_count", "worker_buffer_size", "read_threads", "prefetch")

BATCH_KEYS = (
    "input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "helper_pixel_values",
    "helper_grid_thw", "latent_starts", "segment_mask", "assistant_start", "sample_mask",
)
BATCH_DTYPES = {
    "input_ids": np.int32, "attention_mask": np.int32, "labels": np.int32, "pixel_values": np.float32,
    "image_grid_thw": np.int32, "helper_pixel_values": np.float32, "helper_grid_thw": np.int32,
    "latent_starts": np.int32, "segment_mask": np.bool_, "assistant_start": np.int32, "sample_mask": np.bool_,
}


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside ``absl.app.run`` (tests, notebooks,
    plain scripts) nothing parses them, so mark the defaults as parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def load_tokenizer(tokenizer_or_dir):
    """A tokenizer object, or one loaded from a directory with ``AutoTokenizer`` (a cloud
    directory through a local copy of its files: transformers reads local files only)."""
    if isinstance(tokenizer_or_dir, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(storage.local_copy(os.fspath(tokenizer_or_dir)))
    return tokenizer_or_dir


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(index, count) of this process: the given values, else ``jax.process_index/count()``."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    return int(process_index), int(process_count)


@dataclasses.dataclass
class IndexedRecord:
    record: dict[str, Any]
    where: str
    root: str | None
    size: seg_lib.SampleSize
    bucket: int
    source: str | None = None  # file base name and line (location-independent), if read from JSONL
    line: int | None = None


def index_records(
    located: Iterable[rec_lib.LocatedRecord],
    tokenizer,
    cfg: DataConfig,
    policy: DropPolicy,
    image_cfg: proc.ImageProcessorConfig | None = None,
) -> tuple[list[IndexedRecord], tuple[Bucket, ...]]:
    """Checks and measures records (``checks.RecordChecker``), resolves the buckets and puts each
    record in one; bad records go to ``policy`` (raise or count). Returns (records, buckets)."""
    checker = checks.RecordChecker(tokenizer, cfg.image_config(image_cfg), cfg.sequence_format, cfg.limits,
                                   check_images=cfg.check_images, verify_images=cfg.verify_images)
    kept = []
    for loc in located:
        try:
            rec, size = checker.check(loc)
        except RecordError as e:
            policy.handle(e)
            continue
        kept.append((loc, rec, size))
    buckets, assigned = bucket_lib.resolve([size for _, _, size in kept], cfg.length_limit, cfg.max_question_patches,
                                           cfg.max_helper_patches, cfg.buckets, cfg.bucket_patches)
    out = []
    for (loc, rec, size), b in zip(kept, assigned):
        if b is None:  # only with explicit bucket_patches: no bucket holds both its length and patches
            reason = checks.TOO_MANY_QUESTION_PATCHES if not any(
                bk.length >= size.seq_len and bk.question_patches >= size.question_patches for bk in buckets
            ) else checks.TOO_MANY_HELPER_PATCHES
            policy.handle(RecordError(loc.where, reason, f"no bucket of {[dataclasses.astuple(bk) for bk in buckets]} "
                                      f"holds {size.seq_len} tokens, {size.question_patches} question and "
                                      f"{size.helper_patches} helper patches"))
            continue
        out.append(IndexedRecord(rec, loc.where, loc.root, size, b, loc.source, loc.line))
    return out, buckets


def pipeline_fingerprint(items: Sequence[IndexedRecord], buckets: Sequence[Bucket], cfg: DataConfig,
                         process_index: int, process_count: int) -> str:
    """Hash of everything that decides the batches: the config (less the throughput knobs),
    the process layout, the resolved bucket shapes, and per record in order its file base name
    and line, its content with image paths relative to its root, its measured size (token
    count, patch counts) and its bucket.

    Absolute locations are left out, so a data directory that is moved or copied (JSONL and
    images together) restores a saved iterator state; any change of content, order, image
    sizes, config or layout gives another fingerprint.
    """
    h = hashlib.sha256()
    # Throughput knobs do not change the batches, so a state restores across them.
    order_cfg = {k: v for k, v in cfg.to_dict().items() if k not in THROUGHPUT_KEYS}
    h.update(json.dumps(order_cfg, sort_keys=True).encode())
    h.update(json.dumps([process_index, process_count]).encode())
    h.update(json.dumps([dataclasses.astuple(b) for b in buckets]).encode())
    for it in items:
        # Absolute image paths below the root become relative to it, as relative ones already are.
        rec = relative_paths(it.record, it.root) if it.root is not None else it.record
        # The first chunk's length follows from the content: left out, so iterator states
        # saved before the size carried it still restore.
        size = [v for f, v in zip(dataclasses.fields(it.size), dataclasses.astuple(it.size))
                if f.name != "first_chunk_len"]
        entry = [it.source, it.line, rec, size, it.bucket]
        h.update(json.dumps(entry, sort_keys=True).encode())
    return h.hexdigest()[:16]


class BatchPlan:
    """Which records form each batch: a pure function of (record buckets, config, process).

    Global batch ``i`` is batch ``i % batches_per_epoch`` of epoch ``i // batches_per_epoch``;
    its slots are record indices (-1 = padding sample).
    """

    def __init__(self, buckets: Sequence[int], num_buckets: int, cfg: DataConfig, process_index: int,
                 process_count: int):
        self.buckets = np.asarray(buckets, dtype=np.int64)
        self.num_buckets = num_buckets
        self.cfg = cfg
        self.process_index = process_index
        self.process_count = process_count
        self.global_batch = cfg.batch_size * process_count
        counts = np.bincount(self.buckets, minlength=max(1, num_buckets)) if len(self.buckets) else np.zeros(1, int)
        per_bucket = counts // self.global_batch if cfg.drop_remainder else -(-counts // self.global_batch)
        self.batches_per_epoch = int(per_bucket.sum())
        self._cache: dict[int, list[tuple[int, np.ndarray]]] = {}
        self._lock = threading.Lock()  # grain's read threads share the plan

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        if self.cfg.num_epochs is None:
            return sys.maxsize
        return self.batches_per_epoch * self.cfg.num_epochs

    def epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """[(bucket, record indices [global_batch] with -1 padding)] of one epoch, in order."""
        with self._lock:
            cached = self._cache.get(epoch)
            if cached is None:
                cached = self._build_epoch(epoch)
                if len(self._cache) > 2:
                    self._cache.clear()
                self._cache[epoch] = cached
            return cached

    def _build_epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        n = len(self.buckets)
        if self.cfg.shuffle:
            order = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        gb = self.global_batch
        pending: dict[int, list[int]] = {}
        batches: list[tuple[int, np.ndarray]] = []
        for i in order:
            b = int(self.buckets[i])
            pending.setdefault(b, []).append(int(i))
            if len(pending[b]) == gb:
                batches.append((b, np.asarray(pending.pop(b), np.int64)))
        if not self.cfg.drop_remainder:
            for b in sorted(pending):
                rest = pending[b]
                batches.append((b, np.asarray(rest + [-1] * (gb - len(rest)), np.int64)))
        assert len(batches) == self.batches_per_epoch
        return batches

    def global_batch_at(self, i: int) -> tuple[int, np.ndarray]:
        if self.batches_per_epoch == 0:
            raise IndexError("no batches: the data set is empty")
        return self.epoch(i // self.batches_per_epoch)[i % self.batches_per_epoch]

    def local_batch_at(self, i: int) -> tuple[int, np.ndarray]:
        """(bucket, this process's ``batch_size`` record indices) of global batch ``i``."""
        bucket, slots = self.global_batch_at(i)
        b = self.cfg.batch_size
        return bucket, slots[self.process_index * b:(self.process_index + 1) * b]


class _PlanSource:
    """grain source: element ``j`` = (global batch index, bucket, local record indices), from ``start``."""

    def __init__(self, plan: BatchPlan, start: int):
        self.plan = plan
        self.start = start

    def __len__(self) -> int:
        n = len(self.plan)
        return n if n == sys.maxsize else max(0, n - self.start)

    def __getitem__(self, j: int):
        i = self.start + int(j)
        bucket, idx = self.plan.local_batch_at(i)
        return i, bucket, idx


def pad_sample_into(batch: dict[str, np.ndarray], row: int, sample: seg_lib.Sample) -> None:
    """Writes one sample into row ``row`` of preallocated padded batch arrays."""
    n = len(sample.input_ids)
    batch["input_ids"][row, :n] = sample.input_ids
    batch["attention_mask"][row, :n] = sample.attention_mask
    batch["labels"][row, :n] = sample.labels
    pq, ph = len(sample.pixel_values), len(sample.helper_pixel_values)
    batch["pixel_values"][row, :pq] = sample.pixel_values
    batch["image_grid_thw"][row, : len(sample.image_grid_thw)] = sample.image_grid_thw
    batch["helper_pixel_values"][row, :ph] = sample.helper_pixel_values
    m = len(sample.helper_grid_thw)
    batch["helper_grid_thw"][row, :m] = sample.helper_grid_thw
    batch["latent_starts"][row, :m] = sample.latent_starts
    batch["segment_mask"][row, :m] = sample.segment_mask
    batch["assistant_start"][row] = sample.assistant_start
    batch["sample_mask"][row] = True


def batch_shapes(cfg: DataConfig, bucket: Bucket, patch_dim: int) -> dict[str, tuple[int, ...]]:
    """The array shapes of a batch of ``bucket`` (dtypes: ``BATCH_DTYPES``)."""
    b, m, s = cfg.batch_size, cfg.max_segments, bucket.length
    return {
        "input_ids": (b, s), "attention_mask": (b, s), "labels": (b, s),
        "pixel_values": (b, bucket.question_patches, patch_dim), "image_grid_thw": (b, cfg.max_question_images, 3),
        "helper_pixel_values": (b, bucket.helper_patches, patch_dim), "helper_grid_thw": (b, m, 3),
        "latent_starts": (b, m), "segment_mask": (b, m), "assistant_start": (b,), "sample_mask": (b,),
    }


def empty_batch(cfg: DataConfig, bucket: Bucket, pad_id: int, patch_dim: int) -> dict[str, np.ndarray]:
    """All-padding batch arrays of the contract layout in the shapes of ``bucket``."""
    fill = {"input_ids": pad_id, "labels": seg_lib.IGNORE}
    return {k: np.full(shape, fill.get(k, 0), BATCH_DTYPES[k])
            for k, shape in batch_shapes(cfg, bucket, patch_dim).items()}


class _BatchBuilder(grain.transforms.Map):
    """(global index, bucket, record indices) -> padded batch dict. Runs in worker processes.

    Records that fail to build stay padding; they travel with the batch under ``_FAILURES_KEY``
    (JSON ``[[record index, reason, detail], ...]``) for the iterator to count or raise, so no
    exception crosses grain's threads and processes."""

    def __init__(self, items: list[IndexedRecord], buckets: Sequence[Bucket], tokenizer, cfg: DataConfig,
                 image_cfg: proc.ImageProcessorConfig):
        self.items = items
        self.buckets = tuple(buckets)
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.image_cfg = image_cfg
        self.fmt = cfg.sequence_format
        self.ids = seg_lib.SpecialIds.from_tokenizer(tokenizer)

    def map(self, element):
        _, bucket, idx = element
        batch = empty_batch(self.cfg, self.buckets[bucket], self.ids.pad, self.image_cfg.patch_dim)
        failures = []
        for row, k in enumerate(idx):
            if k < 0:
                continue
            item = self.items[int(k)]
            try:
                # Fails only for files corrupt past their header (verify_images catches those at
                # indexing) or changed since indexing.
                sample = seg_lib.build_sample(
                    item.record, item.root, self.tokenizer, self.image_cfg, self.fmt, ids=self.ids, where=item.where
                )
                got = (len(sample.input_ids), len(sample.pixel_values), len(sample.helper_pixel_values))
                want = (item.size.seq_len, item.size.question_patches, item.size.helper_patches)
                if got != want:
                    raise RecordError(item.where, CHANGED_SINCE_INDEXING,
                                      f"(tokens, question patches, helper patches) {got} differ from {want} "
                                      "measured at indexing: a file changed")
            except RecordError as e:
                failures.append([int(k), e.reason, e.detail])
                continue
            pad_sample_into(batch, row, sample)
        batch[_FAILURES_KEY] = json.dumps(failures)
        return batch


class BatchIterator(grain.DatasetIterator):
    """Iterator of contract batches with a JSON state ``{"next_batch": i, "fingerprint": ...}``.

    ``get_state()`` / ``set_state(state)`` save and restore the position exactly (the next
    batch after ``set_state`` is the one that followed when the state was taken). Being a
    ``grain.DatasetIterator`` it also works with orbax through
    ``grain.checkpoint.CheckpointSave(item=it)`` / ``CheckpointRestore(item=it)``.
    """

    def __init__(self, pipeline: "DataPipeline", start: int = 0):
        super().__init__()
        self._pipeline = pipeline
        self._next = int(start)
        self._it = None

    def _ensure(self):
        if self._it is None:
            self._it = iter(self._pipeline.dataset(self._next))
        return self._it

    def __next__(self) -> dict[str, np.ndarray]:
        it = self._ensure()
        try:
            batch = next(it)
        except RecordError as e:  # defensive: the builder reports failures in the batch instead
            raise RecordError(e.where, e.reason, e.detail) from None
        failures = json.loads(batch.pop(_FAILURES_KEY))
        if self._pipeline.cfg.worker_count > 0:
            # Own copies: the shared-memory segments of grain's workers are released right away
            # instead of living as long as the caller keeps the batch.
            batch = {k: np.array(v) for k, v in batch.items()}
        for k, reason, detail in failures:
            self._pipeline.record_build_failure(k, RecordError(self._pipeline.items[k].where, reason, detail))
        self._next += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_batch": self._next, "fingerprint": self._pipeline.fingerprint,
                "failed_records": self._pipeline.failed_records()}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self._pipeline.fingerprint:
            raise ValueError(
                "data iterator state was saved by a different pipeline (records, config or process layout differ)"
            )
        self.close()
        self._next = int(state["next_batch"])
        for k, reason, detail in state.get("failed_records", []):
            self._pipeline.record_build_failure(k, RecordError(self._pipeline.items[k].where, reason, detail),
                                                restoring=True)

    def start_prefetch(self) -> None:
        self._ensure()

    def close(self) -> None:
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None

    @property
    def next_batch(self) -> int:
        return self._next

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self._next // max(1, self._pipeline.plan.batches_per_epoch)


class DataPipeline:
    """Records + tokenizer + config -> batch plan and iterators.

    Build with ``DataPipeline.from_jsonl`` (or from ``LocatedRecord``s); ``iterator(state)``
    returns a ``BatchIterator``; ``drops`` holds the skip counts per reason.
    """

    def __init__(
        self,
        located: Iterable[rec_lib.LocatedRecord],
        tokenizer,
        cfg: DataConfig,
        *,
        image_cfg: proc.ImageProcessorConfig | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(tokenizer)
        self.image_cfg = cfg.image_config(image_cfg)
        self.process_index, self.process_count = resolve_process(process_index, process_count)
        self.policy = DropPolicy(cfg.drop_policy)
        self.items, self.buckets = index_records(located, self.tokenizer, cfg, self.policy, self.image_cfg)
        if self.policy.counter.total:
            logger.warning("%s", self.policy.counter.summary())
        self.plan = BatchPlan([it.bucket for it in self.items], len(self.buckets), cfg, self.process_index,
                              self.process_count)
        self.fingerprint = pipeline_fingerprint(self.items, self.buckets, cfg, self.process_index,
                                                self.process_count)
        self._builder = _BatchBuilder(self.items, self.buckets, self.tokenizer, cfg, self.image_cfg)
        self._failed: dict[int, RecordError] = {}  # record index -> why building its sample failed

    @classmethod
    def from_jsonl(
        cls,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        tokenizer,
        cfg: DataConfig,
        *,
        root: str | os.PathLike | None = None,
        image_cfg: proc.ImageProcessorConfig | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> "DataPipeline":
        """Reads one or more JSONL files (in the given order). Image paths are relative to
        ``root`` or, by default, to each file's directory."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]

        def located():
            for p in paths:
                yield from rec_lib.read_jsonl(p, root)

        return cls(located(), tokenizer, cfg, image_cfg=image_cfg, process_index=process_index,
                   process_count=process_count)

    @property
    def drops(self) -> rec_lib.DropCounter:
        return self.policy.counter

    @property
    def num_records(self) -> int:
        return len(self.items)

    def record_build_failure(self, index: int, err: RecordError, *, restoring: bool = False) -> None:
        """A record that failed while its batch was built: counted in ``drops`` the first time
        (its slot stays padding in later epochs too), or raised under drop_policy "error"."""
        if index in self._failed:
            return
        self._failed[index] = err
        if restoring:  # counted before the state was saved
            self.policy.counter.add(err)
        else:
            self.policy.handle(err)

    def failed_records(self) -> list[list]:
        """[[record index, reason, detail], ...] of the records that failed to build so far."""
        return [[k, e.reason, e.detail] for k, e in sorted(self._failed.items())]

    def batch_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """Per bucket, the shape of every batch array (dtypes: ``BATCH_DTYPES``): the distinct
        shapes the training step is called with, one compiled program each."""
        return [batch_shapes(self.cfg, b, self.image_cfg.patch_dim) for b in self.buckets]

    def dataset(self, start: int = 0) -> grain.IterDataset:
        """The grain pipeline from global batch ``start`` on."""
        ds = grain.MapDataset.source(_PlanSource(self.plan, start)).map(self._builder)
        ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=self.cfg.read_threads, prefetch_buffer_size=self.cfg.prefetch)
        )
        if self.cfg.worker_count > 0:
            _ensure_absl_flags_parsed()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(
                    num_workers=self.cfg.worker_count, per_worker_buffer_size=self.cfg.worker_buffer_size
                ),
                worker_init_fn=workers.worker_init(),
            )
        return ds

    def iterator(self, state: dict[str, Any] | None = None) -> BatchIterator:
        """A batch iterator from the start, or from a state returned by ``get_state()``."""
        if self.plan.batches_per_epoch == 0:
            raise ValueError(
                f"no batches: {self.num_records} usable records for a global batch of {self.plan.global_batch}"
                f" (drop_remainder={self.cfg.drop_remainder}); {self.drops.summary()}"
            )
        it = BatchIterator(self)
        if state is not None:
            it.set_state(state)
        return it

    @staticmethod
    def _batch_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
        return sum(int(np.prod(shape)) * np.dtype(BATCH_DTYPES[k]).itemsize for k, shape in shapes.items())

    def describe(self) -> dict[str, Any]:
        """Counts and shapes for the run log: records, drops per reason, batches per epoch and
        per bucket its shapes (length, question / helper patch rows), record count and the bytes
        of one batch (host memory per batch in flight)."""
        per_bucket = np.bincount(self.plan.buckets, minlength=len(self.buckets)).tolist() if self.items else \
            [0] * len(self.buckets)
        return {
            "records": self.num_records,
            "dropped": self.drops.as_dict(),
            "batches_per_epoch": self.plan.batches_per_epoch,
            "buckets": [dict(dataclasses.asdict(b), records=n, batch_bytes=self._batch_bytes(shapes))
                        for b, n, shapes in zip(self.buckets, per_bucket, self.batch_shapes())],
            "records_per_bucket": {b.length: n for b, n in zip(self.buckets, per_bucket)},
            "process": [self.process_index, self.process_count],
        }


def make_iterator(
    jsonl: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer,
    cfg: DataConfig,
    *,
    root: str | os.PathLike | None = None,
    state: dict[str, Any] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """JSONL path(s) + tokenizer (object or directory) + config -> iterator of contract batches."""
    pipe = DataPipeline.from_jsonl(jsonl, tokenizer, cfg, root=root, process_index=process_index,
                                   process_count=process_count)
    return pipe.iterator(state)


def save_state(path: str | os.PathLike, it: BatchIterator) -> None:
    """Writes the iterator state as JSON."""
    storage.write_text(os.fspath(path), json.dumps(it.get_state()))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(storage.read_text(os.fspath(path)))
