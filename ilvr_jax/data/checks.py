"""The one set of record checks: what the training pipeline's indexing runs on every record is
what ``python -m ilvr_jax.data validate`` and ``stats`` run, so they cannot disagree.

``RecordChecker.check(located)`` -> ``(record, SampleSize)`` or ``RecordError``, in this order:

1. the record's structure (``records.validate_record``): keys, types, plan steps, helper list,
   ``<image>`` placeholders; every image exists and PIL recognises its header;
   with ``verify_images`` every image is also decoded in full (what building a batch does:
   truncated PNG/JPEG files fail here instead of in a worker);
2. no control or special token in any text (``segments.check_text``);
3. image sizes from the headers: aspect ratio at most 200 (Qwen2.5-VL's ``smart_resize``),
   patch grids at the configured pixel budget;
4. with a tokenizer: the full token sequence (chat template, image pads, latent segments),
   its length, labels and segment layout (``segments.tokenize_record``);
5. the fit against ``RecordLimits`` (each limit None = not checked): sequence length,
   question images, question patches, segments, helper patches.

A record that passes all of them builds into a batch unless its files change afterwards (or,
without ``verify_images``, an image is corrupt past its header); the pipeline counts such
late failures under the same reasons.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ilvr_jax.data import processor as proc
from ilvr_jax.data import records as rec_lib
from ilvr_jax.data import segments as seg_lib
from ilvr_jax.data.records import RecordError

# Drop reasons of the fit check.
TOO_LONG = "too_long"
TOO_MANY_QUESTION_IMAGES = "too_many_question_images"
TOO_MANY_QUESTION_PATCHES = "too_many_question_patches"
TOO_MANY_SEGMENTS = "too_many_segments"
TOO_MANY_HELPER_PATCHES = "too_many_helper_patches"


@dataclasses.dataclass(frozen=True)
class RecordLimits:
    """The most a record may need of the batch shapes; None = not checked."""

    max_length: int | None = None
    max_question_images: int | None = None
    max_question_patches: int | None = None
    max_segments: int | None = None
    max_helper_patches: int | None = None


def fit_error(size: seg_lib.SampleSize, limits: RecordLimits, where: str) -> RecordError | None:
    """The first limit ``size`` exceeds, as a ``RecordError`` (None if it fits)."""
    checks = (
        (size.seq_len, limits.max_length, TOO_LONG, "tokens"),
        (size.num_question_images, limits.max_question_images, TOO_MANY_QUESTION_IMAGES, "question images"),
        (size.question_patches, limits.max_question_patches, TOO_MANY_QUESTION_PATCHES, "question patches"),
        (size.num_segments, limits.max_segments, TOO_MANY_SEGMENTS, "latent segments"),
        (size.helper_patches, limits.max_helper_patches, TOO_MANY_HELPER_PATCHES, "helper patches"),
    )
    for value, limit, reason, what in checks:
        if value is not None and limit is not None and value > limit:
            return RecordError(where, reason, f"does not fit the batch shapes: {value} {what} > {limit}")
    return None


class RecordChecker:
    """Runs the checks above; ``tokenizer`` None skips the token checks (step 4) and the length
    limit, and checks text against the fixed control tokens only."""

    def __init__(
        self,
        tokenizer,
        image_cfg: proc.ImageProcessorConfig,
        fmt: seg_lib.SequenceFormat,
        limits: RecordLimits = RecordLimits(),
        *,
        check_images: bool = True,
        verify_images: bool = False,
    ):
        self.tokenizer = tokenizer
        self.image_cfg = image_cfg
        self.fmt = fmt
        self.limits = limits
        self.check_images = check_images
        self.verify_images = verify_images
        self.ids = seg_lib.SpecialIds.from_tokenizer(tokenizer) if tokenizer is not None else None

    def check(self, loc: rec_lib.LocatedRecord) -> tuple[dict[str, Any], seg_lib.SampleSize]:
        """The record and its size; raises ``RecordError`` naming the record and the reason."""
        rec = rec_lib.validate_located(loc, check_images=self.check_images, verify_images=self.verify_images)
        seg_lib.check_text(rec, self.tokenizer, loc.where)
        size = seg_lib.measure_record(rec, loc.root, self.tokenizer, self.image_cfg, self.fmt, ids=self.ids,
                                      where=loc.where)
        err = fit_error(size, self.limits, loc.where)
        if err is not None:
            raise err
        return rec, size
