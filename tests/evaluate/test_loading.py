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
