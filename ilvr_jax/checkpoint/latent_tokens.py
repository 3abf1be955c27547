"""The ILVR latent tokens in the tokenizer, the embedding table and the config.

``<|latent_pad|>``, ``<|latent_start|>``, ``<|latent_end|>`` are added as special tokens,
then the embedding table (and an untied ``lm_head``) is resized:

* ``resize="exact"`` (default): the table gets exactly ``len(tokenizer)`` rows, as ILVR's
  released training code does with HF ``model.resize_token_embeddings(len(tokenizer))``.
  Qwen2.5's table is padded past the tokenizer (152064 rows for 151665 tokens), so with the
  three latent tokens (151668 tokens) it SHRINKS: the first 151668 rows are kept and the
  padding rows are dropped. This changes the loss, not only the memory: the cross-entropy
  softmax runs over exactly the tokenizer's classes,
  ``log p_y = z_y - logsumexp_{v < len(tokenizer)} z_v``; with the padded table the logits
  of the 396 rows no token maps to would also enter the partition function.
* ``resize="grow_only"``: a table with enough rows is kept as it is (padding included); a
  table that is too small grows to ``len(tokenizer)`` rows.

``pad_to_multiple_of=m`` rounds the target row count up to a multiple of ``m`` in both modes
(HF's argument of the same name; Qwen pads to a multiple of 64).

New rows (columns of the ``[D, V]`` head kernel) are the mean of the existing ones. HF's
default ``mean_resizing`` samples them from a normal with that mean and the old rows'
covariance scaled by 1e-9 (so within ~3e-5 standard deviations of the mean); the mean itself
is the deterministic centre of that distribution. A new token then starts with the average
input embedding and an output logit equal to the average logit, so it neither dominates nor
is unreachable at the start of training.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ilvr_jax.model.config import LATENT_TOKENS, ModelConfig

RESIZE_MODES = ("exact", "grow_only")


def _resize_rows(table: Any, rows: int, axis: int) -> Any:
    """``table`` with exactly ``rows`` entries along ``axis``: the first ``rows`` kept when
    it is longer, new entries equal to the mean of the existing ones (computed in float32,
    stored in the table's dtype) appended when it is shorter. NumPy in, NumPy out (an owned
    copy of the kept entries only, so the caller's larger table can be freed); JAX in, JAX out."""
    old = table.shape[axis]
    if rows == old:
        return table
    if isinstance(table, np.ndarray):
        xp = np
    else:
        import jax.numpy as xp  # noqa: PLC0415 (a JAX leaf: stay on device)
    if rows < old:
        kept = table[(slice(None),) * axis + (slice(0, rows),)]
        return kept.copy() if xp is np else kept
    mean = xp.mean(table.astype(np.float32), axis=axis, keepdims=True).astype(table.dtype)
    reps = [1] * table.ndim
    reps[axis] = rows - old
    return xp.concatenate([table, xp.tile(mean, reps)], axis=axis)


def add_latent_tokens(
    tokenizer: Any,
    params: dict,
    cfg: ModelConfig,
    *,
    latent_size: int | None = None,
    resize: str = "exact",
    pad_to_multiple_of: int | None = None,
) -> tuple[Any, dict, ModelConfig]:
    """Adds the latent tokens; returns ``(tokenizer, params, cfg)``.

    The tokenizer is changed in place (special tokens added if missing) and returned.
    Let ``n = len(tokenizer)`` after the addition, rounded up to ``pad_to_multiple_of`` when
    given, and ``V`` the table's current rows. ``resize="exact"``: the table gets ``n`` rows
    (the first ``n`` when ``V > n``; mean rows appended when ``V < n``), the same as HF
    ``resize_token_embeddings(len(tokenizer), pad_to_multiple_of)`` up to the random part of
    HF's new-row initialisation (module docstring). ``resize="grow_only"``: ``V`` rows are
    kept when ``V >= n``, else the table grows to ``n``.

    ``params`` is not mutated: a new tree is returned that shares every leaf except a resized
    embedding / untied head (a tied head is the embedding itself). ``cfg`` records the three
    ids (``latent_*_token_id``), the new ``vocab_size``, and ``latent_size`` when given.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if pad_to_multiple_of is not None and int(pad_to_multiple_of) < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
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
    # Every id the tokenizer can emit needs a row; ids are normally 0 .. len(tokenizer) - 1.
    target = max(len(tokenizer), max(ids) + 1)
    if pad_to_multiple_of is not None:
        m = int(pad_to_multiple_of)
        target = -(-target // m) * m
    v_new = target if resize == "exact" else max(v_old, target)
    special = {name: getattr(cfg, name) for name in (
        "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
        "bos_token_id", "eos_token_id")}
    beyond = {k: v for k, v in special.items() if v is not None and v >= v_new}
    if beyond:
        raise ValueError(f"a {v_new}-row table (len(tokenizer) = {len(tokenizer)}) has no rows for "
                         f"the config's {beyond}: tokenizer and model do not match")

    new_params = params
    text_cfg = cfg.text
    if v_new != v_old:
        new_params = {**params, "text": {**params["text"], "embed_tokens": {
            **params["text"]["embed_tokens"], "embedding": _resize_rows(embedding, v_new, axis=0)}}}
        if not cfg.text.tie_word_embeddings:
            head = params["lm_head"]["kernel"]  # [D, V]: the vocabulary is the last axis
            new_params["lm_head"] = {**params["lm_head"], "kernel": _resize_rows(head, v_new, axis=1)}
        text_cfg = dataclasses.replace(cfg.text, vocab_size=v_new)
    new_cfg = cfg.replace(
        text=text_cfg,
        latent_pad_token_id=ids[0],
        latent_start_token_id=ids[1],
        latent_end_token_id=ids[2],
        **({} if latent_size is None else {"latent_size": int(latent_size)}),
    )
    return tokenizer, new_params, new_cfg
