"""HF directory <-> parameter tree: name map, transforms, layouts, shards, errors, memory."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from ilvr_jax.checkpoint.hf import INDEX_FILE, load_hf_params, param_shapes, save_hf
from ilvr_jax.checkpoint.safetensors_io import SafetensorsFile

LEGACY_TO_T5 = (("visual.", "model.visual."), ("model.", "model.language_model."))


def _read_dir(d: str) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory, read with the safetensors library (the reference reader)."""
    index = os.path.join(d, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    out = {}
    for s in shards:
        out.update(load_file(os.path.join(d, s)))
    return out


def _to_t5_name(name: str) -> str:
    for old, new in LEGACY_TO_T5:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _copy_dir_with(src: str, dst: str, tensors: dict[str, np.ndarray] | None = None) -> str:
    """A copy of ``src``'s non-weight files, with ``tensors`` as its model.safetensors."""
    os.makedirs(dst, exist_ok=True)
    for n in os.listdir(src):
        if not n.endswith(".safetensors") and n != INDEX_FILE:
            shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))
    if tensors is not None:
        save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def _assert_trees_equal(a: dict, b: dict, path: str = "") -> None:
    assert sorted(a) == sorted(b), path
    for k in a:
        if isinstance(a[k], dict):
            _assert_trees_equal(a[k], b[k], f"{path}/{k}")
        else:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{path}/{k}"
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{path}/{k}")


def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("layout", ["legacy", "transformers5"])
def test_round_trip_is_bit_identical(tiny_dirs, tiny_shape, layout, tmp_path):
    src = tiny_dirs(tiny_shape)
    cfg, params = load_hf_params(src)
    want = {k: v for k, v in param_shapes(cfg).items()}
    assert {tuple(p) for p in want} == {
        tuple(p) for p in _flat_paths(params)
    }, "tree leaves differ from the contract"
    assert ("lm_head", "kernel") in want or cfg.text.tie_word_embeddings
    names = save_hf(params, cfg, str(tmp_path), tokenizer_dir=src, layout=layout)
    assert len(names) == 1 and names[0] == "model-00001-of-00001.safetensors"
    original = _read_dir(src)
    exported = _read_dir(str(tmp_path))
    if layout == "transformers5":
        original = {_to_t5_name(k): v for k, v in original.items()}
    if cfg.text.tie_word_embeddings:
        # A tied head is the embedding; HF writes no lm_head.weight for it either.
        original.pop("lm_head.weight", None)
    assert sorted(original) == sorted(exported)
    for k, v in original.items():
        assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
        assert exported[k].tobytes() == v.tobytes(), k
    # And back again: the exported directory loads to the same tree.
    cfg2, params2 = load_hf_params(str(tmp_path))
    assert cfg2 == cfg
    _assert_trees_equal(params, params2)


def _flat_paths(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat_paths(v, (*prefix, k))
        else:
            yield (*prefix, k)


def test_leaves_compute_what_the_torch_modules_compute(tiny_dirs, tiny_shape):
    """Independent of the name map's inverse: every torch Linear / the patch Conv3d applied to
    random inputs equals the matmul with our kernel (and bias), layer by layer."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    src = tiny_dirs(tiny_shape)
    cfg, params = load_hf_params(src)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(src).eval()
    rng = np.random.default_rng(0)
    ours = {
        "model.visual.blocks.{i}.attn.qkv": "visual/blocks/attn/qkv",
        "model.visual.blocks.{i}.attn.proj": "visual/blocks/attn/proj",
        "model.visual.blocks.{i}.mlp.gate_proj": "visual/blocks/mlp/gate_proj",
        "model.visual.blocks.{i}.mlp.up_proj": "visual/blocks/mlp/up_proj",
        "model.visual.blocks.{i}.mlp.down_proj": "visual/blocks/mlp/down_proj",
        "model.visual.merger.mlp.0": "visual/merger/fc1",
        "model.visual.merger.mlp.2": "visual/merger/fc2",
        "model.language_model.layers.{i}.self_attn.q_proj": "text/layers/self_attn/q_proj",
        "model.language_model.layers.{i}.self_attn.k_proj": "text/layers/self_attn/k_proj",
        "model.language_model.layers.{i}.self_attn.v_proj": "text/layers/self_attn/v_proj",
        "model.language_model.layers.{i}.self_attn.o_proj": "text/layers/self_attn/o_proj",
        "model.language_model.layers.{i}.mlp.gate_proj": "text/layers/mlp/gate_proj",
        "model.language_model.layers.{i}.mlp.up_proj": "text/layers/mlp/up_proj",
        "model.language_model.layers.{i}.mlp.down_proj": "text/layers/mlp/down_proj",
    }
    if not cfg.text.tie_word_embeddings:
        ours["lm_head"] = "lm_head"
    modules = dict(model.named_modules())
    checked = 0
    for torch_pat, our_path in ours.items():
        stacked = "{i}" in torch_pat
        n = (cfg.vision.depth if "visual" in torch_pat else cfg.text.num_hidden_layers) if stacked else 1
        for i in range(n):
            mod = modules[torch_pat.format(i=i)]
            node = _get(params, our_path)
            kernel = node["kernel"][i] if stacked else node["kernel"]
            bias = (node["bias"][i] if stacked else node["bias"]) if "bias" in node else None
            assert (bias is None) == (mod.bias is None), torch_pat
            x = rng.standard_normal((5, mod.in_features)).astype(np.float32)
            with torch.no_grad():
                ref = mod(torch.from_numpy(x)).numpy()
            got = x.astype(np.float64) @ kernel + (0 if bias is None else bias)
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=torch_pat.format(i=i))
            checked += 1
    assert checked > 10
    # Patch embedding: HF's Conv3d over patches == flattened patch @ kernel.
    v = cfg.vision
    patches = rng.standard_normal((7, v.patch_dim)).astype(np.float32)
    with torch.no_grad():
        ref = model.model.visual.patch_embed(torch.from_numpy(patches)).numpy()
    np.testing.assert_allclose(patches @ params["visual"]["patch_embed"]["kernel"], ref, rtol=1e-5, atol=1e-5)
    # Embedding rows, norm scales.
    sd = {k: t.detach().numpy() for k, t in model.state_dict().items()}
    np.testing.assert_array_equal(params["text"]["embed_tokens"]["embedding"],
                                  sd["model.language_model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["text"]["norm"]["scale"], sd["model.language_model.norm.weight"])
    np.testing.assert_array_equal(params["visual"]["merger"]["ln_q"]["scale"], sd["model.visual.merger.ln_q.weight"])
    for i in range(cfg.text.num_hidden_layers):
        np.testing.assert_array_equal(params["text"]["layers"]["post_attention_layernorm"]["scale"][i],
                                      sd[f"model.language_model.layers.{i}.post_attention_layernorm.weight"])
    for i in range(cfg.vision.depth):
        np.testing.assert_array_equal(params["visual"]["blocks"]["norm2"]["scale"][i],
                                      sd[f"model.visual.blocks.{i}.norm2.weight"])


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("layout,dtype", [("transformers5", None), ("legacy", None), ("transformers5", "bfloat16")])
def test_export_reloads_in_torch_without_key_warnings_and_same_logits(tiny_dirs, tmp_path, layout, dtype):
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    src = tiny_dirs("untied_gqa2")
    cfg, params = load_hf_params(src)
    out = str(tmp_path / "export")
    # Small shards: the exported directory is sharded with an index.
    names = save_hf(params, cfg, out, tokenizer_dir=src, layout=layout, dtype=dtype, max_shard_bytes=200_000)
    assert len(names) > 1 and os.path.isfile(os.path.join(out, INDEX_FILE))
    for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    assert written["latent_pad_token_id"] == cfg.latent_pad_token_id is not None
    assert written["latent_size"] == cfg.latent_size
    assert written["dtype"] == (dtype or "float32")

    handler = _Records()
    hf_log = hf_logging.get_logger("transformers")
    hf_log.addHandler(handler)
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        reloaded, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            out, output_loading_info=True, dtype=torch.float32
        )
    finally:
        hf_logging.set_verbosity(old)
        hf_log.removeHandler(handler)
    assert any("loading weights file" in m for m in handler.messages)  # the capture works
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    bad = [m for m in handler.messages if any(w in m.lower() for w in ("missing", "unexpected", "newly initialized", "not used", "mismatch"))]
    assert not bad, bad

    original = Qwen2_5_VLForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    reloaded.eval()
    ids = torch.tensor([[400, 401, 5, 17, 90, 300, 402, 7]])
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=torch.zeros_like(ids))
    with torch.no_grad():
        ref = original(**kw).logits
        if dtype == "bfloat16":
            # The bf16 export equals the original weights rounded to bf16.
            sd = {k: v.to(torch.bfloat16).to(torch.float32) for k, v in original.state_dict().items()}
            original.load_state_dict(sd)
            ref = original(**kw).logits
        got = reloaded(**kw).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


# --------------------------------------------------------------------------- input layouts
def _flat_44x_config(src: str) -> dict:
    """The tiny dir's config rewritten as a transformers 4.4x config.json: text fields at the
    top level, ``rope_scaling {"type": "mrope"}``, ``rope_theta`` at the top level."""
    with open(os.path.join(src, "config.json")) as f:
        c = json.load(f)
    text = c.pop("text_config")
    rope = text.pop("rope_parameters")
    for k in ("layer_types", "model_type"):
        text.pop(k, None)
    flat = {**c, **text}
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    v = flat["vision_config"]
    v.pop("rope_parameters", None)
    flat["transformers_version"] = "4.49.0"
    flat["torch_dtype"] = flat.pop("dtype", "float32")
    return flat


def test_44x_layout_and_flat_config_load_to_the_same_params(tiny_dirs, tiny_shape, tmp_path):
    src = tiny_dirs(tiny_shape)
    cfg, params = load_hf_params(src)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    assert any(k.startswith("visual.") for k in tensors)  # transformers writes the 4.4x names

    old = _copy_dir_with(src, str(tmp_path / "old"), tensors)
    with open(os.path.join(old, "config.json"), "w") as f:
        json.dump(_flat_44x_config(src), f)
    cfg_old, params_old = load_hf_params(old)
    assert cfg_old == cfg
    _assert_trees_equal(params, params_old)

    new = _copy_dir_with(src, str(tmp_path / "new"), {_to_t5_name(k): v for k, v in tensors.items()})
    cfg_new, params_new = load_hf_params(new)
    assert cfg_new == cfg
    _assert_trees_equal(params, params_new)


def test_sharded_input_and_bf16_on_disk(tiny_dir, tmp_path):
    cfg, params = load_hf_params(tiny_dir)
    tensors = load_file(os.path.join(tiny_dir, "model.safetensors"))
    names = sorted(tensors)
    d = _copy_dir_with(tiny_dir, str(tmp_path / "sharded"))
    parts = [names[: len(names) // 3], names[len(names) // 3: 2 * len(names) // 3], names[2 * len(names) // 3:]]
    weight_map = {}
    for k, part in enumerate(parts):
        shard = f"model-{k + 1:05d}-of-00003.safetensors"
        # bf16 on disk, as released Qwen2.5-VL checkpoints are.
        save_file({n: tensors[n].astype(ml_dtypes.bfloat16) for n in part}, os.path.join(d, shard),
                  metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    with open(os.path.join(d, INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    cfg2, p32 = load_hf_params(d)
    assert cfg2 == cfg
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in tensors.items()}
    np.testing.assert_array_equal(p32["text"]["layers"]["self_attn"]["k_proj"]["kernel"][1],
                                  rounded["model.layers.1.self_attn.k_proj.weight"].T)
    _, pbf = load_hf_params(d, dtype=ml_dtypes.bfloat16)
    assert pbf["text"]["norm"]["scale"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(pbf["text"]["norm"]["scale"].astype(np.float32), rounded["model.norm.weight"])
    np.testing.assert_array_equal(pbf["visual"]["patch_embed"]["kernel"].astype(np.float32),
                                  rounded["visual.patch_embed.proj.weight"].reshape(cfg.vision.hidden_size, -1).T)


def test_own_reader_matches_safetensors_library(tiny_dir):
    sf = SafetensorsFile(os.path.join(tiny_dir, "model.safetensors"))
    ref = load_file(os.path.join(tiny_dir, "model.safetensors"))
    assert sorted(sf.keys()) == sorted(ref)
    for k, v in ref.items():
        got = sf.read(k)
        assert got.dtype == v.dtype and got.shape == v.shape
        np.testing.assert_array_equal(got, v)


# --------------------------------------------------------------------------- errors
def test_errors_name_the_file_and_tensor(tiny_dir, tmp_path):
    tensors = load_file(os.path.join(tiny_dir, "model.safetensors"))

    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_hf_params(str(tmp_path / "nope"))

    d = _copy_dir_with(tiny_dir, str(tmp_path / "llama"), tensors)
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    c["model_type"] = "llama"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f)
    with pytest.raises(ValueError, match=r"config\.json.*'llama'.*Qwen2\.5-VL"):
        load_hf_params(d)

    d = _copy_dir_with(tiny_dir, str(tmp_path / "missing"), {k: v for k, v in tensors.items() if k != "model.layers.2.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.2\.mlp\.up_proj\.weight"):
        load_hf_params(d)

    d = _copy_dir_with(tiny_dir, str(tmp_path / "extra"), {**tensors, "model.layers.3.mlp.up_proj.weight": tensors["model.layers.0.mlp.up_proj.weight"]})
    with pytest.raises(ValueError, match=r"extra/model\.safetensors.*unexpected.*model\.layers\.3\.mlp\.up_proj\.weight"):
        load_hf_params(d)

    bad = dict(tensors)
    bad["model.layers.1.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    d = _copy_dir_with(tiny_dir, str(tmp_path / "shape"), bad)
    with pytest.raises(ValueError, match=r"shape/model\.safetensors.*model\.layers\.1\.self_attn\.k_proj\.weight.*\(64, 64\).*\(32, 64\)"):
        load_hf_params(d)

    d = _copy_dir_with(tiny_dir, str(tmp_path / "shards"))
    save_file(tensors, os.path.join(d, "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, INDEX_FILE), "w") as f:
        json.dump({"weight_map": {k: ("model-00002-of-00002.safetensors" if k == "lm_head.weight" else "model-00001-of-00002.safetensors") for k in tensors}}, f)
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors.*listed in.*index\.json"):
        load_hf_params(d)

    d = _copy_dir_with(tiny_dir, str(tmp_path / "pickle"))
    with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
        f.write(b"not read")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors is required"):
        load_hf_params(d)

    d = _copy_dir_with(tiny_dir, str(tmp_path / "trunc"))
    raw = open(os.path.join(tiny_dir, "model.safetensors"), "rb").read()
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"trunc/model\.safetensors.*tensor .* past the end"):
        load_hf_params(d)


def test_save_rejects_a_tree_that_does_not_match_the_config(tiny_dir, tmp_path):
    cfg, params = load_hf_params(tiny_dir)
    params["text"]["norm"]["scale"] = np.zeros((3,), np.float32)
    with pytest.raises(ValueError, match=r"text/norm/scale.*\(3,\).*\(64,\)"):
        save_hf(params, cfg, str(tmp_path))
    del params["text"]["norm"]
    with pytest.raises(ValueError, match=r"missing \['text/norm/scale'\]"):
        save_hf(params, cfg, str(tmp_path))


# --------------------------------------------------------------------------- memory
def test_loading_makes_no_second_full_copy(tiny_dir):
    load_hf_params(tiny_dir)  # warm: imports and config parsing are not the loader's memory
    tracemalloc.start()
    try:
        _, params = load_hf_params(tiny_dir)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    param_bytes = sum(x.nbytes for x in _leaves(params))
    ratio = peak / param_bytes
    print(f"peak/params = {ratio:.3f} ({peak} / {param_bytes} bytes)")
    assert ratio <= 1.3, ratio


def _leaves(tree):
    for v in tree.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


# --------------------------------------------------------------------------- cloud storage
def test_export_to_and_load_from_a_bucket(tiny_dir, tmp_path):
    """save_hf into gs:// (in memory, through etils.epath) writes the bytes a local export
    writes, the safetensors library reads them back, and load_hf_params and the tokenizer load
    from the bucket as from a local directory."""
    import importlib.util

    from safetensors.numpy import load as load_bytes

    from ilvr_jax import storage
    from ilvr_jax.train.run_model import load_source_tokenizer

    spec = importlib.util.spec_from_file_location("_fb", os.path.join(os.path.dirname(__file__), "..",
                                                                      "fake_bucket.py"))
    fake_bucket = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake_bucket)
    cfg, params = load_hf_params(tiny_dir)
    local = str(tmp_path / "local")
    names = save_hf(params, cfg, local, tokenizer_dir=tiny_dir, max_shard_bytes=200_000)
    assert len(names) > 1
    with fake_bucket.load().install():
        remote = "gs://models/tiny"
        assert save_hf(params, cfg, remote, tokenizer_dir=tiny_dir, max_shard_bytes=200_000) == names
        assert sorted(storage.listdir(remote)) == sorted(os.listdir(local))
        for n in os.listdir(local):
            assert storage.read_bytes(storage.join(remote, n)) == open(os.path.join(local, n), "rb").read(), n
        reference = {}
        for n in names:
            reference.update(load_bytes(storage.read_bytes(storage.join(remote, n))))
        assert sorted(reference) == sorted(_read_dir(local))
        cfg2, params2 = load_hf_params(remote)
        assert cfg2 == cfg
        _assert_trees_equal(params, params2)
        tok = load_source_tokenizer(remote)
        text = "<|im_start|>user\nWhich way? <|vision_start|>"
        assert tok(text)["input_ids"] == load_source_tokenizer(tiny_dir)(text)["input_ids"]
        assert tok.chat_template == load_source_tokenizer(tiny_dir).chat_template
