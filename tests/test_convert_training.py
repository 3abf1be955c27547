"""``python -m ilvr_jax.convert to-hf`` on training checkpoints: the student (default) and
the EMA teacher of a debug training run load in ``Qwen2_5_VLForConditionalGeneration`` with
no missing/unexpected keys, and torch's logits equal our JAX model's on the trained
parameters (text-only and with an image)."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "_tr", os.path.join(os.path.dirname(__file__), "train", "train_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)
runs = runs.load()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 8-step stage-1 debug run (shared with the resume tests in one session)."""
    return runs.stage1_run(str(tmp_path_factory.getbasetemp()),
                           str(tmp_path_factory.getbasetemp() / "jax_compilation_cache"))


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = np.asarray(v)
    return out


def _unflat(flat):
    tree = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def _saved_state(workdir, step):
    from ilvr_jax.train import checkpoints as ckpt_lib

    return jax.tree.map(np.asarray, ckpt_lib.restore_state_item(os.path.join(workdir, "checkpoints", str(step))))


def _teacher_tree(state):
    """The full teacher: the student's tree with every leaf the teacher holds replaced."""
    flat = _flat(state["params"])
    teacher = _flat(state["teacher"])
    assert set(teacher) < set(flat) and all(k[0] != "visual" for k in teacher)   # vision tower frozen
    flat.update(teacher)
    return _unflat(flat)


def _convert(*args):
    return subprocess.run([sys.executable, "-m", "ilvr_jax.convert", "to-hf", *args], cwd=runs.REPO,
                          env=runs.env(), capture_output=True, text=True, timeout=600)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load_hf(out_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    handler = _Records()
    hf_log = hf_logging.get_logger("transformers")
    hf_log.addHandler(handler)
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out_dir, output_loading_info=True,
                                                                         dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(old)
        hf_log.removeHandler(handler)
    assert any("loading weights file" in m for m in handler.messages)      # the capture works
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    bad = [m for m in handler.messages
           if any(w in m.lower() for w in ("missing", "unexpected", "newly initialized", "not used", "mismatch"))]
    assert not bad, bad
    return model.eval()


def _inputs(cfg, tiny_dir):
    """A text-only prompt (with the latent tokens) and one with a 56x84 image."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil.from_pretrained(tiny_dir)
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (56, 84, 3), dtype=np.uint8))
    out = proc(images=[img], return_tensors="np")
    pix, grid = out["pixel_values"].astype(np.float32), out["image_grid_thw"].astype(np.int64)
    n_img = int(np.prod(grid[0]) // cfg.vision.spatial_merge_size ** 2)
    text = [5, 17, 90, 300, 7, cfg.latent_start_token_id] + [cfg.latent_pad_token_id] * 4 + \
        [cfg.latent_end_token_id, 11, 12]
    with_image = [5, 17, cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + \
        [cfg.vision_end_token_id, 90, 300, 7]
    return [(np.array([text], np.int64), None, None), (np.array([with_image], np.int64), pix, grid)]


def _jax_logits(params, cfg, ids, pix, grid):
    from ilvr_jax.model import qwen25vl

    kw = {}
    if pix is not None:
        kw = dict(pixel_values=pix[None], image_grid_thw=grid[None].astype(np.int32))
    out = qwen25vl.forward(jax.tree.map(np.asarray, params), cfg, ids.astype(np.int32),
                           np.ones_like(ids, np.int32), **kw)
    return np.asarray(out.logits, np.float64)


def _torch_logits(model, cfg, ids, pix, grid):
    kw = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
              mm_token_type_ids=torch.from_numpy((ids == cfg.image_token_id).astype(np.int64)))
    if pix is not None:
        kw.update(pixel_values=torch.from_numpy(pix), image_grid_thw=torch.from_numpy(grid))
    with torch.no_grad():
        return model(**kw).logits.double().numpy()


def test_export_student_and_teacher_reload_in_torch_with_equal_logits(trained, tmp_path, tiny_dir):
    from ilvr_jax.model.config import ModelConfig

    cfg = ModelConfig.from_hf(os.path.join(trained, "model_config.json"))
    state = _saved_state(trained, 8)
    expected = {"student": state["params"], "teacher": _teacher_tree(state)}
    inputs = _inputs(cfg, tiny_dir)
    exported = {}
    for which, flag in (("student", []), ("teacher", ["--teacher"])):
        out = str(tmp_path / which)
        p = _convert("--checkpoint", trained, "--out", out, *flag)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "WARNING" not in p.stderr, p.stderr[-2000:]
        assert os.path.isfile(os.path.join(out, "tokenizer.json"))      # the run's tokenizer, by default
        model = _load_hf(out)
        exported[which] = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        for ids, pix, grid in inputs:
            want = _jax_logits(expected[which], cfg, ids, pix, grid)
            got = _torch_logits(model, cfg, ids, pix, grid)
            scale = np.max(np.abs(want))
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale, err_msg=which)
    # After 8 steps of training the EMA teacher differs from the student, except in the
    # frozen vision tower, which they share.
    s, t = exported["student"], exported["teacher"]
    assert set(s) == set(t)
    differ = [k for k in s if not np.array_equal(s[k], t[k])]
    assert differ and all("visual" not in k for k in differ)
    assert any("language_model" in k for k in differ)


def test_checkpoints_dir_and_step_dir_select_the_step(trained, tmp_path):
    from ilvr_jax import convert
    from ilvr_jax.checkpoint.hf import load_hf_params

    state6 = _saved_state(trained, 6)
    out6 = str(tmp_path / "step6")
    convert.to_hf(os.path.join(trained, "checkpoints", "6"), out6)
    _, got = load_hf_params(out6)
    jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, state6["params"]))
    out_latest = str(tmp_path / "latest")
    convert.to_hf(os.path.join(trained, "checkpoints"), out_latest, which="teacher")
    _, got = load_hf_params(out_latest)
    jax.tree.map(np.testing.assert_array_equal, got, _teacher_tree(_saved_state(trained, 8)))


def test_bad_training_paths_give_one_error_line(trained, tmp_path):
    p = _convert("--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and p.stderr.startswith("error:") and "does not exist" in p.stderr
    empty = tmp_path / "run"
    (empty / "checkpoints").mkdir(parents=True)
    p = _convert("--checkpoint", str(empty), "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "holds no finished checkpoint step" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_export_of_a_training_run_into_a_bucket_equals_the_local_export(trained, tmp_path):
    """``convert.to_hf`` with a gs:// output (in memory, behind etils.epath): the same files
    and bytes as the local export; an existing non-empty bucket directory needs overwrite."""
    from ilvr_jax import convert, storage

    spec = importlib.util.spec_from_file_location("_fb", os.path.join(os.path.dirname(__file__), "fake_bucket.py"))
    fake_bucket = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake_bucket)
    local = str(tmp_path / "local")
    names = convert.to_hf(trained, local)
    with fake_bucket.load().install():
        remote = "gs://runs/export"
        assert convert.to_hf(trained, remote) == names
        assert sorted(storage.listdir(remote)) == sorted(os.listdir(local))
        for n in os.listdir(local):
            assert storage.read_bytes(storage.join(remote, n)) == open(os.path.join(local, n), "rb").read(), n
        with pytest.raises(FileExistsError, match="already exists and is not empty"):
            convert.to_hf(trained, remote)
