"""Checkpoint manager of the training loop: retention (newest N + best), atomic saves
(unfinished temporary directories are never restored), fallback from an unreadable newest
checkpoint, and the path helpers used by stage 2 and export."""

from __future__ import annotations

import importlib.util
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ilvr_jax.train import checkpoints as ckpt_lib

_spec = importlib.util.spec_from_file_location("_tr", os.path.join(os.path.dirname(__file__), "train_runs.py"))
_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_runs)


def _state(seed: int):
    r = np.random.default_rng(seed)
    return {"params": {"w": jnp.asarray(r.normal(size=(64, 32)), jnp.float32),
                       "b": jnp.asarray(r.normal(size=(32,)), jnp.float32)},
            "step": jnp.asarray(seed, jnp.int32)}


def _abstract(state):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), state)


def _save_steps(workdir, losses, *, keep, best="", start=1):
    mgr = ckpt_lib.make_manager(workdir, save_every=1, keep=keep, best_metric=best)
    for i, loss in enumerate(losses, start=start):
        ckpt_lib.save(mgr, i, _state(i), {"next_batch": i}, {"stage": 1}, metrics={"loss": loss} if best else None)
    mgr.wait_until_finished()
    return mgr


def _corrupt(step_dir: str) -> int:
    return _runs.corrupt_checkpoint_arrays(step_dir)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def ckpt_warnings():
    h = _Records()
    log = logging.getLogger(ckpt_lib.__name__)
    log.addHandler(h)
    yield h.messages
    log.removeHandler(h)


def test_keep_newest_n(tmp_path):
    mgr = _save_steps(str(tmp_path), [5, 1, 4, 3, 6, 7], keep=2)
    assert list(mgr.all_steps()) == [5, 6]
    assert ckpt_lib.finished_steps(str(tmp_path / "checkpoints")) == [5, 6]


def test_keep_newest_n_plus_best(tmp_path):
    mgr = _save_steps(str(tmp_path), [5, 1, 4, 3, 6, 7], keep=2, best="loss")
    assert sorted(mgr.all_steps()) == [2, 5, 6]          # step 2 has the lowest loss
    mgr.close()
    # The metrics are stored with the checkpoints: a restarted manager still knows the best.
    mgr = _save_steps(str(tmp_path), [8, 0.5, 9], keep=2, best="loss", start=7)
    assert sorted(mgr.all_steps()) == [8, 9]              # 8 (loss 0.5) is now the best and the newest
    mgr = _save_steps(str(tmp_path), [10, 11], keep=2, best="loss", start=10)
    assert sorted(mgr.all_steps()) == [8, 10, 11]


def test_keep_zero_keeps_all(tmp_path):
    mgr = _save_steps(str(tmp_path), [1, 2, 3, 4], keep=0)
    assert list(mgr.all_steps()) == [1, 2, 3, 4]


def test_restore_latest_returns_state_and_data(tmp_path):
    mgr = _save_steps(str(tmp_path), [1, 1, 1], keep=0)
    step, state, data = ckpt_lib.restore_latest(mgr, _abstract(_state(0)))
    assert step == 3 and data == {"next_batch": 3}
    jax.tree.map(np.testing.assert_array_equal, state, _state(3))
    assert ckpt_lib.restore_latest(ckpt_lib.make_manager(str(tmp_path / "empty")), _abstract(_state(0))) is None


def test_unfinished_save_is_ignored_and_removed(tmp_path):
    _save_steps(str(tmp_path), [1, 1], keep=0)
    # What a kill mid-save leaves behind: the temporary directory of a later step.
    tmp = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp"
    tmp.mkdir()
    (tmp / "state").mkdir()
    mgr = ckpt_lib.make_manager(str(tmp_path))
    assert list(mgr.all_steps()) == [1, 2]
    step, state, _ = ckpt_lib.restore_latest(mgr, _abstract(_state(0)))
    assert step == 2
    assert not tmp.exists()
    assert ckpt_lib.resolve_step_dir(str(tmp_path)).endswith(os.path.join("checkpoints", "2"))


def test_corrupted_newest_falls_back_with_a_warning(tmp_path, ckpt_warnings):
    _save_steps(str(tmp_path), [1, 1, 1], keep=0)
    _corrupt(str(tmp_path / "checkpoints" / "3"))
    mgr = ckpt_lib.make_manager(str(tmp_path))
    step, state, data = ckpt_lib.restore_latest(mgr, _abstract(_state(0)))
    assert step == 2 and data == {"next_batch": 2}
    jax.tree.map(np.testing.assert_array_equal, state, _state(2))
    assert any("step 3" in m and "could not be restored" in m for m in ckpt_warnings), ckpt_warnings
    # The unreadable step is moved aside, so the resumed run can save step 3 again.
    assert (tmp_path / "corrupt_checkpoints" / "3" / "state").is_dir()
    assert list(mgr.all_steps()) == [1, 2]
    ckpt_lib.save(mgr, 3, _state(33), {"next_batch": 3}, {"stage": 1})
    mgr.wait_until_finished()
    step, state, _ = ckpt_lib.restore_latest(mgr, _abstract(_state(0)))
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, state, _state(33))


def test_all_checkpoints_unreadable_is_an_error_not_a_fresh_start(tmp_path):
    _save_steps(str(tmp_path), [1, 1], keep=0)
    for s in (1, 2):
        _corrupt(str(tmp_path / "checkpoints" / str(s)))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"none of the checkpoints \[1, 2\] can be restored"):
        ckpt_lib.restore_latest(ckpt_lib.make_manager(str(tmp_path)), _abstract(_state(0)))
    assert ckpt_lib.finished_steps(str(tmp_path / "checkpoints")) == [1, 2]   # nothing moved


def test_path_helpers(tmp_path):
    _save_steps(str(tmp_path), [1, 1, 1], keep=2)
    root = str(tmp_path / "checkpoints")
    latest = os.path.join(root, "3")
    assert ckpt_lib.resolve_step_dir(str(tmp_path)) == latest
    assert ckpt_lib.resolve_step_dir(root) == latest
    assert ckpt_lib.resolve_step_dir(os.path.join(root, "2")) == os.path.join(root, "2")
    for p in (str(tmp_path), root, latest):
        assert ckpt_lib.run_root(p) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt_lib.resolve_step_dir(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no training checkpoints found"):
        ckpt_lib.resolve_step_dir(str(tmp_path / "checkpoints" / "3" / "data"))
    assert ckpt_lib.restore_json_item(latest, ckpt_lib.DATA) == {"next_batch": 3}
    assert ckpt_lib.restore_json_item(latest) == {"stage": 1}
    state = ckpt_lib.restore_state_item(latest)
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.asarray(_state(3)["params"]["w"]))


def test_restore_state_item_reads_only_the_named_entries(tmp_path, monkeypatch):
    """An export reads the parameters, never the optimizer moments: ``only`` restores the
    named top-level entries, equal to a full restore, without reading the others' arrays."""
    _save_steps(str(tmp_path), [1, 1], keep=0)
    step_dir = str(tmp_path / "checkpoints" / "2")
    full = ckpt_lib.restore_state_item(step_dir)
    reads: list[str] = []
    original = ocp.PyTreeCheckpointer.restore

    def spy(self, directory, *a, **kw):
        reads.append(sorted(kw["args"].item))
        return original(self, directory, *a, **kw)

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", spy)
    part = ckpt_lib.restore_state_item(step_dir, only=("params",))
    assert sorted(part) == ["params"] and reads == [["params"]]
    for k in ("w", "b"):
        np.testing.assert_array_equal(np.asarray(part["params"][k]), np.asarray(full["params"][k]))
