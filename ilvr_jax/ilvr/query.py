"""The teacher-side context of the contextual query: the user summary u and the
per-segment text means t_m (ILVR method, sections 3.2, 3.4 and 9).

Everything here is a pure function of arrays the teacher forward already produced (last
hidden states after the final norm ``H``, the teacher's input token embeddings, the
teacher's question-image vision features, the last decoder layer's q/k projections).
Shapes are fixed; which positions count is decided by masks, so the functions are jit- and
vmap-friendly and run on the whole batch at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Token ids the ILVR maths needs (hashable: usable as a static jit argument)."""

    image: int
    vision_start: int
    vision_end: int
    latent_pad: int
    latent_start: int
    latent_end: int

    @classmethod
    def from_config(cls, cfg) -> "SpecialTokens":
        """From a ``ModelConfig`` (its latent ids must be set)."""
        missing = [n for n in ("latent_pad_token_id", "latent_start_token_id", "latent_end_token_id")
                   if getattr(cfg, n) is None]
        if missing:
            raise ValueError(f"model config has no latent token ids ({', '.join(missing)})")
        return cls(image=cfg.image_token_id, vision_start=cfg.vision_start_token_id,
                   vision_end=cfg.vision_end_token_id, latent_pad=cfg.latent_pad_token_id,
                   latent_start=cfg.latent_start_token_id, latent_end=cfg.latent_end_token_id)

    @property
    def structural(self) -> tuple[int, ...]:
        """Latent pad/start/end and vision start/end: never text, never image."""
        return (self.latent_pad, self.latent_start, self.latent_end, self.vision_start, self.vision_end)


def _is_any(input_ids: jax.Array, token_ids: tuple[int, ...]) -> jax.Array:
    out = jnp.zeros(input_ids.shape, bool)
    for t in token_ids:
        out = out | (input_ids == t)
    return out


def _masked_mean(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """mean over axis -2 of ``x [..., S, D]`` where ``mask [..., S]``; zeros when empty.
    Returns (mean, count)."""
    m = mask.astype(jnp.float32)
    count = m.sum(-1)
    total = jnp.einsum("...s,...sd->...d", m, x.astype(jnp.float32))
    return total / jnp.maximum(count, 1.0)[..., None], count


def prompt_masks(input_ids: jax.Array, attention_mask: jax.Array, assistant_start: jax.Array,
                 ids: SpecialTokens) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Masks over the user side (positions before the assistant turn's ``<|im_start|>``).

    Returns ``(text [B,S], image [B,S], before [B,S])``: ``before`` = attended positions
    before ``assistant_start``; ``image`` = those holding the image token; ``text`` = those
    that are neither image tokens nor structural tokens (latent pad/start/end, vision
    start/end), i.e. the method's "prompt text positions".
    """
    pos = jnp.arange(input_ids.shape[1])[None, :]
    before = (pos < assistant_start[:, None]) & (attention_mask > 0)
    image = before & (input_ids == ids.image)
    text = before & ~image & ~_is_any(input_ids, ids.structural)
    return text, image, before


def _image_attention_weights(H: jax.Array, text_mask: jax.Array, image_mask: jax.Array,
                             q_proj: Params, k_proj: Params, num_heads: int, num_kv_heads: int,
                             query_chunk: int) -> jax.Array:
    """w [B,S]: w_j = mean_{h, i in text} softmax_{j in image}(q_ih . k_jh / sqrt(d_head)),
    then renormalised: w <- w / (sum_j w_j + 1e-9). Zero outside image positions.

    Queries are processed in chunks of ``query_chunk`` positions (``lax.scan``) so the
    [heads, queries, keys] logits never exist for the whole sequence at once.
    """
    b, s, d = H.shape
    hd = q_proj["kernel"].shape[-1] // num_heads
    rep = num_heads // num_kv_heads
    h32 = H.astype(jnp.float32)
    k = (h32 @ k_proj["kernel"].astype(jnp.float32) + k_proj["bias"].astype(jnp.float32))
    k = k.reshape(b, s, num_kv_heads, hd)
    # GQA: query head h reads kv head h // rep (torch's expand+reshape = repeat_interleave).
    k = jnp.repeat(k, rep, axis=2)  # [B,S,Hq,hd]

    n_chunks = -(-s // query_chunk)
    pad = n_chunks * query_chunk - s
    hq_in = jnp.pad(h32, ((0, 0), (0, pad), (0, 0))).reshape(b, n_chunks, query_chunk, d)
    tm = jnp.pad(text_mask, ((0, 0), (0, pad))).reshape(b, n_chunks, query_chunk)
    scale = 1.0 / jnp.sqrt(jnp.float32(hd))
    any_image = image_mask.any(-1)

    def chunk_weights(x, qmask):
        q = x @ q_proj["kernel"].astype(jnp.float32) + q_proj["bias"].astype(jnp.float32)
        q = q.reshape(b, query_chunk, num_heads, hd)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
        logits = jnp.where(image_mask[:, None, None, :], logits, -jnp.inf)
        # Rows with no image key at all would be NaN; they are never used (fallback u).
        logits = jnp.where(any_image[:, None, None, None], logits, 0.0)
        probs = jax.nn.softmax(logits, axis=-1)
        probs = probs * qmask[:, None, :, None].astype(jnp.float32)
        return probs.sum(axis=(1, 2))

    def body(acc, chunk):
        x, qmask = chunk  # [B,C,D], [B,C]
        # Most chunks (the assistant turn, padding) hold no prompt text: skip their work.
        w = jax.lax.cond(qmask.any(), chunk_weights, lambda *_: jnp.zeros((b, s), jnp.float32),
                         x, qmask)
        return acc + w, None

    acc0 = jnp.zeros((b, s), jnp.float32)
    acc, _ = jax.lax.scan(body, acc0, (jnp.moveaxis(hq_in, 1, 0), jnp.moveaxis(tm, 1, 0)))
    n_text = text_mask.sum(-1).astype(jnp.float32)
    w = acc / (num_heads * jnp.maximum(n_text, 1.0))[:, None]
    w = jnp.where(image_mask, w, 0.0)
    return w / (w.sum(-1, keepdims=True) + 1e-9)


def image_rows(grid_thw: jax.Array, num_rows: int, merge_unit: int = 4
               ) -> tuple[jax.Array, jax.Array]:
    """Image number and validity of each merged-feature row of a sample's images:
    (image_index [B,num_rows] int32, valid [B,num_rows] bool). grid_thw [B,I,3] (zero rows
    = no image); image i has t*h*w / merge_unit rows, images consecutive in order."""
    thw = grid_thw.astype(jnp.int32)
    counts = thw[..., 0] * thw[..., 1] * thw[..., 2] // merge_unit
    ends = jnp.cumsum(counts, axis=1)
    pos = jnp.arange(num_rows)
    idx = (pos[None, :, None] >= ends[:, None, :]).sum(-1).astype(jnp.int32)
    return jnp.minimum(idx, grid_thw.shape[1] - 1), pos[None, :] < ends[:, -1:]


def grouped_mean_weights(image_index: jax.Array, valid: jax.Array, num_groups: int = 8) -> jax.Array:
    """Per-token weights [B,T] such that sum_t w_t x_t = mean over images i of the mean of
    ``num_groups`` grouped means of image i's tokens (fallback u, method section 9).

    Grouping of one image with P tokens (contiguous, in order), G = num_groups:
      P >= G: drop the last P mod G tokens, G consecutive runs of P // G tokens, each
              averaged (torch ``x[:G*(P//G)].view(G, P//G, D).mean(1)``);
      0 < P < G: the P tokens are tiled cyclically to G rows (``x.repeat(ceil(G/P), 1)[:G]``),
              so token r is counted G // P + (r < G mod P) times out of G.
    Images are the distinct values of ``image_index`` among ``valid`` tokens.
    """
    b, t = image_index.shape
    pos = jnp.arange(t)
    nseg = t  # at most T images; scalar segment ops only, so this stays cheap

    def one(idx, ok):
        seg = jnp.where(ok, idx, nseg)
        count = jax.ops.segment_sum(ok.astype(jnp.int32), seg, num_segments=nseg + 1)[:nseg]
        first = jax.ops.segment_min(jnp.where(ok, pos, t), seg, num_segments=nseg + 1)[:nseg]
        n_images = (count > 0).sum()
        p = count[jnp.clip(seg, 0, nseg - 1)]
        r = pos - first[jnp.clip(seg, 0, nseg - 1)]
        q = p // num_groups
        big = (r < q * num_groups).astype(jnp.float32) / (num_groups * jnp.maximum(q, 1))
        reps = (num_groups // jnp.maximum(p, 1) + (r < num_groups % jnp.maximum(p, 1))).astype(jnp.float32)
        small = reps / num_groups
        w = jnp.where(p >= num_groups, big, small)
        return jnp.where(ok, w, 0.0) / jnp.maximum(n_images, 1).astype(jnp.float32)

    return jax.vmap(one)(image_index, valid)


def user_summary(H: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                 assistant_start: jax.Array, q_proj: Params, k_proj: Params, *,
                 num_heads: int, num_kv_heads: int, ids: SpecialTokens,
                 token_embeds: jax.Array, question_feats: jax.Array,
                 question_image_index: jax.Array, question_feat_mask: jax.Array,
                 num_groups: int = 8, query_chunk: int = 256) -> jax.Array:
    """User-side summary u [B,D] (method section 3.2, fallback in section 9).

    H [B,S,D]: teacher last hidden states after the final norm. q_proj/k_proj: the
    teacher's LAST decoder layer's ``{"kernel": [D, H*hd], "bias": [H*hd]}``.
    token_embeds [B,S,D]: the teacher's input token embeddings (plain token rows).
    question_feats [B,T,D]: the teacher's merged question-image vision features;
    question_image_index [B,T] int: image number of each row; question_feat_mask [B,T].

    Main path (the sample has prompt text positions AND image tokens before the marker)::

        q_i = H_i Wq + bq  (i in text),   k_j = H_j Wk + bk  (j in image), per head, no rotary
        w_j = mean_{h,i} softmax_j(q_ih . k_jh / sqrt(d_head));  w <- w / (sum w + 1e-9)
        r_img = sum_j w_j H_j,   r_txt = mean_{i in text} H_i,   u = (r_img + r_txt) / 2

    Fallback (no image token or no prompt text before the marker)::

        u_text = mean of token_embeds over attended positions before the marker that are not
                 latent pad/start/end or vision start/end (image-pad tokens DO count: the
                 reference excludes only those five ids); if that set is empty, the mean
                 over all attended positions before max(1, assistant_start)
        u_img  = mean over question images of the mean of their ``num_groups`` grouped
                 means (see ``grouped_mean_weights``), only if the sample has question
                 features
        u      = mean(u_text, u_img) over the parts that exist
    """
    text, image, before = prompt_masks(input_ids, attention_mask, assistant_start, ids)
    w = _image_attention_weights(H, text, image, q_proj, k_proj, num_heads, num_kv_heads, query_chunk)
    h32 = H.astype(jnp.float32)
    r_img = jnp.einsum("bs,bsd->bd", w, h32)
    r_txt, n_text = _masked_mean(h32, text)
    u_main = 0.5 * (r_img + r_txt)

    # Fallback.
    pos = jnp.arange(input_ids.shape[1])[None, :]
    fb_mask = before & ~_is_any(input_ids, ids.structural)
    fb_any = fb_mask.any(-1, keepdims=True)
    last_resort = (pos < jnp.maximum(assistant_start, 1)[:, None]) & (attention_mask > 0)
    u_text, _ = _masked_mean(token_embeds, jnp.where(fb_any, fb_mask, last_resort))
    gw = grouped_mean_weights(question_image_index, question_feat_mask, num_groups)
    u_img = jnp.einsum("bt,btd->bd", gw, question_feats.astype(jnp.float32))
    has_q_img = question_feat_mask.any(-1)[:, None]
    u_fb = jnp.where(has_q_img, 0.5 * (u_text + u_img), u_text)

    use_main = (n_text > 0) & image.any(-1)
    return jnp.where(use_main[:, None], u_main, u_fb)


def segment_text_masks(input_ids: jax.Array, attention_mask: jax.Array, latent_starts: jax.Array,
                       segment_mask: jax.Array, assistant_start: jax.Array, K: int,
                       ids: SpecialTokens) -> jax.Array:
    """[B,M,S] mask of the text span before segment m: positions j with
    start_m <= j < latent_starts[m], start_1 = assistant_start (the ``<|im_start|>``,
    inclusive), start_m = latent_end_{m-1} + 1 = latent_starts[m-1] + K + 2; latent
    pad/start/end and vision start/end tokens excluded; attended positions only."""
    prev_end = latent_starts[:, :-1] + K + 2
    starts = jnp.concatenate([assistant_start[:, None], prev_end], axis=1)  # [B,M]
    pos = jnp.arange(input_ids.shape[1])[None, None, :]
    span = (pos >= starts[..., None]) & (pos < latent_starts[..., None])
    ok = (attention_mask > 0) & ~_is_any(input_ids, ids.structural)
    return span & ok[:, None, :] & segment_mask[..., None]


def segment_text_means(H: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                       latent_starts: jax.Array, segment_mask: jax.Array,
                       assistant_start: jax.Array, K: int, ids: SpecialTokens
                       ) -> tuple[jax.Array, jax.Array]:
    """t [B,M,D], t_present [B,M] (method section 3.4).

    t_m = mean_{j in span_m} H_j with span_m = tokens after the previous segment's
    ``<|latent_end|>`` (for m = 1: from the assistant turn's ``<|im_start|>``, inclusive)
    and before segment m's ``<|latent_start|>``, structural tokens excluded. An empty span
    gives t_present = False (and t_m = 0), so t_m is left out of the query.
    """
    mask = segment_text_masks(input_ids, attention_mask, latent_starts, segment_mask,
                              assistant_start, K, ids)
    m = mask.astype(jnp.float32)
    count = m.sum(-1)
    t = jnp.einsum("bms,bsd->bmd", m, H.astype(jnp.float32)) / jnp.maximum(count, 1.0)[..., None]
    return t, count > 0
