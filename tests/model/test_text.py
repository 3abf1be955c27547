"""The Qwen2 decoder (one layer and the whole stack) against HF's torch text model."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _lm_reference import BATCHES, build_batch, hf_model, jax_params  # noqa: E402

from ilvr_jax.model import rope, text  # noqa: E402


def _inputs(tiny_dir, name, seed=0):
    samples, side = BATCHES[name]
    batch = build_batch(tiny_dir, samples, side)
    cfg = batch["cfg"]
    pos, _ = rope.mrope_position_ids(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], cfg)
    b, s = batch["input_ids"].shape
    embeds = np.random.RandomState(seed).randn(b, s, cfg.text.hidden_size).astype(np.float32)
    return cfg, np.asarray(pos), embeds, batch["attention_mask"]


def _scale(x):
    return float(np.max(np.abs(x)))


@pytest.mark.parametrize("name", ["one_image", "mixed_left", "mixed_right"])
def test_decoder_layer_matches_hf(tiny_dir, name):
    cfg, pos, embeds, mask = _inputs(tiny_dir, name)
    model = hf_model(tiny_dir)
    _, params = jax_params(tiny_dir)
    lm = model.model.language_model
    valid = mask.astype(bool)
    allowed = np.asarray(text.attention_mask_4d(jnp.asarray(valid), jnp.arange(mask.shape[1])))
    additive = torch.from_numpy(np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32))
    pos_t = torch.from_numpy(pos.astype(np.int64))
    x = torch.from_numpy(embeds)
    with torch.no_grad():
        cos_sin = lm.rotary_emb(x, pos_t)
        want = lm.layers[0](x, attention_mask=additive, position_embeddings=cos_sin).numpy()
    cos, sin = rope.mrope_cos_sin(pos, cfg.text)
    layer0 = jax.tree.map(lambda a: a[0], params["text"]["layers"])
    got, _ = text.decoder_layer(jnp.asarray(embeds), layer0, cfg.text, cos, sin, jnp.asarray(allowed))
    got = np.asarray(got)
    np.testing.assert_allclose(got[valid], want[valid], rtol=0, atol=1e-5 * _scale(want))


@pytest.mark.parametrize("name", ["text_only", "mixed_left", "mixed_right"])
def test_decoder_stack_matches_hf_text_model(tiny_dir, name):
    cfg, pos, embeds, mask = _inputs(tiny_dir, name)
    model = hf_model(tiny_dir)
    _, params = jax_params(tiny_dir)
    with torch.no_grad():
        want = model.model.language_model(
            inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask.astype(np.int64)),
            position_ids=torch.from_numpy(pos.astype(np.int64))).last_hidden_state.numpy()
    fn = jax.jit(text.decoder_forward, static_argnums=1)
    got, cache = fn(params["text"], cfg.text, embeds, pos, mask)
    assert cache is None
    valid = mask.astype(bool)
    diff = np.max(np.abs(np.asarray(got)[valid] - want[valid]))
    assert diff <= 1e-5 * _scale(want), diff


@pytest.mark.parametrize("policy", ["full"])
def test_remat_policies_give_same_values_and_grads(tiny_dir, policy):
    cfg, pos, embeds, mask = _inputs(tiny_dir, "mixed_left")
    _, params = jax_params(tiny_dir)

    def loss(p, e, remat_policy):
        h, _ = text.decoder_forward(p, cfg.text, e, pos, mask, remat_policy=remat_policy)
        return jnp.sum(jnp.where(mask[..., None] > 0, h, 0.0) ** 2)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    v0, g0 = grad(params["text"], embeds, "none")
    v1, g1 = grad(params["text"], embeds, policy)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, _scale(np.asarray(b))))


def test_padded_rows_do_not_change_real_rows(tiny_dir):
    """Garbage in padded positions (embeddings and position ids) leaves real rows unchanged."""
    cfg, pos, embeds, mask = _inputs(tiny_dir, "mixed_left")
    _, params = jax_params(tiny_dir)
    noisy = np.where(mask[..., None] > 0, embeds, 1e3 * np.random.RandomState(1).randn(*embeds.shape))
    noisy_pos = np.where(mask[None] > 0, pos, 977)
    h0, _ = text.decoder_forward(params["text"], cfg.text, embeds, pos, mask)
    h1, _ = text.decoder_forward(params["text"], cfg.text, noisy.astype(np.float32), noisy_pos, mask)
    valid = mask.astype(bool)
    assert np.all(np.isfinite(np.asarray(h1)))
    np.testing.assert_allclose(np.asarray(h1)[valid], np.asarray(h0)[valid], rtol=0, atol=1e-5)


def test_reference_attention_implementation_agrees(tiny_dir):
    cfg, pos, embeds, mask = _inputs(tiny_dir, "mixed_right")
    _, params = jax_params(tiny_dir)
    h_xla, _ = text.decoder_forward(params["text"], cfg.text, embeds, pos, mask)
    h_ref, _ = text.decoder_forward(params["text"], cfg.text, embeds, pos, mask, attn_impl="reference")
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(h_ref)[valid], np.asarray(h_xla)[valid], rtol=0, atol=1e-5)


def test_context_blocks_equal_one_forward_over_the_whole_sequence(tiny_dir):
    """A right-padded sequence cut into three pieces, each run with the earlier pieces'
    returned keys/values as context blocks (the middle piece also with a block of garbage
    keys that its mask hides): the hidden states of the real tokens equal one forward over
    the whole sequence, and so do the gradients with respect to the input embeddings."""
    cfg, pos, embeds, mask = _inputs(tiny_dir, "mixed_right")
    _, params = jax_params(tiny_dir)
    p, tc = params["text"], cfg.text
    valid = mask.astype(bool)
    cuts = (0, 5, 9, mask.shape[1])
    garbage_k = jnp.asarray(np.random.RandomState(3).randn(tc.num_hidden_layers, mask.shape[0], 4,
                                                            tc.num_key_value_heads, tc.head_dim) * 10, jnp.float32)
    hidden_mask = jnp.zeros((mask.shape[0], 4), bool)

    def pieces(e):
        context, hs = [], []
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            extra = [(garbage_k, garbage_k, hidden_mask)] if i == 1 else []
            h, kv = text.decoder_forward(p, tc, e[:, a:b], pos[:, :, a:b], valid[:, a:b],
                                         context=context + extra, return_kv=True)
            context.append((kv["k"], kv["v"], jnp.asarray(valid[:, a:b])))
            hs.append(h)
        return jnp.concatenate(hs, axis=1)

    def whole(e):
        return text.decoder_forward(p, tc, e, pos, valid, attn_impl="reference")[0]

    e = jnp.asarray(embeds)
    got, want = np.asarray(jax.jit(pieces)(e)), np.asarray(jax.jit(whole)(e))
    np.testing.assert_allclose(got[valid], want[valid], rtol=0, atol=2e-6 * _scale(want))
    w = jnp.asarray(np.random.RandomState(1).randn(*want.shape).astype(np.float32) * valid[..., None])
    g_got = np.asarray(jax.grad(lambda x: jnp.sum(pieces(x) * w))(e))
    g_want = np.asarray(jax.grad(lambda x: jnp.sum(whole(x) * w))(e))
    np.testing.assert_allclose(g_got[valid], g_want[valid], rtol=0, atol=2e-6 * _scale(g_want))


def test_context_blocks_refuse_a_cache(tiny_dir):
    cfg, pos, embeds, mask = _inputs(tiny_dir, "text_only")
    _, params = jax_params(tiny_dir)
    cache = text.init_cache(cfg.text, mask.shape[0], mask.shape[1])
    with pytest.raises(ValueError, match="not for a call with a cache"):
        text.decoder_forward(params["text"], cfg.text, jnp.asarray(embeds), pos, mask, cache=cache,
                             return_kv=True)
