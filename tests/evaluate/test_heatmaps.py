"""Heatmap pictures: latent-to-patch cosines (one panel per latent, the expected sizes and
colours) and the momentum teacher's selected patches (exactly those tinted), the latter
checked against ``teacher_targets`` run on a batch of the training input pipeline."""

from __future__ import annotations

import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ilvr_jax.evaluate import heatmaps
from ilvr_jax.evaluate.__main__ import main


def _model_view(path, image_cfg):
    """The image as the model sees it (size and resampling of the processor)."""
    from ilvr_jax.data import processor as proc

    im = proc.to_rgb(Image.open(path))
    h, w = proc.smart_resize(im.height, im.width, image_cfg.factor, image_cfg.min_pixels, image_cfg.max_pixels)
    return np.asarray(im.resize((w, h), resample=Image.Resampling.BICUBIC)).astype(np.float64)


def _centre(k, width, cell=28):
    cols = width // cell
    return (k // cols) * cell + cell // 2, (k % cols) * cell + cell // 2  # (y, x)


def test_latent_heatmaps_one_panel_per_latent(eval_setup, tmp_path):
    from ilvr_jax.generate import generate_records
    from ilvr_jax.model import qwen25vl

    s = eval_setup
    loc = s.records[0]
    out = tmp_path / "heat"
    assert main(["heatmap", "--model", s.hf_dir, "--data", s.data_path, "--out", str(out), "--ids",
                 loc.record["id"], "--max-new-tokens", "12"]) == 0
    (gen,) = generate_records(s.params, s.cfg, [loc], s.tokenizer, s.image_cfg, batch_size=1, max_new_tokens=12)
    n = len(gen.latents)
    assert n >= s.latent_size
    helpers = [st["helper_image"] for st in loc.record["sequence_plan"] if st["type"] == "latent"]
    images = [("question_0", loc.record["image_input"][0])] + [(f"helper_{m}", p) for m, p in enumerate(helpers)]
    files = sorted(os.listdir(out / loc.record["id"]))
    assert files == sorted(f"latents_{label}.png" for label, _ in images)
    for label, rel in images:
        view = _model_view(os.path.join(loc.root, rel), s.image_cfg)
        h, w = view.shape[:2]
        png = np.asarray(Image.open(out / loc.record["id"] / f"latents_{label}.png").convert("RGB")).astype(float)
        assert png.shape == (h, n * w, 3)
        # The brightest cell of a panel is its highest cosine (white), the darkest its lowest (black).
        from ilvr_jax.data import processor as proc

        pv, grid = proc.preprocess_image(Image.open(os.path.join(loc.root, rel)), s.image_cfg)
        pad = np.zeros((1, max(4, len(pv)), pv.shape[1]), np.float32)
        pad[0, : len(pv)] = pv
        feats = np.asarray(qwen25vl.image_features(s.params, s.cfg, jnp.asarray(pad), jnp.asarray([[grid]])))[0]
        feats = feats[: len(pv) // 4]
        for i, lat in enumerate(gen.latents):
            cos = feats @ lat / (np.linalg.norm(feats, axis=1) * np.linalg.norm(lat))
            panel = png[:, i * w:(i + 1) * w]
            for k, colour in ((int(np.argmax(cos)), 255.0), (int(np.argmin(cos)), 0.0)):
                y, x = _centre(k, w)
                np.testing.assert_allclose(panel[y, x], np.round(0.4 * view[y, x] + 0.6 * colour), atol=1)


@pytest.fixture(scope="module")
def training_batch(eval_setup):
    """The six records as one batch of the training input pipeline (file order)."""
    from ilvr_jax.data.pipeline import DataConfig, DataPipeline

    s = eval_setup
    dc = DataConfig(batch_size=len(s.records), max_length=512, max_question_patches=64, max_helper_patches=512,
                    max_segments=8, latent_size=s.latent_size, min_pixels=s.image_cfg.min_pixels,
                    max_pixels=s.image_cfg.max_pixels, shuffle=False)
    batch = next(iter(DataPipeline.from_jsonl(s.data_path, s.hf_dir, dc).iterator()))
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("num_candidates", [8, 2])  # 4 merged patches: all candidates / pooled in runs of 2
def test_selection_overlay_marks_exactly_the_selected_patches(eval_setup, training_batch, tmp_path, num_candidates):
    from ilvr_jax.model import rope
    from ilvr_jax.train.step import StepConfig, teacher_targets

    s = eval_setup
    K = s.latent_size
    out = tmp_path / "sel"
    paths = heatmaps.selection_overlays(s.params, s.cfg, s.tokenizer, s.image_cfg, s.records, str(out),
                                        num_candidates=num_candidates)
    batch = training_batch
    scfg = StepConfig(model=s.cfg, stage=1, latent_size=K, num_candidates=num_candidates)
    pos, _ = rope.mrope_position_ids(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], s.cfg)
    from ilvr_jax.model import qwen25vl


    @jax.jit
    def select(params, batch, pos):
        qf = qwen25vl.image_features(params, s.cfg, batch["pixel_values"], batch["image_grid_thw"])
        return teacher_targets(params, scfg, batch, qf, pos)

    sel = jax.device_get(select(s.params, batch, pos))
    n_png = 0
    kstars = []
    for b, loc in enumerate(s.records):
        helpers = [st["helper_image"] for st in loc.record["sequence_plan"] if st["type"] == "latent"]
        for m, rel in enumerate(helpers):
            png_path = out / loc.record["id"] / f"selection_segment_{m}.png"
            assert str(png_path) in paths
            view = _model_view(os.path.join(loc.root, rel), s.image_cfg)
            png = np.asarray(Image.open(png_path).convert("RGB")).astype(float)
            assert png.shape == view.shape
            n_cells = (view.shape[0] // 28) * (view.shape[1] // 28)
            kstar = int(sel.kstar[b, m])
            kstars.append(kstar)
            run = n_cells // num_candidates if n_cells >= num_candidates else 1
            chosen = {int(j) * run + r for j in sel.indices[b, m, :kstar] for r in range(run)}
            for k in range(n_cells):
                y, x = _centre(k, view.shape[1])
                want = np.round(0.4 * view[y, x] + 0.6 * np.asarray([255.0, 0, 0])) if k in chosen else view[y, x]
                np.testing.assert_allclose(png[y, x], want, atol=1, err_msg=f"{loc.record['id']} segment {m} cell {k}")
            n_png += 1
    assert n_png == len(paths) == sum(
        1 for loc in s.records for st in loc.record["sequence_plan"] if st["type"] == "latent")
    assert min(kstars) >= 1  # every segment tints at least one patch
    assert max(kstars) <= min(K, num_candidates)  # with 2 candidates the cutoff K* < K bites


def test_heatmap_and_selection_commands_write_into_a_bucket(eval_setup, tmp_path, monkeypatch):
    """Both commands with the model, the records and --out on gs:// (in memory, through
    etils.epath) write, under the bucket's out dir, the PNGs a local run writes, byte for byte,
    each at the model's view of its image (one panel per latent side by side for the heatmap)."""
    import importlib.util

    from ilvr_jax import storage

    spec = importlib.util.spec_from_file_location(
        "_fb", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fake_bucket.py"))
    fake_bucket = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake_bucket)
    monkeypatch.chdir(tmp_path)   # nothing may land in a local folder named after the URI
    s = eval_setup
    loc = s.records[0]
    rid = loc.record["id"]
    commands = {"heatmap": ["--max-new-tokens", "12"], "selection": ["--num-candidates", "8"]}
    for name, extra in commands.items():
        assert main([name, "--model", s.hf_dir, "--data", s.data_path, "--out", str(tmp_path / name),
                     "--ids", rid, *extra]) == 0
    data = "gs://data/maze/" + os.path.basename(s.data_path)
    with fake_bucket.load().install():
        storage.copy_tree(s.hf_dir, "gs://models/tiny")
        storage.copy_tree(os.path.dirname(s.data_path), "gs://data/maze")
        got = {}
        for name, extra in commands.items():
            out = f"gs://figures/{name}"
            assert main([name, "--model", "gs://models/tiny", "--data", data, "--out", out, "--ids", rid,
                         *extra]) == 0
            got[name] = {f: storage.read_bytes(storage.join(out, rid, f)) for f in storage.listdir(storage.join(out, rid))}
    assert sorted(os.listdir(tmp_path)) == sorted(commands)
    helpers = [st["helper_image"] for st in loc.record["sequence_plan"] if st["type"] == "latent"]
    want_names = {"heatmap": {"latents_question_0.png"} | {f"latents_helper_{m}.png" for m in range(len(helpers))},
                  "selection": {f"selection_segment_{m}.png" for m in range(len(helpers))}}
    views = {"latents_question_0.png": loc.record["image_input"][0]}
    views.update({f"latents_helper_{m}.png": p for m, p in enumerate(helpers)})
    views.update({f"selection_segment_{m}.png": p for m, p in enumerate(helpers)})
    for name, files in got.items():
        assert set(files) == want_names[name] == set(os.listdir(tmp_path / name / rid))
        for f, png in files.items():
            assert png == (tmp_path / name / rid / f).read_bytes(), (name, f)
            h, w = _model_view(os.path.join(loc.root, views[f]), s.image_cfg).shape[:2]
            size = Image.open(io.BytesIO(png)).size
            if name == "selection":
                assert size == (w, h)
            else:
                assert size[1] == h and size[0] % w == 0 and size[0] // w >= s.latent_size
