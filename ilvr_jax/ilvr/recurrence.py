"""Stage-2 latent recurrence (method section 5), KV-cached.

The input embedding at every latent pad ``t`` is the student's last-layer hidden state
(after the final norm) at ``t - 1``: ``e_t = h_{t-1}``, for all K pads of every segment,
left to right, gradients flowing through the recurrence. The reference recomputes the
whole prefix for every latent; here each text chunk runs once, in parallel, and each
latent is one cached decoder step:

    chunk 0 = [0, start_1]            (up to and including segment 1's <|latent_start|>)
    latents of segment 1: K one-token steps, e_{start_1 + k} = h_{start_1 + k - 1}
    chunk 1 = [end_1, start_2]        (from segment 1's <|latent_end|>)
    ...
    chunk M = [end_M, S)

Rows have their segments at different positions, so chunk ``m`` of row ``b`` is gathered
from that row's own offset into a fixed window of ``chunk_len`` tokens (positions past
the row's chunk are computed but neither written to the cache nor kept). Cache slots are
absolute positions, plus one trash slot that absorbs the masked writes. With
``chunk_len = S`` (the default) any batch is valid; a smaller ``chunk_len`` (at least the
longest text chunk in the batch; see :func:`max_chunk_length`) brings the cost down to
about one forward pass over the sequence.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ilvr_jax.model import text as text_lib
from ilvr_jax.model.config import TextConfig

Params = dict[str, Any]


def chunk_bounds(latent_starts: jax.Array, segment_mask: jax.Array, K: int, seq_len: int,
                 attention_mask: jax.Array | None = None):
    """Per row, the [start, end) of text chunks 0..M: ([B, M+1], [B, M+1]).

    Chunk m ends after segment m's ``<|latent_start|>`` (or after the row's last real
    token when the row has no segment m); chunk m >= 1 starts at segment m-1's
    ``<|latent_end|>`` (or is empty when the row has no segment m-1). Right padding after
    the last real token belongs to no chunk: nothing attends to it."""
    b = latent_starts.shape[0]
    seg = segment_mask.astype(bool)
    if attention_mask is None:
        seq_end = jnp.full((b,), seq_len, jnp.int32)
    else:
        real = jnp.asarray(attention_mask).astype(bool)
        seq_end = jnp.max(jnp.where(real, jnp.arange(seq_len, dtype=jnp.int32)[None] + 1, 0), axis=1)
    seq_end = seq_end[:, None]
    starts = jnp.concatenate([jnp.zeros((b, 1), jnp.int32),
                              jnp.where(seg, latent_starts + K + 1, seq_end).astype(jnp.int32)], axis=1)
    ends = jnp.concatenate([jnp.where(seg, latent_starts + 1, seq_end).astype(jnp.int32),
                            jnp.broadcast_to(seq_end, (b, 1)).astype(jnp.int32)], axis=1)
    ends = jnp.maximum(ends, starts)
    return starts, ends


def max_chunk_length(latent_starts: np.ndarray, segment_mask: np.ndarray, K: int, seq_len: int,
                     attention_mask: np.ndarray | None = None) -> int:
    """Host-side: the longest text chunk of a batch (the smallest valid ``chunk_len``)."""
    starts, ends = chunk_bounds(jnp.asarray(latent_starts), jnp.asarray(segment_mask), K, seq_len,
                                attention_mask)
    return int(np.max(np.asarray(ends) - np.asarray(starts)))


def chunk_windows(chunk_len: int | tuple[int, int] | None, num_chunks: int, seq_len: int) -> tuple[int, ...]:
    """Window width of each of the ``num_chunks`` text chunks (None entries = the sequence length)."""
    if chunk_len is None or isinstance(chunk_len, (int, np.integer)):
        first = rest = chunk_len
    else:
        first, rest = chunk_len
    widths = tuple(seq_len if w is None else int(w) for w in (first,) + (rest,) * (num_chunks - 1))
    for w in widths:
        if w < 1 or w > seq_len:
            raise ValueError(f"chunk_len must be in [1, {seq_len}], got {chunk_len}")
    return widths


def check_chunk_len(latent_starts: np.ndarray, segment_mask: np.ndarray, K: int, seq_len: int,
                    chunk_len: int | tuple[int, int] | None, attention_mask: np.ndarray | None = None) -> None:
    """Host-side, before the step: every text chunk of every sample fits its window (a
    longer chunk would leave tokens unprocessed). Raises naming the sample."""
    starts, ends = chunk_bounds(jnp.asarray(latent_starts), jnp.asarray(segment_mask), K, seq_len,
                                attention_mask)
    lengths = np.asarray(ends) - np.asarray(starts)
    widths = np.asarray(chunk_windows(chunk_len, lengths.shape[1], seq_len))
    for b, row in enumerate(lengths):
        over = np.nonzero(row > widths)[0]
        if over.size:
            m = int(over[0])
            raise ValueError(f"sample {b}: text chunk {m} has {int(row[m])} tokens, more than its "
                             f"window of {int(widths[m])} (stage2_chunk_len={chunk_len}); raise it "
                             "(or leave it unset: the sequence length)")


def latent_recurrence_forward(params_text: Params, cfg: TextConfig, embeds: jax.Array,
                              attention_mask: jax.Array, position_ids: jax.Array,
                              latent_starts: jax.Array, segment_mask: jax.Array, K: int, *,
                              chunk_len: int | tuple[int, int] | None = None, dtype=jnp.float32,
                              remat_policy: str = "none", attn_impl: str | None = None) -> jax.Array:
    """Last-layer hidden states [B, S, D] of the sequence with every latent pad's input
    replaced by the previous position's hidden state (``embeds`` at the pads is ignored).

    embeds [B, S, D] (token embeddings with image features merged), attention_mask [B, S],
    position_ids [3, B, S] (M-RoPE ids of the whole sequence), latent_starts / segment_mask
    [B, M] (the contract layout), K latents per segment.
    """
    b, s, d = embeds.shape
    m_max = latent_starts.shape[1]
    widths = chunk_windows(chunk_len, m_max + 1, s)
    trash = s  # the extra cache slot for masked writes
    valid_tok = jnp.asarray(attention_mask).astype(bool)
    seg = segment_mask.astype(bool)
    starts, ends = chunk_bounds(latent_starts, seg, K, s, valid_tok)
    cache = text_lib.init_cache(cfg, b, s + 1, dtype)
    rows = jnp.arange(b)[:, None]

    def run(x, pos_ids, slots, write, cache):
        # ``write``: the token is real and its key/value enters the cache.
        return text_lib.decoder_forward(params_text, cfg, x, pos_ids, write, cache=cache, slots=slots,
                                        dtype=dtype, remat_policy=remat_policy, attn_impl=attn_impl)

    def text_chunk(cache, out, m):
        c = widths[m]
        pos = starts[:, m][:, None] + jnp.arange(c, dtype=jnp.int32)[None]          # [B, C]
        inside = pos < ends[:, m][:, None]
        pos_c = jnp.minimum(pos, s - 1)
        slots = jnp.where(inside, pos_c, trash)
        x = embeds[rows, pos_c]
        pos_ids = position_ids[:, rows, pos_c]
        h, cache = run(x, pos_ids, slots, inside & valid_tok[rows, pos_c], cache)
        out = out.at[rows, slots].set(jnp.where(inside[..., None], h, out[rows, slots]))
        last = jnp.clip(ends[:, m] - 1 - starts[:, m], 0, c - 1)
        h_last = h[jnp.arange(b), last]                                             # [B, D]
        return cache, out, h_last

    def latent_step(carry, k, m):
        cache, out, h_prev = carry
        present = seg[:, m]
        p = latent_starts[:, m] + 1 + k
        slot = jnp.where(present, jnp.minimum(p, s - 1), trash)[:, None]           # [B, 1]
        pos_ids = position_ids[:, rows, jnp.minimum(p, s - 1)[:, None]]
        h, cache = run(h_prev[:, None, :].astype(dtype), pos_ids, slot,
                       (present & valid_tok[jnp.arange(b), jnp.minimum(p, s - 1)])[:, None], cache)
        out = out.at[rows, slot].set(jnp.where(present[:, None, None], h, out[rows, slot]))
        return (cache, out, h[:, 0]), None

    out = jnp.zeros((b, s + 1, d), dtype)
    for m in range(m_max + 1):  # static: M_max + 1 chunks and M_max * K latent steps
        cache, out, h_last = text_chunk(cache, out, m)
        if m < m_max:
            (cache, out, _), _ = jax.lax.scan(lambda carry, k: latent_step(carry, k, m),
                                              (cache, out, h_last), jnp.arange(K, dtype=jnp.int32))
    return out[:, :s]
