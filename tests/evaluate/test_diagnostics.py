"""Latent diagnostics: the paired bootstrap against a plain NumPy loop and the ablation
functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilvr_jax.evaluate import diagnostics


def _bootstrap_reference(base, other, n_resamples, seed, level):
    """The textbook paired percentile bootstrap, one resample at a time."""
    base, other = np.asarray(base, float), np.asarray(other, float)
    n = len(base)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    diffs = []
    for r in range(n_resamples):
        acc_o = sum(other[i] for i in idx[r]) / n
        acc_b = sum(base[i] for i in idx[r]) / n
        diffs.append(acc_o - acc_b)
    diffs = sorted(diffs)
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2

    def percentile(q):  # linear interpolation between closest ranks (NumPy's default)
        pos = q * (n_resamples - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, n_resamples - 1)
        return diffs[lo] + (pos - lo) * (diffs[hi] - diffs[lo])

    return other.mean() - base.mean(), percentile(lo_q), percentile(hi_q)


@pytest.mark.parametrize("seed", [0, 7])
def test_paired_bootstrap_matches_a_plain_loop(seed):
    base = [1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 1]
    other = [1, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0, 1, 0, 0]
    got = diagnostics.paired_bootstrap(base, other, n_resamples=500, seed=seed, level=0.9)
    diff, lo, hi = _bootstrap_reference(base, other, 500, seed, 0.9)
    assert got["diff"] == pytest.approx(diff, abs=1e-12) == pytest.approx(-0.3)
    assert got["low"] == pytest.approx(lo, abs=1e-12)
    assert got["high"] == pytest.approx(hi, abs=1e-12)
    assert got["low"] < got["diff"] < got["high"] < 0  # every resample of this pair loses accuracy
    assert got["n"] == 20 and got["n_resamples"] == 500


def test_paired_bootstrap_edge_cases():
    same = diagnostics.paired_bootstrap([1, 0, 1], [1, 0, 1], n_resamples=50)
    assert (same["diff"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    flip = diagnostics.paired_bootstrap([0, 0, 0, 0], [1, 1, 1, 1], n_resamples=50)
    assert (flip["diff"], flip["low"], flip["high"]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="equal length"):
        diagnostics.paired_bootstrap([1, 0], [1])


def test_parse_ablations():
    assert diagnostics.parse_ablations("zeros, noise,zeros") == ("zeros", "noise")
    assert diagnostics.parse_ablations("") == ()
    with pytest.raises(ValueError, match="unknown latent ablation 'zero'"):
        diagnostics.parse_ablations("zero")
    with pytest.raises(ValueError, match="always made"):
        diagnostics.parse_ablations("normal")


def test_ablation_functions():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(3, 16)) * np.asarray([[1.0], [5.0], [0.1]]), jnp.float32)
    pad = jnp.arange(16, dtype=jnp.float32)
    assert not np.any(np.asarray(diagnostics.ablate_fed_latents("zeros", h)))
    np.testing.assert_array_equal(diagnostics.ablate_fed_latents("pad", h, pad_embedding=pad), np.tile(pad, (3, 1)))
    np.testing.assert_array_equal(diagnostics.ablate_fed_latents("none", h), h)
    key = jax.random.PRNGKey(3)
    n1 = np.asarray(diagnostics.ablate_fed_latents("noise", h, key=key))
    np.testing.assert_allclose(np.linalg.norm(n1, axis=-1), np.linalg.norm(h, axis=-1), rtol=1e-5)
    np.testing.assert_array_equal(n1, diagnostics.ablate_fed_latents("noise", h, key=key))  # seeded
    assert not np.allclose(n1, diagnostics.ablate_fed_latents("noise", h, key=jax.random.PRNGKey(4)))
    cos = np.sum(n1 * np.asarray(h), -1) / (np.linalg.norm(n1, axis=-1) * np.linalg.norm(h, axis=-1))
    assert np.all(np.abs(cos) < 0.9)
    donors = rng.normal(size=(3, 4, 16)).astype(np.float32)
    counts = np.asarray([3, 0, 4], np.int32)
    idx = np.asarray([4, 1, 2], np.int32)
    got = np.asarray(diagnostics.ablate_fed_latents("shuffle", h, donor_latents=donors, donor_counts=counts,
                                                    latent_index=idx))
    np.testing.assert_array_equal(got[0], donors[0, 4 % 3])  # cycles over the donor's latents
    np.testing.assert_array_equal(got[1], 0)                 # a donor without latents gives zeros
    np.testing.assert_array_equal(got[2], donors[2, 2])
    np.testing.assert_array_equal(diagnostics.shuffle_donors(3), [1, 2, 0])
