"""A run's model files from whatever the source directory holds: a stock hub download (no
latent tokens, padded vocabulary, processor files), or a directory that already carries the
latent tokens (an earlier export): the tokens are added once, their ids recorded, the
processor settings kept, and the tokenizer files readable by every transformers version."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hub = _load("_hub", os.path.join(os.path.dirname(_HERE), "hub_download.py")).load()
configs = _load("_stage1_config", os.path.join(os.path.dirname(os.path.dirname(_HERE)), "configs", "stage1.py"))

from ilvr_jax.train import run_model  # noqa: E402

LATENT = ("<|latent_pad|>", "<|latent_start|>", "<|latent_end|>")


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    return hub.build_hub_download(str(tmp_path_factory.mktemp("hub") / "Qwen2.5-VL-tiny"))


def _config(hf_dir: str, **data):
    c = configs.get_config("debug")
    c.model.init = "hf"
    c.model.hf_dir = hf_dir
    for k, v in data.items():
        c.data[k] = v
    return c


def test_stock_download_gets_the_latent_tokens_once(download, tmp_path):
    from transformers import AutoTokenizer

    stock = AutoTokenizer.from_pretrained(download)
    c = _config(download)
    cfg, params, tok_dir = run_model.prepare_model(c, str(tmp_path / "run"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = [tok.convert_tokens_to_ids(t) for t in LATENT]
    assert ids == [len(stock), len(stock) + 1, len(stock) + 2]
    assert [cfg.latent_pad_token_id, cfg.latent_start_token_id, cfg.latent_end_token_id] == ids
    assert cfg.text.vocab_size == len(tok) == params["text"]["embed_tokens"]["embedding"].shape[0]
    with open(tmp_path / "run" / run_model.MODEL_CONFIG_FILE) as f:
        assert json.load(f)["latent_start_token_id"] == ids[1]
    with open(tmp_path / "run" / run_model.SOURCE_CONFIG_FILE) as f, open(os.path.join(download, "config.json")) as g:
        assert json.load(f) == json.load(g)
    for name in ("preprocessor_config.json", "chat_template.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(tok_dir, name)), name
    # The tokenizer config is in the hub's layout (transformers 4.5x reads it): the latent
    # tokens are additional special tokens and decoded added tokens, no list-valued field
    # that 4.5x cannot parse.
    with open(os.path.join(tok_dir, "tokenizer_config.json")) as f:
        tc = json.load(f)
    assert set(LATENT) <= set(tc["additional_special_tokens"])
    assert not isinstance(tc.get("extra_special_tokens"), list)
    assert {tc["added_tokens_decoder"][str(i)]["content"] for i in ids} == set(LATENT)
    assert "<|im_start|>" in tc["chat_template"]
    # Texts tokenise the same with the rewritten files as with the tokenizer training used.
    text = "<|latent_start|><|latent_pad|><|latent_end|> move left"
    assert tok(text)["input_ids"] == [*ids[1:2], ids[0], ids[2], *stock(" move left")["input_ids"]]


def test_a_directory_that_has_the_tokens_keeps_its_ids_and_table(download, tmp_path):
    from ilvr_jax.checkpoint.hf import save_hf

    cfg1, params1, tok_dir1 = run_model.prepare_model(_config(download), str(tmp_path / "first"))
    export = str(tmp_path / "export")
    save_hf(params1, cfg1, export, tokenizer_dir=tok_dir1)
    cfg2, params2, _ = run_model.prepare_model(_config(export), str(tmp_path / "second"))
    ids = lambda c: (c.latent_pad_token_id, c.latent_start_token_id, c.latent_end_token_id)  # noqa: E731
    assert ids(cfg2) == ids(cfg1) and cfg2.text.vocab_size == cfg1.text.vocab_size
    np.testing.assert_array_equal(np.asarray(params2["text"]["embed_tokens"]["embedding"]),
                                  np.asarray(params1["text"]["embed_tokens"]["embedding"]))


def test_pixel_budgets_come_from_the_model_unless_overridden(download, tmp_path):
    _, _, tok_dir = run_model.prepare_model(_config(download), str(tmp_path / "a"))
    own = run_model.image_config(_config(download, min_pixels=0, max_pixels=0), tok_dir)
    assert (own.min_pixels, own.max_pixels) == (3136, 12845056)
    over = run_model.image_config(_config(download, min_pixels=0, max_pixels=64 * 28 * 28), tok_dir)
    assert (over.min_pixels, over.max_pixels) == (3136, 64 * 28 * 28)
    # What training used is what the run's processor file (and so the export) says, in both
    # transformers layouts.
    with open(os.path.join(tok_dir, "preprocessor_config.json")) as f:
        pre = json.load(f)
    assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 64 * 28 * 28)
    assert pre["size"] == {"shortest_edge": 3136, "longest_edge": 64 * 28 * 28}
    from transformers import AutoImageProcessor

    hf = AutoImageProcessor.from_pretrained(tok_dir)
    assert (hf.size["shortest_edge"], hf.size["longest_edge"]) == (3136, 64 * 28 * 28)


def test_model_directory_and_workdir_in_a_bucket_give_the_local_files(download, tmp_path):
    """Stage 1 from a gs:// model directory into a gs:// workdir (in memory, through etils.epath)
    writes the files a local run writes, byte for byte, with the same parameters; stage 2 reads
    them back from the bucket."""
    import jax

    from ilvr_jax import storage
    from ilvr_jax.data.pipeline import load_tokenizer

    fake_bucket = _load("_fb", os.path.join(os.path.dirname(_HERE), "fake_bucket.py")).load()
    local_wd = str(tmp_path / "run")
    cfg, params, tok_dir = run_model.prepare_model(_config(download), local_wd)
    image_cfg = run_model.image_config(_config(download), tok_dir)
    with fake_bucket.install():
        storage.copy_tree(download, "gs://models/Qwen2.5-VL-tiny")
        c = _config("gs://models/Qwen2.5-VL-tiny")
        cfg2, params2, tok_dir2 = run_model.prepare_model(c, "gs://runs/s1")
        assert tok_dir2 == "gs://runs/s1/tokenizer" and cfg2 == cfg
        assert run_model.image_config(c, tok_dir2) == image_cfg
        jax.tree.map(np.testing.assert_array_equal, params2, params)
        files = sorted(os.listdir(local_wd))
        assert sorted(storage.listdir("gs://runs/s1")) == files
        for name in files:
            if name == "tokenizer":
                assert sorted(storage.listdir(tok_dir2)) == sorted(os.listdir(tok_dir))
                pairs = [(os.path.join(tok_dir, n), storage.join(tok_dir2, n)) for n in os.listdir(tok_dir)]
            else:
                pairs = [(os.path.join(local_wd, name), storage.join("gs://runs/s1", name))]
            for a, b in pairs:
                assert storage.read_bytes(b) == open(a, "rb").read(), b
        text = "<|latent_start|><|latent_pad|><|latent_end|> left"
        assert load_tokenizer(tok_dir2)(text)["input_ids"] == load_tokenizer(tok_dir)(text)["input_ids"]
        # Stage 2 copies the model files from the stage-1 workdir in the bucket.
        c2 = _config("")
        c2.stage, c2.train.init_from = 2, "gs://runs/s1"
        cfg3, _, tok_dir3 = run_model.prepare_model(c2, "gs://runs/s2")
        assert cfg3 == cfg and sorted(storage.listdir(tok_dir3)) == sorted(os.listdir(tok_dir))
