"""Top-k / top-p / temperature filtering against HF's logits warpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from ilvr_jax.generate.sampling import SamplingParams, choose_tokens, filter_logits


def _hf_filter(logits, temperature, top_k, top_p):
    scores = torch.from_numpy(logits.copy())
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores.numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.9), (1.3, 20, 0.5),
                                                     (1.0, 0, 0.05), (0.5, 3, 0.99)])
def test_filter_keeps_the_tokens_hf_keeps(temperature, top_k, top_p):
    logits = np.random.RandomState(0).randn(6, 300).astype(np.float32) * 3
    want = _hf_filter(logits, temperature, top_k, top_p)
    got = np.asarray(filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
    keep_want, keep_got = np.isfinite(want), got > np.finfo(np.float32).min
    np.testing.assert_array_equal(keep_got, keep_want)
    np.testing.assert_allclose(got[keep_got], want[keep_want], rtol=1e-6)
    assert 1 <= keep_got.sum(1).min() and (top_k == 0 or keep_got.sum(1).max() <= top_k)


def test_choose_tokens_samples_the_filtered_distribution():
    logits = jnp.asarray(np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 4000, np.float32)))
    chosen, greedy = choose_tokens(logits, jax.random.PRNGKey(0), 1.0, 0, 0.7, sample=True)
    counts = np.bincount(np.asarray(chosen), minlength=4) / 4000
    # top-p 0.7 keeps {0.5, 0.3}: renormalised 0.625 / 0.375.
    np.testing.assert_allclose(counts, [0.625, 0.375, 0, 0], atol=0.03)
    assert np.all(np.asarray(greedy) == 0)
    zero_t, _ = choose_tokens(logits, jax.random.PRNGKey(0), 0.0, 0, 1.0, sample=True)
    assert np.all(np.asarray(zero_t) == 0)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 0, 1.0), (0.8, 4, 1.0), (1.2, 0, 0.6)])
def test_sampled_tokens_are_the_draw_from_the_filtered_logits(temperature, top_k, top_p):
    """With top-k and top-p off the filter (its sort) is skipped; the draw is the same one."""
    logits = jnp.asarray(np.random.RandomState(2).randn(64, 50).astype(np.float32) * 2)
    key = jax.random.PRNGKey(3)
    chosen, greedy = jax.jit(choose_tokens, static_argnames="sample")(logits, key, temperature, top_k, top_p,
                                                                      sample=True)
    want = jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p), axis=-1)
    if top_k == 0 and top_p == 1.0:
        want = jax.random.categorical(key, logits / temperature, axis=-1)
    np.testing.assert_array_equal(np.asarray(chosen), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(greedy), np.argmax(np.asarray(logits), axis=-1))
    assert len(set(np.asarray(chosen).tolist())) > 5  # a draw, not the argmax


def test_sampling_params_reject_bad_values():
    for bad in (dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    assert SamplingParams().greedy and not SamplingParams(temperature=0.5).greedy
