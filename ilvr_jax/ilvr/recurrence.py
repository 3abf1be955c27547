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
                              remat_policy: str = "none", attn_impl: str | None = None,
                              unroll: bool = False) -> jax.Array:
    """Last-layer hidden states [B, S, D] of the sequence with every latent pad's input
    replaced by the previous position's hidden state (``embeds`` at the pads is ignored).

    embeds [B, S, D] (token embeddings with image features merged), attention_mask [B, S],
    position_ids [3, B, S] (M-RoPE ids of the whole sequence), latent_starts / segment_mask
    [B, M] (the contract layout), K latents per segment.

    Memory: every piece of the sequence (a text chunk's window, a segment's K latents)
    computes its keys/values once and keeps them as a context block that later pieces
    attend to (``text.decoder_forward(context=...)``); nothing is written into a shared
    cache. Chunk 0 is one block; the segments run in a ``lax.scan`` (segment m's K latent
    steps, then text chunk m + 1) that writes their keys/values into two small buffers
    ([L, B, M*K] latents, [L, B, M*W] later chunks of window W). A differentiated step
    therefore holds chunk 0's keys/values once, the small buffers once per segment, and one
    gradient accumulator for the parameters, however many segments and latent steps there
    are; each segment and each latent step is rematerialised in the backward.

    ``unroll``: a segment's K latent steps, and the decoder layers of every piece (latent
    step or text chunk), are inlined instead of looped (the same numbers). The pieces are
    small (one token, or a chunk's window), so on CPUs and GPUs the loops' per-iteration
    overhead is much of their cost; the price is a compiled program that grows with
    K x layers.
    """
    b, s, d = embeds.shape
    m_max = latent_starts.shape[1]
    w0, w = chunk_windows(chunk_len, 2, s)
    valid_tok = jnp.asarray(attention_mask).astype(bool)
    seg = segment_mask.astype(bool)
    starts, ends = chunk_bounds(latent_starts, seg, K, s, valid_tok)
    rows = jnp.arange(b)[:, None]
    layers_, kv_heads, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim

    def run(x, pos_ids, valid, context):
        h, kv = text_lib.decoder_forward(params_text, cfg, x, pos_ids, valid, dtype=dtype,
                                         remat_policy=remat_policy, attn_impl=attn_impl,
                                         context=context, return_kv=True, unroll=unroll)
        return h, kv["k"], kv["v"]

    def text_chunk(context, m, c):
        """Chunk m in a window of c tokens -> (keys, values, key validity), window positions
        (S where past the row's chunk), hidden states, the hidden state of its last token."""
        lo = jnp.take(starts, m, axis=1)
        pos = lo[:, None] + jnp.arange(c, dtype=jnp.int32)[None]                     # [B, C]
        inside = pos < jnp.take(ends, m, axis=1)[:, None]
        pos_c = jnp.minimum(pos, s - 1)
        valid = inside & valid_tok[rows, pos_c]
        h, k, v = run(embeds[rows, pos_c], position_ids[:, rows, pos_c], valid, context)
        last = jnp.clip(jnp.take(ends, m, axis=1) - 1 - lo, 0, c - 1)
        return (k, v, valid), jnp.where(inside, pos_c, s), h, h[jnp.arange(b), last]

    block0, slots0, h0, h_last = text_chunk([], 0, w0)
    out = jnp.zeros((b, s + 1, d), dtype).at[rows, slots0].set(h0)   # row S: dropped positions
    if m_max == 0:
        return out[:, :s]

    def latent_steps(context, h_last, m):
        """Segment m's K one-token steps -> its (keys, values, validity) [L, B, K], its
        positions (S where absent) and hidden states [B, K, D]."""
        present = jnp.take(seg, m, axis=1)
        first = jnp.take(latent_starts, m, axis=1) + 1
        lat_pos = jnp.minimum(first[:, None] + jnp.arange(K, dtype=jnp.int32)[None], s - 1)  # [B, K]
        lat_valid = present[:, None] & valid_tok[rows, lat_pos]

        def step(carry, k):
            buf_k, buf_v, h_prev = carry
            seen = lat_valid & (jnp.arange(K)[None] < k)                              # earlier latents
            h, nk, nv = run(h_prev[:, None, :].astype(dtype), position_ids[:, rows, lat_pos[:, k][:, None]],
                            lat_valid[:, k][:, None], list(context) + [(buf_k, buf_v, seen)])
            buf_k = jax.lax.dynamic_update_slice_in_dim(buf_k, nk.astype(buf_k.dtype), k, axis=2)
            buf_v = jax.lax.dynamic_update_slice_in_dim(buf_v, nv.astype(buf_v.dtype), k, axis=2)
            return (buf_k, buf_v, h[:, 0]), h[:, 0]

        zeros = jnp.zeros((layers_, b, K, kv_heads, head_dim), dtype)
        # Checkpointed: the backward keeps a step's inputs only and recomputes its one-token forward.
        (buf_k, buf_v, _), hs = jax.lax.scan(jax.checkpoint(step, prevent_cse=False), (zeros, zeros, h_last),
                                             jnp.arange(K, dtype=jnp.int32), unroll=unroll)
        slots = jnp.where(present[:, None], lat_pos, s)
        return (buf_k, buf_v, lat_valid), slots, jnp.moveaxis(hs, 0, 1)

    def segment(carry, m):
        """Segment m's latents, then text chunk m + 1, both attending to chunk 0 and to the
        buffers of the earlier segments (invalid where not yet written)."""
        lat_k, lat_v, lat_ok, chk_k, chk_v, chk_ok, h_last = carry
        context = [block0, (lat_k, lat_v, lat_ok), (chk_k, chk_v, chk_ok)]
        (bk, bv, bok), lat_slots, lat_h = latent_steps(context, h_last, m)
        lat_k = jax.lax.dynamic_update_slice_in_dim(lat_k, bk, m * K, axis=2)
        lat_v = jax.lax.dynamic_update_slice_in_dim(lat_v, bv, m * K, axis=2)
        lat_ok = jax.lax.dynamic_update_slice_in_dim(lat_ok, bok, m * K, axis=1)
        context = [block0, (lat_k, lat_v, lat_ok), (chk_k, chk_v, chk_ok)]
        (ck, cv, cok), chk_slots, chk_h, h_last = text_chunk(context, m + 1, w)
        chk_k = jax.lax.dynamic_update_slice_in_dim(chk_k, ck.astype(chk_k.dtype), m * w, axis=2)
        chk_v = jax.lax.dynamic_update_slice_in_dim(chk_v, cv.astype(chk_v.dtype), m * w, axis=2)
        chk_ok = jax.lax.dynamic_update_slice_in_dim(chk_ok, cok, m * w, axis=1)
        return (lat_k, lat_v, lat_ok, chk_k, chk_v, chk_ok, h_last), (lat_slots, lat_h, chk_slots, chk_h)

    def buffer(n):
        return (jnp.zeros((layers_, b, m_max * n, kv_heads, head_dim), dtype),
                jnp.zeros((layers_, b, m_max * n, kv_heads, head_dim), dtype), jnp.zeros((b, m_max * n), bool))

    carry0 = buffer(K) + buffer(w) + (h_last,)
    _, (lat_slots, lat_h, chk_slots, chk_h) = jax.lax.scan(
        jax.checkpoint(segment, prevent_cse=False), carry0, jnp.arange(m_max, dtype=jnp.int32))
    # [M, B, n] positions and [M, B, n, D] states -> one scatter each (dropped ones to row S).
    flat = lambda x: jnp.moveaxis(x, 0, 1).reshape((b, -1) + x.shape[3:])  # noqa: E731
    out = out.at[rows, flat(lat_slots)].set(flat(lat_h))
    out = out.at[rows, flat(chk_slots)].set(flat(chk_h))
    return out[:, :s]
