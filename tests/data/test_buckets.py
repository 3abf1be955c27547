"""Bucket lengths and patch budgets derived from record sizes."""

from __future__ import annotations

from ilvr_jax.data import buckets as B
from ilvr_jax.data.segments import SampleSize


def size(n, q=0, h=0):
    return SampleSize(n, 1, q, 1, h)


def test_auto_lengths_keep_the_powers_of_two_that_hold_records():
    assert B.auto_lengths([10, 64, 65, 200, 900], 1000) == (64, 128, 256, 1000)
    assert B.auto_lengths([300], 32768) == (512,)
    assert B.auto_lengths([], 4096) == ()
    assert B.auto_lengths([40], 50) == (50,)


def test_round_patches():
    assert [B.round_patches(n, 10_000) for n in (0, 1, 64, 65, 130)] == [64, 64, 64, 128, 192]
    assert B.round_patches(500, 256) == 256 and B.round_patches(0, 16) == 16


def test_resolve_auto_budgets_per_bucket():
    sizes = [size(100, 40, 300), size(120, 10, 70), size(500, 0, 700), size(60, 4, 4)]
    buckets, assigned = B.resolve(sizes, 2048, 1024, 768, "auto", "auto")
    assert buckets == (B.Bucket(64, 64, 64), B.Bucket(128, 64, 320), B.Bucket(512, 64, 704))
    assert assigned == [1, 1, 2, 0]
    assert all(buckets[b].holds(s) for s, b in zip(sizes, assigned))
    # None: the global maxima everywhere; explicit lengths with auto budgets
    buckets, _ = B.resolve(sizes, 2048, 1024, 768, "auto", None)
    assert {(b.question_patches, b.helper_patches) for b in buckets} == {(1024, 768)}
    buckets, assigned = B.resolve(sizes, 2048, 1024, 768, (256, 2048), "auto")
    assert buckets == (B.Bucket(256, 64, 320), B.Bucket(2048, 64, 704)) and assigned == [0, 0, 1, 0]


def test_resolve_explicit_budgets_pick_the_first_bucket_that_holds_a_record():
    sizes = [size(100, 8, 500), size(100, 8, 8), size(100, 400, 8)]
    buckets, assigned = B.resolve(sizes, 1024, 256, 1024, (128, 1024), [(16, 16), (256, 1024)])
    assert assigned == [1, 0, None]  # the last needs 400 question patches: no bucket holds it
