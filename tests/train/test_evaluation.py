"""``train.eval_every``: the training program evaluates the student on held-out records with
latent-mode generation and logs the accuracy; the held-out mazes share no map with the
training set."""

from __future__ import annotations

import importlib.util
import json
import os

_spec = importlib.util.spec_from_file_location("_tr", os.path.join(os.path.dirname(__file__), "train_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)
runs = runs.load()


def test_eval_every_logs_heldout_accuracy(tmp_path):
    wd = str(tmp_path / "run")
    runs.run_main(wd, "--config.train.eval_every=2", "--config.data.eval_records=6",
                  "--config.train.eval_max_new_tokens=8", "--config.train.eval_batch_size=4")
    lines = runs.metrics(wd)
    evals = [r for r in lines if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4]            # every 2 steps of the 4
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in evals)
    # Every held-out record was generated and scored, with the saved samples and summary.
    for step in (2, 4):
        out = os.path.join(wd, "eval", f"step_{step}")
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        assert summary["modes"]["normal"]["count"] == 6
        with open(os.path.join(out, "samples.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        assert sorted(r["id"] for r in rows) == sorted(set(r["id"] for r in rows)) and len(rows) == 6
        assert all(r["mode"] == "normal" and 0 < r["num_tokens"] <= 8 for r in rows)
    # Held out: no evaluation map is a training map.
    def maps(path):
        with open(path) as f:
            return {json.dumps(json.loads(line)["map_desc"]) for line in f if line.strip()}

    heldout = maps(os.path.join(wd, "data", "eval", "eval.jsonl"))
    assert len(heldout) == 6 and not heldout & maps(os.path.join(wd, "data", "train.jsonl"))


def test_eval_every_needs_a_scorer_and_held_out_records(tmp_path):
    p = runs.run_main(str(tmp_path / "run"), "--config.train.eval_every=2", "--config.data.adapter=canonical",
                      f"--config.data.train_path={tmp_path}", check=False)
    assert p.returncode == 2
    assert "train.eval_every needs data.scorer" in p.stderr and "train.eval_every needs data.eval_path" in p.stderr


def test_adapter_sources_are_converted_for_training_and_evaluation(tmp_path):
    """A training and a held-out source read through an adapter (here the maze one) are
    converted into the workdir, and both the training and the evaluation use them."""
    from ilvr_jax.data import maze

    train_src = maze.generate_maze_dataset(str(tmp_path / "train_src"), 8, 5, (3, 4))
    eval_src = maze.generate_maze_dataset(str(tmp_path / "eval_src"), 3, 6, (3, 3))
    wd = str(tmp_path / "run")
    runs.run_main(wd, "--config.data.adapter=maze", f"--config.data.train_path={train_src}",
                  f"--config.data.eval_path={eval_src}", "--config.train.eval_every=4",
                  "--config.train.eval_max_new_tokens=4", "--config.train.eval_batch_size=4")

    def ids(path):
        with open(path) as f:
            return [json.loads(line)["id"] for line in f if line.strip()]

    assert ids(os.path.join(wd, "data", "train.jsonl")) == ids(train_src)
    assert ids(os.path.join(wd, "data", "eval", "eval.jsonl")) == ids(eval_src)
    with open(os.path.join(wd, "eval", "step_4", "summary.json")) as f:
        assert json.load(f)["modes"]["normal"]["count"] == 3
