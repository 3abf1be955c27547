"""Stage-2 latent recurrence (method section 5), with the sequence's keys/values kept piece by piece.

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
the row's chunk are computed but masked out of attention and dropped). With
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
    """Window width of each of the ``num_chunks`` text chunks (None entries = the sequence
    length; wider windows are cut to it: no chunk is longer than the sequence)."""
    if chunk_len is None or isinstance(chunk_len, (int, np.integer)):
        first = rest = chunk_len
    else:
        first, rest = chunk_len
    widths = tuple(seq_len if w is None else min(int(w), seq_len) for w in (first,) + (rest,) * (num_chunks - 1))
    for w in widths:
        if w < 1:
            raise ValueError(f"chunk_len windows must be >= 1, got {chunk_len}")
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

    Memory: every piece of the sequence (a text chunk's window, a segment's K latents)
    computes its keys/values once and keeps them as a context block that later pieces
    attend to (``text.decoder_forward(context=...)``); nothing is written into a shared
    cache. A differentiated step therefore holds each piece's keys/values once: about one
    sequence's worth with tight windows, however many latent steps there are. Inside a
    segment the K latent steps carry only that segment's [L, B, K] keys/values.
    """
    b, s, d = embeds.shape
    m_max = latent_starts.shape[1]
    widths = chunk_windows(chunk_len, m_max + 1, s)
    valid_tok = jnp.asarray(attention_mask).astype(bool)
    seg = segment_mask.astype(bool)
    starts, ends = chunk_bounds(latent_starts, seg, K, s, valid_tok)
    rows = jnp.arange(b)[:, None]
    layers_, kv_heads, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim

    def run(x, pos_ids, valid, context):
        h, kv = text_lib.decoder_forward(params_text, cfg, x, pos_ids, valid, dtype=dtype,
                                         remat_policy=remat_policy, attn_impl=attn_impl,
                                         context=context, return_kv=True)
        return h, kv["k"], kv["v"]

    def text_chunk(context, out, m):
        c = widths[m]
        pos = starts[:, m][:, None] + jnp.arange(c, dtype=jnp.int32)[None]          # [B, C]
        inside = pos < ends[:, m][:, None]
        pos_c = jnp.minimum(pos, s - 1)
        valid = inside & valid_tok[rows, pos_c]
        h, k, v = run(embeds[rows, pos_c], position_ids[:, rows, pos_c], valid, context)
        # Window positions past the row's chunk are dropped (written to the spare row S).
        slots = jnp.where(inside, pos_c, s)
        out = out.at[rows, slots].set(h)
        last = jnp.clip(ends[:, m] - 1 - starts[:, m], 0, c - 1)
        return (k, v, valid), out, h[jnp.arange(b), last]                           # h_last [B, D]

    def latent_steps(context, out, h_last, m):
        present = seg[:, m]
        first = latent_starts[:, m] + 1
        lat_pos = jnp.minimum(first[:, None] + jnp.arange(K, dtype=jnp.int32)[None], s - 1)  # [B, K]
        lat_valid = present[:, None] & valid_tok[rows, lat_pos]

        def step(carry, k):
            buf_k, buf_v, h_prev, out = carry
            p = lat_pos[:, k][:, None]                                                # [B, 1]
            seen = lat_valid & (jnp.arange(K)[None] < k)                              # earlier latents
            h, nk, nv = run(h_prev[:, None, :].astype(dtype), position_ids[:, rows, p],
                            lat_valid[:, k][:, None], list(context) + [(buf_k, buf_v, seen)])
            buf_k = jax.lax.dynamic_update_slice_in_dim(buf_k, nk.astype(buf_k.dtype), k, axis=2)
            buf_v = jax.lax.dynamic_update_slice_in_dim(buf_v, nv.astype(buf_v.dtype), k, axis=2)
            out = out.at[rows, jnp.where(present[:, None], p, s)].set(h)
            return (buf_k, buf_v, h[:, 0], out), None

        zeros = jnp.zeros((layers_, b, K, kv_heads, head_dim), dtype)
        (buf_k, buf_v, _, out), _ = jax.lax.scan(step, (zeros, zeros, h_last, out),
                                                 jnp.arange(K, dtype=jnp.int32))
        return (buf_k, buf_v, lat_valid), out

    out = jnp.zeros((b, s + 1, d), dtype)          # row S: the spare row of dropped positions
    context: list = []
    for m in range(m_max + 1):  # static: M_max + 1 text chunks and M_max segments of K latent steps
        block, out, h_last = text_chunk(context, out, m)
        context.append(block)
        if m < m_max:
            block, out = latent_steps(context, out, h_last, m)
            context.append(block)
    return out[:, :s]
