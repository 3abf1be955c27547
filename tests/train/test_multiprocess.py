"""Multi-process training on this CPU host: 2 JAX processes x 4 CPU devices (a localhost
coordinator, gloo collectives), killed with SIGKILL mid-run and restarted, train the debug
preset as 1 process x 8 devices does with the same global batch and mesh: the same batches,
losses equal up to the order of the cross-process reductions, checkpoints with both
processes' shards, the same final state and export. A model-free probe checks, in 2 real
processes, the gathers the loop relies on, the barrier and the agreed stop on SIGTERM."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from ilvr_jax.train import distributed

_spec = importlib.util.spec_from_file_location("_tr", os.path.join(os.path.dirname(__file__), "train_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)
runs = runs.load()

STEPS = 6
# One global batch of 8 over a (1, 8, 1) mesh in both layouts; a checkpoint every 2 steps.
OVERRIDES = ("--config.data.batch_size=8", "--config.mesh.shape=(1,8,1)", f"--config.train.num_steps={STEPS}",
             "--config.train.checkpoint_every=2", "--config.train.log_every=1", "--config.train.keep_checkpoints=0")
FLOATS = ("loss", "ce", "sim", "grad_norm", "param_norm")
EXACT = ("kstar", "lr", "tokens", "target_tokens", "batch_fingerprint")
RUN_TIMEOUT = 420.0


# ----------------------------------------------------------------------------- launching
def _env(cache_dir: str | None, devices: int) -> dict[str, str]:
    e = runs.env(cache_dir)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Processes:
    """The processes of one multi-process run (``ilvr_jax.main`` each, one log file each);
    any failure or timeout ends all of them, so no process outlives the test."""

    def __init__(self, workdir: str, logs: str, *overrides: str, n: int = 2):
        port = _free_port()
        self.logs = [os.path.join(logs, f"{os.path.basename(workdir)}-{int(time.time() * 1e3)}-p{i}.log")
                     for i in range(n)]
        self.procs: list[subprocess.Popen] = []
        try:
            for i in range(n):
                cmd = runs.main_cmd(workdir, *OVERRIDES, "--config.mesh.distributed=True",
                                    f"--config.mesh.coordinator_address=localhost:{port}",
                                    f"--config.mesh.num_processes={n}", f"--config.mesh.process_id={i}", *overrides)
                # No persistent compilation cache: jax writes it from process 0 only and keys
                # it by each process's view of the CPU topology, so process 0 would load the
                # train step while process 1 compiles it, and gloo gives up on a collective
                # that one process reaches 30 s after the other.
                with open(self.logs[i], "w") as log:
                    self.procs.append(subprocess.Popen(cmd, cwd=runs.REPO, env=_env(None, 8 // n),
                                                       stdout=log, stderr=subprocess.STDOUT))
        except BaseException:
            self.kill()
            raise

    def tails(self) -> str:
        out = []
        for i, path in enumerate(self.logs):
            with open(path, errors="replace") as f:
                out.append(f"--- process {i} (exit {self.procs[i].poll() if i < len(self.procs) else None}):\n"
                           + f.read()[-3000:])
        return "\n".join(out)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def wait(self, timeout: float = RUN_TIMEOUT, until=None) -> list[int]:
        """Exit codes once all exited (or once ``until()`` holds: then None for the running
        ones). A process that fails, or a timeout, ends the others and fails the test."""
        t0 = time.time()
        try:
            while True:
                codes = [p.poll() for p in self.procs]
                if until is not None and until():
                    return codes
                if all(c is not None for c in codes):
                    return codes
                if any(c not in (None, 0) for c in codes) and until is None:
                    time.sleep(10)  # the others' exit status, if they stop by themselves
                    return [p.poll() for p in self.procs]
                if time.time() - t0 > timeout:
                    raise AssertionError(f"the run did not finish within {timeout:.0f}s\n{self.tails()}")
                time.sleep(0.05)
        except BaseException:
            self.kill()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def _by_step(workdir: str) -> dict[int, dict]:
    lines = runs.metrics(workdir)
    steps = [r["step"] for r in lines]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {r["step"]: r for r in lines}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _state(workdir: str, step: int):
    from ilvr_jax.train import checkpoints as ckpt_lib

    return jax.tree.map(np.asarray, ckpt_lib.restore_state_item(os.path.join(workdir, "checkpoints", str(step))))


def _export(workdir: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(os.listdir(os.path.join(workdir, "export_hf"))):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(workdir, "export_hf", f)))
    return out


# ----------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "jax_compilation_cache")


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return str(tmp_path_factory.mktemp("multiprocess_logs"))


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir):
    """1 process x 8 devices, uninterrupted: the reference."""
    wd = str(tmp_path_factory.mktemp("mp") / "single")
    t0 = time.time()
    p = subprocess.run(runs.main_cmd(wd, *OVERRIDES), cwd=runs.REPO, env=_env(cache_dir, 8), capture_output=True,
                       text=True, timeout=RUN_TIMEOUT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    print(f"\n1 process x 8 devices: {time.time() - t0:.1f}s")
    return wd


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, logs):
    """2 processes x 4 devices: both killed (SIGKILL) once the checkpoint of step 2 is
    complete, then restarted to the end. Returns (workdir, step resumed from)."""
    wd = str(tmp_path_factory.mktemp("mp") / "multi")
    t0 = time.time()
    with Processes(wd, logs) as procs:
        procs.wait(until=lambda: any(s >= 2 for s in runs.finished_steps(wd)))
        procs.kill(signal.SIGKILL)
        assert [p.returncode for p in procs.procs] == [-signal.SIGKILL] * 2, procs.tails()
    t1 = time.time()
    killed_at = max(r["step"] for r in runs.metrics(wd))
    assert killed_at < STEPS, "the run finished before the kill; nothing was tested"
    resumed_from = runs.finished_steps(wd)[-1]
    with Processes(wd, logs) as procs:
        codes = procs.wait()
        assert codes == [0, 0], procs.tails()
        with open(procs.logs[0]) as f:
            assert f"at step {resumed_from}" in f.read(), procs.tails()
    print(f"\n2 processes x 4 devices: {t1 - t0:.1f}s until killed after step {killed_at}, "
          f"{time.time() - t1:.1f}s resumed from step {resumed_from} to the end")
    return wd, resumed_from


@pytest.mark.slow
def test_two_processes_killed_and_resumed_train_like_one_with_the_same_devices(single, killed_and_resumed):
    wd, resumed_from = killed_and_resumed
    assert 2 <= resumed_from < STEPS
    ref, got = _by_step(single), _by_step(wd)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    worst = {k: max(_rel(got[s][k], ref[s][k]) for s in ref) for k in FLOATS}
    print("max relative difference, 2 processes x 4 devices vs 1 x 8:", json.dumps(worst))
    # Same batches (the global batch's fingerprint), same losses up to the order of the
    # cross-process reductions, before and after the restart.
    for s in ref:
        for k in EXACT:
            assert got[s][k] == ref[s][k], (s, k, got[s][k], ref[s][k])
    assert all(v <= 1e-5 for v in worst.values()), worst
    # Each process wrote its own shards of each checkpoint (orbax's per-process files), and
    # together they hold the whole state: the single-process run's.
    for step in runs.finished_steps(wd):
        state_dir = os.path.join(wd, "checkpoints", str(step), "state")
        assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir)), (step, os.listdir(state_dir))
    a, b = _state(wd, STEPS), _state(single, STEPS)
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    # The data position of every process is saved, each with its own record slice.
    from ilvr_jax.train import checkpoints as ckpt_lib

    saved = ckpt_lib.restore_json_item(os.path.join(wd, "checkpoints", str(STEPS)), ckpt_lib.DATA)
    states = saved[distributed.PROCESS_STATES]
    assert [s["next_batch"] for s in states] == [STEPS, STEPS] and len({s["fingerprint"] for s in states}) == 2


@pytest.mark.slow
def test_two_process_export_equals_the_single_process_export(single, killed_and_resumed):
    wd, _ = killed_and_resumed
    a, b = _export(wd), _export(single)
    assert sorted(a) == sorted(b) and a
    worst = 0.0
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_allclose(a[k].astype(np.float32), b[k].astype(np.float32), rtol=1e-4, atol=1e-6,
                                   err_msg=k)
        worst = max(worst, float(np.max(np.abs(a[k].astype(np.float32) - b[k].astype(np.float32)))))
    print(f"export: max abs difference {worst:.3g}")
    with open(os.path.join(wd, "export_hf", "config.json")) as f, \
            open(os.path.join(single, "export_hf", "config.json")) as g:
        assert json.load(f) == json.load(g)


# What the loop relies on, in 2 real processes without a model: the global batch's
# fingerprint, every process's data state handed to process 0, arrays spanning processes
# fetched whole, a barrier that outlasts gloo's 30 s (process 0 arrives late), and SIGTERM
# to one process stopping both at the same step.
PROBE = textwrap.dedent("""\
    import json, os, signal, sys, time
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from ilvr_jax.train import distributed, preemption

    pid, port, out, late = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    distributed.initialize(f"localhost:{port}", 2, pid)
    res = {"processes": jax.process_count(), "devices": jax.device_count()}
    rng = np.random.default_rng(0)
    full = {k: rng.integers(0, 50, (8, 6)).astype(np.int32) for k in distributed.FINGERPRINT_KEYS}
    res["fingerprint"] = distributed.batch_fingerprint({k: v[pid * 4:(pid + 1) * 4] for k, v in full.items()})

    class Iterator:
        def get_state(self):
            return {"next_batch": 3, "fingerprint": f"p{pid}", "failed_records": [[pid, "x" * (300 * pid), ""]]}

    res["data_state"] = distributed.DataIterator(Iterator()).get_state()
    res["local_state"] = distributed.local_data_state(res["data_state"])
    mesh = Mesh(np.array(jax.devices()), ("d",))
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("d")),
                                               np.arange(16.0).reshape(8, 2)[pid * 4:(pid + 1) * 4])
    res["fetched"] = distributed.fetch_to_host({"x": x})["x"].tolist()
    if pid == 0:
        time.sleep(late)
    t0 = time.time()
    distributed.barrier("probe")
    res["barrier_wait_s"] = time.time() - t0
    with preemption.catch_stop_signals() as request:
        step = 0
        while step < 500:
            if distributed.agreed_stop_signal(request) is not None:
                break
            if pid == 1 and step == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            step += 1
    res["stopped_at"], res["signal"] = step, request.signal
    with open(out, "w") as f:
        json.dump(res, f)
    """)


@pytest.mark.slow
def test_two_processes_agree_on_batches_data_states_arrays_and_stop_steps(tmp_path):
    from ilvr_jax.train import metrics as metrics_lib

    port, late = _free_port(), 35.0
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = []
    try:
        for i in range(2):
            procs.append(subprocess.Popen([sys.executable, str(script), str(i), str(port), str(outs[i]), str(late)],
                                          cwd=runs.REPO, env=_env(None, 4), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    got = [json.loads(o.read_text()) for o in outs]
    rng = np.random.default_rng(0)
    full = {k: rng.integers(0, 50, (8, 6)).astype(np.int32) for k in distributed.FINGERPRINT_KEYS}
    for i, r in enumerate(got):
        assert (r["processes"], r["devices"]) == (2, 8)
        assert r["fingerprint"] == metrics_lib.batch_fingerprint(full)
        assert [s["fingerprint"] for s in r["data_state"][distributed.PROCESS_STATES]] == ["p0", "p1"]
        assert r["local_state"]["fingerprint"] == f"p{i}"
        assert r["fetched"] == np.arange(16.0).reshape(8, 2).tolist()
        assert r["signal"] == signal.SIGTERM
    assert got[1]["barrier_wait_s"] > late - 5   # process 1 waited for the late process 0
    assert got[0]["stopped_at"] == got[1]["stopped_at"] == 6


# ----------------------------------------------------------------------------- one process
def test_init_kwargs_pass_the_given_values_and_leave_the_rest_to_auto_detection():
    assert distributed.init_kwargs() == {}
    assert distributed.init_kwargs("10.0.0.1:1234", 4, 3, "0,1") == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3, "local_device_ids": [0, 1]}
    with pytest.raises(distributed.DistributedInitError, match="mesh.local_device_ids must be comma-separated"):
        distributed.init_kwargs(local_device_ids="0;1")


def test_single_process_gathers_are_the_local_values():
    from ilvr_jax.train import metrics as metrics_lib
    from ilvr_jax.train.preemption import StopRequest

    rng = np.random.default_rng(0)
    batch = {k: rng.integers(0, 9, (2, 5)).astype(np.int32) for k in distributed.FINGERPRINT_KEYS}
    batch["pixel_values"] = rng.normal(size=(2, 4, 3)).astype(np.float32)
    assert distributed.batch_fingerprint(batch) == metrics_lib.batch_fingerprint(batch)
    # The gathered keys are all that the fingerprint reads: the other arrays do not change it.
    assert metrics_lib.batch_fingerprint(batch) == metrics_lib.batch_fingerprint(
        {k: batch[k] for k in distributed.FINGERPRINT_KEYS})
    request = StopRequest()
    assert distributed.agreed_stop_signal(request) is None
    request.signal = signal.SIGTERM
    assert distributed.agreed_stop_signal(request) == signal.SIGTERM
    x = jax.device_put(np.arange(8.0), jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()), ("d",)), jax.sharding.PartitionSpec("d")))
    np.testing.assert_array_equal(distributed.fetch_to_host({"x": x})["x"], np.arange(8.0))


def test_data_state_of_each_process_is_picked_and_other_layouts_are_rejected():
    own = {"next_batch": 3, "fingerprint": "ab", "failed_records": []}
    assert distributed.local_data_state(own) == own   # a single-process checkpoint
    assert distributed.local_data_state({distributed.PROCESS_STATES: [own]}) == own
    # Saved by 2 processes, restored by 1: a state the pipeline refuses (ValueError -> the
    # loop's "the process count did" line).
    assert distributed.local_data_state({distributed.PROCESS_STATES: [own, own]}) == {"fingerprint": None}
