"""The in-place decode step equals the model's decode_step (logits, hidden, cache)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ilvr_jax.generate import pad_prompts
from ilvr_jax.generate.cached_step import decode_step_inplace
from ilvr_jax.model import qwen25vl


def test_inplace_step_equals_model_decode_step(gen_latent):
    s = gen_latent
    cfg, params = s.cfg, s.params
    batch = pad_prompts(s.prompts, s.tokenizer.pad_token_id, patch_dim=cfg.vision.patch_dim)
    b, seq = batch.input_ids.shape
    _, cache, deltas = jax.jit(qwen25vl.prefill, static_argnums=(1, 6))(
        params, cfg, batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw, seq + 4)
    ref_step = jax.jit(qwen25vl.decode_step, static_argnums=1)
    new_step = jax.jit(decode_step_inplace, static_argnums=1)
    rng = np.random.RandomState(0)
    ref, new = cache, jax.tree.map(jnp.copy, cache)
    for i in range(3):
        emb = jnp.asarray(rng.randn(b, 1, cfg.text.hidden_size).astype(np.float32))
        l_ref, h_ref, ref = ref_step(params, cfg, emb, ref, deltas)
        l_new, h_new, new = new_step(params, cfg, emb, new, deltas)
        np.testing.assert_allclose(np.asarray(l_new), np.asarray(l_ref), rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(h_new), np.asarray(h_ref), rtol=0, atol=1e-5)
    for key in ("k", "v"):
        np.testing.assert_allclose(np.asarray(new[key]), np.asarray(ref[key]), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new["mask"]), np.asarray(ref["mask"]))
    assert int(new["index"]) == int(ref["index"]) == seq + 3
