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


def test_eval_in_a_bucket_workdir_equals_a_local_run(tmp_path, tiny_dir):
    """A run whose model directory, maze records and workdir are on gs:// (in memory, through
    etils.epath; ``bucket_main.py``) with ``train.eval_every`` draws the same held-out mazes
    into the bucket workdir, writes the same samples and summary there and logs the same
    accuracy as the same run with local paths (both in one process, the local one first)."""
    import subprocess
    import sys

    from ilvr_jax.data import maze

    mazes = os.path.dirname(maze.generate_maze_dataset(str(tmp_path / "mazes"), n=8, seed=0, sizes=(3, 4)))
    common = [f"--config={runs.STAGE1}:debug", "--config.model.init=hf", "--config.train.num_steps=2",
              "--config.train.checkpoint_every=2", "--config.train.export_at_end=false",
              "--config.train.eval_every=2", "--config.data.eval_records=4", "--config.train.eval_max_new_tokens=8",
              "--config.train.eval_batch_size=4"]
    local_wd, exported = str(tmp_path / "local"), str(tmp_path / "exported")
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bucket_main.py"),
           str(tmp_path / "checkpoints"), "copy", tiny_dir, "gs://models/tiny", "copy", mazes, "gs://data/mazes",
           "export", "gs://runs/ev", exported,
           "--", *common, f"--workdir={local_wd}", f"--config.model.hf_dir={tiny_dir}",
           f"--config.data.train_path={mazes}",
           "--", *common, "--workdir=gs://runs/ev", "--config.model.hf_dir=gs://models/tiny",
           "--config.data.train_path=gs://data/mazes"]
    cache = str(tmp_path.parent / "jax_compilation_cache")
    p = subprocess.run(cmd, cwd=str(tmp_path), env=runs.env(cache), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "exported", "local", "mazes"]   # no local "gs:" folder
    from ilvr_jax.train.metrics import read_tensorboard_scalars

    ref, got = runs.metrics(local_wd), runs.metrics(exported)
    evals = [r for r in ref if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [2] and [r for r in got if "eval_accuracy" in r] == evals
    assert [r["loss"] for r in got if "loss" in r] == [r["loss"] for r in ref if "loss" in r]
    tb = [read_tensorboard_scalars(os.path.join(root, "tensorboard"))["train/eval_accuracy"]
          for root in (local_wd, exported)]
    assert tb[0] == tb[1] == {2: evals[0]["eval_accuracy"]}

    def read(root, *parts):
        with open(os.path.join(root, *parts), "rb") as f:
            return f.read()

    samples = read(local_wd, "eval", "step_2", "samples.jsonl")
    assert len(samples.splitlines()) == 4 and read(exported, "eval", "step_2", "samples.jsonl") == samples
    summaries = [json.loads(read(root, "eval", "step_2", "summary.json")) for root in (local_wd, exported)]
    for s in summaries:
        s.pop("seconds")
    assert summaries[0] == summaries[1] and summaries[0]["modes"]["normal"]["count"] == 4
    # The held-out mazes and their images, beside each other in the bucket as locally.
    heldout = os.path.join(local_wd, "data", "eval")
    files = sorted(os.path.relpath(os.path.join(d, f), heldout) for d, _, fs in os.walk(heldout) for f in fs)
    assert "eval.jsonl" in files and len(files) > 4
    for rel in files:
        assert read(exported, "data", "eval", rel) == read(heldout, rel), rel
    assert sorted(os.listdir(os.path.join(exported, "data", "eval"))) == sorted(os.listdir(heldout))


def test_a_bucket_eval_path_is_looked_up_in_the_bucket(monkeypatch):
    """``data.eval_path`` on gs://: one config line without a storage package; with the
    bucket reachable (in memory, through etils.epath) the file is looked up there."""
    from ilvr_jax import storage
    from ilvr_jax.train import evaluation

    spec = importlib.util.spec_from_file_location("_stage1", runs.STAGE1)
    stage1 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage1)
    c = stage1.get_config("debug")
    c.train.eval_every = 2
    c.data.eval_path = "gs://b/heldout"
    monkeypatch.setattr(storage, "_installed", lambda package: False)
    assert evaluation.config_errors(c) == ["data.eval_path: gs://b/heldout: gs:// paths need gcsfs or tensorflow, "
                                           "and neither is installed (pip install gcsfs)"]
    monkeypatch.undo()
    spec = importlib.util.spec_from_file_location(
        "_fb", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fake_bucket.py"))
    fake_bucket = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake_bucket)
    with fake_bucket.load().install():
        assert evaluation.config_errors(c) == ["data.eval_path: gs://b/heldout does not exist"]
        storage.write_text("gs://b/heldout/data.jsonl", "")
        assert evaluation.config_errors(c) == []
