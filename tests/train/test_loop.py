"""The training loop's host reads of the step metrics (``python -m ilvr_jax.main`` in a
subprocess, its train step wrapped by ``loop_probe.py``): metrics come to the host only at
log steps, before checkpoints and at the first step, yet a non-finite step is still reported
exactly (the first one, with its loss and gradient norm), no checkpoint is written at or
after it under ``nan_policy='stop'``, every skipped step is named under ``'skip'``, and the
throughput and best-metric numbers count the same steps as a read after every step."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

_spec = importlib.util.spec_from_file_location("_tr", os.path.join(os.path.dirname(__file__), "train_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)
runs = runs.load()

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loop_probe.py")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # The same cache as test_resume.py: its non-finite runs compile the same programs.
    return str(tmp_path_factory.getbasetemp() / "jax_compilation_cache")


def _probe_run(tmp_path, name, cache_dir, *overrides):
    wd, out = str(tmp_path / name), str(tmp_path / f"{name}.json")
    cmd = [sys.executable, PROBE, out, f"--config={runs.STAGE1}:debug", f"--workdir={wd}", *overrides]
    p = subprocess.run(cmd, cwd=runs.REPO, env=runs.env(cache_dir), capture_output=True, text=True, timeout=600)
    assert os.path.isfile(out), p.stdout[-3000:] + p.stderr[-3000:]
    with open(out, encoding="utf-8") as f:
        return wd, p, json.load(f)


def _read_steps(probe) -> set[int]:
    return {at for at, _, _ in probe["reads"]}


def _first_non_finite(probe) -> int:
    return next(i + 1 for i, v in enumerate(probe["values"]) if not v["finite"])


def test_nan_stop_reads_only_at_log_and_save_steps_and_names_the_first_bad_step(tmp_path, cache_dir):
    log_every, save_every = 5, 2
    wd, p, probe = _probe_run(tmp_path, "stop", cache_dir, "--config.optim.lr=1e30", "--config.train.num_steps=8",
                              f"--config.train.log_every={log_every}", f"--config.train.checkpoint_every={save_every}",
                              "--config.train.keep_checkpoints=0")
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    bad = _first_non_finite(probe)
    # The case under test: the first non-finite step is neither logged nor checkpointed.
    assert bad % log_every and bad % save_every and bad > 1, bad
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1, p.stderr[-2000:]
    v = probe["values"][bad - 1]
    assert f"non-finite loss or gradient at step {bad} (loss={v['loss']}, grad_norm={v['grad_norm']})" in err[0]
    # Reads: the first step (the throughput clock), log and save steps; none in between.
    due = {1} | {s for s in range(1, 9) if s % log_every == 0 or s % save_every == 0}
    assert _read_steps(probe) <= due, sorted(_read_steps(probe))
    assert bad not in _read_steps(probe)
    # The divergence is found at the next save step, so no checkpoint at or after ``bad``.
    stop_at = min(s for s in due if s > bad)
    assert probe["steps_run"] == stop_at
    assert max(_read_steps(probe)) == stop_at
    steps = runs.finished_steps(wd)
    assert steps and max(steps) < bad, (steps, bad)
    assert all(r["step"] < bad for r in runs.metrics(wd))


def test_nan_skip_warns_every_skipped_step_and_counts_like_a_per_step_read(tmp_path, cache_dir):
    log_every, save_every, total = 4, 3, 6
    wd, p, probe = _probe_run(tmp_path, "skip", cache_dir, "--config.optim.lr=1e30",
                              "--config.train.nan_policy=skip", f"--config.train.num_steps={total}",
                              f"--config.train.log_every={log_every}", f"--config.train.checkpoint_every={save_every}",
                              "--config.train.keep_checkpoints=0", "--config.train.keep_best_metric=loss",
                              "--config.train.export_at_end=false")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    values = probe["values"]
    assert probe["steps_run"] == total == len(values)
    due = {1, total} | {s for s in range(1, total + 1) if s % log_every == 0 or s % save_every == 0}
    assert _read_steps(probe) <= due and set(range(1, total + 1)) - due, sorted(_read_steps(probe))
    # Every step's metrics were read (at or after the step).
    assert {(of, name) for _, of, name in probe["reads"]} >= {(s, "finite") for s in range(1, total + 1)}
    # One warning per skipped step, in order, with that step's values.
    bad = [s for s in range(1, total + 1) if not values[s - 1]["finite"]]
    assert bad and bad[0] > 1
    skipped = [w for w in probe["warnings"] if "update was skipped" in w]
    assert [int(re.search(r"at step (\d+)", w).group(1)) for w in skipped] == bad
    for w, s in zip(skipped, bad):
        assert f"(loss={values[s - 1]['loss']}, grad_norm={values[s - 1]['grad_norm']})" in w
    # The log lines carry the log step's own values.
    logged = {r["step"]: r for r in runs.metrics(wd)}
    assert sorted(logged) == [4, 6]
    for s, r in logged.items():
        assert r["finite"] == values[s - 1]["finite"]
        assert str(r["loss"]) == str(float(values[s - 1]["loss"]))
        # Throughput over the steps since the previous log line, the first step excluded:
        # tokens_per_s * step_time_s * steps = the tokens of those steps.
        previous_line = max([q for q in logged if q < s], default=1)
        counted = range(previous_line + 1, s + 1)
        tokens = sum(values[t - 1]["tokens"] for t in counted)
        assert r["tokens_per_s"] * r["step_time_s"] * len(counted) == pytest.approx(tokens, rel=1e-9)
    # keep_best_metric: each checkpoint's mean loss over the finite steps since the previous
    # checkpoint (orbax also saves the first step).
    saved = runs.finished_steps(wd)
    assert saved == [1, 3, 6], saved
    for prev, s in zip([0] + saved, saved):
        finite = [values[t - 1]["loss"] for t in range(prev + 1, s + 1) if values[t - 1]["finite"]]
        path = os.path.join(wd, "checkpoints", str(s), "metrics", "metrics")
        if finite:
            with open(path) as f:
                assert json.load(f) == {"loss": pytest.approx(sum(finite) / len(finite), rel=1e-6)}, s
        else:
            assert not os.path.isfile(path), s
    assert math.isfinite(values[0]["loss"])


def test_a_run_in_a_bucket_resumes_and_matches_a_local_run(tmp_path, cache_dir):
    """A stock model directory (bf16 shards, processor files), the maze records with their
    images and the workdir all on gs:// (in memory, through etils.epath): two starts (steps
    1-2, then a resume for 3-4) log exactly what one local run of 4 steps logs, and the
    workdir's files in the bucket are the local run's."""
    hub = importlib.util.spec_from_file_location("_hub", os.path.join(os.path.dirname(__file__), "..",
                                                                       "hub_download.py"))
    hub_module = importlib.util.module_from_spec(hub)
    hub.loader.exec_module(hub_module)
    from ilvr_jax.data import maze
    from ilvr_jax.train.metrics import read_tensorboard_scalars

    model = hub_module.load().build_hub_download(str(tmp_path / "Qwen2.5-VL-tiny"))
    mazes = os.path.dirname(maze.generate_maze_dataset(str(tmp_path / "mazes"), n=8, seed=0, sizes=(3, 4)))
    # A constant schedule after warm-up: the 2-step first start trains as the 4-step run does.
    common = ("--config.model.init=hf", "--config.optim.schedule=constant", "--config.train.log_every=1",
              "--config.train.checkpoint_every=2", "--config.train.export_at_end=false")
    local_wd = str(tmp_path / "local")
    runs.run_main(local_wd, *common, "--config.train.num_steps=4", f"--config.model.hf_dir={model}",
                  f"--config.data.train_path={mazes}", cache_dir=cache_dir)
    start = [f"--config={runs.STAGE1}:debug", "--workdir=gs://runs/s1", *common,
             "--config.model.hf_dir=gs://models/Qwen2.5-VL-tiny", "--config.data.train_path=gs://data/mazes"]
    exported = str(tmp_path / "exported")
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bucket_main.py"),
           str(tmp_path / "checkpoints"), "copy", model, "gs://models/Qwen2.5-VL-tiny", "copy", mazes,
           "gs://data/mazes", "export", "gs://runs/s1", exported,
           "--", *start, "--config.train.num_steps=2", "--", *start, "--config.train.num_steps=4"]
    p = subprocess.run(cmd, cwd=runs.REPO, env=runs.env(cache_dir), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr and "at step 2" in p.stdout + p.stderr
    ref, got = runs.metrics(local_wd), runs.metrics(exported)
    assert [r["step"] for r in got] == [1, 2, 3, 4] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        for k in ("loss", "ce", "sim", "kstar", "grad_norm", "param_norm", "lr", "tokens", "batch_fingerprint"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
    tb = read_tensorboard_scalars(os.path.join(exported, "tensorboard"))["train/loss"]
    assert tb == {r["step"]: pytest.approx(r["loss"], rel=1e-7) for r in ref}
    for name in ("model_config.json", "source_config.json", "tokenizer/tokenizer.json",
                 "tokenizer/preprocessor_config.json", "data/train.jsonl"):
        want = open(os.path.join(local_wd, name)).read()
        if name == "data/train.jsonl":   # images stay where the source records are
            want = want.replace(mazes, "gs://data/mazes")
        assert open(os.path.join(exported, name)).read() == want, name


def test_stage2_windows_auto_from_the_data_and_given_widths():
    from ilvr_jax.train import loop as loop_lib

    # auto: the first chunk in a window of the data's longest first chunk (the sequence when
    # unknown), later ones in the data's longest, both rounded up to a multiple of 16
    assert loop_lib.stage2_windows("auto", later_chunk_len=28, first_chunk_len=150) == (160, 32)
    assert loop_lib.stage2_windows("auto", later_chunk_len=28, first_chunk_len=160) == (160, 32)
    assert loop_lib.stage2_windows("0,96", later_chunk_len=28, first_chunk_len=150) == (None, 96)
    assert loop_lib.stage2_windows("auto", later_chunk_len=28) == (None, 32)
    assert loop_lib.stage2_windows("auto", later_chunk_len=32) == (None, 32)
    assert loop_lib.stage2_windows("auto", later_chunk_len=0) == (None, 16)     # no segments anywhere
    assert loop_lib.stage2_windows("auto", later_chunk_len=None) == (None, loop_lib.AOT_LATER_CHUNK)
    assert loop_lib.stage2_windows("0,96", later_chunk_len=28) == (None, 96)
    assert loop_lib.stage2_windows("(2048, 256)", later_chunk_len=28) == (2048, 256)
    assert loop_lib.stage2_windows("0,0", later_chunk_len=28) == (None, None)
    for bad in ("", "auto,3", "1,2,3", "-1,5", "x"):
        with pytest.raises(ValueError, match="train.stage2_chunk_len must be 'auto' or 'FIRST,REST'"):
            loop_lib.stage2_windows(bad, later_chunk_len=28)
