"""Batch shapes from the data: sequence-length buckets and per-bucket image-patch budgets.

A batch of bucket b is padded to (S_b tokens, Pq_b question patches, Ph_b helper patches), so
jit compiles one program per bucket and no batch carries more padding than its records need.

* Lengths ``"auto"``: the powers of two from ``AUTO_MIN_LENGTH`` below ``max_length``, then
  ``max_length`` itself, keeping only those that are the smallest that holds some record (a
  record goes to the smallest bucket >= its full length). Explicit lengths are used as given;
  None is one bucket of ``max_length``.
* Patch budgets ``"auto"``: per bucket the largest question-patch and helper-patch totals of
  its records, rounded up to a multiple of ``PATCH_ROUND`` (64, so also of the 2x2 merge
  group 4) and never above ``max_question_patches`` / ``max_helper_patches``. None: those
  maxima for every bucket. Explicit: one (question, helper) pair per bucket; a record then
  goes to the smallest bucket whose length *and* budgets hold it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ilvr_jax.data.segments import SampleSize

AUTO = "auto"
AUTO_MIN_LENGTH = 64
PATCH_ROUND = 64


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One batch shape: sequence length and the question / helper patch rows."""

    length: int
    question_patches: int
    helper_patches: int

    def holds(self, size: SampleSize) -> bool:
        return (size.seq_len <= self.length and size.question_patches <= self.question_patches
                and size.helper_patches <= self.helper_patches)


def auto_lengths(seq_lens: Sequence[int], max_length: int, min_length: int = AUTO_MIN_LENGTH) -> tuple[int, ...]:
    """Power-of-two lengths (the last capped at ``max_length``) that hold some of ``seq_lens``."""
    candidates = []
    n = min_length
    while n < max_length:
        candidates.append(n)
        n *= 2
    candidates.append(max_length)
    used = set()
    for length in seq_lens:
        used.add(next(c for c in candidates if c >= length))  # callers drop longer records first
    return tuple(c for c in candidates if c in used)


def round_patches(n: int, cap: int) -> int:
    """``n`` patches rounded up to a multiple of ``PATCH_ROUND`` (at least one), at most ``cap``."""
    return min(cap, max(PATCH_ROUND, -(-n // PATCH_ROUND) * PATCH_ROUND))


def resolve(
    sizes: Sequence[SampleSize],
    max_length: int,
    max_question_patches: int,
    max_helper_patches: int,
    lengths: Sequence[int] | str | None,
    patches: Sequence[tuple[int, int]] | str | None,
) -> tuple[tuple[Bucket, ...], list[int | None]]:
    """(buckets, bucket index of each size or None where no bucket holds it).

    ``sizes`` already fit the global limits (length, ``max_*_patches``)."""
    if lengths == AUTO:
        lengths = auto_lengths([s.seq_len for s in sizes], max_length)
    elif lengths is None:
        lengths = (max_length,)
    lengths = tuple(int(x) for x in lengths)
    if patches is None or patches == AUTO:
        by_length = [next((b for b, n in enumerate(lengths) if s.seq_len <= n), None) for s in sizes]
        if patches is None:
            budgets = [(max_question_patches, max_helper_patches)] * len(lengths)
        else:
            budgets = []
            for b in range(len(lengths)):
                mine = [s for s, a in zip(sizes, by_length) if a == b]
                budgets.append((round_patches(max((s.question_patches for s in mine), default=0), max_question_patches),
                                round_patches(max((s.helper_patches for s in mine), default=0), max_helper_patches)))
        buckets = tuple(Bucket(n, q, h) for n, (q, h) in zip(lengths, budgets))
        return buckets, by_length
    if len(patches) != len(lengths):
        raise ValueError(f"{len(patches)} bucket patch budgets for {len(lengths)} buckets")
    buckets = tuple(Bucket(n, int(q), int(h)) for n, (q, h) in zip(lengths, patches))
    return buckets, [next((b for b, bk in enumerate(buckets) if bk.holds(s)), None) for s in sizes]
