"""Records in, generations out: prompts by the training code, batches of fixed shapes, the
compiled latent-mode decode loop, and per-row results on the host."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ilvr_jax.data import processor as proc
from ilvr_jax.data.records import LocatedRecord, RecordError, read_jsonl, record_location
from ilvr_jax.generate.prompts import Prompt, latent_token_ids, record_prompt
from ilvr_jax.generate.sampler import DecodeConfig, DecodeOutput, generate_batch, pad_prompts
from ilvr_jax.generate.sampling import SamplingParams
from ilvr_jax.ilvr.latent_decoding import LatentIds
from ilvr_jax.model.config import ModelConfig


@dataclasses.dataclass
class Generation:
    """One row's result.

    token_ids [n] int32: the generated tokens (a final stop token included); text: their
    decoding; latents [num_latents, D] fp32: the vectors fed at the ``<|latent_pad|>`` steps,
    in order; latent_positions [num_latents]: their indices in ``token_ids``;
    num_latent_spans: ``<|latent_start|>`` tokens that opened a span; stopped: ended at a
    stop token (else at the budget).
    """

    token_ids: np.ndarray
    text: str
    latents: np.ndarray
    latent_positions: np.ndarray
    num_latent_spans: int
    stopped: bool


def unpack(out: DecodeOutput, n_rows: int, tokenizer=None, *, skip_special_tokens: bool = False) -> list[Generation]:
    """The first ``n_rows`` rows of a decode output as :class:`Generation` (one device fetch)."""
    host = jax.device_get(out)
    gens = []
    for r in range(n_rows):
        n = int(host.num_generated[r])
        ids = np.asarray(host.tokens[r, :n], np.int32)
        pos = np.flatnonzero(host.fed_hidden[r, :n]).astype(np.int32)
        text = tokenizer.decode(ids.tolist(), skip_special_tokens=skip_special_tokens) if tokenizer is not None else ""
        gens.append(Generation(token_ids=ids, text=text, latents=np.asarray(host.latents[r, pos], np.float32),
                               latent_positions=pos, num_latent_spans=int(host.num_spans[r]),
                               stopped=bool(host.stopped[r])))
    return gens


def stop_token_ids(tokenizer, cfg: ModelConfig, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """``<|im_end|>``, the tokenizer's eos and the config's eos (those that exist), plus ``extra``."""
    ids = {int(x) for x in extra}
    for t in (getattr(tokenizer, "eos_token_id", None), cfg.eos_token_id):
        if t is not None:
            ids.add(int(t))
    ids.add(proc.special_token_id(tokenizer, "<|im_end|>"))
    return tuple(sorted(ids))


def decode_config(tokenizer, cfg: ModelConfig, *, latent_size: int | None = None, latent_end_early: bool = False,
                  sampling: SamplingParams = SamplingParams(), **kw) -> DecodeConfig:
    """A :class:`DecodeConfig` from the tokenizer's latent ids and K (argument, else the
    config's ``latent_size``)."""
    k = latent_size if latent_size is not None else cfg.latent_size
    if k is None:
        raise ValueError("latent_size is neither given nor recorded in the model config (config.json latent_size)")
    pad, start, end = latent_token_ids(tokenizer)
    return DecodeConfig(latent_ids=LatentIds(pad, start, end), latent_size=int(k),
                        pad_id=int(tokenizer.pad_token_id), latent_end_early=latent_end_early,
                        sample=not sampling.greedy, **kw)


def generate_prompts(params, cfg: ModelConfig, prompts: Sequence[Prompt], tokenizer, *, batch_size: int = 8,
                     max_new_tokens: int = 4096, latent_size: int | None = None, latent_end_early: bool = False,
                     sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] | None = None,
                     skip_special_tokens: bool = False, min_prompt_len: int = 16, min_patches: int = 0,
                     min_images: int = 1, **decode_kw) -> list[Generation]:
    """Generations of prompts, ``batch_size`` at a time (the last batch padded with filler
    rows, so every batch has the same compiled shapes up to the length buckets).

    ``min_prompt_len`` / ``min_patches`` / ``min_images``: the smallest buckets (see
    ``sampler.pad_prompts``); set to an eval set's largest prompt, every batch shares one
    compiled prefill and loop."""
    dcfg = decode_config(tokenizer, cfg, latent_size=latent_size, latent_end_early=latent_end_early,
                         sampling=sampling, **decode_kw)
    stops = stop_token_ids(tokenizer, cfg) if stop_ids is None else tuple(stop_ids)
    results: list[Generation] = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        batch = pad_prompts(chunk, dcfg.pad_id, batch_size=batch_size, min_len=min_prompt_len,
                            min_patches=min_patches, min_images=min_images, patch_dim=cfg.vision.patch_dim)
        budgets = np.zeros((batch_size,), np.int32)
        budgets[: len(chunk)] = max_new_tokens
        out = generate_batch(params, cfg, dcfg, batch, budgets, stops, sampling)
        results.extend(unpack(out, len(chunk), tokenizer, skip_special_tokens=skip_special_tokens))
    return results


def generate_records(params, cfg: ModelConfig, records: Sequence[dict[str, Any] | LocatedRecord], tokenizer,
                     image_cfg: proc.ImageProcessorConfig, *, root: str | os.PathLike | None = None,
                     path: str | os.PathLike | None = None,
                     image_loader: Callable[[str], Any] = proc.load_image, **kw) -> list[Generation]:
    """Canonical records (``text_input``, ``image_input``) -> one :class:`Generation` each.

    Records are dicts or ``LocatedRecord`` (from ``read_jsonl``; their ``where`` and ``root``
    are used). For dicts, ``root`` is where relative image paths start and ``path`` the file
    named in errors (with the record's index and id). Keyword arguments go to
    :func:`generate_prompts`.
    """
    prompts = []
    for i, rec in enumerate(records):
        if isinstance(rec, LocatedRecord):
            if isinstance(rec.record, RecordError):
                raise rec.record
            where, rec_root, rec = rec.where, rec.root, rec.record
        else:
            where, rec_root = record_location(path, i + 1, rec), root
        prompts.append(record_prompt(rec, tokenizer, image_cfg, root=rec_root, image_loader=image_loader,
                                     where=where))
    return generate_prompts(params, cfg, prompts, tokenizer, **kw)


def generate_jsonl(params, cfg: ModelConfig, path: str | os.PathLike, tokenizer, image_cfg: proc.ImageProcessorConfig,
                   *, root: str | os.PathLike | None = None, **kw) -> list[Generation]:
    """:func:`generate_records` on every record of a JSONL file (images relative to ``root``,
    default the file's directory); errors name the file and line."""
    return generate_records(params, cfg, list(read_jsonl(path, root)), tokenizer, image_cfg, **kw)
