"""Eval prompts from canonical records, built by the training code.

A record's prompt is the user turn of its training sequence up to and including
``<|im_start|>assistant\\n``: ``processor.build_prompt_ids`` with the same chat template,
the same ``<image>`` placeholder placement and the same image-pad expansion as
``segments.tokenize_record``, and question images through ``processor.preprocess_images``.
So the prompt a model is evaluated on is the prefix it was trained on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from ilvr_jax.data import processor as proc
from ilvr_jax.data.records import (IMAGE_PLACEHOLDERS, MISSING_KEY, UNREADABLE_IMAGE, WRONG_TYPE, RecordError,
                                   resolve_image_path)
from ilvr_jax.data.segments import LATENT_END, LATENT_PAD, LATENT_START, check_no_control_tokens


class Prompt(NamedTuple):
    """One record's prompt: ids [L] int32, question-image patches [p, patch_dim], grids [n, 3]."""

    input_ids: np.ndarray
    pixel_values: np.ndarray
    image_grid_thw: np.ndarray


def record_prompt(rec: Mapping[str, Any], tokenizer, image_cfg: proc.ImageProcessorConfig, *,
                  root: str | os.PathLike | None = None, where: str = "<record>",
                  image_loader: Callable[[str], Any] = proc.load_image) -> Prompt:
    """The prompt of one canonical record (``text_input``, ``image_input``; the plan and the
    answer are not read). Bad input raises ``RecordError`` naming ``where``."""
    if not isinstance(rec, Mapping):
        raise RecordError(where, WRONG_TYPE, f"record is a {type(rec).__name__}, not a JSON object")
    for key in ("text_input", "image_input"):
        if key not in rec:
            raise RecordError(where, MISSING_KEY, f"missing key {key!r}")
    text, images = rec["text_input"], rec["image_input"]
    if not isinstance(text, str):
        raise RecordError(where, WRONG_TYPE, f"text_input is a {type(text).__name__}, not a string")
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise RecordError(where, WRONG_TYPE, "image_input must be a list of path strings")
    check_no_control_tokens("text_input", text, tokenizer, where)
    loaded = []
    for p in images:
        full = resolve_image_path(p, root)
        try:
            loaded.append(image_loader(full))
        except (OSError, ValueError) as e:
            raise RecordError(where, UNREADABLE_IMAGE, f"cannot read question image {p!r} ({full!r}): {e}") from None
    pixel_values, grids = proc.preprocess_images(loaded, image_cfg)
    try:
        ids = proc.build_prompt_ids(tokenizer, text, [tuple(g) for g in grids], merge_size=image_cfg.merge_size)
    except ValueError as e:
        raise RecordError(where, IMAGE_PLACEHOLDERS, str(e)) from None
    return Prompt(np.asarray(ids, np.int32), pixel_values, grids.astype(np.int32))


def latent_token_ids(tokenizer) -> tuple[int, int, int]:
    """(pad, start, end) ids of the latent tokens; ``ValueError`` naming a missing one."""
    return tuple(proc.special_token_id(tokenizer, t) for t in (LATENT_PAD, LATENT_START, LATENT_END))
