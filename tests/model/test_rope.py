"""M-RoPE position ids and the chunked rotary embedding against HF's torch code."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _lm_reference import BATCHES, build_batch, hf_model  # noqa: E402

from ilvr_jax.model import rope  # noqa: E402

ROPE_BATCHES = dict(BATCHES)
ROPE_BATCHES["two_images_right_text_only_left"] = ([((), "up up"), ([(56, 84), (84, 140)], "left")], "left")
ROPE_BATCHES["text_only_right"] = ([((), "a b c d e f"), ((), "one")], "right")


def _hf_rope_index(model, batch):
    hf = batch["hf"]
    grid = torch.from_numpy(hf["image_grid_thw"]) if hf["image_grid_thw"].shape[0] else None
    pos, deltas = model.model.get_rope_index(
        torch.from_numpy(hf["input_ids"]),
        mm_token_type_ids=torch.from_numpy(hf["mm_token_type_ids"]),
        image_grid_thw=grid,
        attention_mask=torch.from_numpy(hf["attention_mask"]))
    return pos.numpy(), deltas.numpy()[:, 0]


@pytest.mark.parametrize("name", sorted(ROPE_BATCHES))
def test_position_ids_match_hf_get_rope_index(tiny_dir, name):
    samples, side = ROPE_BATCHES[name]
    batch = build_batch(tiny_dir, samples, side)
    want_pos, want_deltas = _hf_rope_index(hf_model(tiny_dir), batch)
    fn = jax.jit(rope.mrope_position_ids, static_argnums=3)
    pos, deltas = fn(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], batch["cfg"])
    assert pos.dtype == jnp.int32 and pos.shape == want_pos.shape
    np.testing.assert_array_equal(np.asarray(pos), want_pos)
    np.testing.assert_array_equal(np.asarray(deltas), want_deltas)


def test_position_ids_image_grid_layout(tiny_dir):
    """A hand-checked case: 2 text tokens, one 1x4x6 patch grid (2x3 llm grid), 1 text token."""
    batch = build_batch(tiny_dir, [([(56, 84)], "x")], "left")
    cfg = batch["cfg"]
    ids = np.array([[7, 7] + [cfg.image_token_id] * 6 + [7]], np.int32)
    pos, deltas = rope.mrope_position_ids(ids, np.ones_like(ids), np.array([[[1, 4, 6]]], np.int32), cfg)
    np.testing.assert_array_equal(np.asarray(pos)[:, 0], [
        [0, 1, 2, 2, 2, 2, 2, 2, 5],
        [0, 1, 2, 2, 2, 3, 3, 3, 5],
        [0, 1, 2, 3, 4, 2, 3, 4, 5]])
    assert int(deltas[0]) == 6 - 9


@pytest.mark.parametrize("name", ["one_image", "mixed_left"])
def test_cos_sin_and_rotation_match_hf(tiny_dir, name):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

    samples, side = BATCHES[name]
    batch = build_batch(tiny_dir, samples, side)
    model = hf_model(tiny_dir)
    tcfg = batch["cfg"].text
    pos, _ = rope.mrope_position_ids(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                                     batch["cfg"])
    pos = np.asarray(pos)
    b, s = pos.shape[1:]
    x = torch.zeros(1, dtype=torch.float32)
    want_cos, want_sin = model.model.language_model.rotary_emb(x, torch.from_numpy(pos.astype(np.int64)))
    cos, sin = rope.mrope_cos_sin(pos, tcfg)
    np.testing.assert_allclose(np.asarray(cos), want_cos.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), want_sin.numpy(), rtol=0, atol=1e-6)

    rng = np.random.RandomState(0)
    hq, hkv = tcfg.num_attention_heads, tcfg.num_key_value_heads
    q = rng.randn(b, s, hq, tcfg.head_dim).astype(np.float32)
    k = rng.randn(b, s, hkv, tcfg.head_dim).astype(np.float32)
    want_q, want_k = apply_rotary_pos_emb(torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2),
                                          want_cos, want_sin)
    got_q, got_k = rope.apply_mrope(jnp.asarray(q), jnp.asarray(k), pos, tcfg)
    np.testing.assert_allclose(np.asarray(got_q), want_q.transpose(1, 2).numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_k), want_k.transpose(1, 2).numpy(), rtol=0, atol=1e-5)


def test_sections_select_axes():
    """Frequency j reads the t/h/w position chosen by mrope_section; angles are doubled."""
    from ilvr_jax.model.config import TextConfig

    pos = np.array([3, 5, 7], np.int32).reshape(3, 1, 1)
    bad = TextConfig(hidden_size=16, num_attention_heads=1, mrope_section=(1, 2, 1))
    with pytest.raises(ValueError):  # sections cover 4 of the 8 frequencies
        rope.mrope_cos_sin(pos, bad)
    cfg = TextConfig(hidden_size=8, num_attention_heads=1, mrope_section=(1, 2, 1), rope_theta=100.0)
    cos, sin = rope.mrope_cos_sin(pos, cfg)
    angles = np.array([3, 5, 5, 7]) / (100.0 ** (np.arange(0, 8, 2) / 8))
    np.testing.assert_allclose(np.asarray(cos)[0, 0], np.cos(np.concatenate([angles, angles])), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin)[0, 0], np.sin(np.concatenate([angles, angles])), atol=1e-6)
