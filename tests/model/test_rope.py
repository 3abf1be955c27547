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


# (head_dim, theta) pairs of real models: Qwen2.5-VL's text (128, 1e6) and vision rotary
# (80 / 2 = 40, 1e4), Llama-style 1e4 / 5e5 heads of 64, 80, 128.
INV_FREQ_CASES = [(dim, theta) for dim in (40, 64, 80, 96, 128, 256) for theta in (1e4, 5e5, 1e6)]


def _torch_inv_freq_per_entry(theta, dim):
    """HF's formula with torch's scalar power kernel (each entry a one-element tensor)."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim
    return np.concatenate([(1.0 / (theta ** exponent[i:i + 1])).numpy() for i in range(exponent.shape[0])])


def _hf_text_inv_freq(theta, dim):
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    cfg = Qwen2_5_VLTextConfig(hidden_size=dim, num_attention_heads=1, num_key_value_heads=1,
                               rope_parameters={"rope_type": "default", "rope_theta": theta,
                                                "mrope_section": [dim // 2, 0, 0]})
    return Qwen2_5_VLRotaryEmbedding(cfg).inv_freq.numpy()


@pytest.mark.parametrize("dim,theta", INV_FREQ_CASES)
def test_inv_freq_bit_identical_to_torch_power(dim, theta):
    got = rope.rotary_inv_freq(theta, dim)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), _torch_inv_freq_per_entry(theta, dim).view(np.uint32))
    # HF's buffer (torch's vectorised kernel) may round an odd near-tie the other way.
    hf = _hf_text_inv_freq(theta, dim)
    ulps = np.abs(got.view(np.int32).astype(np.int64) - hf.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1 and np.count_nonzero(ulps) <= 2, (np.nonzero(ulps)[0], ulps.max())


_HF_INV_FREQ_SCRIPT = """
import json, sys
from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m
out = []
for dim, theta in json.loads(sys.argv[1]):
    t = Qwen2_5_VLTextConfig(hidden_size=dim, num_attention_heads=1, num_key_value_heads=1,
                             rope_parameters={"rope_type": "default", "rope_theta": theta,
                                              "mrope_section": [dim // 2, 0, 0]})
    v = Qwen2_5_VLVisionConfig(hidden_size=dim, num_heads=1)
    v.rope_parameters = {"rope_type": "axial", "rope_theta": theta}
    out.append([m.Qwen2_5_VLRotaryEmbedding(t).inv_freq.view(dtype=m.torch.int32).tolist(),
                m.Qwen2_5_VLVisionRotaryEmbedding(v).inv_freq.view(dtype=m.torch.int32).tolist()])
print(json.dumps(out))
"""


def test_inv_freq_bit_identical_to_hf_buffers_on_scalar_torch_kernels():
    """HF's own inv_freq buffers (text and vision rotary) computed by a torch that runs its
    scalar CPU kernels, bit for bit; the SIMD kernels' results depend on the host."""
    import json
    import subprocess

    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    done = subprocess.run([sys.executable, "-c", _HF_INV_FREQ_SCRIPT, json.dumps(INV_FREQ_CASES)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for (dim, theta), (text_bits, vision_bits) in zip(INV_FREQ_CASES, json.loads(done.stdout.splitlines()[-1])):
        np.testing.assert_array_equal(rope.rotary_inv_freq(theta, dim).view(np.int32), text_bits,
                                      err_msg=f"text rotary dim {dim} theta {theta}")
        np.testing.assert_array_equal(rope.rotary_inv_freq(theta, dim // 2).view(np.int32), vision_bits,
                                      err_msg=f"vision rotary head_dim {dim} theta {theta}")


def _large_positions(s, seed=0):
    """[3, 1, s] positions up to 128000 with different t/h/w ids (image-like spreads)."""
    rng = np.random.RandomState(seed)
    base = np.sort(rng.randint(0, 128000 - 64, size=s))
    base[-1] = 128000 - 64
    pos = np.stack([base, base + rng.randint(0, 64, s), base + rng.randint(0, 64, s)])
    return pos[:, None, :].astype(np.int32)


def test_cos_sin_and_rotation_match_hf_at_large_positions():
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding, apply_rotary_pos_emb

    from ilvr_jax.model.config import TextConfig

    tcfg = TextConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                      mrope_section=(16, 24, 24), rope_theta=1e6)
    assert tcfg.head_dim == 128
    hf_cfg = Qwen2_5_VLTextConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                   "mrope_section": [16, 24, 24]})
    emb = Qwen2_5_VLRotaryEmbedding(hf_cfg)
    pos = _large_positions(512)
    pos[:, 0, -1] = 128000
    want_cos, want_sin = emb(torch.zeros(1, dtype=torch.float32), torch.from_numpy(pos.astype(np.int64)))
    cos, sin = rope.mrope_cos_sin(pos, tcfg)
    # Columns whose inv_freq is bit-equal to HF's agree to float32 cos/sin rounding; a column
    # where HF's vectorised power rounded a near-tie the other way is one angle ulp off.
    inv = np.tile(rope.rotary_inv_freq(1e6, 128), 2)
    same = inv.view(np.uint32) == np.tile(emb.inv_freq.numpy(), 2).view(np.uint32)
    assert np.count_nonzero(~same) <= 2
    for got, want in ((cos, want_cos), (sin, want_sin)):
        got, want = np.asarray(got), want.numpy()
        np.testing.assert_allclose(got[..., same], want[..., same], rtol=0, atol=1e-6)
        np.testing.assert_allclose(got, want, rtol=0, atol=8e-6)

    rng = np.random.RandomState(1)
    q = rng.randn(1, pos.shape[-1], 2, 128).astype(np.float32)
    k = rng.randn(1, pos.shape[-1], 1, 128).astype(np.float32)
    want_q, want_k = apply_rotary_pos_emb(torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2),
                                          want_cos, want_sin)
    got_q, got_k = rope.apply_mrope(jnp.asarray(q), jnp.asarray(k), pos, tcfg)
    np.testing.assert_allclose(np.asarray(got_q), want_q.transpose(1, 2).numpy(), rtol=0, atol=4e-5)
    np.testing.assert_allclose(np.asarray(got_k), want_k.transpose(1, 2).numpy(), rtol=0, atol=4e-5)


def test_decoder_logits_match_hf_at_position_120000(tiny_dir, tmp_path):
    """A one-layer decoder with the real rotary (head_dim 128, theta 1e6, [16, 24, 24]) fed
    explicit position ids past 120000: hidden states and logits as HF's."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ilvr_jax.checkpoint.hf import load_hf_params
    from ilvr_jax.model import qwen25vl, text

    spec = Qwen2_5_VLConfig.from_pretrained(tiny_dir).to_dict()
    spec["text_config"].pop("layer_types", None)
    spec["text_config"].update(hidden_size=256, intermediate_size=128, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                               rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                "mrope_section": [16, 24, 24]})
    spec["vision_config"]["out_hidden_size"] = 256
    hf_cfg = Qwen2_5_VLConfig(**{k: v for k, v in spec.items() if k != "model_type"})
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, params = load_hf_params(str(tmp_path))
    assert (cfg.text.head_dim, cfg.text.rope_theta, tuple(cfg.text.mrope_section)) == (128, 1e6, (16, 24, 24))

    s = 48
    pos = np.broadcast_to(120000 + np.arange(s, dtype=np.int32), (3, 1, s)).copy()
    pos[1:, 0, 8:24] += np.arange(16, dtype=np.int32) % 4  # an image-like block: h/w ids differ
    embeds = np.random.RandomState(0).randn(1, s, 256).astype(np.float32)
    mask = np.ones((1, s), np.int64)
    with torch.no_grad():
        want_h = model.model.language_model(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask),
                                            position_ids=torch.from_numpy(pos.astype(np.int64))).last_hidden_state
        want_logits = model.lm_head(want_h).numpy()
    got_h, _ = jax.jit(text.decoder_forward, static_argnums=1)(params["text"], cfg.text, embeds, pos, mask)
    got_logits = np.asarray(qwen25vl.lm_logits(params, cfg, got_h))
    scale = float(np.max(np.abs(want_logits)))
    np.testing.assert_allclose(np.asarray(got_h), want_h.numpy(), rtol=0, atol=2e-5 * float(want_h.abs().max()))
    np.testing.assert_allclose(got_logits, want_logits, rtol=0, atol=2e-5 * scale)
