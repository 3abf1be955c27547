"""Models for evaluation from a training run: ``--step`` and ``--teacher`` pick the
checkpoint and the momentum teacher, with the run's tokenizer and pixel budgets."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "_tr", os.path.join(os.path.dirname(os.path.dirname(__file__)), "train", "train_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)
runs = runs.load()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The finished 8-step stage-1 debug run the training tests share (one per session)."""
    return runs.stage1_run(str(tmp_path_factory.getbasetemp()),
                           str(tmp_path_factory.getbasetemp() / "jax_compilation_cache"))


def test_training_run_step_and_teacher(trained, eval_setup, tmp_path):
    from ilvr_jax import convert
    from ilvr_jax.data import processor as proc
    from ilvr_jax.evaluate.__main__ import main
    from ilvr_jax.evaluate.loading import load_model
    from ilvr_jax.evaluate.run import SAMPLES_FILE, SUMMARY_FILE, evaluate, read_samples

    s = eval_setup
    m = load_model(trained, step=4, teacher=True)
    cfg, params, tok_dir = convert.load_training_params(os.path.join(trained, "checkpoints", "4"), "teacher")
    assert m.cfg == cfg and m.tokenizer_dir == tok_dir
    assert m.image_cfg == proc.ImageProcessorConfig.from_hf(os.path.join(tok_dir, "preprocessor_config.json"))
    out = tmp_path / "cli"
    assert main(["--model", trained, "--step", "4", "--teacher", "--data", s.data_path, "--scorer", "maze",
                 "--out", str(out), "--batch-size", "4", "--max-new-tokens", "16", "--limit", "4",
                 "--no-progress"]) == 0
    config = json.loads((out / SUMMARY_FILE).read_text())["config"]
    assert (config["step"], config["teacher"], config["model"]) == (4, True, os.path.abspath(trained))
    evaluate(params, cfg, m.tokenizer, m.image_cfg, s.records[:4], "maze", batch_size=4, max_new_tokens=16,
             out_dir=str(tmp_path / "direct"), progress=False)
    assert read_samples(str(out / SAMPLES_FILE)) == read_samples(str(tmp_path / "direct" / SAMPLES_FILE))
    newest = load_model(trained)
    _, student8, _ = convert.load_training_params(trained)
    assert all((a == b).all() for a, b in zip(_leaves(newest.params), _leaves(student8)))
    assert any((a != b).any() for a, b in zip(_leaves(newest.params), _leaves(m.params)))
    with pytest.raises(FileNotFoundError, match="no checkpoint for --step 3"):
        load_model(trained, step=3)
    # The selection pictures of a run use its momentum teacher by default.
    sel = tmp_path / "sel"
    assert main(["selection", "--model", trained, "--data", s.data_path, "--out", str(sel), "--limit", "1",
                 "--num-candidates", "16"]) == 0
    rec = s.records[0].record
    n_helpers = sum(1 for st in rec["sequence_plan"] if st["type"] == "latent")
    assert sorted(os.listdir(sel / rec["id"])) == [f"selection_segment_{m}.png" for m in range(n_helpers)]


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    """A directory laid out like a stock hub download: its tokenizer has no latent tokens."""
    spec = importlib.util.spec_from_file_location(
        "_hub", os.path.join(os.path.dirname(os.path.dirname(__file__)), "hub_download.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load().build_hub_download(str(tmp_path_factory.mktemp("hub")))


def test_stock_download_is_evaluated_as_stage_1_starts_from_it(hub_dir, eval_setup, tmp_path, caplog):
    """A tokenizer without the latent tokens gets them in memory, as stage 1 adds them: the
    same ids, the same resized table and head (padding rows dropped, new rows the mean), the
    same config as ``prepare_model`` writes for a run from that directory; the directory is
    left as it is, and the evaluation command runs on it."""
    import jax
    import numpy as np

    from ilvr_jax.evaluate.__main__ import main
    from ilvr_jax.evaluate.loading import STOCK_LATENT_SIZE, load_model, load_tokenizer
    from ilvr_jax.evaluate.run import SAMPLES_FILE, read_samples
    from ilvr_jax.model.config import LATENT_TOKENS
    from ilvr_jax.train import run_model

    before = sorted(os.listdir(hub_dir))
    with caplog.at_level("WARNING", logger="ilvr_jax"):
        m = load_model(hub_dir)
    assert m.added_latent_tokens and "the tokenizer has no <|latent_pad|>" in caplog.text
    assert sorted(os.listdir(hub_dir)) == before
    assert not any(t in load_tokenizer(hub_dir).get_vocab() for t in LATENT_TOKENS)

    from configs.stage1 import get_config

    c = get_config()   # the published preset: K = 8, the exact vocabulary resize
    c.model.hf_dir = hub_dir
    cfg, params, tok_dir = run_model.prepare_model(c, str(tmp_path / "run"))
    assert int(c.ilvr.latent_size) == STOCK_LATENT_SIZE == m.cfg.latent_size
    assert m.cfg == cfg
    tok = load_tokenizer(tok_dir)
    assert {t: m.tokenizer.convert_tokens_to_ids(t) for t in LATENT_TOKENS} == \
        {t: tok.convert_tokens_to_ids(t) for t in LATENT_TOKENS}
    assert len(m.tokenizer) == len(tok) == m.cfg.text.vocab_size
    got, want = jax.tree.leaves_with_path(m.params), jax.tree.leaves_with_path(params)
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, a), (_, b) in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path

    out = tmp_path / "eval"
    assert main(["--model", hub_dir, "--data", eval_setup.data_path, "--scorer", "maze", "--out", str(out),
                 "--batch-size", "4", "--max-new-tokens", "8", "--limit", "4", "--no-progress"]) == 0
    rows = read_samples(str(out / SAMPLES_FILE))
    assert len(rows) == 4 and all(r["mode"] == "normal" for r in rows)
