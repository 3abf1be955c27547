"""Canonical JSONL records -> fixed-shape training batches (the contract layout), with grain.

Data flow::

    JSONL files --read+validate--> records --measure (headers + tokenizer)--> fit check
        --> global batch plan per epoch (seeded shuffle, length buckets)
        --> this process's slice of each global batch
        --> grain MapDataset[batch index] .map(build batch: decode, preprocess, tokenise, pad)
        --> to_iter_dataset (threads) --> mp_prefetch (worker processes) --> BatchIterator

* Everything that decides *which* records form a batch is computed up front in the main
  process from record sizes alone (no pixels), so the plan is deterministic, identical on
  every process, independent of the worker count, and the drop counts are exact.
* Bad records (invalid, unreadable, too long, too many patches/segments/images) are raised or
  skipped and counted per reason before training starts (``DataConfig.drop_policy``): nothing
  of the wrong shape reaches jit.
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

Batch (numpy, per process, B = ``batch_size``, S = bucket length)::

    input_ids [B,S] int32 (pad: <|endoftext|>), attention_mask [B,S] int32, labels [B,S] int32,
    pixel_values [B,Pq,patch_dim] f32, image_grid_thw [B,Iq,3] i32,
    helper_pixel_values [B,Ph,patch_dim] f32, helper_grid_thw [B,M,3] i32,
    latent_starts [B,M] i32, segment_mask [B,M] bool, assistant_start [B] i32, sample_mask [B] bool

Padding samples have all-zero masks/grids/pixels, input_ids = pad id, labels -100,
assistant_start 0.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import grain
import numpy as np

from ilvr_jax.data import processor as proc
from ilvr_jax.data import records as rec_lib
from ilvr_jax.data import segments as seg_lib
from ilvr_jax.data import workers
from ilvr_jax.data.adapters import relative_paths
from ilvr_jax.data.records import DropPolicy, RecordError

logger = logging.getLogger(__name__)

# Drop reasons of the fit check.
TOO_LONG = "too_long"
TOO_MANY_QUESTION_IMAGES = "too_many_question_images"
TOO_MANY_QUESTION_PATCHES = "too_many_question_patches"
TOO_MANY_SEGMENTS = "too_many_segments"
TOO_MANY_HELPER_PATCHES = "too_many_helper_patches"

THROUGHPUT_KEYS = ("worker_count", "worker_buffer_size", "read_threads", "prefetch")

BATCH_KEYS = (
    "input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "helper_pixel_values",
    "helper_grid_thw", "latent_starts", "segment_mask", "assistant_start", "sample_mask",
)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Every knob of the input pipeline.

    Shapes
      batch_size: samples per batch *per process* (the global batch is batch_size * process_count).
      max_length: sequence length S when ``buckets`` is None; records longer are dropped ("too_long").
      buckets: sorted sequence lengths; a record goes to the smallest bucket >= its length, a
        batch holds records of one bucket and is padded to that length (one compiled shape per
        bucket). The largest bucket is the length limit. None = one bucket of ``max_length``.
      max_question_images: Iq, rows of ``image_grid_thw``.
      max_question_patches: Pq, rows of ``pixel_values`` (question images of a sample together).
      max_helper_patches: Ph, rows of ``helper_pixel_values`` (all helper images of a sample).
      max_segments: M, latent segments (= helper images) per sample.
      latent_size: K, latent pads per segment.
      answer_format: text appended after the plan (``{answer}`` = ``original_final_answer``);
        None (the reference's behaviour) = nothing, the plan alone (see segments.py).
      min_pixels / max_pixels: image resize budget (Qwen2.5-VL's smart_resize). Defaults are
        Qwen2.5-VL's preprocessor_config.json (3136 = 4*28*28 and 12845056 = 16384*28*28), which
        the reference's processor loads. One image has at most about max_pixels / 196 patches
        (65536 at the default); a record whose images exceed max_question_patches /
        max_helper_patches is dropped ("too_many_*_patches"), not shrunk, so lower max_pixels
        to fit large images into smaller patch budgets.
    Order
      seed: shuffle seed (epoch e uses (seed, e)).
      shuffle: False keeps file order.
      num_epochs: passes over the data; None = infinite.
      drop_remainder: drop a bucket's last short batch instead of padding it (sample_mask False).
    Records
      drop_policy: "error" raises on the first bad record, "skip" drops and counts it per reason.
      check_images: check at load time that every image file exists and is recognised.
      verify_images: also read every image fully at load time (slower; catches truncated files).
    Throughput
      worker_count: image-decoding worker processes (0 = in the main process).
      worker_buffer_size: batches each worker prepares ahead.
      read_threads: threads per process that build batches.
      prefetch: batches buffered per process by those threads.
    """

    batch_size: int = 1
    max_length: int = 4096
    buckets: tuple[int, ...] | None = None
    max_question_images: int = 1
    max_question_patches: int = 4096
    max_helper_patches: int = 8192
    max_segments: int = 8
    latent_size: int = 8
    answer_format: str | None = None
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 16384 * 28 * 28
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    drop_remainder: bool = False
    drop_policy: Literal["error", "skip"] = "error"
    check_images: bool = True
    verify_images: bool = False
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 1
    prefetch: int = 2

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.buckets is not None:
            b = tuple(int(x) for x in self.buckets)
            if not b or list(b) != sorted(set(b)) or b[0] < 1:
                raise ValueError(f"buckets must be strictly increasing positive lengths, got {self.buckets}")
            object.__setattr__(self, "buckets", b)
        for name in ("max_question_patches", "max_helper_patches"):
            if getattr(self, name) % 4:
                raise ValueError(f"{name} must be a multiple of 4 (one 2x2 merge group), got {getattr(self, name)}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")
        if self.drop_policy not in ("error", "skip"):
            raise ValueError(f"drop_policy must be 'error' or 'skip', got {self.drop_policy!r}")
        if self.worker_count < 0 or self.max_segments < 0 or self.max_question_images < 0:
            raise ValueError("worker_count, max_segments and max_question_images must be >= 0")

    @property
    def lengths(self) -> tuple[int, ...]:
        """The sequence lengths batches are padded to."""
        return self.buckets if self.buckets is not None else (self.max_length,)

    @property
    def sequence_format(self) -> seg_lib.SequenceFormat:
        return seg_lib.SequenceFormat(latent_size=self.latent_size, answer_format=self.answer_format)

    def image_config(self, base: proc.ImageProcessorConfig | None = None) -> proc.ImageProcessorConfig:
        base = base if base is not None else proc.ImageProcessorConfig()
        return dataclasses.replace(base, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["buckets"] = list(self.buckets) if self.buckets is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        """Builds a config; unknown keys are an error (every key must mean something)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown data config keys: {unknown}")
        d = dict(d)
        if d.get("buckets") is not None:
            d["buckets"] = tuple(d["buckets"])
        return cls(**d)


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside ``absl.app.run`` (tests, notebooks,
    plain scripts) nothing parses them, so mark the defaults as parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def load_tokenizer(tokenizer_or_dir):
    """A tokenizer object, or one loaded from a directory with ``AutoTokenizer``."""
    if isinstance(tokenizer_or_dir, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.fspath(tokenizer_or_dir))
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


def _fit_error(size: seg_lib.SampleSize, cfg: DataConfig, where: str) -> RecordError | None:
    checks = (
        (size.seq_len > cfg.lengths[-1], TOO_LONG, f"{size.seq_len} tokens > {cfg.lengths[-1]}"),
        (size.num_question_images > cfg.max_question_images, TOO_MANY_QUESTION_IMAGES,
         f"{size.num_question_images} question images > {cfg.max_question_images}"),
        (size.question_patches > cfg.max_question_patches, TOO_MANY_QUESTION_PATCHES,
         f"{size.question_patches} question patches > {cfg.max_question_patches}"),
        (size.num_segments > cfg.max_segments, TOO_MANY_SEGMENTS,
         f"{size.num_segments} latent segments > {cfg.max_segments}"),
        (size.helper_patches > cfg.max_helper_patches, TOO_MANY_HELPER_PATCHES,
         f"{size.helper_patches} helper patches > {cfg.max_helper_patches}"),
    )
    for bad, reason, detail in checks:
        if bad:
            return RecordError(where, reason, f"does not fit the batch shapes: {detail}")
    return None


def index_records(
    located: Iterable[rec_lib.LocatedRecord],
    tokenizer,
    cfg: DataConfig,
    policy: DropPolicy,
    image_cfg: proc.ImageProcessorConfig | None = None,
) -> list[IndexedRecord]:
    """Validates, measures and fit-checks records; bad ones go to ``policy`` (raise or count)."""
    image_cfg = cfg.image_config(image_cfg)
    fmt = cfg.sequence_format
    ids = seg_lib.SpecialIds.from_tokenizer(tokenizer)
    out = []
    for loc in located:
        try:
            rec = rec_lib.validate_located(loc, check_images=cfg.check_images, verify_images=cfg.verify_images)
            size = seg_lib.measure_record(rec, loc.root, tokenizer, image_cfg, fmt, ids=ids, where=loc.where)
            err = _fit_error(size, cfg, loc.where)
            if err is not None:
                raise err
        except RecordError as e:
            policy.handle(e)
            continue
        bucket = bisect.bisect_left(cfg.lengths, size.seq_len)
        out.append(IndexedRecord(rec, loc.where, loc.root, size, bucket, loc.source, loc.line))
    return out


def pipeline_fingerprint(items: Sequence[IndexedRecord], cfg: DataConfig, process_index: int,
                         process_count: int) -> str:
    """Hash of everything that decides the batches: the config (less the throughput knobs),
    the process layout, and per record in order its file base name and line, its content with
    image paths relative to its root, and its measured size (token count, patch counts).

    Absolute locations are left out, so a data directory that is moved or copied (JSONL and
    images together) restores a saved iterator state; any change of content, order, image
    sizes, config or layout gives another fingerprint.
    """
    h = hashlib.sha256()
    # Throughput knobs do not change the batches, so a state restores across them.
    order_cfg = {k: v for k, v in cfg.to_dict().items() if k not in THROUGHPUT_KEYS}
    h.update(json.dumps(order_cfg, sort_keys=True).encode())
    h.update(json.dumps([process_index, process_count]).encode())
    for it in items:
        # Absolute image paths below the root become relative to it, as relative ones already are.
        rec = relative_paths(it.record, it.root) if it.root is not None else it.record
        entry = [it.source, it.line, rec, dataclasses.astuple(it.size), it.bucket]
        h.update(json.dumps(entry, sort_keys=True).encode())
    return h.hexdigest()[:16]


class BatchPlan:
    """Which records form each batch: a pure function of (record buckets, config, process).

    Global batch ``i`` is batch ``i % batches_per_epoch`` of epoch ``i // batches_per_epoch``;
    its slots are record indices (-1 = padding sample).
    """

    def __init__(self, buckets: Sequence[int], cfg: DataConfig, process_index: int, process_count: int):
        self.buckets = np.asarray(buckets, dtype=np.int64)
        self.cfg = cfg
        self.process_index = process_index
        self.process_count = process_count
        self.global_batch = cfg.batch_size * process_count
        counts = np.bincount(self.buckets, minlength=len(cfg.lengths)) if len(self.buckets) else np.zeros(1, int)
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


def empty_batch(cfg: DataConfig, seq_len: int, pad_id: int, patch_dim: int) -> dict[str, np.ndarray]:
    """All-padding batch arrays of the contract layout."""
    b, m = cfg.batch_size, cfg.max_segments
    return {
        "input_ids": np.full((b, seq_len), pad_id, np.int32),
        "attention_mask": np.zeros((b, seq_len), np.int32),
        "labels": np.full((b, seq_len), seg_lib.IGNORE, np.int32),
        "pixel_values": np.zeros((b, cfg.max_question_patches, patch_dim), np.float32),
        "image_grid_thw": np.zeros((b, cfg.max_question_images, 3), np.int32),
        "helper_pixel_values": np.zeros((b, cfg.max_helper_patches, patch_dim), np.float32),
        "helper_grid_thw": np.zeros((b, m, 3), np.int32),
        "latent_starts": np.zeros((b, m), np.int32),
        "segment_mask": np.zeros((b, m), bool),
        "assistant_start": np.zeros((b,), np.int32),
        "sample_mask": np.zeros((b,), bool),
    }


class _BatchBuilder(grain.transforms.Map):
    """(global index, bucket, record indices) -> padded batch dict. Runs in worker processes."""

    def __init__(self, items: list[IndexedRecord], tokenizer, cfg: DataConfig, image_cfg: proc.ImageProcessorConfig):
        self.items = items
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.image_cfg = image_cfg
        self.fmt = cfg.sequence_format
        self.ids = seg_lib.SpecialIds.from_tokenizer(tokenizer)

    def map(self, element):
        _, bucket, idx = element
        batch = empty_batch(self.cfg, self.cfg.lengths[bucket], self.ids.pad, self.image_cfg.patch_dim)
        for row, k in enumerate(idx):
            if k < 0:
                continue
            item = self.items[int(k)]
            try:
                sample = seg_lib.build_sample(
                    item.record, item.root, self.tokenizer, self.image_cfg, self.fmt, ids=self.ids, where=item.where
                )
            except RecordError as e:
                # Only possible for files that changed or are corrupt past their header since
                # loading (set verify_images to catch those up front). The slot stays padding.
                if self.cfg.drop_policy == "error":
                    raise
                logger.warning("record failed while building a batch, slot left as padding: %s", e)
                continue
            if len(sample.input_ids) != item.size.seq_len or len(sample.pixel_values) != item.size.question_patches \
                    or len(sample.helper_pixel_values) != item.size.helper_patches:
                raise RuntimeError(f"{item.where}: sample differs from its measured size (file changed?)")
            pad_sample_into(batch, row, sample)
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
        batch = next(it)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_batch": self._next, "fingerprint": self._pipeline.fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self._pipeline.fingerprint:
            raise ValueError(
                "data iterator state was saved by a different pipeline (records, config or process layout differ)"
            )
        self.close()
        self._next = int(state["next_batch"])

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
        self.items = index_records(located, self.tokenizer, cfg, self.policy, self.image_cfg)
        if self.policy.counter.total:
            logger.warning("%s", self.policy.counter.summary())
        self.plan = BatchPlan([it.bucket for it in self.items], cfg, self.process_index, self.process_count)
        self.fingerprint = pipeline_fingerprint(self.items, cfg, self.process_index, self.process_count)
        self._builder = _BatchBuilder(self.items, self.tokenizer, cfg, self.image_cfg)

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

    def describe(self) -> dict[str, Any]:
        """Counts for the run log."""
        per_bucket = np.bincount(self.plan.buckets, minlength=len(self.cfg.lengths)).tolist() if self.items else []
        return {
            "records": self.num_records,
            "dropped": self.drops.as_dict(),
            "batches_per_epoch": self.plan.batches_per_epoch,
            "records_per_bucket": dict(zip(self.cfg.lengths, per_bucket)),
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
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        json.dump(it.get_state(), f)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    with open(os.fspath(path), encoding="utf-8") as f:
        return json.load(f)
