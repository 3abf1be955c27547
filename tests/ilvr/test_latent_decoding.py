"""The per-row latent-mode rules, stepped by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ilvr_jax.ilvr.latent_decoding import LatentIds, initial_span_left, latent_step

IDS = LatentIds(pad=7, start=8, end=9)


def _run(chosen_seq, greedy_seq, k, end_early, span_left=0):
    """Steps one row through the rules; returns the tokens and the fed-hidden flags."""
    tokens, fed, opened = [], [], 0
    s = np.array([span_left])
    for c, g in zip(chosen_seq, greedy_seq):
        step = latent_step(np.array([c]), np.array([g]), s, k, IDS, end_early)
        tokens.append(int(step.token[0]))
        fed.append(bool(step.feed_hidden[0]))
        opened += int(step.opened[0])
        s = np.asarray(step.span_left)
    return tokens, fed, opened


def test_span_is_start_k_pads_end_whatever_the_model_says():
    chosen = [5, 8, 9, 9, 9, 9, 6, 8, 1, 1, 1, 1]
    tokens, fed, opened = _run(chosen, chosen, k=3, end_early=False)
    assert tokens == [5, 8, 7, 7, 7, 9, 6, 8, 7, 7, 7, 9]
    assert fed == [False, False, True, True, True, False, False, False, True, True, True, False]
    assert opened == 2


def test_end_early_ends_on_the_argmax_only_inside_the_pads():
    chosen = [8, 1, 1, 1, 9, 8, 1, 1, 1, 1]
    greedy = [8, 1, 9, 1, 9, 8, 1, 1, 1, 1]
    tokens, fed, _ = _run(chosen, greedy, k=3, end_early=True)
    # span 1: pad, then the argmax end ends it; text 9 is an ordinary token; span 2 runs full.
    assert tokens == [8, 7, 9, 1, 9, 8, 7, 7, 7, 9]
    assert fed == [False, True, False, False, False, False, True, True, True, False]
    tokens, _, _ = _run(chosen, greedy, k=3, end_early=False)
    assert tokens == [8, 7, 7, 7, 9, 8, 7, 7, 7, 9]


def test_prompt_ending_in_start_begins_inside_a_span():
    s = initial_span_left(np.array([8, 5]), 2, IDS)
    np.testing.assert_array_equal(np.asarray(s), [3, 0])
    tokens, fed, opened = _run([1, 1, 1, 1], [1, 1, 1, 1], k=2, end_early=False, span_left=3)
    assert tokens == [7, 7, 9, 1] and fed == [True, True, False, False] and opened == 0


def test_zero_latent_size_gives_start_then_end_and_negative_fails():
    tokens, fed, _ = _run([8, 1, 1], [8, 1, 1], k=0, end_early=False)
    assert tokens == [8, 9, 1] and not any(fed)
    with pytest.raises(ValueError, match="latent_size"):
        latent_step(np.array([1]), np.array([1]), np.array([0]), -1, IDS)
