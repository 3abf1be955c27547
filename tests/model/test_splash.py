"""The splash kernel (Pallas interpret mode on the CPU) against XLA's attention
(``jax.nn.dot_product_attention``) with the dense masks the model builds: causal text with
right padding and GQA, non-causal window / frame segments of the vision tower, values and
gradients, on one device and inside shard_map on a (data, fsdp, tensor) mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilvr_jax import sharding
from ilvr_jax.model import layers, splash
from ilvr_jax.model.text import attention_mask_4d
from ilvr_jax.train import mesh as mesh_lib

BLOCK = 128


def _qkv(seed, b, s, hq, hkv, d, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (b, s, hq, d), dtype), jax.random.normal(kk, (b, s, hkv, d), dtype),
            jax.random.normal(kv, (b, s, hkv, d), dtype))


def _text_mask(lengths, s):
    """The decoder's structured mask for right-padded rows: real tokens id 0, every padding
    token an id of its own; the dense part is the decoder's own causal + key-validity mask."""
    valid = jnp.arange(s)[None, :] < jnp.asarray(lengths)[:, None]
    ids = jnp.where(valid, 0, -1 - jnp.arange(s, dtype=jnp.int32)[None, :])
    dense = attention_mask_4d(valid, jnp.arange(s, dtype=jnp.int32))
    return layers.SegmentMask(ids, ids, dense=dense, causal=True), valid


def _windows(rng, n, max_len, pad_tail):
    ids, seg = [], 0
    while len(ids) < n - pad_tail:
        ids += [seg] * int(rng.integers(1, max_len + 1))
        seg += 1
    return np.asarray(ids[: n - pad_tail] + [-1 - i for i in range(pad_tail)], np.int32)


def _value_and_grads(fn, q, k, v, keep):
    """Output and d(sum(out * c))/d(q, k, v) for a fixed random cotangent c on the kept rows."""
    c = jax.random.normal(jax.random.PRNGKey(7), q.shape, jnp.float32) * keep[:, :, None, None]
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * c)  # noqa: E731
    out = jax.jit(fn)(q, k, v)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _close(a, b, keep=None, tol=2e-5):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if keep is not None:
        a, b = a[np.asarray(keep)], b[np.asarray(keep)]
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("s,hq,hkv", [(256, 4, 2), (200, 4, 1)])  # 200: padded to the block inside
def test_causal_text_with_padding_and_gqa_matches_xla(s, hq, hkv):
    q, k, v = _qkv(0, 3, s, hq, hkv, 16)
    mask, valid = _text_mask([s, 150, 37], s)
    splash_fn = lambda q, k, v: splash.splash_attention(  # noqa: E731
        q, k, v, mask.q_segment_ids, mask.kv_segment_ids, causal=True, block=BLOCK, interpret=True)
    xla_fn = lambda q, k, v: layers.attention(q, k, v, mask.dense, "xla")  # noqa: E731
    out, grads = _value_and_grads(splash_fn, q, k, v, valid)
    ref, ref_grads = _value_and_grads(xla_fn, q, k, v, valid)
    _close(out, ref, valid)  # padding rows attend to themselves only under splash: not compared
    for g, r in zip(grads, ref_grads):
        _close(g, r)
    # The padding keys take no weight: changing them changes no real row.
    k2 = jnp.where(valid[:, :, None, None], k, 100.0)
    _close(jax.jit(splash_fn)(q, k2, v), out, valid)


def test_bfloat16_inputs_compute_in_bfloat16():
    q, k, v = _qkv(1, 2, 256, 4, 2, 32, jnp.bfloat16)
    mask, valid = _text_mask([256, 100], 256)
    out = splash.splash_attention(q, k, v, mask.q_segment_ids, mask.kv_segment_ids, causal=True,
                                  block=BLOCK, interpret=True)
    ref = layers.attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask.dense)
    assert out.dtype == jnp.bfloat16
    _close(out, ref, valid, tol=3e-2)


@pytest.mark.parametrize("n,w", [(301, 64)])  # 64: a Qwen2.5-VL window; 301: padded twice
def test_vision_windows_and_frames_match_xla(n, w):
    """Non-causal segment ids: the windowed blocks' banded layout and the full-attention
    blocks' frame ids, splash against XLA, values and gradients of every real patch."""
    rng = np.random.default_rng(n)
    q, k, v = _qkv(2, 2, n, 4, 4, 16)
    ids = jnp.asarray(np.stack([_windows(rng, n, w, pad_tail=5 * i) for i in range(2)]))
    keep = ids >= 0
    frames = jnp.where(ids >= 0, ids // 3, ids)  # several windows per segment, any length
    windowed = lambda impl: lambda q, k, v: layers.local_segment_attention(q, k, v, ids, w, impl)  # noqa: E731
    full = lambda impl: lambda q, k, v: layers.query_chunked_attention(q, k, v, frames, 64, impl)  # noqa: E731
    for fn in (windowed, full):
        out, grads = _value_and_grads(fn("splash"), q, k, v, keep)
        ref, ref_grads = _value_and_grads(fn("xla"), q, k, v, keep)
        _close(out, ref, keep)
        for g, r in zip(grads, ref_grads):
            _close(g, r)


def test_attention_dispatch_by_mask_kind():
    """``layers.attention``: a SegmentMask runs the kernel under "splash" and its dense mask
    everywhere else (the same numbers as passing that mask); a plain boolean mask under
    "splash" runs XLA."""
    q, k, v = _qkv(3, 2, 128, 2, 2, 8)
    mask, valid = _text_mask([128, 60], 128)
    dense_xla = layers.attention(q, k, v, mask.dense, None)
    np.testing.assert_array_equal(layers.attention(q, k, v, mask, None), dense_xla)
    np.testing.assert_array_equal(layers.attention(q, k, v, mask, "reference"),
                                  layers.attention(q, k, v, mask.dense, "reference"))
    np.testing.assert_array_equal(layers.attention(q, k, v, mask.dense, "splash"), dense_xla)
    out = layers.attention(q, k, v, mask, "splash")
    _close(out, dense_xla, valid)
    # The kernel ran: a padding query attends to itself alone there (its own value), while
    # the dense mask lets it see the real keys before it.
    pad = ~np.asarray(valid)
    _close(np.asarray(out)[pad], np.asarray(v)[pad])
    assert not np.allclose(np.asarray(dense_xla)[pad], np.asarray(v)[pad], atol=1e-3)
    # Without a dense part the ids and the causal flag say the mask.
    ids_only = layers.SegmentMask(mask.q_segment_ids, mask.kv_segment_ids, causal=True)
    _close(layers.attention(q, k, v, ids_only, "xla"), dense_xla, valid)


def test_inside_shard_map_on_a_mesh_matches_one_device():
    """On a (data 2, fsdp 2, tensor 2) mesh the kernel runs per shard (batch over data x
    fsdp, heads over tensor); a kv head count the tensor axis does not divide keeps heads
    whole. Same numbers as without a mesh."""
    if jax.device_count() < 8:
        pytest.skip("needs the 8 host devices of tests/conftest.py")
    mesh = mesh_lib.make_mesh((2, 2, 2))
    for hq, hkv in ((4, 2), (4, 1)):
        q, k, v = _qkv(4, 4, 128, hq, hkv, 8)
        mask, valid = _text_mask([128, 90, 128, 20], 128)
        alone = jax.jit(lambda q, k, v: layers.attention(q, k, v, mask, "splash"))(q, k, v)
        # A function of its own: jit's cache does not know about the activation mesh.
        on_mesh_fn = jax.jit(lambda q, k, v: layers.attention(q, k, v, mask, "splash"))
        with sharding.activation_mesh(mesh):
            lowered = on_mesh_fn.lower(q, k, v)
            on_mesh = on_mesh_fn(q, k, v)
        assert "manual_computation" in lowered.as_text()
        _close(on_mesh, alone, tol=1e-6)
        _close(alone, layers.attention(q, k, v, mask.dense), valid)
    # Gradients through the shard_map (the train step differentiates it on the mesh).
    grad = lambda q, k, v: jnp.sum(layers.attention(q, k, v, mask, "splash") * valid[:, :, None, None])  # noqa: E731
    alone = jax.jit(jax.grad(grad, argnums=(0, 1, 2)))(q, k, v)
    with sharding.activation_mesh(mesh):
        on_mesh = jax.jit(jax.grad(lambda *a: grad(*a), argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(on_mesh, alone):
        _close(g, r, tol=1e-5)


def test_block_sizes_divide_the_padded_length():
    assert splash.block_and_padded_len(8192, 512) == (512, 8192)
    assert splash.block_and_padded_len(200, 512) == (256, 256)
    assert splash.block_and_padded_len(700, 512) == (512, 1024)
    assert splash.block_and_padded_len(1, 128) == (128, 128)
    with pytest.raises(ValueError, match="multiple of 128"):
        splash.block_and_padded_len(256, 100)


def test_bad_shapes_name_what_is_wrong():
    q, k, v = _qkv(5, 1, 128, 3, 2, 8)
    ids = jnp.zeros((1, 128), jnp.int32)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2 kv heads"):
        splash.splash_attention(q, k, v, ids, ids, causal=True, interpret=True)
    with pytest.raises(ValueError, match="segment ids"):
        splash.splash_attention(q[:, :, :2], k, v, ids[:, :64], ids, causal=True, interpret=True)


def test_resolve_attention_impl_per_platform():
    r = layers.resolve_attention_impl
    assert (r("auto", "tpu"), r("auto", "gpu"), r("auto", "cuda"), r("auto", "cpu")) == \
        ("splash", "cudnn", "cudnn", "xla")
    assert r("auto", "rocm") == "xla" and r("auto", None) == "xla"
    assert r("auto", "gpu", "bfloat16") == r("auto", "gpu", jnp.float16) == "cudnn"
    assert r("auto", "gpu", "float32") == "xla" and r("auto", "tpu", "float32") == "splash"
    assert r("splash", "cpu") == "splash" and r("reference", "tpu") == "reference" and r(None, "tpu") == "xla"
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        r("flash", "tpu")
    assert splash.mesh_platform(mesh_lib.make_mesh((1, -1, 1))) == "cpu"
    assert splash.mesh_platform(None) is None


def test_text_decoder_with_splash_matches_xla(monkeypatch):
    """The decoder stack (scanned layers, full remat, right padding, GQA 2:1) with
    attn_impl="splash" runs its attention through the kernel and gives XLA's hidden states
    and parameter gradients on every real token."""
    from ilvr_jax.model import qwen25vl, text
    from ilvr_jax.model.config import TextConfig

    calls = []
    kernel = splash.splash_attention
    monkeypatch.setattr(splash, "splash_attention", lambda *a, **k: calls.append(k["causal"]) or kernel(*a, **k))
    cfg = TextConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3))
    params = qwen25vl.init_text_params(cfg, jax.random.PRNGKey(0))
    for name in ("q_proj", "k_proj"):  # peaked attention, so that the mask matters
        p = params["layers"]["self_attn"][name]
        p["kernel"] = p["kernel"] * 20.0
    b, s = 2, 200
    valid = jnp.arange(s)[None, :] < jnp.asarray([s, 120])[:, None]
    embeds = jax.random.normal(jax.random.PRNGKey(1), (b, s, cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(s), (3, b, s))
    c = jax.random.normal(jax.random.PRNGKey(2), (b, s, cfg.hidden_size)) * valid[..., None]

    def run(impl):
        def loss(p):
            h, _ = text.decoder_forward(p, cfg, embeds, pos, valid, remat_policy="full", attn_impl=impl)
            return jnp.sum(h * c), h
        return jax.jit(jax.grad(loss, has_aux=True))(params)

    grads, h = run("splash")
    assert calls == [True]
    ref_grads, ref = run(None)
    _close(h, ref, valid, tol=5e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        _close(g, r, tol=5e-5 * max(1.0, float(jnp.abs(r).max())))
