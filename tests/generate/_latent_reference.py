"""The naive latent-mode decoder the compiled loop is checked against, written out plainly:
no KV cache, one full forward over the whole sequence so far at every step (right-padded to
one fixed length so it compiles once), positions recomputed from the whole sequence, the
rules of ILVR's latent mode spelled out in Python (method section 6), greedy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ilvr_jax.model import qwen25vl

K = 3  # latent size of the latent-mode tests


@functools.lru_cache(maxsize=None)
def _forward(cfg):
    def run(params, ids, mask, embeds, grid):
        out = qwen25vl.forward(params, cfg, ids, mask, None, grid, inputs_embeds=embeds)
        return out.logits, out.hidden

    return jax.jit(run)


_image_features = jax.jit(qwen25vl.image_features, static_argnums=1)


def token_embeds(params, tokens):
    """Rows of the embedding table [n, D]."""
    return np.asarray(params["text"]["embed_tokens"]["embedding"])[np.asarray(tokens, np.int64)]


def prompt_embeds(params, cfg, ids, pixel_values, grid):
    """Token embeddings of one prompt [L, D] with its image features merged in."""
    e = token_embeds(params, ids)
    if len(grid):
        p = max(4, -(-pixel_values.shape[0] // 4) * 4)
        pv = np.zeros((1, p, pixel_values.shape[1]), np.float32)
        pv[0, : pixel_values.shape[0]] = pixel_values
        feats = np.asarray(_image_features(params, cfg, jnp.asarray(pv), jnp.asarray(grid)[None]))[0]
        is_img = np.asarray(ids) == cfg.image_token_id
        e[is_img] = feats[: int(is_img.sum())]
    return e


def naive_generate(params, cfg, ids, pixel_values, grid, *, latent_size, latent_ids, max_new_tokens, stop_ids,
                   end_early=False, total_len=None, in_span=False):
    """Greedy generation of one prompt; returns (tokens, fed latents [n, D], their indices).

    ``in_span``: the prompt ends with ``<|latent_start|>`` whose span is still to come."""
    pad, start, end = latent_ids
    ids = [int(t) for t in ids]
    embeds = list(prompt_embeds(params, cfg, ids, pixel_values, grid))
    grid_arr = np.zeros((1, max(1, len(grid)), 3), np.int32)
    grid_arr[0, : len(grid)] = grid
    total = total_len or len(ids) + max_new_tokens
    fwd = _forward(cfg)
    out, latents, latent_at = [], [], []
    # Forced tokens still to come in the current span, the end included.
    span_left = latent_size + 1 if in_span else 0
    for step in range(max_new_tokens):
        n = len(ids)
        seq = np.zeros((1, total), np.int32)
        seq[0, :n] = ids
        mask = np.zeros((1, total), np.int32)
        mask[0, :n] = 1
        emb = np.zeros((1, total, len(embeds[0])), np.float32)
        emb[0, :n] = np.stack(embeds)
        logits, hidden = fwd(params, seq, mask, emb, grid_arr)
        last_logits = np.asarray(logits[0, n - 1])
        last_hidden = np.asarray(hidden[0, n - 1])
        argmax = int(np.argmax(last_logits))
        feed = None
        if span_left == 0:
            token = argmax
            if token == start:
                span_left = latent_size + 1
        elif span_left >= 2 and not (end_early and argmax == end):
            token = pad
            feed = last_hidden
            span_left -= 1
        else:
            token = end
            span_left = 0
        out.append(token)
        ids.append(token)
        if feed is not None:
            embeds.append(feed)
            latents.append(feed)
            latent_at.append(step)
        else:
            embeds.append(token_embeds(params, [token])[0])
        if token in stop_ids:
            break
    d = len(embeds[0])
    return (np.asarray(out, np.int32), np.asarray(latents, np.float32).reshape(-1, d),
            np.asarray(latent_at, np.int32))


def naive_hidden(params, cfg, ids, pixel_values, grid, tokens, latents, latent_at):
    """Final-norm hidden states [L + n, D] of a prompt followed by a finished generation."""
    seq = [int(t) for t in ids] + [int(t) for t in tokens]
    embeds = np.concatenate([prompt_embeds(params, cfg, ids, pixel_values, grid), token_embeds(params, tokens)])
    embeds[len(ids) + np.asarray(latent_at, int)] = latents
    grid_arr = np.zeros((1, max(1, len(grid)), 3), np.int32)
    grid_arr[0, : len(grid)] = grid
    _, hidden = _forward(cfg)(params, np.asarray([seq], np.int32), np.ones((1, len(seq)), np.int32), embeds[None],
                              grid_arr)
    return np.asarray(hidden[0])
