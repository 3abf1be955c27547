"""The ILVR latent tokens in the tokenizer, the embedding table and the config.

``<|latent_pad|>``, ``<|latent_start|>``, ``<|latent_end|>`` are added as special tokens.
Qwen2.5's embedding table is padded past the tokenizer (152064 rows for 151665 tokens), so
on the real tokenizer the new ids (151665-151667) already have rows and nothing grows. When
an id falls outside the table (a tokenizer without spare rows), the embedding and an untied
``lm_head`` grow to ``ceil((max id + 1) / 64) * 64`` rows, Qwen's padding multiple, and each
new row (column of the ``[D, V]`` head kernel) is the mean of the existing ones: a new
token then starts with the average input embedding and an output logit equal to the
average logit, so it neither dominates nor is unreachable at the start of training.
The table never shrinks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ilvr_jax.model.config import LATENT_TOKENS, ModelConfig

VOCAB_MULTIPLE = 64


def _grow_rows(table: Any, new_rows: int, axis: int) -> Any:
    """``table`` with ``new_rows`` more entries along ``axis``, each the mean of the existing
    ones (computed in float32, stored in the table's dtype). NumPy in, NumPy out; JAX in, JAX out."""
    if isinstance(table, np.ndarray):
        xp = np
    else:
        import jax.numpy as xp  # noqa: PLC0415 (a JAX leaf: stay on device)
    mean = xp.mean(table.astype(np.float32), axis=axis, keepdims=True).astype(table.dtype)
    reps = [1] * table.ndim
    reps[axis] = new_rows
    return xp.concatenate([table, xp.tile(mean, reps)], axis=axis)


def add_latent_tokens(
    tokenizer: Any, params: dict, cfg: ModelConfig, *, latent_size: int | None = None
) -> tuple[Any, dict, ModelConfig]:
    """Adds the latent tokens; returns ``(tokenizer, params, cfg)``.

    The tokenizer is changed in place (special tokens added if missing) and returned.
    ``params`` is not mutated: a new tree is returned that shares every leaf except a grown
    embedding / head. ``cfg`` records the three ids (``latent_*_token_id``), the new
    ``vocab_size`` if the table grew, and ``latent_size`` when given.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in LATENT_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in LATENT_TOKENS]
    if len(set(ids)) != 3 or min(ids) < 0:
        raise ValueError(f"latent tokens {LATENT_TOKENS} got ids {ids}")

    v_old = cfg.text.vocab_size
    embedding = params["text"]["embed_tokens"]["embedding"]
    if embedding.shape[0] != v_old:
        raise ValueError(f"embedding has {embedding.shape[0]} rows, config vocab_size is {v_old}")
    needed = max(ids) + 1
    new_params = params
    text_cfg = cfg.text
    if needed > v_old:
        v_new = -(-needed // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        new_params = {**params, "text": {**params["text"], "embed_tokens": {
            **params["text"]["embed_tokens"], "embedding": _grow_rows(embedding, v_new - v_old, axis=0)}}}
        if not cfg.text.tie_word_embeddings:
            head = params["lm_head"]["kernel"]  # [D, V]: the vocabulary is the last axis
            new_params["lm_head"] = {**params["lm_head"], "kernel": _grow_rows(head, v_new - v_old, axis=1)}
        text_cfg = dataclasses.replace(cfg.text, vocab_size=v_new)
    new_cfg = cfg.replace(
        text=text_cfg,
        latent_pad_token_id=ids[0],
        latent_start_token_id=ids[1],
        latent_end_token_id=ids[2],
        **({} if latent_size is None else {"latent_size": int(latent_size)}),
    )
    return tokenizer, new_params, new_cfg
