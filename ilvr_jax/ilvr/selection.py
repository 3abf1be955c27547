"""Helper-image candidates and the momentum teacher's selective top-p/top-k choice of
latent targets (ILVR method, sections 3.3-3.5 and 9).

``pool_candidates`` turns the teacher's merged vision features of the helper images into
at most L candidates per segment; ``select_helper_patches`` scans over segments, carrying
the mean of the previous segment's selection, and returns the K targets per segment (the
first K* of them real). ``validate_segments`` checks a numpy batch on the host before any
compilation, so malformed records fail with a message naming the sample.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ilvr_jax.ilvr.query import SpecialTokens


def helper_token_counts(helper_grid_thw: jax.Array, merge_unit: int = 4) -> jax.Array:
    """[B,M] merged tokens per helper image: t*h*w / merge_unit (0 for absent rows)."""
    thw = helper_grid_thw.astype(jnp.int32)
    return thw[..., 0] * thw[..., 1] * thw[..., 2] // merge_unit


def pool_candidates(helper_feats: jax.Array, helper_grid_thw: jax.Array, L: int,
                    merge_unit: int = 4) -> tuple[jax.Array, jax.Array]:
    """Candidates C_m of every helper image: (cands [B,M,L,D] fp32, cand_mask [B,M,L]).

    helper_feats [B,T,D]: merged features of a sample's helper images, image m at rows
    offset_m .. offset_m + P_m - 1 (offsets = cumsum of P), rows past the real tokens ignored.
    With P_m merged tokens of image m:
      P < L : candidate j = token j for j < P (no pooling), the rest masked out;
      P >= L: drop the last P mod L tokens; candidate j = mean of tokens
              [j*(P//L), (j+1)*(P//L)) (consecutive raster-order runs).
    Implemented as one segment-sum per sample (token -> candidate id), so shapes are fixed
    while P varies per image at run time.
    """
    b, t, d = helper_feats.shape
    m = helper_grid_thw.shape[1]
    counts = helper_token_counts(helper_grid_thw, merge_unit)  # [B,M]
    ends = jnp.cumsum(counts, axis=1)
    starts = ends - counts
    pos = jnp.arange(t)
    # Image of each row: number of images that end at or before it.
    img = (pos[None, :, None] >= ends[:, None, :]).sum(-1)  # [B,T]
    in_range = img < m
    img_c = jnp.clip(img, 0, m - 1)
    p = jnp.take_along_axis(counts, img_c, axis=1)
    r = pos[None, :] - jnp.take_along_axis(starts, img_c, axis=1)
    run = jnp.maximum(p // L, 1)
    pooled = p >= L
    cand = jnp.where(pooled, r // run, r)
    keep = in_range & (cand < L) & (r >= 0)
    seg = jnp.where(keep, img_c * L + cand, m * L)  # m*L = the discard bucket

    def one(x, s):
        total = jax.ops.segment_sum(x.astype(jnp.float32), s, num_segments=m * L + 1)[: m * L]
        n = jax.ops.segment_sum(jnp.ones(s.shape, jnp.float32), s, num_segments=m * L + 1)[: m * L]
        return total / jnp.maximum(n, 1.0)[:, None], n > 0

    cands, cmask = jax.vmap(one)(helper_feats, seg)
    return cands.reshape(b, m, L, d), cmask.reshape(b, m, L)


class Selection(NamedTuple):
    """Output of ``select_helper_patches``.

    targets [B,M,K,D] fp32: Z_m in descending score order, rows k >= K* zero.
    kstar [B,M] int32: K* (0 for absent segments).
    indices [B,M,K] int32: candidate index of each target row, -1 for rows k >= K*.
    scores [B,M,L] fp32: s_j = cos(c_j, q_m), -inf at invalid candidates / absent segments.
    probs [B,M,L] fp32: pi = softmax(s) (0 at invalid candidates).
    query [B,M,D] fp32: q_m.
    """

    targets: jax.Array
    kstar: jax.Array
    indices: jax.Array
    scores: jax.Array
    probs: jax.Array
    query: jax.Array


def cosine_similarity(x: jax.Array, y: jax.Array, eps: float = 1e-8, axis: int = -1) -> jax.Array:
    """torch ``F.cosine_similarity`` (torch >= 2.0 formula), in fp32:
    sum( x / max(||x||, eps) * y / max(||y||, eps) )."""
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    nx = jnp.maximum(_safe_norm(x, axis), eps)
    ny = jnp.maximum(_safe_norm(y, axis), eps)
    return jnp.sum((x / nx) * (y / ny), axis=axis)


def _safe_norm(x: jax.Array, axis: int) -> jax.Array:
    """||x|| with a finite gradient at x = 0 (masked-out rows must not turn into NaN
    gradients through ``jnp.where``)."""
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def select_helper_patches(u: jax.Array, t: jax.Array, t_present: jax.Array, cands: jax.Array,
                          cand_mask: jax.Array, segment_mask: jax.Array, K: int,
                          p: float = 0.9) -> Selection:
    """Contextual query and top-p/top-k selection per segment (method sections 3.4-3.5).

    For m = 1..M (``lax.scan``, vectorised over the batch)::

        q_m   = mean of {u, t_m (if t_present), zbar_{m-1} (if m > 1)}   (equal weights)
        s_j   = cos(c_j, q_m)  over valid candidates (invalid: -inf, i.e. pi_j = 0)
        pi    = softmax(s);  sort descending
        K*    = min(K, n_valid, first n (1-based) with cumsum(pi_sorted)_n >= p)
        Z_m   = the first K* of jax.lax.top_k(s, K)  (descending score order)
        zbar_m = mean of Z_m's K* rows

    (``n_valid`` only matters when the cumsum never reaches p, e.g. p = 1 with rounding:
    the reference then takes every candidate.) The cumsum and the ``>= p`` test run in fp32,
    left to right over the sorted probabilities; a value within one ulp of p can resolve
    differently in another implementation.
    u [B,D], t [B,M,D], t_present [B,M], cands [B,M,L,D], cand_mask [B,M,L],
    segment_mask [B,M]. Absent segments give K* = 0, zero targets and leave zbar unchanged.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"coverage p must be in (0, 1], got {p}")
    b, m, l, d = cands.shape
    kk = min(K, l)
    u = u.astype(jnp.float32)

    def step(carry, xs):
        zbar, has_prev = carry
        t_m, tp, c, cm, present = xs
        tpf = tp.astype(jnp.float32)[:, None]
        hpf = has_prev.astype(jnp.float32)[:, None]
        q = (u + tpf * t_m + hpf * zbar) / (1.0 + tpf + hpf)
        s = cosine_similarity(c, q[:, None, :])  # [B,L]
        s = jnp.where(cm, s, -jnp.inf)
        s_safe = jnp.where(cm.any(-1, keepdims=True), s, 0.0)
        pi = jnp.where(cm, jax.nn.softmax(s_safe, axis=-1), 0.0)
        top_s, top_i = jax.lax.top_k(s_safe, kk)  # descending scores, ties: lower index first
        top_pi = jnp.take_along_axis(pi, top_i, axis=-1)
        csum = jnp.cumsum(top_pi, axis=-1)
        hit = csum >= jnp.float32(p)
        first = jnp.where(hit.any(-1), jnp.argmax(hit, axis=-1) + 1, kk)
        n_valid = cm.sum(-1)
        kstar = jnp.minimum(jnp.minimum(first, n_valid), K).astype(jnp.int32)
        kstar = jnp.where(present, kstar, 0)
        sel = jnp.arange(kk)[None, :] < kstar[:, None]  # [B,kk]
        z = jnp.take_along_axis(c, top_i[..., None], axis=1) * sel[..., None]
        idx = jnp.where(sel, top_i, -1).astype(jnp.int32)
        if kk < K:
            z = jnp.pad(z, ((0, 0), (0, K - kk), (0, 0)))
            idx = jnp.pad(idx, ((0, 0), (0, K - kk)), constant_values=-1)
        zmean = z.sum(1) / jnp.maximum(kstar, 1).astype(jnp.float32)[:, None]
        new_zbar = jnp.where(present[:, None], zmean, zbar)
        new_has_prev = has_prev | present
        s_out = jnp.where(present[:, None], s, -jnp.inf)
        pi_out = jnp.where(present[:, None], pi, 0.0)
        return (new_zbar, new_has_prev), (z, kstar, idx, s_out, pi_out, q)

    xs = (jnp.moveaxis(t.astype(jnp.float32), 1, 0), jnp.moveaxis(t_present, 1, 0),
          jnp.moveaxis(cands.astype(jnp.float32), 1, 0), jnp.moveaxis(cand_mask, 1, 0),
          jnp.moveaxis(segment_mask, 1, 0))
    carry0 = (jnp.zeros((b, d), jnp.float32), jnp.zeros((b,), bool))
    _, (z, kstar, idx, s, pi, q) = jax.lax.scan(step, carry0, xs)
    mv = lambda a: jnp.moveaxis(a, 0, 1)
    return Selection(mv(z), mv(kstar), mv(idx), mv(s), mv(pi), mv(q))


def validate_segments(input_ids: np.ndarray, attention_mask: np.ndarray, latent_starts: np.ndarray,
                      segment_mask: np.ndarray, helper_grid_thw: np.ndarray,
                      assistant_start: np.ndarray, K: int, ids: SpecialTokens, *,
                      p: float = 0.9, merge_unit: int = 4, sample_mask: np.ndarray | None = None) -> None:
    """Host-side checks of a numpy batch, run before compilation. Raises ``ValueError``
    naming the first bad sample (padding samples, ``sample_mask`` False, are not checked):

    - p not in (0, 1];
    - more ``<|latent_start|>`` tokens in a sample than the batch's M (segment slots);
    - segment count (``segment_mask``) != ``<|latent_start|>`` count != helper-image count
      (non-zero ``helper_grid_thw`` rows); segment slots not a prefix;
    - a segment not laid out as ``<|latent_start|>`` + exactly K ``<|latent_pad|>`` +
      ``<|latent_end|>`` at ``latent_starts``, outside the attended sequence, before the
      assistant turn, or out of order;
    - a helper image with no merged token.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"coverage p must be in (0, 1], got {p}")
    input_ids = np.asarray(input_ids)
    attention_mask = np.asarray(attention_mask)
    latent_starts = np.asarray(latent_starts)
    segment_mask = np.asarray(segment_mask).astype(bool)
    thw = np.asarray(helper_grid_thw).astype(np.int64)
    assistant_start = np.asarray(assistant_start)
    b, s = input_ids.shape
    m_max = segment_mask.shape[1]
    real = np.ones((b,), bool) if sample_mask is None else np.asarray(sample_mask).astype(bool)
    for i in range(b):
        if not real[i]:
            continue
        ids_i = input_ids[i]
        n_start = int((ids_i == ids.latent_start).sum())
        n_seg = int(segment_mask[i].sum())
        has_img = thw[i].any(-1)
        n_img = int(has_img.sum())
        if n_start > m_max:
            raise ValueError(f"sample {i}: {n_start} latent segments exceed the maximum M = {m_max}")
        if not segment_mask[i, :n_seg].all():
            raise ValueError(f"sample {i}: segment_mask is not a prefix of segment slots")
        if not (n_seg == n_start == n_img):
            raise ValueError(f"sample {i}: segment count mismatch: segment_mask has {n_seg}, "
                             f"{n_start} <|latent_start|> tokens, {n_img} helper images")
        if (has_img != segment_mask[i]).any():
            raise ValueError(f"sample {i}: helper images do not occupy the segment slots")
        prev = int(assistant_start[i])
        for m in range(n_seg):
            ls = int(latent_starts[i, m])
            # Segment 1 comes after the assistant's <|im_start|>; later ones after the
            # previous <|latent_end|>.
            too_early = ls <= prev if m == 0 else ls < prev
            if too_early:
                raise ValueError(f"sample {i}: segment {m} at {ls} is not after position {prev}")
            le = ls + K + 1
            if le >= s or not attention_mask[i, le]:
                raise ValueError(f"sample {i}: segment {m} at {ls} runs past the sequence")
            body = ids_i[ls + 1: le]
            if ids_i[ls] != ids.latent_start or ids_i[le] != ids.latent_end \
                    or (body != ids.latent_pad).any():
                n_pad = int((ids_i[ls + 1:] == ids.latent_pad).cumprod().sum())
                raise ValueError(f"sample {i}: segment {m} at {ls} is not <|latent_start|> + "
                                 f"{K} x <|latent_pad|> + <|latent_end|> (found {n_pad} pads)")
            prev = le + 1
            n_tok = int(thw[i, m, 0] * thw[i, m, 1] * thw[i, m, 2]) // merge_unit
            if n_tok < 1:
                raise ValueError(f"sample {i}: helper image {m} has no merged tokens")
