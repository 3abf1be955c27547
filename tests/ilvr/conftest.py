"""Synthetic ILVR batches built token by token (no tokenizer, no model), shared by the
tests of ``ilvr_jax.ilvr``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ilvr_jax.ilvr.query import SpecialTokens

IDS = SpecialTokens(image=5, vision_start=3, vision_end=4, latent_pad=7, latent_start=8, latent_end=9)
IM_START, IM_END, PAD_ID = 1, 2, 0
TEXT_LO, TEXT_HI = 10, 60


@dataclasses.dataclass
class SampleSpec:
    q_images: tuple[int, ...] = (4,)       # merged tokens per question image
    sys_len: int = 3                       # system prompt text tokens
    prompt_len: int = 4                    # user text tokens after the images
    seg_text: tuple[int, ...] = (3, 2)     # text tokens before each latent segment
    helper_thw: tuple[tuple[int, int, int], ...] = ((1, 4, 4), (1, 4, 6))
    tail_len: int = 3
    bare_user: bool = False                # user side = vision tokens only (no chat tokens)
    left_pad: int = 0


def build_sample(rng, spec: SampleSpec, K: int):
    text = lambda n: list(rng.integers(TEXT_LO, TEXT_HI, size=n))
    ids: list[int] = []
    if not spec.bare_user:
        ids += [IM_START] + text(1) + text(spec.sys_len) + [IM_END, IM_START] + text(1)
    for n in spec.q_images:
        ids += [IDS.vision_start] + [IDS.image] * n + [IDS.vision_end]
    if not spec.bare_user:
        ids += text(spec.prompt_len) + [IM_END]
    astart = len(ids)
    ids += [IM_START] + text(2)
    starts = []
    for n in spec.seg_text:
        ids += text(n)
        starts.append(len(ids))
        ids += [IDS.latent_start] + [IDS.latent_pad] * K + [IDS.latent_end]
    ids += text(spec.tail_len) + [IM_END]
    return np.array(ids, np.int32), astart, starts


def build_batch(specs, K: int, M: int, seed: int = 0, extra: int = 2):
    """Right-padded (or ``left_pad``-shifted) batch in the training layout."""
    rng = np.random.default_rng(seed)
    samples = [build_sample(rng, s, K) for s in specs]
    S = max(len(x[0]) + s.left_pad for x, s in zip(samples, specs)) + extra
    B = len(specs)
    input_ids = np.full((B, S), PAD_ID, np.int32)
    attn = np.zeros((B, S), np.int32)
    latent_starts = np.zeros((B, M), np.int32)
    segment_mask = np.zeros((B, M), bool)
    helper_thw = np.zeros((B, M, 3), np.int32)
    astart = np.zeros((B,), np.int32)
    for b, ((ids, a, st), spec) in enumerate(zip(samples, specs)):
        off = spec.left_pad
        input_ids[b, off:off + len(ids)] = ids
        attn[b, off:off + len(ids)] = 1
        astart[b] = a + off
        for m, s0 in enumerate(st):
            latent_starts[b, m] = s0 + off
            segment_mask[b, m] = True
            helper_thw[b, m] = spec.helper_thw[m]
    return dict(input_ids=input_ids, attention_mask=attn, latent_starts=latent_starts,
                segment_mask=segment_mask, helper_grid_thw=helper_thw, assistant_start=astart)


@pytest.fixture
def synth():
    """The builders and token ids above, for test modules (importlib mode: no sibling imports)."""
    import types
    return types.SimpleNamespace(IDS=IDS, SampleSpec=SampleSpec, build_batch=build_batch,
                                 IM_START=IM_START, IM_END=IM_END)
