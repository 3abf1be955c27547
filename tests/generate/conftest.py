"""Shared fixtures of the generation tests: tiny models, prompts built by the training code
(0, 1 or 2 question images, different lengths), and variants of the default tiny model's
head made to open latent spans (and to end some of them early)."""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _gen_data import PROMPT_SPECS, random_image  # noqa: E402


@dataclasses.dataclass
class GenSetup:
    hf_dir: str
    tokenizer: object
    cfg: object
    params: dict
    image_cfg: object
    prompts: list
    images: list  # PIL question images of each prompt


def _setup(hf_dir: str) -> GenSetup:
    from transformers import AutoTokenizer

    from ilvr_jax.checkpoint.hf import load_hf_params
    from ilvr_jax.data import processor as proc
    from ilvr_jax.generate import Prompt

    tok = AutoTokenizer.from_pretrained(hf_dir)
    cfg, params = load_hf_params(hf_dir)
    icfg = proc.ImageProcessorConfig.from_hf(hf_dir)
    prompts, images = [], []
    for i, (sizes, text) in enumerate(PROMPT_SPECS):
        ims = [random_image(h, w, 10 * i + j) for j, (h, w) in enumerate(sizes)]
        pv, grids = proc.preprocess_images(ims, icfg)
        ids = proc.build_prompt_ids(tok, text, [tuple(g) for g in grids])
        prompts.append(Prompt(np.asarray(ids, np.int32), pv, grids.astype(np.int32)))
        images.append(ims)
    return GenSetup(hf_dir, tok, cfg, params, icfg, prompts, images)


@pytest.fixture(scope="session")
def gen_text(tiny_dirs) -> GenSetup:
    """A tiny model with larger random weights (init std 0.2): varied greedy text, no near-ties."""
    return _setup(tiny_dirs("untied_gqa2", init_std=0.2))


@pytest.fixture(scope="session")
def gen_latent(tiny_dir) -> GenSetup:
    """The default tiny model with ``<|latent_start|>``'s lm_head column replaced by a scaled
    mix of the columns of two tokens the plain model keeps emitting (220 and 453): start then
    wins at some steps and not at others, so rows open several spans with text between."""
    s = _setup(tiny_dir)
    w = np.array(s.params["lm_head"]["kernel"])
    w[:, s.cfg.latent_start_token_id] = 1.08 * (0.7 * w[:, 220] + 0.3 * w[:, 453])
    s.params = dict(s.params, lm_head={"kernel": w})
    return s


@pytest.fixture(scope="session")
def gen_latent_early(gen_latent) -> GenSetup:
    """``gen_latent`` whose ``<|latent_end|>`` column points along (mean hidden state that
    precedes a pad) - (mean hidden state that precedes a text token) of its greedy K-pad
    generations, so the end is the argmax at some pad steps (early ends) and rarely in text."""
    from _latent_reference import K, naive_hidden

    from ilvr_jax.generate import generate_prompts

    s = gen_latent
    pad, end = s.cfg.latent_pad_token_id, s.cfg.latent_end_token_id
    gens = generate_prompts(s.params, s.cfg, s.prompts, s.tokenizer, batch_size=4, max_new_tokens=40, latent_size=K)
    before_pad, before_text = [], []
    for p, g in zip(s.prompts, gens):
        h = naive_hidden(s.params, s.cfg, p.input_ids, p.pixel_values, p.image_grid_thw, g.token_ids, g.latents,
                         g.latent_positions)[len(p.input_ids) - 1:-1]
        before_pad.append(h[g.token_ids == pad])
        before_text.append(h[(g.token_ids != pad) & (g.token_ids != end)])
    direction = np.concatenate(before_pad).mean(0) - np.concatenate(before_text).mean(0)
    w = np.array(s.params["lm_head"]["kernel"])
    w[:, end] = 0.5 * direction / np.linalg.norm(direction)
    return dataclasses.replace(s, params=dict(s.params, lm_head={"kernel": w}))
