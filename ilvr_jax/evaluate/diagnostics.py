"""Latent diagnostics: does the model's answer depend on the latents it feeds itself?

The same evaluation is run with the vector fed at every ``<|latent_pad|>`` step replaced
(:func:`ablate_fed_latents`, applied inside the compiled decode loop when
``DecodeConfig.latent_ablation`` names a mode):

* ``zeros``: the zero vector;
* ``pad``: the ``<|latent_pad|>`` token's input embedding (what a model without latent
  feedback would read);
* ``shuffle``: the latents another row of the evaluation fed in its normal run (row r's
  j-th pad gets the donor's j-th latent, cycling when the donor fed fewer; zeros when the
  donor fed none). Donors are a fixed derangement, :func:`shuffle_donors`;
* ``noise``: Gaussian noise rescaled to the norm of the vector it replaces (seeded).

Accuracy differences against the normal run get a paired bootstrap confidence interval
(:func:`paired_bootstrap`): samples are resampled with replacement and the difference of
the two accuracies is taken on the same resampled samples, so the interval reflects
per-sample changes, not the spread of either accuracy alone.

The replacements themselves are ILVR's decode-loop rules (``ilvr_jax.ilvr.latent_ablation``);
this module names the modes for the evaluation and holds the donor layout and the bootstrap.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ilvr_jax.ilvr.latent_ablation import (ABLATIONS, NONE, ablate_fed_latents, check_ablation,  # noqa: F401
                                          noise_like)

NORMAL = "normal"


def parse_ablations(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"zeros,noise"`` (or a sequence) -> ``("zeros", "noise")``: known names, no repeats."""
    if spec is None:
        return ()
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    out: list[str] = []
    for n in names:
        if not n:
            continue
        if n == NONE or n == NORMAL:
            raise ValueError(f"--ablate {n!r}: the normal run is always made; name ablations only "
                             f"({', '.join(ABLATIONS)})")
        check_ablation(n)
        if n not in out:
            out.append(n)
    return tuple(out)


def shuffle_donors(n: int) -> np.ndarray:
    """A fixed derangement of ``n >= 2`` rows: row r takes row (r + 1) mod n."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 rows, got {n}")
    return (np.arange(n) + 1) % n


def donor_arrays(latents: Sequence[np.ndarray], donors: Sequence[int], rows: int, dim: int, *,
                 length: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(donor_latents [rows, J, dim] fp32, donor_counts [rows] int32) for the decode loop:
    row r holds ``latents[donors[r]]``; rows past ``len(donors)`` (filler rows) are empty.
    J is the smallest power of two >= the longest donor and ``length``, so batches share
    compiled shapes."""
    longest = max([len(latents[d]) for d in donors] + [int(length), 1])
    j = 1 << (longest - 1).bit_length()
    out = np.zeros((rows, j, dim), np.float32)
    counts = np.zeros((rows,), np.int32)
    for r, d in enumerate(donors):
        lat = np.asarray(latents[d], np.float32).reshape(-1, dim)
        out[r, : len(lat)] = lat
        counts[r] = len(lat)
    return out, counts


def paired_bootstrap(base: Sequence[bool], other: Sequence[bool], *, n_resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Accuracy difference ``mean(other) - mean(base)`` of paired per-sample correctness
    vectors with a percentile bootstrap interval.

    Each resample draws ``n`` sample indices with replacement (``numpy.random.default_rng(seed)``,
    one ``integers(0, n, size=(n_resamples, n))`` draw) and takes the difference of the two
    accuracies on those indices; the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2``
    percentiles (NumPy's linear interpolation) of the resampled differences.
    """
    a = np.asarray(base, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired correctness vectors must be 1-D of equal length, got {a.shape} and {b.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    n = a.shape[0]
    if n == 0:
        return dict(diff=float("nan"), low=float("nan"), high=float("nan"), n=0, n_resamples=n_resamples,
                    level=level)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    diffs = b[idx].mean(axis=1) - a[idx].mean(axis=1)
    low, high = np.percentile(diffs, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return dict(diff=float(b.mean() - a.mean()), low=float(low), high=float(high), n=int(n),
                n_resamples=int(n_resamples), level=float(level))
