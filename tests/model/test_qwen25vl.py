"""The whole Qwen2.5-VL (vision tower, merge, M-RoPE, decoder, head) against HF's torch model."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _lm_reference import BATCHES, build_batch, hf_forward, hf_model, jax_params  # noqa: E402

from ilvr_jax.model import qwen25vl  # noqa: E402
from ilvr_jax.tiny import TINY_SHAPES  # noqa: E402

_forward = jax.jit(qwen25vl.forward, static_argnums=1, static_argnames=("dtype", "return_logits"))


def _jax_forward(params, batch, **kw):
    has_images = batch["hf"]["pixel_values"].shape[0] > 0
    return _forward(params, batch["cfg"], batch["input_ids"], batch["attention_mask"],
                    batch["pixel_values"] if has_images else None, batch["image_grid_thw"], **kw)


@pytest.mark.parametrize("batch_name", sorted(BATCHES))
@pytest.mark.parametrize("shape", sorted(TINY_SHAPES))
def test_logits_match_hf(tiny_dirs, shape, batch_name):
    hf_dir = tiny_dirs(shape)
    samples, side = BATCHES[batch_name]
    batch = build_batch(hf_dir, samples, side)
    want = hf_forward(hf_model(hf_dir), batch)
    cfg, params = jax_params(hf_dir)
    out = _jax_forward(params, batch)
    valid = batch["attention_mask"].astype(bool)
    want_logits = want.logits.numpy()
    got = np.asarray(out.logits)
    assert got.dtype == np.float32 and got.shape == want_logits.shape
    scale = float(np.max(np.abs(want_logits[valid])))
    diff = float(np.max(np.abs(got[valid] - want_logits[valid])))
    print(f"\nlogits parity {shape}/{batch_name}: max|diff| {diff:.3e}, scale {scale:.3e}, "
          f"relative {diff / scale:.3e}")
    assert diff <= 1e-4 * scale
    want_hidden = want.hidden_states[-1].numpy()
    np.testing.assert_allclose(np.asarray(out.hidden)[valid], want_hidden[valid], rtol=0,
                               atol=1e-4 * float(np.max(np.abs(want_hidden[valid]))))
    # Positions and deltas are those HF's generation would store.
    model = hf_model(hf_dir)
    np.testing.assert_array_equal(np.asarray(out.rope_deltas), model.model.rope_deltas.numpy()[:, 0])


def test_merge_image_features_matches_masked_scatter():
    """Per sample, the k-th image token receives merged vision token k (torch masked_scatter)."""
    import torch

    from ilvr_jax.model.config import ModelConfig

    cfg = ModelConfig()
    t = cfg.image_token_id
    ids = np.array([[1, t, t, 2, t, 3, 0], [t, 5, 6, t, t, t, 9]], np.int32)
    rng = np.random.RandomState(0)
    embeds = rng.randn(2, 7, 4).astype(np.float32)
    feats = rng.randn(2, 5, 4).astype(np.float32)
    got = np.asarray(qwen25vl.merge_image_features(jnp.asarray(embeds), jnp.asarray(ids), jnp.asarray(feats), cfg))
    for b in range(2):
        n = int((ids[b] == t).sum())
        mask = torch.from_numpy(ids[b] == t)[:, None].expand(-1, 4)
        want = torch.from_numpy(embeds[b]).masked_scatter(mask, torch.from_numpy(feats[b, :n]))
        np.testing.assert_array_equal(got[b], want.numpy())


def test_inputs_embeds_path_equals_ids_path(tiny_dir):
    samples, side = BATCHES["mixed_left"]
    batch = build_batch(tiny_dir, samples, side)
    cfg, params = jax_params(tiny_dir)
    ref = _jax_forward(params, batch)
    embeds = qwen25vl.embed_tokens(params, jnp.asarray(batch["input_ids"]))
    out = _jax_forward(params, batch, inputs_embeds=embeds)
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(ref.logits))
    # Different embeddings at text positions change the output: the argument is really used.
    out2 = _jax_forward(params, batch, inputs_embeds=embeds * 1.5)
    assert not np.allclose(np.asarray(out2.logits), np.asarray(ref.logits))


def test_tied_head_uses_embedding(tiny_dirs):
    cfg, params = jax_params(tiny_dirs("tied_mqa"))
    assert cfg.text.tie_word_embeddings and "lm_head" not in params
    h = np.random.RandomState(0).randn(2, 3, cfg.text.hidden_size).astype(np.float32)
    want = h @ np.asarray(params["text"]["embed_tokens"]["embedding"]).T
    np.testing.assert_allclose(np.asarray(qwen25vl.lm_logits(params, cfg, jnp.asarray(h))), want,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", sorted(TINY_SHAPES))
def test_init_params_and_axes_match_checkpoint_tree(tiny_dirs, shape):
    cfg, ref = jax_params(tiny_dirs(shape))
    params = jax.eval_shape(lambda k: qwen25vl.init_params(cfg, k, jnp.float32), jax.random.PRNGKey(0))
    axes = qwen25vl.param_axes(cfg)
    ref_shapes = jax.tree.map(lambda a: tuple(a.shape), ref)
    assert jax.tree.map(lambda a: tuple(a.shape), params) == ref_shapes
    flat_axes = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    flat_shapes = dict(jax.tree_util.tree_flatten_with_path(ref_shapes, is_leaf=lambda x: isinstance(x, tuple))[0])
    assert len(flat_axes) == len(flat_shapes)
    for path, names in flat_axes:
        assert len(names) == len(flat_shapes[path]), (path, names)
    assert axes["text"]["layers"]["self_attn"]["q_proj"]["kernel"] == ("layers", "embed", "qkv")
    assert axes["text"]["embed_tokens"]["embedding"] == ("vocab", "embed")


def test_sharded_forward_under_mesh_equals_single_device(tiny_dir):
    """Params sharded by param_axes, activations constrained on a (data, fsdp, tensor) mesh:
    the same logits as on one device."""
    from jax.sharding import Mesh

    from ilvr_jax import sharding

    samples, side = BATCHES["mixed_left"]
    batch = build_batch(tiny_dir, samples + [((), "up")], side)  # batch 4: divisible by data*fsdp
    cfg, params = jax_params(tiny_dir)
    ref = _jax_forward(params, batch)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), sharding.MESH_AXES)
    axes = qwen25vl.param_axes(cfg)
    placed = jax.tree.map(lambda names, a: jax.device_put(a, sharding.named_sharding(mesh, names, a.shape)),
                          axes, params, is_leaf=lambda x: isinstance(x, tuple))
    batch_sharded = {k: jax.device_put(batch[k], sharding.named_sharding(mesh, ("batch",) + (None,) *
                                                                         (batch[k].ndim - 1), batch[k].shape))
                     for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    with sharding.activation_mesh(mesh):
        out = jax.jit(qwen25vl.forward, static_argnums=1)(
            placed, cfg, batch_sharded["input_ids"], batch_sharded["attention_mask"],
            batch_sharded["pixel_values"], batch_sharded["image_grid_thw"])
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), rtol=0, atol=1e-5)


def test_bfloat16_forward_is_close_to_float32(tiny_dir):
    samples, side = BATCHES["mixed_left"]
    batch = build_batch(tiny_dir, samples, side)
    cfg, params = jax_params(tiny_dir)
    ref = _jax_forward(params, batch)
    out = _jax_forward(params, batch, dtype=jnp.bfloat16)
    assert out.logits.dtype == jnp.float32 and out.hidden.dtype == jnp.bfloat16
    valid = batch["attention_mask"].astype(bool)
    got, want = np.asarray(out.logits)[valid], np.asarray(ref.logits)[valid]
    assert np.all(np.isfinite(got))
    assert np.max(np.abs(got - want)) <= 0.1 * np.max(np.abs(want))
