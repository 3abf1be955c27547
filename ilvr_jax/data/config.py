"""``DataConfig``: every knob of the input pipeline, as plain values (no grain, no tokenizer).

The training loop builds one from its config; ``pipeline.DataPipeline`` resolves the parts that
depend on the data (automatic buckets and patch budgets).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from ilvr_jax.data import checks
from ilvr_jax.data import processor as proc
from ilvr_jax.data import segments as seg_lib
from ilvr_jax.data.buckets import AUTO


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Every knob of the input pipeline.

    Shapes
      batch_size: samples per batch *per process* (the global batch is batch_size * process_count).
      max_length: the longest sequence (full length: image pads and latent segments included);
        records longer are dropped ("too_long"). The one length S when ``buckets`` is None.
      buckets: sequence-length buckets; a record goes to the smallest bucket >= its length, a
        batch holds records of one bucket and is padded to its shapes (one compiled program per
        bucket). Sorted lengths (the largest is then the length limit), "auto" (derived from
        the records: the powers of two from 64 up to max_length that hold records, the last
        one max_length; see buckets.py), or None = one bucket of ``max_length``.
      bucket_patches: the patch rows (Pq, Ph) of each bucket's batches. None = max_question_patches
        / max_helper_patches for every bucket; "auto" = per bucket the largest question and
        helper patch totals of its records rounded up to a multiple of 64, at most those maxima;
        or one (question, helper) pair per bucket (multiples of 4; a record then goes to the
        smallest bucket whose length and budgets hold it). ``DataPipeline.buckets`` holds the
        resolved shapes, ``batch_shapes()`` the arrays of each.
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
      verify_images: also decode every image at load time (slower; catches truncated files there;
        otherwise such a record fails when its batch is built, is counted once in ``drops``
        under the same reason and its slot stays padding, or is raised under "error").
    Throughput
      worker_count: image-decoding worker processes (0 = in the main process).
      worker_buffer_size: batches each worker prepares ahead.
      read_threads: threads per process that build batches.
      prefetch: batches buffered per process by those threads.
    """

    batch_size: int = 1
    max_length: int = 4096
    buckets: tuple[int, ...] | Literal["auto"] | None = None
    bucket_patches: tuple[tuple[int, int], ...] | Literal["auto"] | None = None
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
        if isinstance(self.buckets, str):
            if self.buckets != AUTO:
                raise ValueError(f"buckets must be 'auto', None or lengths, got {self.buckets!r}")
        elif self.buckets is not None:
            b = tuple(int(x) for x in self.buckets)
            if not b or list(b) != sorted(set(b)) or b[0] < 1:
                raise ValueError(f"buckets must be strictly increasing positive lengths, got {self.buckets}")
            object.__setattr__(self, "buckets", b)
        for name in ("max_question_patches", "max_helper_patches"):
            if getattr(self, name) % 4:
                raise ValueError(f"{name} must be a multiple of 4 (one 2x2 merge group), got {getattr(self, name)}")
        if isinstance(self.bucket_patches, str):
            if self.bucket_patches != AUTO:
                raise ValueError(f"bucket_patches must be 'auto', None or (question, helper) pairs, "
                                 f"got {self.bucket_patches!r}")
        elif self.bucket_patches is not None:
            pairs = tuple((int(q), int(h)) for q, h in self.bucket_patches)
            n_buckets = 1 if self.buckets is None else len(self.buckets) if self.buckets != AUTO else None
            if n_buckets != len(pairs):
                raise ValueError(f"bucket_patches needs one (question, helper) pair per bucket of explicit "
                                 f"buckets, got {len(pairs)} pairs for buckets={self.buckets!r}")
            for q, h in pairs:
                if q % 4 or h % 4 or not 0 <= q <= self.max_question_patches or not 0 <= h <= self.max_helper_patches:
                    raise ValueError(f"bucket_patches ({q}, {h}) must be multiples of 4 within max_question_patches "
                                     f"{self.max_question_patches} / max_helper_patches {self.max_helper_patches}")
            object.__setattr__(self, "bucket_patches", pairs)
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")
        if self.drop_policy not in ("error", "skip"):
            raise ValueError(f"drop_policy must be 'error' or 'skip', got {self.drop_policy!r}")
        if self.worker_count < 0 or self.max_segments < 0 or self.max_question_images < 0:
            raise ValueError("worker_count, max_segments and max_question_images must be >= 0")

    @property
    def length_limit(self) -> int:
        """The longest record kept: the largest explicit bucket, else max_length."""
        return self.buckets[-1] if isinstance(self.buckets, tuple) else self.max_length

    @property
    def limits(self) -> checks.RecordLimits:
        """What a record may need of the batch shapes (the fit check of ``checks.py``)."""
        return checks.RecordLimits(
            max_length=self.length_limit, max_question_images=self.max_question_images,
            max_question_patches=self.max_question_patches, max_segments=self.max_segments,
            max_helper_patches=self.max_helper_patches,
        )

    @property
    def sequence_format(self) -> seg_lib.SequenceFormat:
        return seg_lib.SequenceFormat(latent_size=self.latent_size, answer_format=self.answer_format)

    def image_config(self, base: proc.ImageProcessorConfig | None = None) -> proc.ImageProcessorConfig:
        base = base if base is not None else proc.ImageProcessorConfig()
        return dataclasses.replace(base, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(self.buckets, tuple):
            d["buckets"] = list(self.buckets)
        if isinstance(self.bucket_patches, tuple):
            d["bucket_patches"] = [list(p) for p in self.bucket_patches]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        """Builds a config; unknown keys are an error (every key must mean something)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown data config keys: {unknown}")
        d = dict(d)
        if isinstance(d.get("buckets"), (list, tuple)):
            d["buckets"] = tuple(d["buckets"])
        if isinstance(d.get("bucket_patches"), (list, tuple)):
            d["bucket_patches"] = tuple(tuple(p) for p in d["bucket_patches"])
        return cls(**d)
