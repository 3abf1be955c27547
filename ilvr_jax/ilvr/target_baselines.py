"""Latent targets of the baselines the paper compares against, in the layout of
``select_helper_patches`` (a :class:`Selection`), so the step trains them unchanged.

``random_helper_patches``: the selection ablation. Per segment the same number of targets
as the momentum teacher chose (its K*), but drawn uniformly without replacement from the
segment's valid candidates: only *which* patches are predicted changes.

``mean_pooled_targets``: Mirage-style latents. Each segment's valid candidates, in raster
order, are cut into K consecutive runs and each run is averaged: K targets that summarise
the whole helper image with no selection at all (K* = min(K, valid candidates)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ilvr_jax.ilvr.selection import Selection

TARGET_SELECTIONS = ("teacher", "random", "mean_pool")


def _selection(targets, kstar, indices, cand_mask, segment_mask) -> Selection:
    b, m, l = cand_mask.shape
    present = segment_mask.astype(bool)
    scores = jnp.where(present[..., None] & cand_mask, 0.0, -jnp.inf).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(cand_mask, -1, keepdims=True), 1).astype(jnp.float32)
    probs = jnp.where(present[..., None] & cand_mask, 1.0 / n, 0.0).astype(jnp.float32)
    query = jnp.zeros((b, m, targets.shape[-1]), jnp.float32)
    return Selection(targets.astype(jnp.float32), kstar.astype(jnp.int32), indices.astype(jnp.int32),
                     scores, probs, query)


def random_helper_patches(key: jax.Array, cands: jax.Array, cand_mask: jax.Array,
                          segment_mask: jax.Array, kstar: jax.Array, K: int) -> Selection:
    """Z_m = K*_m candidates of segment m drawn uniformly without replacement.

    cands [B,M,L,D], cand_mask [B,M,L], segment_mask [B,M], kstar [B,M] (the teacher's K*,
    the number of targets to draw; clipped to the valid candidates). Drawn as the top-K of
    i.i.d. uniform scores over the valid candidates (a uniform random subset, in random
    order). Rows k >= K* are zero, ``indices`` -1 there."""
    b, m, l, d = cands.shape
    kk = min(K, l)
    noise = jax.random.uniform(key, (b, m, l))
    noise = jnp.where(cand_mask, noise, -1.0)
    _, idx = jax.lax.top_k(noise, kk)                                        # [B,M,kk]
    n_valid = jnp.sum(cand_mask, -1)
    kstar = jnp.where(segment_mask.astype(bool), jnp.minimum(kstar, n_valid), 0)
    sel = jnp.arange(kk) < kstar[..., None]
    z = jnp.take_along_axis(cands.astype(jnp.float32), idx[..., None], axis=2) * sel[..., None]
    idx = jnp.where(sel, idx, -1)
    if kk < K:
        z = jnp.pad(z, ((0, 0), (0, 0), (0, K - kk), (0, 0)))
        idx = jnp.pad(idx, ((0, 0), (0, 0), (0, K - kk)), constant_values=-1)
    return _selection(z, kstar, idx, cand_mask, segment_mask)


def mean_pooled_targets(cands: jax.Array, cand_mask: jax.Array, segment_mask: jax.Array,
                        K: int) -> Selection:
    """Z_m[k] = mean of the valid candidates j of segment m with floor(j * K / n) == k.

    With n valid candidates (the first n of the L rows, as ``pool_candidates`` lays them
    out): n >= K gives K runs of consecutive candidates of near-equal length (the run sizes
    differ by at most one); n < K gives the n candidates themselves, K* = n. ``indices``
    holds each run's first candidate."""
    b, m, l, d = cands.shape
    n = jnp.sum(cand_mask, -1)                                               # [B,M]
    j = jnp.arange(l)
    # n >= K: K near-equal runs; n < K: every candidate is its own target.
    group = jnp.where(n[..., None] >= K, (j[None, None, :] * K) // jnp.maximum(n, 1)[..., None],
                      j[None, None, :])                                      # [B,M,L]
    onehot = (group[..., None] == jnp.arange(K)) & cand_mask[..., None]     # [B,M,L,K]
    w = onehot.astype(jnp.float32)
    total = jnp.einsum("bmlk,bmld->bmkd", w, cands.astype(jnp.float32))
    count = jnp.sum(w, axis=2)                                               # [B,M,K]
    present = segment_mask.astype(bool)
    kstar = jnp.where(present, jnp.minimum(n, K), 0)
    sel = (jnp.arange(K) < kstar[..., None]) & (count > 0)
    z = jnp.where(sel[..., None], total / jnp.maximum(count, 1.0)[..., None], 0.0)
    first = jnp.argmax(onehot, axis=2)                                       # [B,M,K]
    idx = jnp.where(sel, first, -1)
    return _selection(z, kstar, idx, cand_mask, segment_mask)
