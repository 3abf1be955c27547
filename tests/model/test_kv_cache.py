"""KV cache: prefill + one-step decodes, chunked writes and gradients equal the uncached model."""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _lm_reference import BATCHES, build_batch, hf_model, jax_params  # noqa: E402

from ilvr_jax.model import qwen25vl  # noqa: E402

N_NEW = 4


def _extended(tiny_dir, seed=0):
    """A left-padded batch with images (and a text-only row) plus N_NEW appended tokens."""
    samples, side = BATCHES["mixed_left"]
    batch = build_batch(tiny_dir, samples, side)
    b = batch["input_ids"].shape[0]
    new = np.random.RandomState(seed).randint(0, 300, (b, N_NEW)).astype(np.int32)
    full_ids = np.concatenate([batch["input_ids"], new], axis=1)
    full_mask = np.concatenate([batch["attention_mask"], np.ones((b, N_NEW), np.int32)], axis=1)
    return batch, new, full_ids, full_mask


@functools.lru_cache(maxsize=None)
def _jitted():
    fwd = jax.jit(qwen25vl.forward, static_argnums=1, static_argnames=("return_logits",))
    prefill = jax.jit(qwen25vl.prefill, static_argnums=(1, 6))
    decode = jax.jit(qwen25vl.decode_step, static_argnums=1)
    return fwd, prefill, decode


def test_prefill_then_decode_equals_full_forward_and_hf(tiny_dir):
    batch, new, full_ids, full_mask = _extended(tiny_dir)
    cfg, params = jax_params(tiny_dir)
    fwd, prefill, decode = _jitted()
    s = batch["input_ids"].shape[1]
    full = fwd(params, cfg, full_ids, full_mask, batch["pixel_values"], batch["image_grid_thw"])
    full_logits = np.asarray(full.logits)

    # HF on the extended sequence: the positions of the appended tokens are those of generation.
    model = hf_model(tiny_dir)
    with torch.no_grad():
        hf_logits = model(input_ids=torch.from_numpy(full_ids.astype(np.int64)),
                          attention_mask=torch.from_numpy(full_mask.astype(np.int64)),
                          mm_token_type_ids=torch.from_numpy((full_ids == cfg.image_token_id).astype(np.int64)),
                          pixel_values=torch.from_numpy(batch["hf"]["pixel_values"]),
                          image_grid_thw=torch.from_numpy(batch["hf"]["image_grid_thw"])).logits.numpy()
    scale = float(np.max(np.abs(hf_logits[:, s - 1:])))

    logits, cache, deltas = prefill(params, cfg, batch["input_ids"], batch["attention_mask"],
                                    batch["pixel_values"], batch["image_grid_thw"], s + N_NEW + 3)
    assert cache["k"].shape == (cfg.text.num_hidden_layers, 3, s + N_NEW + 3, cfg.text.num_key_value_heads,
                                cfg.text.head_dim)
    assert int(cache["index"]) == s
    steps = [np.asarray(logits)]
    for i in range(N_NEW):
        step_logits, hidden, cache = decode(params, cfg, new[:, i:i + 1], cache, deltas)
        assert step_logits.shape == (3, 1, cfg.text.vocab_size) and hidden.shape == (3, 1, cfg.text.hidden_size)
        steps.append(np.asarray(step_logits)[:, 0])
    got = np.stack(steps, axis=1)  # logits at positions s-1 .. s+N_NEW-1
    assert int(cache["index"]) == s + N_NEW
    np.testing.assert_array_equal(np.asarray(cache["mask"])[:, : s + N_NEW], full_mask.astype(bool))
    assert not np.asarray(cache["mask"])[:, s + N_NEW:].any()
    d_full = float(np.max(np.abs(got - full_logits[:, s - 1:])))
    d_hf = float(np.max(np.abs(got - hf_logits[:, s - 1:])))
    print(f"\ncached decode vs full forward {d_full:.3e}, vs HF {d_hf:.3e} (scale {scale:.3e})")
    assert d_full <= 1e-5 * scale
    assert d_hf <= 1e-4 * scale


def test_decode_with_inputs_embeds_equals_token_ids(tiny_dir):
    batch, new, _, _ = _extended(tiny_dir)
    cfg, params = jax_params(tiny_dir)
    _, prefill, decode = _jitted()
    s = batch["input_ids"].shape[1]
    _, cache, deltas = prefill(params, cfg, batch["input_ids"], batch["attention_mask"],
                               batch["pixel_values"], batch["image_grid_thw"], s + 2)
    l_ids, h_ids, c_ids = decode(params, cfg, new[:, :1], cache, deltas)
    embeds = qwen25vl.embed_tokens(params, jnp.asarray(new[:, :1]))
    l_emb, h_emb, c_emb = decode(params, cfg, embeds, cache, deltas)
    np.testing.assert_array_equal(np.asarray(l_emb), np.asarray(l_ids))
    np.testing.assert_array_equal(np.asarray(c_emb["k"]), np.asarray(c_ids["k"]))


def _full_embeds(params, cfg, batch, full_ids):
    """Token embeddings of the extended sequence with the image features merged in."""
    embeds = qwen25vl.embed_tokens(params, jnp.asarray(full_ids))
    feats = qwen25vl.image_features(params, cfg, jnp.asarray(batch["pixel_values"]),
                                    jnp.asarray(batch["image_grid_thw"]))
    return qwen25vl.merge_image_features(embeds, jnp.asarray(full_ids), feats, cfg)


def _two_chunk_logits(params_text, params, cfg, embeds, full_ids, full_mask, pos, cut, max_len):
    p = dict(params, text=params_text)
    cache = qwen25vl.init_cache(cfg, full_ids.shape[0], max_len)
    outs = []
    for sl in (slice(0, cut), slice(cut, full_ids.shape[1])):
        out = qwen25vl.forward(p, cfg, full_ids[:, sl], full_mask[:, sl], inputs_embeds=embeds[:, sl],
                               position_ids=pos[:, :, sl], cache=cache)
        cache = out.cache
        outs.append(out.logits)
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("cut", [7, 40])
def test_two_chunk_cache_writes_equal_one_forward(tiny_dir, cut):
    batch, _, full_ids, full_mask = _extended(tiny_dir)
    cfg, params = jax_params(tiny_dir)
    fwd, _, _ = _jitted()
    full = fwd(params, cfg, full_ids, full_mask, batch["pixel_values"], batch["image_grid_thw"])
    embeds = _full_embeds(params, cfg, batch, full_ids)
    got, cache = jax.jit(_two_chunk_logits, static_argnums=(2, 7, 8))(
        params["text"], params, cfg, embeds, full_ids, full_mask, full.position_ids, cut, full_ids.shape[1] + 5)
    valid = full_mask.astype(bool)
    want = np.asarray(full.logits)
    assert int(cache["index"]) == full_ids.shape[1]
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], rtol=0, atol=1e-5 * np.max(np.abs(want)))


def test_gradient_through_cache_equals_uncached_gradient(tiny_dir):
    batch, _, full_ids, full_mask = _extended(tiny_dir)
    cfg, params = jax_params(tiny_dir)
    pos = qwen25vl.forward(params, cfg, full_ids, full_mask, None, batch["image_grid_thw"],
                           return_logits=False).position_ids
    embeds = _full_embeds(params, cfg, batch, full_ids)
    weights = jnp.asarray(np.random.RandomState(3).randn(*full_ids.shape, cfg.text.vocab_size), jnp.float32)
    weights = weights * full_mask[..., None]

    def cached_loss(params_text, e):
        logits, _ = _two_chunk_logits(params_text, params, cfg, e, full_ids, full_mask, pos, 23,
                                      full_ids.shape[1] + 2)
        return jnp.sum(logits * weights)

    def plain_loss(params_text, e):
        out = qwen25vl.forward(dict(params, text=params_text), cfg, full_ids, full_mask, inputs_embeds=e,
                               position_ids=pos)
        return jnp.sum(out.logits * weights)

    g_cached = jax.jit(jax.grad(cached_loss, argnums=(0, 1)))(params["text"], embeds)
    g_plain = jax.jit(jax.grad(plain_loss, argnums=(0, 1)))(params["text"], embeds)
    for a, b in zip(jax.tree.leaves(g_cached), jax.tree.leaves(g_plain)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, float(np.max(np.abs(b)))))
    assert float(np.max(np.abs(np.asarray(g_plain[1])))) > 0


def test_slot_writes_with_per_row_offsets_equal_one_forward(tiny_dir):
    """Two chunks at different offsets per row, written by ``slots`` (absolute positions,
    out-of-chunk tokens to one spare slot), give the logits of one uncached forward."""
    from ilvr_jax.model import text

    batch, _, full_ids, full_mask = _extended(tiny_dir)
    cfg, params = jax_params(tiny_dir)
    fwd, _, _ = _jitted()
    full = fwd(params, cfg, full_ids, full_mask, batch["pixel_values"], batch["image_grid_thw"],
               return_logits=False)
    embeds = _full_embeds(params, cfg, batch, full_ids)
    b, s = full_ids.shape
    cuts = np.array([9, 30, 51])[:b]
    spare = s
    rows = np.arange(b)[:, None]

    def run(params_text):
        cache = text.init_cache(cfg.text, b, s + 1)
        hidden = jnp.zeros((b, s + 1, cfg.text.hidden_size))  # last row: spare, like the cache
        width = s  # each chunk is a fixed window of `width` tokens starting at the row's offset
        for start, end in ((np.zeros(b, int), cuts), (cuts, np.full(b, s))):
            pos = start[:, None] + np.arange(width)[None]
            inside = pos < end[:, None]
            pos_c = np.minimum(pos, s - 1)
            slots = np.where(inside, pos_c, spare)
            write = inside & (full_mask[rows, pos_c] > 0)
            h, cache = text.decoder_forward(params_text, cfg.text, embeds[rows, pos_c],
                                            full.position_ids[:, rows, pos_c], write, cache=cache,
                                            slots=slots)
            hidden = hidden.at[rows, slots].set(h)
        return hidden[:, :s], cache

    hidden, cache = jax.jit(run)(params["text"])
    valid = full_mask.astype(bool)
    want = np.asarray(full.hidden)
    np.testing.assert_allclose(np.asarray(hidden)[valid], want[valid], rtol=0, atol=1e-5 * np.max(np.abs(want)))
    np.testing.assert_array_equal(np.asarray(cache["mask"])[:, :s], valid)
    assert not np.asarray(cache["mask"])[:, spare].any() and int(cache["index"]) == 0
