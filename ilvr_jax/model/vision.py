"""Qwen2.5-VL vision tower: patch embedding, 2-D rotary ViT with window attention, 2x2 merger.

Pure functions over the ``params["visual"]`` subtree (see ``init_vision_params``). Inputs are
per sample so the batch axis shards:

* ``pixel_values [B, P, patch_dim]`` float32: the patches of all images of a sample,
  concatenated in the HF image processor's order and zero-padded to ``P`` (a multiple of 4).
* ``grid_thw [B, I, 3]`` int32: (t, h, w) patch grid of each image; rows of zeros = no image.

Inside an image HF orders patches as ``(t, h/2, w/2, 2, 2)``: every 4 consecutive patches form
one 2x2 merge unit, and merge units run row-major over the ``(h/2, w/2)`` LLM grid. Every
per-patch quantity (image, frame, row, column, window) is computed from ``grid_thw`` with
cumsum / comparison ops, so the whole tower is jit-compatible with fixed shapes.

HF's window attention reorders merge units into windows of
``window_size // spatial_merge_size // patch_size`` merge units per side, attends inside each
window and reverses the order. The tower does the same: patches are sorted into HF's window
order once (``window_permutation``), every window is then a contiguous run of at most
``window_patches`` patches, and the windowed blocks attend in blocks of that length
(``layers.local_segment_attention``: memory linear in P, not P x P). Blocks in
``fullatt_block_indexes`` attend within their own frame of their own image (HF's
``cu_seqlens``: one segment per frame; an image has one frame) with a frame-id mask, a chunk
of queries at a time (``layers.query_chunked_attention``). Padding patches sort to the end; a
padding patch attends only to itself, so it never touches real patches and never produces an
all-masked row (NaN). ``attention_layout="dense"`` keeps the former layout (processor order,
dense P x P block-diagonal masks) as the reference the windowed layout is tested against.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ilvr_jax import sharding
from ilvr_jax.model import layers, rope
from ilvr_jax.model.config import VisionConfig
from ilvr_jax.model.layers import apply_rotary

Params = dict[str, Any]


# ----------------------------------------------------------------------------- layout helpers
def merged_token_counts(grid_thw: jax.Array, merge_size: int) -> jax.Array:
    """Merged (LLM) tokens per image: ``t * h * w // merge_size**2``; ``[..., I]`` int32.

    ``merge_size`` is the spatial merge size (2 for Qwen2.5-VL, i.e. 4 patches per token).
    """
    g = jnp.asarray(grid_thw).astype(jnp.int32)
    return g[..., 0] * g[..., 1] * g[..., 2] // (merge_size * merge_size)


def _segment_index(offsets_end: jax.Array, positions: jax.Array) -> jax.Array:
    """For each position, the index of the segment it falls in, given per-segment exclusive
    cumulative ends ``[B, I]``: ``#{k : ends[k] <= pos}`` (= I past the last segment).
    Empty segments (end == start) are skipped, as searchsorted(side="right") would."""
    return jnp.sum(positions[None, :, None] >= offsets_end[:, None, :], axis=-1).astype(jnp.int32)


def merged_token_image_ids(grid_thw: jax.Array, num_tokens: int, merge_size: int) -> jax.Array:
    """Image index of each merged token of a sample, ``[B, num_tokens]`` int32; -1 past the
    sample's real tokens. Token ``n`` of sample ``b`` belongs to image ``k`` when
    ``cum[k-1] <= n < cum[k]`` with ``cum = cumsum(merged_token_counts)``."""
    ends = jnp.cumsum(merged_token_counts(grid_thw, merge_size), axis=-1)
    img = _segment_index(ends, jnp.arange(num_tokens, dtype=jnp.int32))
    return jnp.where(img < ends.shape[-1], img, -1)


def _exclusive_cumsum(x: jax.Array) -> jax.Array:
    return jnp.cumsum(x, axis=-1) - x


def patch_layout(cfg: VisionConfig, grid_thw: jax.Array, num_patches: int) -> dict[str, jax.Array]:
    """Per-patch coordinates and attention segment ids for ``P = num_patches`` patches.

    Returns ``[B, P]`` int32 arrays (bool for ``valid``):
      image:  image index within the sample (I past the real patches)
      valid:  patch belongs to an image
      row, col: patch coordinates in the image's ``(h, w)`` patch grid (HF rotary positions)
      frame_id: unique per (image, frame) within the sample: full-attention segments
      window_id: unique per (image, frame, window) within the sample: window segments
      window_offset: the patch's place inside its window in HF's window order (merge units
        row-major inside the window, the 4 patches of a unit consecutive)
    Padding patches get ``frame_id = window_id = -1 - p`` (unique), so they form singleton
    segments.
    """
    g = jnp.asarray(grid_thw).astype(jnp.int32)
    t, h, w = g[..., 0], g[..., 1], g[..., 2]  # [B, I]
    m = cfg.spatial_merge_size
    n_img = t * h * w
    ends = jnp.cumsum(n_img, axis=-1)
    starts = ends - n_img
    num_images = g.shape[-2]
    p = jnp.arange(num_patches, dtype=jnp.int32)
    img = _segment_index(ends, p)  # [B, P]
    valid = img < num_images
    k = jnp.minimum(img, num_images - 1)

    def per_patch(a):  # [B, I] -> [B, P], the value of the patch's image
        return jnp.take_along_axis(a, k, axis=-1)

    pt, ph, pw = per_patch(t), per_patch(h), per_patch(w)
    local = p[None, :] - per_patch(starts)
    hw = jnp.maximum(ph * pw, 1)
    frame = local // hw
    r = local % hw
    unit, sub = r // (m * m), r % (m * m)
    llm_w = jnp.maximum(pw // m, 1)
    llm_row, llm_col = unit // llm_w, unit % llm_w
    row = llm_row * m + sub // m
    col = llm_col * m + sub % m

    # Window layout as HF's get_vision_window_index: the LLM grid is padded up to the next
    # multiple of the window side (a whole extra window when already a multiple, which stays
    # empty); windows run row-major per frame.
    ws = cfg.window_size // m // cfg.patch_size
    if ws < 1:
        raise ValueError(f"window_size {cfg.window_size} is smaller than one merge unit")
    nwh = (h // m) // ws + 1
    nww = (w // m) // ws + 1
    windows_per_image = t * nwh * nww
    win_local = (frame * per_patch(nwh) + llm_row // ws) * per_patch(nww) + llm_col // ws
    window_id = per_patch(_exclusive_cumsum(windows_per_image)) + win_local
    frame_id = per_patch(_exclusive_cumsum(t)) + frame
    window_offset = ((llm_row % ws) * ws + llm_col % ws) * (m * m) + sub

    pad_id = -1 - p[None, :]
    zero = jnp.zeros_like(row)
    return {
        "image": img,
        "valid": valid,
        "row": jnp.where(valid, row, zero),
        "col": jnp.where(valid, col, zero),
        "frame_id": jnp.where(valid, frame_id, pad_id),
        "window_id": jnp.where(valid, window_id, pad_id),
        "window_offset": jnp.where(valid, window_offset, zero),
    }


def window_patches(cfg: VisionConfig) -> int:
    """Most patches one attention window holds: (merge units per window side)^2 * 4."""
    ws = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
    return ws * ws * cfg.merge_unit


def window_permutation(cfg: VisionConfig, lay: dict[str, jax.Array]) -> jax.Array:
    """``perm [B, P]``: ``x[perm]`` is HF's window order (``get_vision_window_index`` applied to
    patches): windows in (image, frame, window row, window column) order, each window's
    patches contiguous in ``window_offset`` order, padding patches last."""
    p = jnp.arange(lay["valid"].shape[-1], dtype=jnp.int32)
    key = jnp.where(lay["valid"], lay["window_id"] * window_patches(cfg) + lay["window_offset"],
                    jnp.int32(2 ** 30) + p[None, :])
    return jnp.argsort(key, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- rotary
def rotary_inv_freq(cfg: VisionConfig) -> jax.Array:
    """``1 / theta^(2i / (head_dim/2))`` for i < head_dim/4: one set shared by rows and columns
    (HF's axial ``inv_freq``, rounded as :func:`ilvr_jax.model.rope.rotary_inv_freq` explains)."""
    return jnp.asarray(rope.rotary_inv_freq(cfg.rope_theta, cfg.head_dim // 2))


def rotary_tables(cfg: VisionConfig, row: jax.Array, col: jax.Array) -> tuple[jax.Array, jax.Array]:
    """2-D rotary cos/sin ``[..., head_dim]`` (fp32) for patch coordinates ``row``, ``col``.

    Angles are ``[row * f, col * f]`` (head_dim/2) repeated twice, matching HF's
    ``cat([freq_h, freq_w, freq_h, freq_w])`` used with ``rotate_half``.
    """
    inv = rotary_inv_freq(cfg)
    ang = jnp.concatenate([row[..., None].astype(jnp.float32) * inv,
                           col[..., None].astype(jnp.float32) * inv], axis=-1)
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


# ----------------------------------------------------------------------------- block, merger
def segment_mask(ids: jax.Array) -> jax.Array:
    """Block-diagonal attention mask ``[B, 1, P, P]``: patch q attends to k iff same segment id."""
    return (ids[:, :, None] == ids[:, None, :])[:, None]


def vision_block(p: Params, cfg: VisionConfig, x: jax.Array, cos: jax.Array, sin: jax.Array,
                 mask: jax.Array | layers.SegmentMask | None = None, *, attn_impl: str | None = None,
                 attend: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None
                 ) -> jax.Array:
    """One pre-norm ViT block (params of a single layer, no leading axis):

    ``x = x + proj(attn(rope(q), rope(k), v; mask))`` with q, k, v from ``qkv(norm1(x))``;
    ``x = x + down(silu(gate(norm2(x))) * up(norm2(x)))``. x: [B, P, Dv].
    ``attend(q, k, v)`` replaces the dense-mask attention when given.
    """
    b, n, d = x.shape
    heads = cfg.num_heads
    eps = 1e-6  # HF builds the block norms with a fixed eps
    hn = layers.rms_norm(x, p["norm1"]["scale"], eps)
    qkv = layers.dense(hn, p["attn"]["qkv"])
    # HF splits the fused output as (3, heads, head_dim).
    qkv = qkv.reshape(b, n, 3, heads, cfg.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = sharding.constrain(apply_rotary(q, cos, sin), ("batch", "patches", "act_heads", None))
    k = sharding.constrain(apply_rotary(k, cos, sin), ("batch", "patches", "act_heads", None))
    v = sharding.constrain(v, ("batch", "patches", "act_heads", None))
    o = attend(q, k, v) if attend is not None else layers.attention(q, k, v, mask, attn_impl)
    o = o.reshape(b, n, d)
    x = x + layers.dense(o, p["attn"]["proj"])
    x = sharding.constrain(x, ("batch", "patches", "act_embed"))
    x = x + layers.gated_mlp(layers.rms_norm(x, p["norm2"]["scale"], eps), p["mlp"])
    return sharding.constrain(x, ("batch", "patches", "act_embed"))


def merger(p: Params, cfg: VisionConfig, x: jax.Array) -> jax.Array:
    """2x2 patch merger: ``fc2(gelu(fc1(concat4(ln_q(x)))))``, [B, P, Dv] -> [B, P/4, Dout].

    ``concat4`` joins each merge unit's 4 consecutive patches; GELU is the exact (erf) form
    (torch ``nn.GELU()``); ln_q is an RMSNorm with eps 1e-6.
    """
    b, n, d = x.shape
    u = cfg.merge_unit
    y = layers.rms_norm(x, p["ln_q"]["scale"], 1e-6).reshape(b, n // u, u * d)
    y = jax.nn.gelu(layers.dense(y, p["fc1"]), approximate=False)
    y = sharding.constrain(y, ("batch", "patches", "act_mlp"))
    return layers.dense(y, p["fc2"])


# ----------------------------------------------------------------------------- tower
FULL_ATTENTION_QUERY_CHUNK = 1024


def vision_forward(params_visual: Params, cfg: VisionConfig, pixel_values: jax.Array,
                   grid_thw: jax.Array, *, dtype=jnp.float32, remat_policy: str = "none",
                   attn_impl: str | None = None, attention_layout: str = "windowed",
                   full_attention_chunk: int = FULL_ATTENTION_QUERY_CHUNK) -> jax.Array:
    """Merged vision tokens ``[B, P // 4, out_hidden_size]`` (in ``dtype``) of each sample.

    The tokens of image k of a sample sit at offsets ``cumsum(merged_token_counts)``; rows past
    the sample's real tokens are zero. The patch embedding (HF's Conv3d with stride = kernel)
    is an fp32 matmul over the flattened patch (channel, time, row, col order, as HF's
    ``view(-1, C, T, P, P)``); the blocks run in ``dtype`` under ``lax.scan``.
    ``attention_layout``: "windowed" (HF's window order, memory linear in P for the windowed
    blocks; the full-attention blocks take ``full_attention_chunk`` queries at a time) or
    "dense" (processor order with P x P masks; the reference for tests).
    """
    if attention_layout not in ("windowed", "dense"):
        raise ValueError(f"attention_layout must be 'windowed' or 'dense', got {attention_layout!r}")
    if full_attention_chunk < 1:
        raise ValueError(f"full_attention_chunk must be >= 1 queries, got {full_attention_chunk}")
    b, n, pd = pixel_values.shape
    if pd != cfg.patch_dim:
        raise ValueError(f"pixel_values last dim {pd} != patch_dim {cfg.patch_dim}")
    if n % cfg.merge_unit:
        raise ValueError(f"number of patches {n} is not a multiple of {cfg.merge_unit}")
    lay = patch_layout(cfg, grid_thw, n)
    cos, sin = rotary_tables(cfg, lay["row"], lay["col"])

    x = jnp.einsum("bpi,io->bpo", pixel_values.astype(jnp.float32),
                   params_visual["patch_embed"]["kernel"].astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    x = sharding.constrain(x.astype(dtype), ("batch", "patches", "act_embed"))

    # Per-layer flag, scanned alongside the stacked block params.
    full_flags = [i in cfg.fullatt_block_indexes for i in range(cfg.depth)]
    is_full = jnp.asarray(full_flags, bool)
    blocks = jax.tree.map(lambda a: a.astype(dtype), params_visual["blocks"])
    frame_id, window_id = lay["frame_id"], lay["window_id"]
    if attention_layout == "windowed":
        perm = window_permutation(cfg, lay)
        in_window_order = lambda a: jnp.take_along_axis(  # noqa: E731
            a, perm.reshape(perm.shape + (1,) * (a.ndim - 2)), axis=1)
        x, cos, sin = in_window_order(x), in_window_order(cos), in_window_order(sin)
        frame_id, window_id = in_window_order(frame_id), in_window_order(window_id)

    def windowed(q, k, v):
        return layers.local_segment_attention(q, k, v, window_id, window_patches(cfg), attn_impl)

    def full_frames(q, k, v):
        return layers.query_chunked_attention(q, k, v, frame_id, full_attention_chunk, attn_impl)

    def body(h, xs):
        p_layer, full = xs
        if attention_layout == "dense":
            # Segment ids for this layer: per frame (full attention) or per window.
            ids = jnp.where(full, frame_id, window_id)
            mask = layers.SegmentMask(ids, ids, dense=segment_mask(ids))
            return vision_block(p_layer, cfg, h, cos, sin, mask, attn_impl=attn_impl), None
        if all(full_flags):
            attend = full_frames
        elif not any(full_flags):
            attend = windowed
        else:  # only the taken branch runs
            attend = lambda q, k, v: jax.lax.cond(full, full_frames, windowed, q, k, v)  # noqa: E731
        return vision_block(p_layer, cfg, h, cos, sin, attn_impl=attn_impl, attend=attend), None

    x, _ = jax.lax.scan(layers.remat(body, remat_policy), x, (blocks, is_full))
    if attention_layout == "windowed":  # back to processor order
        inverse = jnp.argsort(perm, axis=-1)
        x = jnp.take_along_axis(x, inverse[..., None], axis=1)

    merger_params = jax.tree.map(lambda a: a.astype(dtype), params_visual["merger"])
    out = merger(merger_params, cfg, x)
    total = jnp.sum(merged_token_counts(grid_thw, cfg.spatial_merge_size), axis=-1)  # [B]
    real = jnp.arange(n // cfg.merge_unit)[None, :] < total[:, None]
    out = jnp.where(real[..., None], out, jnp.zeros((), out.dtype))
    return sharding.constrain(out, ("batch", "patches", "act_embed"))


# ----------------------------------------------------------------------------- params
# Standard deviation of a unit normal truncated to [-2, 2]; dividing by it gives kernels the
# requested standard deviation.
_TRUNC_STD = 0.87962566


def _normal(rng, shape, dtype, std=0.02):
    x = jax.random.truncated_normal(rng, -2.0, 2.0, shape, jnp.float32)
    return (x * (std / _TRUNC_STD)).astype(dtype)


def init_vision_params(cfg: VisionConfig, rng: jax.Array, dtype=jnp.float32) -> Params:
    """Random vision params: truncated-normal kernels (std 0.02), zero biases, unit norm scales."""
    dv, iv, lv = cfg.hidden_size, cfg.intermediate_size, cfg.depth
    mi = cfg.merge_unit * dv
    keys = iter(jax.random.split(rng, 8))
    zeros = lambda *s: jnp.zeros(s, dtype)  # noqa: E731
    ones = lambda *s: jnp.ones(s, dtype)  # noqa: E731
    return {
        "patch_embed": {"kernel": _normal(next(keys), (cfg.patch_dim, dv), dtype)},
        "blocks": {
            "norm1": {"scale": ones(lv, dv)},
            "norm2": {"scale": ones(lv, dv)},
            "attn": {
                "qkv": {"kernel": _normal(next(keys), (lv, dv, 3 * dv), dtype), "bias": zeros(lv, 3 * dv)},
                "proj": {"kernel": _normal(next(keys), (lv, dv, dv), dtype), "bias": zeros(lv, dv)},
            },
            "mlp": {
                "gate_proj": {"kernel": _normal(next(keys), (lv, dv, iv), dtype), "bias": zeros(lv, iv)},
                "up_proj": {"kernel": _normal(next(keys), (lv, dv, iv), dtype), "bias": zeros(lv, iv)},
                "down_proj": {"kernel": _normal(next(keys), (lv, iv, dv), dtype), "bias": zeros(lv, dv)},
            },
        },
        "merger": {
            "ln_q": {"scale": ones(dv)},
            "fc1": {"kernel": _normal(next(keys), (mi, mi), dtype), "bias": zeros(mi)},
            "fc2": {"kernel": _normal(next(keys), (mi, cfg.out_hidden_size), dtype),
                    "bias": zeros(cfg.out_hidden_size)},
        },
    }


def vision_param_axes(cfg: VisionConfig) -> Params:
    """The params tree with a tuple of logical axis names in place of every leaf."""
    del cfg  # the names do not depend on sizes
    L, E, Q, M = "layers", "vision_embed", "qkv", "vision_mlp"
    return {
        "patch_embed": {"kernel": ("patch_in", E)},
        "blocks": {
            "norm1": {"scale": (L, "norm")},
            "norm2": {"scale": (L, "norm")},
            "attn": {
                "qkv": {"kernel": (L, E, Q), "bias": (L, Q)},
                "proj": {"kernel": (L, Q, E), "bias": (L, E)},
            },
            "mlp": {
                "gate_proj": {"kernel": (L, E, M), "bias": (L, M)},
                "up_proj": {"kernel": (L, E, M), "bias": (L, M)},
                "down_proj": {"kernel": (L, M, E), "bias": (L, E)},
            },
        },
        "merger": {
            "ln_q": {"scale": ("norm",)},
            "fc1": {"kernel": ("merger_in", M), "bias": (M,)},
            "fc2": {"kernel": (M, "embed"), "bias": ("embed",)},
        },
    }
