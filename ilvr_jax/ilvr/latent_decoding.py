"""Per-row latent-mode rules of ILVR decoding (method section 6), as pure array functions.

A row is in text mode or inside a latent span. Its state is one integer ``span_left``: the
number of forced tokens still to come in the current span, ``<|latent_end|>`` included
(0 = text mode). One decode step turns the token the sampler chose (and the greedy argmax)
plus the state into the token recorded at this step, whether its input is the previous
hidden state instead of the token embedding, and the next state:

    text mode, chosen != start  ->  chosen, embedding,  span_left = 0
    text mode, chosen == start  ->  start,  embedding,  span_left = K + 1   (a span opens)
    span_left >= 2              ->  pad,    hidden,     span_left - 1
      (with end_early and argmax == end: end, embedding, span_left = 0)
    span_left == 1              ->  end,    embedding,  span_left = 0      (forced)

so every span is ``<|latent_start|>`` + K x ``<|latent_pad|>`` + ``<|latent_end|>`` (fewer
pads only with ``end_early``; K = 0 gives start + end), the released eval's
LatentTemplateLogitsProcessor. In text
mode a ``<|latent_pad|>`` or ``<|latent_end|>`` the model emits is an ordinary token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LatentIds(NamedTuple):
    """Token ids of the three latent tokens."""

    pad: int
    start: int
    end: int


class LatentStep(NamedTuple):
    """token [B] int32 recorded at this step; feed_hidden [B] bool (input = previous hidden
    state, not the token's embedding); span_left [B] int32 after the step; opened [B] bool
    (a span starts with this token)."""

    token: jax.Array
    feed_hidden: jax.Array
    span_left: jax.Array
    opened: jax.Array


def initial_span_left(last_prompt_token: jax.Array, latent_size: int, ids: LatentIds) -> jax.Array:
    """State before the first generated token: a prompt that ends with ``<|latent_start|>``
    is inside a span already (K pads and the end still to come), any other prompt is in
    text mode."""
    return jnp.where(jnp.asarray(last_prompt_token) == ids.start, latent_size + 1, 0).astype(jnp.int32)


def latent_step(chosen: jax.Array, greedy: jax.Array, span_left: jax.Array, latent_size: int,
                ids: LatentIds, end_early: bool = False) -> LatentStep:
    """One step of the rules in the module docstring, for every row.

    chosen: [B] the sampler's token (the argmax under greedy decoding); greedy: [B] the
    argmax of the same logits, read for ``end_early`` (an earlier ``<|latent_end|>`` argmax
    ends the span); span_left: [B] the state before the step.
    """
    if latent_size < 0:
        raise ValueError(f"latent_size must be >= 0, got {latent_size}")
    chosen = jnp.asarray(chosen, jnp.int32)
    span_left = jnp.asarray(span_left, jnp.int32)
    in_text = span_left == 0
    in_pads = span_left >= 2
    early = in_pads & (jnp.asarray(greedy) == ids.end) if end_early else jnp.zeros_like(in_pads)
    pad = in_pads & ~early
    # Inside a span, anything but a pad is the end: span_left == 1 (forced) or an early end.
    token = jnp.where(in_text, chosen, jnp.where(pad, ids.pad, ids.end)).astype(jnp.int32)
    opened = in_text & (chosen == ids.start)
    new_left = jnp.where(opened, latent_size + 1, jnp.where(pad, span_left - 1, 0)).astype(jnp.int32)
    return LatentStep(token=token, feed_hidden=pad, span_left=new_left, opened=opened)
