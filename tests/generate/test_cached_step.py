"""The decode-layout step equals the model's decode_step (logits, hidden, cache), and runs
in place: no copy of a cache buffer, no argmax pair-reduction in the compiled loop."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilvr_jax.generate import pad_prompts
from ilvr_jax.generate.cached_step import (decode_cache, decode_step, first_token_positions, layer_params,
                                           model_cache)
from ilvr_jax.generate.generation import decode_config
from ilvr_jax.generate.sampler import cache_length, compiled
from ilvr_jax.generate.sampling import first_argmax
from ilvr_jax.model import qwen25vl


def test_decode_step_equals_model_decode_step(gen_latent):
    s = gen_latent
    cfg, params = s.cfg, s.params
    batch = pad_prompts(s.prompts, s.tokenizer.pad_token_id, patch_dim=cfg.vision.patch_dim)
    b, seq = batch.input_ids.shape
    _, cache, deltas = jax.jit(qwen25vl.prefill, static_argnums=(1, 6))(
        params, cfg, batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw, seq + 4)
    ref_step = jax.jit(qwen25vl.decode_step, static_argnums=1)
    new_step = jax.jit(decode_step, static_argnums=2)
    per_layer = layer_params(params)
    rng = np.random.RandomState(0)
    ref = cache
    new = decode_cache(jax.tree.map(jnp.copy, cache))
    np.testing.assert_array_equal(np.asarray(model_cache(new)["k"]), np.asarray(cache["k"]))
    pos = first_token_positions(new, deltas)
    for i in range(3):
        emb = jnp.asarray(rng.randn(b, 1, cfg.text.hidden_size).astype(np.float32))
        l_ref, h_ref, ref = ref_step(params, cfg, emb, ref, deltas)
        l_new, h_new, new = new_step(params, per_layer, cfg, emb[:, 0], new, pos + i)
        np.testing.assert_allclose(np.asarray(l_new), np.asarray(l_ref[:, 0]), rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(h_new), np.asarray(h_ref[:, 0]), rtol=0, atol=1e-5)
    got = model_cache(new)
    for key in ("k", "v"):
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(ref[key]), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got["mask"]), np.asarray(ref["mask"]))
    assert int(got["index"]) == int(ref["index"]) == seq + 3


def test_first_argmax_equals_argmax_with_ties_and_nan():
    x = np.random.RandomState(1).randn(6, 37).astype(np.float32)
    x[1, [3, 20]] = 9.0  # tie: the first index wins
    x[2, :] = 0.0
    x[3, [5, 11]] = np.nan  # the first NaN wins
    x[4, 36] = np.inf
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, axis=1))


@pytest.mark.parametrize("rows", [1, 4])
def test_compiled_loop_keeps_the_cache_in_place(gen_latent, rows):
    """The optimised loop body has no copy of a cache-sized buffer (every step would pay it)
    and no variadic (value, index) reduce (argmax's scalar loop on CPU), at batch 1 too."""
    from ilvr_jax.generate import Prompt

    cfg, params = gen_latent.cfg, gen_latent.params
    dcfg = decode_config(gen_latent.tokenizer, cfg, latent_size=4)
    pre, loop = compiled(cfg, dcfg)
    prompts = [Prompt(np.arange(5 + 3 * i, dtype=np.int32), np.zeros((0, cfg.vision.patch_dim), np.float32),
                      np.zeros((0, 3), np.int32)) for i in range(rows)]
    batch = pad_prompts(prompts, dcfg.pad_id, patch_dim=cfg.vision.patch_dim)
    t = 16
    logits, hidden, cache, deltas = pre(params, batch=batch, cache_len=cache_length(batch.input_ids.shape[1], t))
    hlo = loop.lower(params, max_steps=t, cache=cache, logits=logits, hidden=hidden, rope_deltas=deltas,
                     last_prompt_token=jnp.asarray(batch.input_ids[:, -1]), budgets=jnp.full((rows,), t, jnp.int32),
                     stop_ids=jnp.asarray([-1], jnp.int32), key=jax.random.PRNGKey(0), temperature=jnp.float32(0),
                     top_k=jnp.int32(0), top_p=jnp.float32(1)).compile().as_text()
    k_shape = "f32[%s]" % ",".join(str(d) for d in cache.keys[0].shape)
    v_shape = "f32[%s]" % ",".join(str(d) for d in cache.values[0].shape)
    copies = [ln for ln in hlo.splitlines() if re.search(r"= (%s|%s)\{[0-9,]*\} copy\(" % (
        re.escape(k_shape), re.escape(v_shape)), ln)]
    assert not copies, copies[:2]
    assert not re.search(r"= \(f32\[%d\]\{0\}, s32\[%d\]\{0\}\) (reduce|fusion)\(" % (rows, rows), hlo)
