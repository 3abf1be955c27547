"""Multimodal rotary position embedding (M-RoPE) of Qwen2.5-VL.

Two parts:

* :func:`mrope_position_ids` builds the 3-D (temporal, height, width) position ids of a
  token sequence that interleaves text and images, with the semantics of HF's
  ``Qwen2_5_VLModel.get_rope_index``. Only tokens with ``attention_mask == 1`` are counted;
  text token ``j`` (0-based among the valid tokens, after the images before it) gets the
  same id on all three axes, an image with llm grid ``(t, h, w) = (T, H/2, W/2)`` that starts
  at position ``s`` gives its token ``(ti, hi, wi)`` the ids ``(s + ti, s + hi, s + wi)``, and
  the text after the image continues at ``s + max(H, W) / 2`` (HF's rule; for a still image,
  ``t = 1``, that is ``max(image ids) + 1``). Padded positions get HF's filler 0.
  ``rope_deltas[b] = max(ids of b) + 1 - (number of valid tokens of b)``: during generation
  the next token's id on all three axes is ``(number of valid tokens so far) + rope_deltas``.

* :func:`mrope_cos_sin` / :func:`apply_mrope`: the chunked rotary embedding. With
  ``inv_freq[j] = theta^(-2j / head_dim)`` for ``j < head_dim / 2`` (:func:`rotary_inv_freq`), frequency ``j`` uses the
  position of axis ``a(j)``, where ``mrope_section = (s0, s1, s2)`` assigns the first ``s0``
  frequencies to the temporal axis, the next ``s1`` to height and the last ``s2`` to width.
  The angle vector is then doubled (``[f, f]``) and applied as
  ``x * cos + rotate_half(x) * sin`` (HF's ``apply_multimodal_rotary_pos_emb``). cos/sin and
  the rotation are computed in fp32.

Everything is fixed-shape and jit-compatible: cumulative sums and gathers, no loop over
tokens or samples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ilvr_jax.model.config import ModelConfig, TextConfig
from ilvr_jax.model.layers import apply_rotary, rotate_half  # noqa: F401  (shared with the vision tower)


def mrope_position_ids(input_ids: jax.Array, attention_mask: jax.Array | None,
                       image_grid_thw: jax.Array | None, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """3-D M-RoPE position ids for text + image sequences (HF ``get_rope_index``).

    Args:
      input_ids: [B, S] int. Image k of a sample is the k-th run of ``cfg.image_token_id``
        tokens among its valid tokens, and must hold ``t * h * w / merge**2`` tokens.
      attention_mask: [B, S] (1 = real token) or None (all real). Left, right or any padding.
      image_grid_thw: [B, I, 3] int patch grids (t, h, w) of each sample's images in order;
        rows past a sample's images are ignored (zeros). None or I == 0: text only.
      cfg: the model config (image token id, spatial merge size).

    Returns:
      position_ids [3, B, S] int32 (0 at padded positions), rope_deltas [B] int32.
    """
    input_ids = jnp.asarray(input_ids)
    b, s = input_ids.shape
    valid = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    # Index of each token among the valid tokens of its sample (HF drops padding first).
    compact = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
    pos_idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))

    is_img = (input_ids == cfg.image_token_id) & valid
    # An image run starts at an image token whose previous *valid* token is not an image token.
    last_valid_before = jax.lax.cummax(jnp.where(valid, pos_idx, -1), axis=1)
    last_valid_before = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), last_valid_before[:, :-1]], axis=1)
    prev_is_img = jnp.where(last_valid_before >= 0,
                            jnp.take_along_axis(is_img, jnp.maximum(last_valid_before, 0), axis=1), False)
    run_start = is_img & ~prev_is_img
    runs_so_far = jnp.cumsum(run_start.astype(jnp.int32), axis=1)  # inclusive count of image runs

    if image_grid_thw is None or image_grid_thw.shape[1] == 0:
        grid = jnp.zeros((b, 1, 3), jnp.int32)
    else:
        grid = jnp.asarray(image_grid_thw).astype(jnp.int32)
    n_img = grid.shape[1]
    m = cfg.vision.spatial_merge_size
    llm_t = grid[..., 0]
    llm_h = grid[..., 1] // m
    llm_w = grid[..., 2] // m
    n_tokens = llm_t * llm_h * llm_w  # [B, I] image tokens of each image
    span = jnp.maximum(grid[..., 1], grid[..., 2]) // m  # [B, I] positions each image advances
    # shift[b, k] = sum_{j<k} (span_j - n_tokens_j): how far the ids of everything after the
    # first k images are moved relative to the plain valid-token index.
    shift = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.cumsum(span - n_tokens, axis=1)], axis=1)

    # Text tokens: valid index + shift of the images before them.
    text_pos = compact + jnp.take_along_axis(shift, jnp.clip(runs_so_far, 0, n_img), axis=1)

    # Image tokens: the image's start id plus (t, h, w) grid offsets in row-major order.
    img_k = jnp.clip(runs_so_far - 1, 0, n_img - 1)
    run_start_compact = jax.lax.cummax(jnp.where(run_start, compact, -1), axis=1)
    offset = compact - run_start_compact  # index of the token inside its image
    start = run_start_compact + jnp.take_along_axis(shift, img_k, axis=1)
    hh = jnp.maximum(jnp.take_along_axis(llm_h, img_k, axis=1), 1)
    ww = jnp.maximum(jnp.take_along_axis(llm_w, img_k, axis=1), 1)
    img_pos = jnp.stack([start + offset // (hh * ww), start + (offset // ww) % hh, start + offset % ww])

    pos = jnp.where(is_img[None], img_pos, text_pos[None])
    pos = jnp.where(valid[None], pos, 0).astype(jnp.int32)
    n_valid = jnp.sum(valid, axis=1, dtype=jnp.int32)
    max_pos = jnp.max(jnp.where(valid[None], pos, jnp.iinfo(jnp.int32).min), axis=(0, 2))
    rope_deltas = jnp.where(n_valid > 0, max_pos + 1 - n_valid, 0).astype(jnp.int32)
    return pos, rope_deltas


def text_position_ids(attention_mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """[3, B, S] ids of plain text: valid-token index (+ ``offset`` [B] or scalar), 0 at padding."""
    valid = jnp.asarray(attention_mask).astype(bool)
    pos = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1 + jnp.asarray(offset, jnp.int32).reshape(-1, 1)
    pos = jnp.where(valid, pos, 0)
    return jnp.broadcast_to(pos[None], (3,) + pos.shape).astype(jnp.int32)


def _section_axis(cfg: TextConfig) -> np.ndarray:
    """For each of the head_dim/2 frequencies, the position axis (0 t, 1 h, 2 w) it reads."""
    axis = np.concatenate([np.full(n, i % 3, np.int32) for i, n in enumerate(cfg.mrope_section)])
    if axis.shape[0] * 2 != cfg.head_dim:
        raise ValueError(f"mrope_section {cfg.mrope_section} does not cover head_dim {cfg.head_dim}")
    return axis


def rotary_inv_freq(theta: float, dim: int) -> np.ndarray:
    """``1 / theta^(2j / dim)`` for ``j < dim / 2`` in float32, as HF's rotary ``inv_freq``.

    HF forms the exponent ``arange(0, dim, 2) / dim`` and the power in float32. A float32 power
    from NumPy or XLA is off by one ulp in many entries (14 of 64 at dim 128, theta 1e6) and an
    angle ``position * inv_freq`` inherits the error times the position: cos/sin drift by up to
    8e-3 at position 128k. The power is therefore taken in float64 from the same float32
    operands and rounded once to float32, which is the correctly rounded float32 power (what
    torch's scalar kernel, libm's powf, returns); the reciprocal stays in float32 as in HF.
    This is bit for bit what HF computes where torch runs its scalar CPU kernels
    (``ATEN_CPU_CAPABILITY=default``). Its AVX2 / AVX-512 kernels (SLEEF's 1-ulp power) round
    the odd near-tie the other way (1 entry of 64 at dim 128, theta 1e6: about 4e-6 of cos/sin
    at position 128k) and cover a length-dependent share of the entries, so HF's own buffer
    differs between machines and no fixed formula matches it on all of them.
    """
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    power = np.power(np.float64(np.float32(theta)), exponent.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / power


def mrope_cos_sin(position_ids: jax.Array, cfg: TextConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, S, head_dim] (fp32) of the chunked M-RoPE for position_ids [3, B, S]."""
    inv_freq = rotary_inv_freq(cfg.rope_theta, cfg.head_dim)
    axis = _section_axis(cfg)
    # pos_per_freq[b, s, j] = position_ids[axis[j], b, s]; the angle is one float32 product
    # (position * inv_freq), as in HF, before cos and sin.
    pos = jnp.asarray(position_ids).astype(jnp.float32)[axis]  # [hd/2, B, S]
    angles = jnp.moveaxis(pos, 0, -1) * jnp.asarray(inv_freq, jnp.float32)  # [B, S, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_mrope(q: jax.Array, k: jax.Array, position_ids: jax.Array,
                cfg: TextConfig) -> tuple[jax.Array, jax.Array]:
    """Chunked M-RoPE on q [B, S, Hq, D] and k [B, S, Hkv, D] for position_ids [3, B, S]."""
    cos, sin = mrope_cos_sin(position_ids, cfg)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
