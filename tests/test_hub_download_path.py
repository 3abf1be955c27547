"""The path a user takes: a directory laid out like a hub download of Qwen2.5-VL (flat 4.4x
config.json, padded vocabulary, bf16 shards with an index, a tokenizer WITHOUT the latent
tokens, processor and generation files; see hub_download.py), their own CoMT-style records,
the paper preset from the command line: stage 1, stopped by SIGTERM and resumed exactly,
stage 2, export, and the export reloaded in transformers 5.x and 4.5x with the JAX model's
logits.

The two transformers 4.5x versions are installed with ``pip --target`` into
``.cache/transformers-VERSION`` in the checkout the first time (PyPI), beside the test
environment's torch."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name, rel):
    spec = importlib.util.spec_from_file_location(name, os.path.join(_HERE, rel))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load()


hub = _load("_hub", "hub_download.py")
runs = _load("_tr", os.path.join("train", "train_runs.py"))

LEGACY_TRANSFORMERS = {
    "4.50.3": ("transformers==4.50.3", "tokenizers>=0.21,<0.22"),
    "4.57.6": ("transformers==4.57.6", "tokenizers>=0.22,<=0.23.0"),
}
STAGE1_STEPS = 4
COMPARED = ("loss", "ce", "sim", "kstar", "grad_norm", "param_norm", "lr", "tokens", "batch_fingerprint")
# The paper preset (the default) with the user's paths and a short schedule: nothing else.
OVERRIDES = ("--config.data.batch_size=2", "--config.optim.grad_accum_steps=1", "--config.train.log_every=1",
             f"--config.train.num_steps={STAGE1_STEPS}", "--config.train.checkpoint_every=100")


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    model = hub.build_hub_download(str(root / "Qwen2.5-VL-tiny"))
    data = hub.write_comt_records(str(root / "comt"), n=8)
    return model, data


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def stage1(download, tmp_path_factory, cache_dir):
    """(uninterrupted workdir, workdir stopped by SIGTERM then resumed, the stop's stderr)."""
    model, data = download
    root = tmp_path_factory.mktemp("stage1")
    user = (f"--config.model.hf_dir={model}", f"--config.data.train_path={data}", *OVERRIDES)
    full = str(root / "full")
    runs.run_main(full, *user, config=runs.STAGE1, cache_dir=cache_dir, timeout=900)

    stopped = str(root / "stopped")
    log = str(root / "stopped.log")
    p = runs.start_main(stopped, *user, config=runs.STAGE1, cache_dir=cache_dir, log_path=log)
    try:
        assert runs.wait_for(lambda: os.path.isfile(os.path.join(stopped, "metrics.jsonl"))
                             and len(runs.metrics(stopped)) >= 2, timeout=600), open(log).read()[-3000:]
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    out = open(log).read()
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    runs.run_main(stopped, *user, config=runs.STAGE1, cache_dir=cache_dir, timeout=900)
    return full, stopped, out


def test_stage1_adds_the_latent_tokens_once_and_keeps_the_source_files(download, stage1):
    from transformers import AutoTokenizer

    model, _ = download
    full, _, _ = stage1
    tok = AutoTokenizer.from_pretrained(os.path.join(full, "tokenizer"))
    stock = AutoTokenizer.from_pretrained(model)
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|latent_pad|>", "<|latent_start|>", "<|latent_end|>")]
    assert ids == [len(stock), len(stock) + 1, len(stock) + 2]
    with open(os.path.join(full, "model_config.json")) as f:
        recorded = json.load(f)
    assert [recorded[k] for k in ("latent_pad_token_id", "latent_start_token_id", "latent_end_token_id")] == ids
    # "exact" resize: the padded 512-row table becomes len(tokenizer) rows, as the reference.
    assert recorded["text_config"]["vocab_size"] == len(tok) == len(stock) + 3 < hub.PADDED_VOCAB
    # The source's processor settings are the ones training used, and are kept.
    with open(os.path.join(full, "tokenizer", "preprocessor_config.json")) as f:
        pre = json.load(f)
    assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 12845056)
    assert os.path.isfile(os.path.join(full, "tokenizer", "generation_config.json"))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_sigterm_saves_the_current_step_and_the_restart_resumes_exactly(stage1):
    full, stopped, out = stage1
    lines = [line for line in out.splitlines() if "stopped by SIGTERM" in line]
    assert len(lines) == 1 and "rerun the same command to resume" in lines[0], out[-2000:]
    assert "Traceback" not in out
    step = int(lines[0].split("at step ")[1].split(":")[0])
    assert 2 <= step < STAGE1_STEPS
    assert step in runs.finished_steps(stopped)
    a = {r["step"]: r for r in runs.metrics(full)}
    b = {r["step"]: r for r in runs.metrics(stopped)}
    assert sorted(a) == sorted(b) == list(range(1, STAGE1_STEPS + 1))
    for s in a:
        for k in COMPARED:
            assert a[s][k] == b[s][k], (s, k)


@pytest.fixture(scope="module")
def stage2_export(stage1, download, tmp_path_factory, cache_dir):
    _, stopped, _ = stage1
    _, data = download
    wd = str(tmp_path_factory.mktemp("stage2") / "run")
    runs.run_main(wd, f"--config.train.init_from={stopped}", f"--config.data.train_path={data}",
                  "--config.data.batch_size=2", "--config.optim.grad_accum_steps=1", "--config.train.num_steps=2",
                  config=runs.STAGE2, cache_dir=cache_dir, timeout=900)
    return os.path.join(wd, "export_hf")


def test_export_keeps_the_source_config_dtype_and_processor(stage2_export, download):
    model, _ = download
    with open(os.path.join(model, "config.json")) as f:
        source = json.load(f)
    with open(os.path.join(stage2_export, "config.json")) as f:
        exported = json.load(f)
    for key in ("max_position_embeddings", "vision_token_id", "sliding_window", "rope_theta", "bos_token_id"):
        assert exported[key] == source[key], key
    assert exported["torch_dtype"] == "bfloat16"
    assert exported["rope_scaling"]["mrope_section"] == source["rope_scaling"]["mrope_section"]
    from safetensors import safe_open

    with open(os.path.join(stage2_export, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[0]
    with safe_open(os.path.join(stage2_export, shard), "np") as f:
        name = next(iter(f.keys()))
        assert str(f.get_slice(name).get_dtype()) == "BF16"
    with open(os.path.join(stage2_export, "preprocessor_config.json")) as f:
        pre = json.load(f)
    assert (pre["min_pixels"], pre["max_pixels"]) == (3136, 12845056)
    assert pre["size"] == {"shortest_edge": 3136, "longest_edge": 12845056}
    for f in ("chat_template.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(stage2_export, f)), f


def _probe_inputs(export_dir: str, data: str, out_npz: str) -> dict:
    """A prompt with a question image and latent tokens, built by the training code."""
    from transformers import AutoTokenizer

    from ilvr_jax.data import processor as proc

    tok = AutoTokenizer.from_pretrained(export_dir)
    with open(data) as f:
        rec = json.loads(f.readline())
    image_cfg = proc.ImageProcessorConfig.from_hf(export_dir)
    pixels, grids = proc.preprocess_images([proc.load_image(os.path.join(os.path.dirname(data), rec["image_input"][0]))],
                                           image_cfg)
    ids = proc.build_prompt_ids(tok, rec["text_input"], grids.tolist())
    ids = ids + tok("<|latent_start|><|latent_pad|><|latent_pad|><|latent_end|> Step 2: move")["input_ids"]
    arrays = {"input_ids": np.asarray([ids], np.int64), "pixel_values": pixels.astype(np.float32),
              "image_grid_thw": np.asarray(grids, np.int64)}
    np.savez(out_npz, **arrays)
    return arrays


def _jax_logits(export_dir: str, arrays: dict) -> np.ndarray:
    import jax.numpy as jnp

    from ilvr_jax.checkpoint.hf import load_hf_params
    from ilvr_jax.model import qwen25vl

    cfg, params = load_hf_params(export_dir, dtype="float32")
    out = qwen25vl.forward(params, cfg, jnp.asarray(arrays["input_ids"]), None,
                           jnp.asarray(arrays["pixel_values"])[None], jnp.asarray(arrays["image_grid_thw"])[None])
    return np.asarray(out.logits[0])


TORCH_SCRIPT = r"""
import sys, numpy as np, torch, transformers
from transformers import AutoTokenizer, AutoImageProcessor, Qwen2_5_VLForConditionalGeneration
export, npz, out = sys.argv[1:4]
a = dict(np.load(npz))
tok = AutoTokenizer.from_pretrained(export)
ip = AutoImageProcessor.from_pretrained(export)
model = Qwen2_5_VLForConditionalGeneration.from_pretrained(export, torch_dtype=torch.float32).eval()
kw = dict(input_ids=torch.tensor(a["input_ids"]), pixel_values=torch.tensor(a["pixel_values"]),
          image_grid_thw=torch.tensor(a["image_grid_thw"]))
if int(transformers.__version__.split(".")[0]) >= 5:
    kw["mm_token_type_ids"] = (kw["input_ids"] == model.config.image_token_id).long()
with torch.no_grad():
    logits = model(**kw).logits[0].float().numpy()
ids = tok("<|latent_start|><|latent_pad|><|latent_end|> the answer")["input_ids"]
np.savez(out, logits=logits, ids=np.asarray(ids), min_pixels=ip.min_pixels if hasattr(ip, "min_pixels") else ip.size["shortest_edge"],
         max_pixels=ip.max_pixels if hasattr(ip, "max_pixels") else ip.size["longest_edge"],
         version=transformers.__version__, dtype=str(Qwen2_5_VLForConditionalGeneration.from_pretrained(export, torch_dtype="auto").dtype))
"""


def _legacy_transformers(version: str) -> str:
    """``.cache/transformers-VERSION`` with that release (and its tokenizers and hub client)."""
    target = os.path.join(runs.REPO, ".cache", f"transformers-{version}")
    if not os.path.isfile(os.path.join(target, ".complete")):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
                        *LEGACY_TRANSFORMERS[version], "huggingface_hub>=0.30,<1.0", "requests", "urllib3", "idna",
                        "certifi", "charset_normalizer"], check=True, capture_output=True, timeout=600)
        open(os.path.join(target, ".complete"), "w").close()
    return target


@pytest.mark.slow
@pytest.mark.parametrize("version", ["installed", *LEGACY_TRANSFORMERS])
def test_export_loads_in_transformers_with_the_jax_logits(stage2_export, download, tmp_path, version):
    _, data = download
    arrays = _probe_inputs(stage2_export, data, str(tmp_path / "in.npz"))
    env = runs.env()
    if version != "installed":
        env["PYTHONPATH"] = _legacy_transformers(version)
    script = tmp_path / "probe.py"
    script.write_text(TORCH_SCRIPT)
    p = subprocess.run([sys.executable, str(script), stage2_export, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    if version != "installed":
        assert str(got["version"]) == version
    assert str(got["dtype"]) == "torch.bfloat16"
    assert (int(got["min_pixels"]), int(got["max_pixels"])) == (3136, 12845056)
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(stage2_export)("<|latent_start|><|latent_pad|><|latent_end|> the answer")
    assert got["ids"].tolist() == ours["input_ids"]
    expected = _jax_logits(stage2_export, arrays)
    assert got["logits"].shape == expected.shape
    np.testing.assert_allclose(got["logits"], expected, atol=2e-4, rtol=2e-4)
