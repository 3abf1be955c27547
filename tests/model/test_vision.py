"""Vision tower parity with HF's torch Qwen2.5-VL vision module, on tiny local models."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ilvr_jax.model import vision
from ilvr_jax.model.config import ModelConfig
from ilvr_jax.tiny import TINY_SHAPES

_HF_CACHE: dict[str, tuple] = {}

# One jitted forward for every test (eager op-by-op dispatch is slow on CPU).
forward = jax.jit(vision.vision_forward, static_argnums=1,
                  static_argnames=("dtype", "remat_policy", "attn_impl", "attention_layout",
                                   "full_attention_chunk"))


def torch_visual_to_params(visual) -> dict:
    """HF ``model.model.visual`` state dict -> our ``params["visual"]`` tree (numpy fp32)."""
    sd = {k: v.detach().to(torch.float32).numpy() for k, v in visual.state_dict().items()}
    depth = len(visual.blocks)

    def lin(prefix, bias=True):
        out = {"kernel": sd[prefix + ".weight"].T}
        if bias:
            out["bias"] = sd[prefix + ".bias"]
        return out

    def stacked(fn):
        per_layer = [fn(f"blocks.{i}.") for i in range(depth)]
        return jax.tree.map(lambda *xs: np.stack(xs, 0), *per_layer)

    w = sd["patch_embed.proj.weight"]
    return {
        "patch_embed": {"kernel": w.reshape(w.shape[0], -1).T},
        "blocks": stacked(lambda p: {
            "norm1": {"scale": sd[p + "norm1.weight"]},
            "norm2": {"scale": sd[p + "norm2.weight"]},
            "attn": {"qkv": lin(p + "attn.qkv"), "proj": lin(p + "attn.proj")},
            "mlp": {k: lin(p + "mlp." + k) for k in ("gate_proj", "up_proj", "down_proj")},
        }),
        "merger": {
            "ln_q": {"scale": sd["merger.ln_q.weight"]},
            "fc1": lin("merger.mlp.0"),
            "fc2": lin("merger.mlp.2"),
        },
    }


def load(tiny_dirs, shape):
    """(vision cfg, torch visual module, our params) for a tiny shape, cached per session."""
    if shape not in _HF_CACHE:
        from transformers import Qwen2_5_VLForConditionalGeneration

        d = tiny_dirs(shape)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
        visual = model.model.visual
        _HF_CACHE[shape] = (ModelConfig.from_hf(d).vision, visual, torch_visual_to_params(visual), d)
    return _HF_CACHE[shape]


def checkpoint_visual_params(hf_dir):
    """``params["visual"]`` as the checkpoint loader reads it from the HF directory."""
    from ilvr_jax.checkpoint.hf import load_hf_params

    _, params = load_hf_params(hf_dir)
    return params["visual"]


def hf_tower(visual, pixel_values: np.ndarray, grid: list) -> np.ndarray:
    """HF merged tokens of a concatenation of images (the merger output, in image order)."""
    with torch.no_grad():
        out = visual(torch.from_numpy(pixel_values), grid_thw=torch.tensor(grid, dtype=torch.long))
    return out.pooler_output.numpy()


def random_patches(cfg, grids, seed):
    n = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).standard_normal((n, cfg.patch_dim)).astype(np.float32)


def processor_patches(hf_dir, sizes, seed):
    """Patches and grids of random RGB images run through HF's (PIL) image processor."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    with open(os.path.join(hf_dir, "preprocessor_config.json")) as f:
        pcfg = json.load(f)
    proc = Qwen2VLImageProcessorPil(**{k: v for k, v in pcfg.items()
                                       if k not in ("image_processor_type", "processor_class")})
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (hh, ww, 3), dtype=np.uint8)) for hh, ww in sizes]
    out = proc(images=images, return_tensors="np")
    return out["pixel_values"].astype(np.float32), [list(map(int, g)) for g in out["image_grid_thw"]]


def pack(samples, num_patches, num_images, patch_dim, pad_value=0.0):
    """[(patches [n, pd], grids)] per sample -> padded pixel_values [B, P, pd], grid_thw [B, I, 3]."""
    pv = np.full((len(samples), num_patches, patch_dim), pad_value, np.float32)
    gr = np.zeros((len(samples), num_images, 3), np.int32)
    for b, (patches, grids) in enumerate(samples):
        pv[b, : len(patches)] = patches
        if grids:
            gr[b, : len(grids)] = grids
    return jnp.asarray(pv), jnp.asarray(gr)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6))


# ----------------------------------------------------------------------------- HF internals
def hf_window_index(cfg, grid):
    from transformers.vision_utils import get_vision_window_index

    wi, cu = get_vision_window_index(torch.tensor(grid), spatial_merge_size=cfg.spatial_merge_size,
                                     window_size=cfg.window_size, patch_size=cfg.patch_size)
    return wi.numpy(), cu.numpy()


def hf_patch_perm(cfg, window_index):
    """HF's patch reorder (merge units permuted, 4 patches of a unit kept together)."""
    u = cfg.merge_unit
    return (window_index[:, None] * u + np.arange(u)[None]).reshape(-1)


def hf_segments_from_cu(cu, n):
    """Segment label of each position of a packed sequence split by ``cu_seqlens``."""
    return np.searchsorted(cu, np.arange(n), side="right") - 1


def same_segment(labels):
    labels = np.asarray(labels)
    return labels[:, None] == labels[None, :]


def hf_position_embeddings(visual, cfg, grid):
    from transformers.vision_utils import get_vision_position_ids

    pos = get_vision_position_ids(torch.tensor(grid), cfg.spatial_merge_size)
    x = torch.zeros(1)
    with torch.no_grad():
        cos, sin = visual.rotary_pos_emb(x, pos)
    return pos.numpy(), cos.numpy(), sin.numpy()


GRIDS_MIXED = [[1, 8, 12], [1, 4, 6], [1, 10, 14], [2, 4, 4], [1, 6, 2]]


@pytest.mark.parametrize("head_dim,theta", [(80, 10000.0), (64, 10000.0), (128, 10000.0), (96, 1e6)])
def test_rotary_inv_freq_bit_identical_to_hf(head_dim, theta):
    """The axial inv_freq of Qwen2.5-VL's vision rotary (theta 1e4 on head_dim / 2: 20
    entries at the real head_dim 80), bit for bit, for HF's buffer and torch's scalar power."""
    from transformers import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionRotaryEmbedding

    from ilvr_jax.model.config import VisionConfig

    hf_cfg = Qwen2_5_VLVisionConfig(hidden_size=head_dim * 2, num_heads=2)
    hf_cfg.rope_parameters = {"rope_type": "axial", "rope_theta": theta}
    hf = Qwen2_5_VLVisionRotaryEmbedding(hf_cfg).inv_freq.numpy()
    cfg = VisionConfig(hidden_size=head_dim * 2, num_heads=2, rope_theta=theta)
    assert cfg.head_dim == head_dim
    got = np.asarray(vision.rotary_inv_freq(cfg))
    spatial = head_dim // 2
    exponent = torch.arange(0, spatial, 2, dtype=torch.float) / spatial
    per_entry = np.concatenate([(1.0 / (theta ** exponent[i:i + 1])).numpy() for i in range(exponent.shape[0])])
    assert got.dtype == np.float32 and got.shape == hf.shape
    np.testing.assert_array_equal(got.view(np.uint32), per_entry.view(np.uint32))
    if head_dim == 80:  # the real tower: torch's vectorised power agrees here too (any SIMD width)
        np.testing.assert_array_equal(got.view(np.uint32), hf.view(np.uint32))


@pytest.mark.parametrize("shape", ["untied_gqa2", "tied_mqa"])
def test_rotary_tables_match_hf(tiny_dirs, shape):
    cfg, visual, _, _ = load(tiny_dirs, shape)
    pos, cos_hf, sin_hf = hf_position_embeddings(visual, cfg, GRIDS_MIXED)
    n = len(pos)
    lay = vision.patch_layout(cfg, jnp.asarray([GRIDS_MIXED], jnp.int32), n + 8)
    np.testing.assert_array_equal(np.asarray(lay["row"][0, :n]), pos[:, 0])
    np.testing.assert_array_equal(np.asarray(lay["col"][0, :n]), pos[:, 1])
    assert not np.asarray(lay["valid"][0, n:]).any() and np.asarray(lay["valid"][0, :n]).all()
    cos, sin = vision.rotary_tables(cfg, lay["row"], lay["col"])
    np.testing.assert_allclose(np.asarray(cos[0, :n]), cos_hf, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin[0, :n]), sin_hf, atol=1e-6)


@pytest.mark.parametrize("shape", ["untied_gqa2", "tied_mqa"])
def test_window_and_frame_segments_match_hf(tiny_dirs, shape):
    """Our window ids group exactly the patches HF puts in one window after its reorder, and
    our frame ids exactly HF's full-attention ``cu_seqlens`` segments."""
    from transformers.vision_utils import get_vision_cu_seqlens

    cfg, _, _, _ = load(tiny_dirs, shape)
    grid = GRIDS_MIXED
    n = sum(t * h * w for t, h, w in grid)
    wi, cu_win = hf_window_index(cfg, grid)
    perm = hf_patch_perm(cfg, wi)
    label_in_hf_order = hf_segments_from_cu(cu_win, n)
    hf_window = np.empty(n, np.int64)
    hf_window[perm] = label_in_hf_order  # back to processor order
    assert len(np.unique(hf_window)) > len(grid)  # several windows per image do occur

    lay = vision.patch_layout(cfg, jnp.asarray([grid], jnp.int32), n + 4)
    win = np.asarray(lay["window_id"][0])
    np.testing.assert_array_equal(same_segment(win[:n]), same_segment(hf_window))
    # Each merge unit lies in one window (the merger's 4 consecutive patches stay together).
    assert (win[:n].reshape(-1, 4) == win[:n].reshape(-1, 4)[:, :1]).all()

    cu_full = get_vision_cu_seqlens(torch.tensor(grid)).numpy()
    frame = np.asarray(lay["frame_id"][0])
    np.testing.assert_array_equal(same_segment(frame[:n]), same_segment(hf_segments_from_cu(cu_full, n)))
    # Padding patches: singleton segments, distinct from every real id.
    for ids in (win, frame):
        m = same_segment(ids)
        np.testing.assert_array_equal(m[n:], np.eye(len(ids), dtype=bool)[n:])


@pytest.mark.parametrize("full", [False, True], ids=["windowed", "full"])
def test_block_matches_hf(tiny_dirs, full):
    """One block on HF's reordered sequence (cu_seqlens split) vs ours (mask, no reorder)."""
    from transformers.vision_utils import get_vision_cu_seqlens

    cfg, visual, params, _ = load(tiny_dirs, "untied_gqa2")
    layer = cfg.fullatt_block_indexes[0] if full else 0
    assert (layer in cfg.fullatt_block_indexes) == full
    grid = [[1, 8, 12], [1, 10, 6]]
    n = sum(t * h * w for t, h, w in grid)
    hs = np.random.default_rng(1).standard_normal((n, cfg.hidden_size)).astype(np.float32)

    wi, cu_win = hf_window_index(cfg, grid)
    perm = hf_patch_perm(cfg, wi)
    _, cos, sin = hf_position_embeddings(visual, cfg, grid)
    cu = get_vision_cu_seqlens(torch.tensor(grid)) if full else torch.tensor(cu_win)
    with torch.no_grad():
        out_perm = visual.blocks[layer](torch.from_numpy(hs[perm]), cu_seqlens=cu,
                                        position_embeddings=(torch.from_numpy(cos[perm]),
                                                             torch.from_numpy(sin[perm]))).numpy()
    ref = np.empty_like(out_perm)
    ref[perm] = out_perm

    lay = vision.patch_layout(cfg, jnp.asarray([grid], jnp.int32), n)
    c, s = vision.rotary_tables(cfg, lay["row"], lay["col"])
    mask = vision.segment_mask(lay["frame_id"] if full else lay["window_id"])
    p_layer = jax.tree.map(lambda a: jnp.asarray(a[layer]), params["blocks"])
    out = vision.vision_block(p_layer, cfg, jnp.asarray(hs)[None], c, s, mask)[0]
    err = rel_err(out, ref)
    print(f"block {'full' if full else 'windowed'}: rel max diff {err:.2e}")
    assert err < 1e-5


def test_merger_matches_hf(tiny_dirs):
    cfg, visual, params, _ = load(tiny_dirs, "untied_gqa2")
    hs = np.random.default_rng(2).standard_normal((48, cfg.hidden_size)).astype(np.float32)
    with torch.no_grad():
        ref = visual.merger(torch.from_numpy(hs)).numpy()
    out = vision.merger(jax.tree.map(jnp.asarray, params["merger"]), cfg, jnp.asarray(hs)[None])[0]
    err = rel_err(out, ref)
    print(f"merger: rel max diff {err:.2e}")
    assert err < 1e-5


def _case(case, cfg, hf_dir):
    """Samples [(patches, grids)] for a named tower test case."""
    if case == "one_image":
        g = [[1, 4, 6]]
        return [(random_patches(cfg, g, 3), g)]
    if case == "two_images_one_sample":
        pv, g = processor_patches(hf_dir, [(100, 150), (200, 90)], seed=4)
        return [(pv, g)]
    if case == "batch_padding":
        # Sample 1 also holds a two-frame grid (t = 2: one attention segment per frame, as HF).
        g0, g1 = [[1, 6, 4]], [[1, 4, 4], [2, 8, 6], [1, 2, 2]]
        return [(random_patches(cfg, g0, 5), g0), (random_patches(cfg, g1, 6), g1)]
    if case == "many_windows_and_non_multiple":
        # 8x12 patches: a 4x6 merge grid (several windows); 10x14: a 5x7 merge grid, which is
        # a multiple of neither window side (2 or 4 merge units).
        g = [[1, 8, 12], [1, 10, 14]]
        return [(random_patches(cfg, g, 7), g)]
    if case == "processor_large":
        pv, g = processor_patches(hf_dir, [(300, 300), (60, 420)], seed=8)
        return [(pv, g)]
    raise ValueError(case)


TOWER_CASES = ["one_image", "two_images_one_sample", "batch_padding",
               "many_windows_and_non_multiple", "processor_large"]


@pytest.mark.parametrize("case", TOWER_CASES)
@pytest.mark.parametrize("shape", sorted(TINY_SHAPES))
def test_tower_matches_hf(tiny_dirs, shape, case):
    cfg, visual, _, hf_dir = load(tiny_dirs, shape)
    params = checkpoint_visual_params(hf_dir)
    samples = _case(case, cfg, hf_dir)
    n_max = max(len(p) for p, _ in samples)
    num_patches = n_max + 8 if case == "batch_padding" else n_max  # extra padding in that case
    i_max = max(len(g) for _, g in samples) + (1 if case == "batch_padding" else 0)
    pv, grid = pack(samples, num_patches, i_max, cfg.patch_dim)
    out = np.asarray(forward(jax.tree.map(jnp.asarray, params), cfg, pv, grid))
    assert out.shape == (len(samples), num_patches // 4, cfg.out_hidden_size)
    assert np.isfinite(out).all()
    errs = []
    for b, (patches, grids) in enumerate(samples):
        ref = hf_tower(visual, patches, grids)
        errs.append(rel_err(out[b, : len(ref)], ref))
        assert not out[b, len(ref):].any(), "rows past the real tokens must be zero"
    print(f"tower {shape}/{case}: rel max diff {max(errs):.2e}")
    assert max(errs) < 1e-5


def test_state_dict_conversion_matches_checkpoint_loader(tiny_dirs):
    """The test's own torch -> tree conversion and the checkpoint loader agree exactly."""
    _, _, params, hf_dir = load(tiny_dirs, "untied_gqa2")
    loaded = checkpoint_visual_params(hf_dir)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_padding_does_not_change_real_outputs(tiny_dirs):
    cfg, _, params, _ = load(tiny_dirs, "untied_gqa2")
    params = jax.tree.map(jnp.asarray, params)
    g = [[1, 8, 12], [1, 4, 6]]
    patches = random_patches(cfg, g, 9)
    n = len(patches)
    tight_pv, tight_grid = pack([(patches, g)], n, 2, cfg.patch_dim)
    # Padding patches with large garbage values and an extra empty image row.
    loose_pv, loose_grid = pack([(patches, g)], n + 24, 4, cfg.patch_dim, pad_value=50.0)
    tight = np.asarray(forward(params, cfg, tight_pv, tight_grid))
    loose = np.asarray(forward(params, cfg, loose_pv, loose_grid))
    assert np.isfinite(loose).all()
    np.testing.assert_allclose(loose[:, : n // 4], tight, rtol=0, atol=1e-6 * np.abs(tight).max())
    assert not loose[:, n // 4:].any()
    # A sample with no image at all: all-zero output, no NaN.
    empty = np.asarray(forward(params, cfg, loose_pv, jnp.zeros_like(loose_grid)))
    assert np.isfinite(empty).all() and not empty.any()


def test_jit_remat_full_same_values_and_grads(tiny_dirs):
    cfg, _, params, _ = load(tiny_dirs, "untied_gqa2")
    params = jax.tree.map(jnp.asarray, params)
    g0, g1 = [[1, 8, 12]], [[1, 4, 4], [1, 6, 2]]
    pv, grid = pack([(random_patches(cfg, g0, 10), g0), (random_patches(cfg, g1, 11), g1)],
                    100, 2, cfg.patch_dim)

    @functools.partial(jax.jit, static_argnums=1)
    def out_and_grad(p, policy):
        def loss(p):
            out = vision.vision_forward(p, cfg, pv, grid, remat_policy=policy)
            return jnp.sum(out * out), out

        return jax.grad(loss, has_aux=True)(p)

    ref_grad, ref_out = out_and_grad(params, "none")
    scale = float(jnp.abs(ref_out).max())
    for policy in ("full",):
        grad, out = out_and_grad(params, policy)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=0, atol=1e-6 * scale)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
            assert np.isfinite(np.asarray(a)).all()
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                       atol=1e-6 * float(jnp.abs(b).max()) + 1e-12)


def test_reference_attention_same_as_xla(tiny_dirs):
    cfg, _, params, _ = load(tiny_dirs, "untied_gqa2")
    params = jax.tree.map(jnp.asarray, params)
    g = [[1, 8, 12], [1, 2, 6]]
    pv, grid = pack([(random_patches(cfg, g, 13), g)], 120, 3, cfg.patch_dim)
    ref = np.asarray(forward(params, cfg, pv, grid))
    out = np.asarray(forward(params, cfg, pv, grid, attn_impl="reference"))
    assert rel_err(out, ref) < 1e-6


def test_splash_attention_same_as_xla(tiny_dirs, monkeypatch):
    """The splash kernel (interpret mode) in the windowed blocks (banded layout) and the
    full-attention blocks (frame ids), padding patches included, as XLA's attention."""
    from ilvr_jax.model import splash

    calls = []
    kernel = splash.splash_attention
    monkeypatch.setattr(splash, "splash_attention", lambda *a, **k: calls.append(k["causal"]) or kernel(*a, **k))
    cfg, _, params, _ = load(tiny_dirs, "untied_gqa2")
    params = jax.tree.map(jnp.asarray, params)
    g = [[1, 8, 12], [1, 2, 6]]
    pv, grid = pack([(random_patches(cfg, g, 13), g)], 120, 3, cfg.patch_dim)
    ref = np.asarray(forward(params, cfg, pv, grid))
    out = np.asarray(jax.jit(vision.vision_forward, static_argnums=1, static_argnames="attn_impl")(
        params, cfg, pv, grid, attn_impl="splash"))
    assert calls == [False, False]  # traced once per branch: the windowed and the full blocks
    assert rel_err(out, ref) < 1e-5


def test_bf16_close_to_fp32(tiny_dirs):
    cfg, _, params, _ = load(tiny_dirs, "untied_gqa2")
    params = jax.tree.map(jnp.asarray, params)
    g = [[1, 8, 12]]
    pv, grid = pack([(random_patches(cfg, g, 12), g)], 100, 1, cfg.patch_dim)
    ref = np.asarray(forward(params, cfg, pv, grid))
    out = forward(params, cfg, pv, grid, dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    assert rel_err(out, ref) < 5e-2


def test_token_helpers():
    grid = np.array([[[1, 4, 6], [1, 2, 2], [0, 0, 0]], [[0, 0, 0], [0, 0, 0], [0, 0, 0]],
                     [[2, 4, 4], [0, 0, 0], [1, 2, 4]]], np.int32)
    counts = np.asarray(vision.merged_token_counts(jnp.asarray(grid), 2))
    np.testing.assert_array_equal(counts, [[6, 1, 0], [0, 0, 0], [8, 0, 2]])
    ids = np.asarray(vision.merged_token_image_ids(jnp.asarray(grid), 12, 2))
    expected = -np.ones((3, 12), np.int64)
    for b in range(3):
        pos = 0
        for k, c in enumerate(counts[b]):
            expected[b, pos:pos + c] = k
            pos += c
    np.testing.assert_array_equal(ids, expected)


def test_init_and_axes_match_hf_tree(tiny_dirs):
    cfg, _, params, _ = load(tiny_dirs, "tied_mqa")
    init = vision.init_vision_params(cfg, jax.random.PRNGKey(0))
    axes = vision.vision_param_axes(cfg)
    assert jax.tree.structure(init) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(params)):
        assert a.shape == b.shape and a.dtype == jnp.float32
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple)) == jax.tree.structure(init)
    for names, leaf in zip(flat_axes, jax.tree.leaves(init)):
        assert len(names) == leaf.ndim
    assert axes["blocks"]["attn"]["qkv"]["kernel"] == ("layers", "vision_embed", "qkv")
    k = np.asarray(init["blocks"]["attn"]["qkv"]["kernel"])
    assert 0.018 < k.std() < 0.022 and np.abs(k).max() <= 2 * 0.02 / 0.8796 + 1e-6
    assert not np.asarray(init["blocks"]["mlp"]["up_proj"]["bias"]).any()
    np.testing.assert_array_equal(np.asarray(init["merger"]["ln_q"]["scale"]), 1.0)
    out = forward(init, cfg, jnp.ones((1, 16, cfg.patch_dim)), jnp.asarray([[[1, 4, 4]]]))
    assert np.isfinite(np.asarray(out)).all()


def test_sharded_forward_matches_single_device(tiny_dirs):
    """Under a (data, fsdp, tensor) mesh with params sharded by ``vision_param_axes`` and the
    activation constraints active, the tower gives the single-device numbers."""
    from ilvr_jax import sharding

    cfg, _, params, _ = load(tiny_dirs, "untied_gqa2")
    params = jax.tree.map(jnp.asarray, params)
    grids = [[[1, 8, 12]], [[1, 4, 4], [1, 6, 2]], [[1, 2, 2]], []]
    samples = [(random_patches(cfg, g, 20 + i), g) for i, g in enumerate(grids)]
    pv, grid = pack(samples, 96, 2, cfg.patch_dim)
    ref = np.asarray(forward(params, cfg, pv, grid))

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), sharding.MESH_AXES)
    axes = vision.vision_param_axes(cfg)
    shardings = jax.tree.map(lambda names, x: sharding.named_sharding(mesh, names, x.shape),
                             axes, params, is_leaf=lambda x: isinstance(x, tuple))
    sharded = jax.device_put(params, shardings)
    assert sharded["blocks"]["attn"]["qkv"]["kernel"].sharding.spec != jax.sharding.PartitionSpec()
    pv_s = jax.device_put(pv, sharding.named_sharding(mesh, ("batch", "patches", None), pv.shape))
    with sharding.activation_mesh(mesh):
        fn = jax.jit(vision.vision_forward, static_argnums=1)
        out = fn(sharded, cfg, pv_s, grid)
    assert out.sharding.spec[0] is not None  # the batch axis stays sharded
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_full_size_config_shapes():
    """Qwen2.5-VL-7B's vision config traces (abstractly) to the expected shapes."""
    from ilvr_jax.model.config import VisionConfig

    cfg = VisionConfig()
    params = jax.eval_shape(lambda: vision.init_vision_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16))
    assert params["blocks"]["attn"]["qkv"]["kernel"].shape == (32, 1280, 3840)
    assert params["merger"]["fc2"]["kernel"].shape == (5120, 3584)
    out = jax.eval_shape(
        lambda p, x, g: vision.vision_forward(p, cfg, x, g, dtype=jnp.bfloat16, remat_policy="full"),
        params, jax.ShapeDtypeStruct((2, 1024, 1176), jnp.float32), jax.ShapeDtypeStruct((2, 3, 3), jnp.int32))
    assert out.shape == (2, 256, 3584) and out.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- window layout
@pytest.mark.parametrize("shape", ["untied_gqa2", "tied_mqa"])
def test_window_permutation_is_hf_window_order(tiny_dirs, shape):
    """``x[perm]`` is exactly HF's reordered sequence (``get_vision_window_index`` on patches);
    padding patches follow in their own order."""
    cfg, _, _, _ = load(tiny_dirs, shape)
    grid = GRIDS_MIXED
    n = sum(t * h * w for t, h, w in grid)
    wi, cu = hf_window_index(cfg, grid)
    lay = vision.patch_layout(cfg, jnp.asarray([grid + [[0, 0, 0]]], jnp.int32), n + 12)
    perm = np.asarray(vision.window_permutation(cfg, lay)[0])
    np.testing.assert_array_equal(perm[:n], hf_patch_perm(cfg, wi))
    np.testing.assert_array_equal(perm[n:], np.arange(n, n + 12))
    assert np.diff(cu).max() <= vision.window_patches(cfg)  # no window is longer than the blocks


def _layout_case(cfg, seed):
    """Two samples: non-multiple grids with several windows, a two-frame grid, padding."""
    g0, g1 = [[1, 8, 12], [1, 10, 14]], [[1, 4, 4], [2, 8, 6], [1, 6, 2]]
    return pack([(random_patches(cfg, g0, seed), g0), (random_patches(cfg, g1, seed + 1), g1)],
                272, 4, cfg.patch_dim, pad_value=3.0)


@pytest.mark.parametrize("shape", sorted(TINY_SHAPES))
def test_windowed_layout_equals_dense_masks(tiny_dirs, shape):
    """HF's window order with block-local and query-chunked attention gives the numbers of
    the dense P x P masks in processor order: values, and (on the shape that mixes windowed
    and full-attention blocks) gradients through the remat'd scan."""
    cfg, _, params, _ = load(tiny_dirs, shape)
    params = jax.tree.map(jnp.asarray, params)
    pv, grid = _layout_case(cfg, 30)
    dense = np.asarray(forward(params, cfg, pv, grid, attention_layout="dense"))
    scale = np.abs(dense).max()
    for chunk in (vision.FULL_ATTENTION_QUERY_CHUNK, 40):  # one chunk; several, not dividing P
        out = np.asarray(forward(params, cfg, pv, grid, full_attention_chunk=chunk))
        err = float(np.abs(out - dense).max() / scale)
        print(f"{shape} windowed (full-attention chunk {chunk}) vs dense: rel max diff {err:.1e}")
        assert err < 1e-6
    if shape != "untied_gqa2":
        return

    @functools.partial(jax.jit, static_argnums=(1,))
    def grads(p, layout):
        def loss(p):
            out = vision.vision_forward(p, cfg, pv, grid, remat_policy="full", attention_layout=layout,
                                        full_attention_chunk=40)
            return jnp.sum(out * out)

        return jax.grad(loss)(p)

    for a, b in zip(jax.tree.leaves(grads(params, "windowed")), jax.tree.leaves(grads(params, "dense"))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                   atol=1e-6 * float(jnp.abs(b).max()) + 1e-12)


def test_windowed_layout_memory_grows_linearly():
    """Compiled temporaries (nothing is run) of a tiny-width tower at P = 4096 and 16384
    patches. Measured on CPU, MiB: windowed blocks only 21 -> 85 (4.0x), with a
    full-attention block 68 -> 272 (4.0x); dense masks 402 -> 6406 (16x)."""
    from ilvr_jax.model.config import VisionConfig

    def temp_bytes(cfg, p, layout):
        params = jax.eval_shape(lambda: vision.init_vision_params(cfg, jax.random.PRNGKey(0)))
        fn = jax.jit(lambda w, x, g: vision.vision_forward(w, cfg, x, g, attention_layout=layout))
        return fn.lower(params, jax.ShapeDtypeStruct((1, p, cfg.patch_dim), jnp.float32),
                        jax.ShapeDtypeStruct((1, 2, 3), jnp.int32)).compile().memory_analysis().temp_size_in_bytes

    growth = {}
    for full in ((), (1,)):
        cfg = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=full)
        layouts = ("windowed", "dense") if not full else ("windowed",)
        for layout in layouts:
            small, large = temp_bytes(cfg, 4096, layout), temp_bytes(cfg, 16384, layout)
            growth[(full, layout)] = large / small
    print(f"temp bytes growth for 4x patches: {growth}")
    assert growth[((), "dense")] > 12  # the quadratic layout does grow as P^2
    assert growth[((), "windowed")] < 5 and growth[((1,), "windowed")] < 5
