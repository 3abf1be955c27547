"""Restart behaviour of ``python -m ilvr_jax.main`` (subprocesses on one CPU device):
resume after ``kill -9`` reproduces the uninterrupted run exactly, an unreadable newest
checkpoint falls back to the previous one, a non-finite loss stops (or skips) without
touching the saved checkpoints, and stage 2 starts from stage 1's student."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal

import jax
import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("_tr", os.path.join(os.path.dirname(__file__), "train_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)
runs = runs.load()

COMPARED = ("loss", "ce", "sim", "kstar", "grad_norm", "param_norm", "lr", "tokens", "batch_fingerprint")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "jax_compilation_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """The uninterrupted 8-step debug run (every step logged, a checkpoint every 2 steps)."""
    return runs.stage1_run(str(tmp_path_factory.getbasetemp()), cache_dir)


def _state(workdir, step):
    from ilvr_jax.train import checkpoints as ckpt_lib

    return jax.tree.map(np.asarray, ckpt_lib.restore_state_item(os.path.join(workdir, "checkpoints", str(step))))


def _assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _by_step(lines):
    steps = [r["step"] for r in lines]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {r["step"]: r for r in lines}


def test_reference_run_logs_every_step(reference):
    lines = runs.metrics(reference)
    assert [r["step"] for r in lines] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) for r in lines)
    assert len({r["batch_fingerprint"] for r in lines}) == 8   # distinct batches
    assert runs.finished_steps(reference)[-1] == 8


def test_resume_after_kill_reproduces_the_uninterrupted_run(reference, tmp_path, cache_dir):
    wd = str(tmp_path / "killed")
    proc = runs.start_main(wd, *runs.RUN_OVERRIDES, cache_dir=cache_dir, log_path=str(tmp_path / "first.log"))
    try:
        got = runs.wait_for(lambda: any(s >= 2 for s in runs.finished_steps(wd)) or proc.poll() is not None,
                            timeout=600)
        assert got
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, open(tmp_path / "first.log").read()[-3000:]
    killed_at = max(r["step"] for r in runs.metrics(wd))
    assert killed_at < 8, "the run finished before the kill; nothing was tested"
    resume_step = runs.finished_steps(wd)[-1]
    assert 2 <= resume_step < 8

    # A save interrupted by the kill would sit in a temporary directory; simulate one at a
    # later step (a half-written copy): it must neither be restored nor break the restart.
    src = os.path.join(wd, "checkpoints", str(resume_step))
    tmp_ckpt = os.path.join(wd, "checkpoints", "7.orbax-checkpoint-tmp")
    shutil.copytree(src, tmp_ckpt)
    if os.path.exists(os.path.join(tmp_ckpt, "commit_success.txt")):
        os.remove(os.path.join(tmp_ckpt, "commit_success.txt"))

    p = runs.run_main(wd, *runs.RUN_OVERRIDES, cache_dir=cache_dir)
    assert f"at step {resume_step}" in p.stdout, p.stdout[-3000:]
    assert not os.path.exists(tmp_ckpt)

    ref, got = _by_step(runs.metrics(reference)), _by_step(runs.metrics(wd))
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        for k in COMPARED:
            assert got[step][k] == ref[step][k], (step, k, got[step][k], ref[step][k])
    # The final states are bitwise equal too (student, teacher, Adam moments, rng, step).
    _assert_trees_equal(_state(wd, 8), _state(reference, 8))
    # TensorBoard: after the purge at the restart, every step's loss is the uninterrupted one.
    from ilvr_jax.train.metrics import read_tensorboard_scalars

    tb = read_tensorboard_scalars(os.path.join(wd, "tensorboard"))["train/loss"]
    assert tb == {s: pytest.approx(ref[s]["loss"], rel=1e-7) for s in range(1, 9)}


def test_corrupted_latest_checkpoint_falls_back_with_a_warning(reference, tmp_path, cache_dir):
    wd = str(tmp_path / "corrupt")
    runs.run_main(wd, *runs.RUN_OVERRIDES, "--config.train.export_at_end=false", cache_dir=cache_dir)
    runs_before = runs.finished_steps(wd)
    latest = runs_before[-1]
    # Truncate every array data file of the newest checkpoint.
    runs.corrupt_checkpoint_arrays(os.path.join(wd, "checkpoints", str(latest)))
    ref = _by_step(runs.metrics(reference))
    p = runs.run_main(wd, *runs.RUN_OVERRIDES, cache_dir=cache_dir)
    out = p.stdout + p.stderr
    assert f"checkpoint at step {latest}" in out and "could not be restored" in out, out[-3000:]
    previous = runs_before[-2]
    assert f"resumed from" in out and f"at step {previous}" in out
    assert os.path.isdir(os.path.join(wd, "corrupt_checkpoints", str(latest)))
    got = _by_step(runs.metrics(wd))
    assert sorted(got) == list(range(1, 9))
    for step in range(previous + 1, 9):
        for k in COMPARED:
            assert got[step][k] == ref[step][k], (step, k)
    _assert_trees_equal(_state(wd, latest), _state(reference, latest))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, cache_dir):
    wd = str(tmp_path / "nan_stop")
    p = runs.run_main(wd, "--config.optim.lr=1e30", "--config.train.num_steps=8",
                      "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=0",
                      check=False, cache_dir=cache_dir)
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "non-finite loss or gradient at step" in err[0], p.stderr[-2000:]
    bad_step = int(err[0].split("at step ")[1].split()[0])
    assert "Traceback" not in p.stderr
    steps = runs.finished_steps(wd)
    assert steps and max(steps) == bad_step - 1, (steps, bad_step)
    state = _state(wd, max(steps))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
    logged = runs.metrics(wd)
    assert [r["step"] for r in logged] == list(range(1, bad_step))
    assert all(np.isfinite(r["loss"]) for r in logged)


def test_non_finite_loss_skip_policy_keeps_the_parameters(tmp_path, cache_dir):
    wd = str(tmp_path / "nan_skip")
    p = runs.run_main(wd, "--config.optim.lr=1e30", "--config.train.nan_policy=skip", "--config.train.num_steps=6",
                      "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=0",
                      "--config.train.export_at_end=false", cache_dir=cache_dir)
    logged = runs.metrics(wd)
    first_bad = min(r["step"] for r in logged if not r["finite"])
    assert "update was skipped" in p.stdout
    assert all(not r["finite"] for r in logged if r["step"] >= first_bad)
    # Every skipped step kept the parameters of the last finite step.
    before = _state(wd, first_bad - 1)
    after = _state(wd, 6)
    _assert_trees_equal(after["params"], before["params"])
    _assert_trees_equal(after["teacher"], before["teacher"])
    assert int(after["step"]) == 6


def test_stage2_starts_from_the_stage1_student(reference, tmp_path, cache_dir):
    wd = str(tmp_path / "stage2")
    p = runs.run_main(wd, f"--config.train.init_from={reference}", "--config.train.num_steps=2",
                      "--config.train.checkpoint_every=1", "--config.train.log_every=1",
                      "--config.train.keep_checkpoints=0", config=runs.STAGE2 + ":debug", cache_dir=cache_dir)
    assert "stage 2: student parameters from" in p.stdout
    assert os.path.join(reference, "checkpoints", "8") in p.stdout
    logged = runs.metrics(wd)
    assert [r["step"] for r in logged] == [1, 2] and all(np.isfinite(r["loss"]) for r in logged)
    assert all(r["sim"] == 0.0 for r in logged)   # stage 2 trains on CE alone
    # The first update has lr = 0 (linear warm-up from 0), so the stage-2 student after step 1
    # is exactly stage 1's final student.
    _assert_trees_equal(_state(wd, 1)["params"], _state(reference, 8)["params"])
    assert _state(wd, 1).get("teacher") is None
    with open(os.path.join(wd, "model_config.json")) as f, open(os.path.join(reference, "model_config.json")) as g:
        assert f.read() == g.read()
    assert os.path.isfile(os.path.join(wd, "tokenizer", "tokenizer.json"))
