"""Multi-process runs on this CPU host: 2 JAX processes x 4 CPU devices (a localhost
coordinator, gloo collectives) against 1 process x 8 devices with the same global batch and
mesh.

One 2-process stage-1 run serves most checks: it is killed with SIGKILL mid-run, restarted,
stopped with SIGTERM sent to one of its processes (both save the same step and exit 143),
restarted again to the end, where it evaluates the student on held-out mazes
(``train.eval_every``) and exports it (``train.export_at_end``). It trains as 1 process x 8
devices does: the same batches, losses equal up to the order of the cross-process
reductions, checkpoints with both processes' shards, the same final state. Its export equals
``convert to-hf`` of its last checkpoint bit for bit; its evaluation, and
``python -m ilvr_jax.evaluate`` on 2 processes (resuming a samples file), equal the
evaluation of the same checkpoint by 1 process x 8 devices; stage 2 on 2 processes
initialised from it trains as 1 process x 8 devices does. A model-free probe checks, in 2
real processes, the gathers the loop relies on, the barrier and the agreed stop on SIGTERM."""

from __future__ import annotations

import importlib.util
import json
import os
import re
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
# One global batch of 8 over a (1, 8, 1) mesh in both layouts; a checkpoint every 3 steps, so
# the SIGTERM stop (at step 4 or 5) is a save of its own.
CHECKPOINT_EVERY = 3
OVERRIDES = ("--config.data.batch_size=8", "--config.mesh.shape=(1,8,1)", f"--config.train.num_steps={STEPS}",
             f"--config.train.checkpoint_every={CHECKPOINT_EVERY}", "--config.train.log_every=1",
             "--config.train.keep_checkpoints=0")
# The 2-process stage-1 run evaluates at its last step: 12 held-out mazes in global batches
# of 8 (the second batch has rows on process 0 only), 16 new tokens.
EVAL_OVERRIDES = (f"--config.train.eval_every={STEPS}", "--config.data.eval_records=12",
                  "--config.train.eval_max_new_tokens=16", "--config.train.eval_batch_size=8")
EVAL_ARGS = ("--adapter", "canonical", "--scorer", "maze", "--batch-size", "8", "--max-new-tokens", "16",
             "--mesh", "1,8,1", "--ablate", "shuffle", "--no-progress")
STAGE2_STEPS = 3   # step 1 runs at lr 0 (warmup): step 3's loss shows the update of step 2
STAGE2_OVERRIDES = (f"--config.train.num_steps={STAGE2_STEPS}", "--config.train.export_at_end=False")
FLOATS = ("loss", "ce", "sim", "grad_norm", "param_norm")
EXACT = ("kstar", "lr", "tokens", "target_tokens", "batch_fingerprint")
RUN_TIMEOUT = 600.0
TIMES: dict[str, float] = {}   # wall time of each run, printed by the tests


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
    """The processes of one multi-process run (one log file each): ``ilvr_jax.main`` with
    ``overrides``, or with ``command`` a module whose arguments ``command(port, i)`` gives.
    Any failure or timeout ends all of them, so no process outlives the test."""

    def __init__(self, workdir: str, logs: str, *overrides: str, n: int = 2, config: str = runs.STAGE1 + ":debug",
                 command=None):
        port = _free_port()
        self.logs = [os.path.join(logs, f"{os.path.basename(workdir)}-{int(time.time() * 1e3)}-p{i}.log")
                     for i in range(n)]
        self.procs: list[subprocess.Popen] = []
        try:
            for i in range(n):
                if command is None:
                    cmd = runs.main_cmd(workdir, *OVERRIDES, "--config.mesh.distributed=True",
                                        f"--config.mesh.coordinator_address=localhost:{port}",
                                        f"--config.mesh.num_processes={n}", f"--config.mesh.process_id={i}",
                                        *overrides, config=config)
                else:
                    cmd = command(port, i)
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

    def log(self, i: int) -> str:
        with open(self.logs[i], errors="replace") as f:
            return f.read()

    def tails(self) -> str:
        """Each log's end, after its first Python traceback when there is one (a process that
        fails waits at jax's shutdown barrier, whose abort would fill the end)."""
        out = []
        for i in range(len(self.logs)):
            log = self.log(i)
            first = log.find("Traceback (most recent call last)")
            head = log[first:first + 3000] + "\n[...]\n" if 0 <= first < len(log) - 3000 else ""
            out.append(f"--- process {i} (exit {self.procs[i].poll() if i < len(self.procs) else None}):\n"
                       + head + log[-3000:])
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
        ones). A process that fails gives the others 30 s to stop by themselves; a timeout
        ends them all and fails the test."""
        t0, failed_at = time.time(), None
        try:
            while True:
                codes = [p.poll() for p in self.procs]
                if until is not None and until():
                    return codes
                if all(c is not None for c in codes):
                    return codes
                if any(c not in (None, 0) for c in codes) and until is None:
                    failed_at = failed_at or time.time()
                    if time.time() - failed_at > 30:
                        return codes
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


def _training_steps(workdir: str) -> dict[int, dict]:
    """The training lines of the metrics log by step (an evaluation adds lines of its own)."""
    lines = [r for r in runs.metrics(workdir) if "loss" in r]
    steps = [r["step"] for r in lines]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {r["step"]: r for r in lines}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _worst(got: dict[int, dict], ref: dict[int, dict]) -> dict[str, float]:
    """The largest relative difference of every float metric, after checking that both runs
    logged the same steps and the same exact values (batches, token counts, K*, lr)."""
    assert sorted(got) == sorted(ref)
    for s in ref:
        for k in EXACT:
            assert got[s][k] == ref[s][k], (s, k, got[s][k], ref[s][k])
    return {k: max(_rel(got[s][k], ref[s][k]) for s in ref) for k in FLOATS}


def _state(workdir: str, step: int):
    from ilvr_jax.train import checkpoints as ckpt_lib

    return jax.tree.map(np.asarray, ckpt_lib.restore_state_item(os.path.join(workdir, "checkpoints", str(step))))


def _tensors(export_dir: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(os.listdir(export_dir)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(export_dir, f)))
    return out


def _run_single(args: list[str], cache_dir: str, what: str) -> subprocess.CompletedProcess:
    """One process x 8 devices, timed under ``what``."""
    t0 = time.time()
    p = subprocess.run(args, cwd=runs.REPO, env=_env(cache_dir, 8), capture_output=True, text=True,
                       timeout=RUN_TIMEOUT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    TIMES[what] = time.time() - t0
    return p


def _eval_cmd(model: str, data: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ilvr_jax.evaluate", "--model", model, "--data", data, "--out", out, *EVAL_ARGS,
            *extra]


def _samples(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "samples.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _by_key(rows: list[dict]) -> dict[tuple[str, str], dict]:
    keys = [(r["id"], r["mode"]) for r in rows]
    assert len(keys) == len(set(keys)), "a (record, mode) row is written twice"
    return dict(zip(keys, rows))


def _summary(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


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
    _run_single(runs.main_cmd(wd, *OVERRIDES), cache_dir, "stage 1, 1 process x 8 devices")
    return wd


@pytest.fixture(scope="module")
def multi(tmp_path_factory, logs):
    """2 processes x 4 devices: both killed (SIGKILL) once the checkpoint of step 3 is
    complete; restarted and stopped by SIGTERM to process 1 alone once a step of this start
    has run; restarted to the end (evaluation and export at the last step). Returns the
    workdir and what each start saw."""
    wd = str(tmp_path_factory.mktemp("mp") / "multi")
    info: dict = {"workdir": wd}
    t0 = time.time()
    with Processes(wd, logs, *EVAL_OVERRIDES) as procs:
        procs.wait(until=lambda: any(s >= CHECKPOINT_EVERY for s in runs.finished_steps(wd)))
        procs.kill(signal.SIGKILL)
        assert [p.returncode for p in procs.procs] == [-signal.SIGKILL] * 2, procs.tails()
    info["killed_at"] = max(r["step"] for r in runs.metrics(wd))
    assert info["killed_at"] < STEPS, "the run finished before the kill; nothing was tested"
    info["resumed_from"] = runs.finished_steps(wd)[-1]
    t1 = time.time()
    with Processes(wd, logs, *EVAL_OVERRIDES) as procs:
        first = re.compile(rf"step {info['resumed_from'] + 1}: loss=")
        procs.wait(until=lambda: first.search(procs.log(0)) is not None)
        procs.procs[1].send_signal(signal.SIGTERM)
        info["term_codes"] = procs.wait()
        info["term_logs"] = [procs.log(i) for i in range(2)]
        info["term_tails"] = procs.tails()
    info["stopped_at"] = [int(m.group(1)) if m else None for m in
                          (re.search(r"stopped by SIGTERM at step (\d+)", log) for log in info["term_logs"])]
    t2 = time.time()
    with Processes(wd, logs, *EVAL_OVERRIDES) as procs:
        codes = procs.wait()
        assert codes == [0, 0], procs.tails()
        info["last_log"] = procs.log(0)
    t3 = time.time()
    TIMES["stage 1, 2 processes x 4 devices"] = t3 - t0
    print(f"\n2 processes x 4 devices: {t1 - t0:.1f}s until killed after step {info['killed_at']}, {t2 - t1:.1f}s "
          f"from step {info['resumed_from']} to the SIGTERM stop at step {info['stopped_at']}, {t3 - t2:.1f}s "
          "to the end with the evaluation and the export")
    return info


@pytest.mark.slow
def test_two_processes_killed_and_resumed_train_like_one_with_the_same_devices(single, multi):
    wd = multi["workdir"]
    assert CHECKPOINT_EVERY <= multi["resumed_from"] < STEPS
    ref, got = _training_steps(single), _training_steps(wd)
    assert sorted(got) == list(range(1, STEPS + 1))
    # Same batches (the global batch's fingerprint), same losses up to the order of the
    # cross-process reductions, before and after both restarts.
    worst = _worst(got, ref)
    print("max relative difference, 2 processes x 4 devices vs 1 x 8:", json.dumps(worst))
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
def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(multi):
    """``python -m ilvr_jax.main`` on 2 processes, SIGTERM to process 1 only: both stop at the
    same step with exit status 128 + 15, that step's checkpoint holds both processes' shards
    and the data position, and the next start resumes from it (its numbers are checked
    against the uninterrupted run above)."""
    wd = multi["workdir"]
    assert multi["term_codes"] == [128 + signal.SIGTERM] * 2, multi["term_tails"]
    stopped = multi["stopped_at"]
    assert stopped[0] is not None and stopped[0] == stopped[1], multi["term_tails"]
    assert multi["resumed_from"] < stopped[0] < STEPS and stopped[0] % CHECKPOINT_EVERY
    for log in multi["term_logs"]:   # not a periodic checkpoint: the stop wrote it
        assert f"checkpoint of step {stopped[0]} saved" in log, multi["term_tails"]
    step_dir = os.path.join(wd, "checkpoints", str(stopped[0]))
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(os.path.join(step_dir, "state")))
    from ilvr_jax.train import checkpoints as ckpt_lib

    saved = ckpt_lib.restore_json_item(step_dir, ckpt_lib.DATA)
    assert [s["next_batch"] for s in saved[distributed.PROCESS_STATES]] == [stopped[0]] * 2
    assert f"at step {stopped[0]}" in multi["last_log"]
    print(f"SIGTERM to process 1 after step {multi['resumed_from'] + 1}: both stopped at step {stopped[0]}")


@pytest.mark.slow
def test_two_process_export_equals_to_hf_of_its_checkpoint_bit_for_bit(single, multi, tmp_path, cache_dir):
    """``train.export_at_end`` with parameters spanning 2 processes writes what ``convert
    to-hf`` in one process writes from the same (last) checkpoint, byte for byte; against
    the single-process run's export the tensors differ only as the trained states do."""
    wd = multi["workdir"]
    out = str(tmp_path / "to_hf")
    _run_single([sys.executable, "-m", "ilvr_jax.convert", "to-hf", "--checkpoint", wd, "--out", out], cache_dir,
                "to-hf, 1 process")
    exported = os.path.join(wd, "export_hf")
    files = sorted(os.listdir(exported))
    assert files == sorted(os.listdir(out)) and any(f.endswith(".safetensors") for f in files)
    for f in files:
        with open(os.path.join(exported, f), "rb") as a, open(os.path.join(out, f), "rb") as b:
            assert a.read() == b.read(), f
    a, b = _tensors(exported), _tensors(os.path.join(single, "export_hf"))
    assert sorted(a) == sorted(b) and a
    worst = 0.0
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_allclose(a[k].astype(np.float32), b[k].astype(np.float32), rtol=1e-4, atol=1e-6,
                                   err_msg=k)
        worst = max(worst, float(np.max(np.abs(a[k].astype(np.float32) - b[k].astype(np.float32)))))
    print(f"export: {len(files)} files identical to to-hf's; vs the 1 x 8 run's export max abs difference {worst:.3g}")


@pytest.fixture(scope="module")
def evaluations(multi, tmp_path_factory, logs, cache_dir):
    """``python -m ilvr_jax.evaluate`` of the 2-process run's last checkpoint on its held-out
    mazes: 1 process x 8 devices, then 2 processes x 4 devices resuming a samples file that
    holds the first batch's rows (copied from the first) and a cut-off line."""
    wd = multi["workdir"]
    data = os.path.join(wd, "data", "eval", "eval.jsonl")
    root = tmp_path_factory.mktemp("mp_eval")
    one, two = str(root / "one"), str(root / "two")
    _run_single(_eval_cmd(wd, data, one, "--step", str(STEPS)), cache_dir, "evaluate, 1 process x 8 devices")
    with open(data) as f:
        first_batch = [json.loads(line)["id"] for line in f if line.strip()][:8]
    with open(os.path.join(one, "samples.jsonl")) as f:
        seeded = [line for line in f if json.loads(line)["id"] in first_batch]
    os.makedirs(two)
    with open(os.path.join(two, "samples.jsonl"), "w") as f:
        f.writelines(seeded)
        f.write(seeded[0][:25])   # a run killed while writing a line

    def command(port: int, i: int) -> list[str]:
        return _eval_cmd(wd, data, two, "--step", str(STEPS), "--distributed", "--coordinator-address",
                         f"localhost:{port}", "--num-processes", "2", "--process-id", str(i))

    t0 = time.time()
    with Processes(two, logs, command=command) as procs:
        codes = procs.wait()
        assert codes == [0, 0], procs.tails()
    TIMES["evaluate, 2 processes x 4 devices (resumed)"] = time.time() - t0
    return {"one": one, "two": two, "seeded": seeded}


@pytest.mark.slow
def test_evaluation_during_two_process_training_equals_one_process_evaluating_the_checkpoint(multi, evaluations):
    """``train.eval_every`` on 2 processes: every held-out record once, the same texts,
    answers and accuracy as 1 process x 8 devices evaluating the same checkpoint."""
    wd = multi["workdir"]
    got = _by_key(_samples(os.path.join(wd, "eval", f"step_{STEPS}")))
    ref = {k: r for k, r in _by_key(_samples(evaluations["one"])).items() if k[1] == "normal"}
    with open(os.path.join(wd, "data", "eval", "eval.jsonl")) as f:
        ids = [json.loads(line)["id"] for line in f if line.strip()]
    assert len(ids) == 12 and sorted(got) == sorted(ref) == sorted((i, "normal") for i in ids)
    assert got == ref
    assert len({r["output"] for r in got.values()}) > 1   # the records' generations differ: a mixed-up row shows
    summary = _summary(os.path.join(wd, "eval", f"step_{STEPS}"))
    assert summary["modes"]["normal"] == _summary(evaluations["one"])["modes"]["normal"]
    assert summary["config"]["processes"] == 2
    (logged,) = [r for r in runs.metrics(wd) if "eval_accuracy" in r]
    assert logged["step"] == STEPS and logged["eval_accuracy"] == summary["modes"]["normal"]["accuracy"]


@pytest.mark.slow
def test_evaluate_command_on_two_processes_resumes_and_equals_one_process(evaluations):
    """``python -m ilvr_jax.evaluate --distributed`` on 2 processes: the rows already in the
    samples file are kept and their batch is not generated again, the cut-off line is
    dropped, every (record, mode) row is written once, and rows and summary are those of 1
    process x 8 devices."""
    one, two = evaluations["one"], evaluations["two"]
    ref, got = _by_key(_samples(one)), _by_key(_samples(two))
    assert len(ref) == 24 and got == ref   # 12 records x (normal, shuffle)
    with open(os.path.join(two, "samples.jsonl")) as f:
        assert f.readlines()[:len(evaluations["seeded"])] == evaluations["seeded"]
    a, b = _summary(two), _summary(one)
    assert (a["resumed_rows"], a["generated_batches"]) == (16, 2)   # batch 1 of 2, both modes, was done
    assert (b["resumed_rows"], b["generated_batches"]) == (0, 4)
    assert a["modes"] == b["modes"] and a["num_records"] == b["num_records"] == 12
    assert (a["config"]["processes"], b["config"]["processes"]) == (2, 1)
    assert a["config"]["mesh"] == b["config"]["mesh"] == [1, 8, 1]


@pytest.fixture(scope="module")
def stage2(multi, tmp_path_factory, logs, cache_dir):
    """Stage 2 initialised from the 2-process stage-1 run (its last checkpoint), on 2
    processes x 4 devices and on 1 process x 8 devices."""
    root = tmp_path_factory.mktemp("mp_stage2")
    init = f"--config.train.init_from={multi['workdir']}"
    config = runs.STAGE2 + ":debug"
    one, two = str(root / "one"), str(root / "two")
    _run_single(runs.main_cmd(one, *OVERRIDES, init, *STAGE2_OVERRIDES, config=config), cache_dir,
                "stage 2, 1 process x 8 devices")
    t0 = time.time()
    with Processes(two, logs, init, *STAGE2_OVERRIDES, config=config) as procs:
        codes = procs.wait()
        assert codes == [0, 0], procs.tails()
    TIMES["stage 2, 2 processes x 4 devices"] = time.time() - t0
    return one, two


@pytest.mark.slow
def test_stage2_from_a_two_process_stage1_run_trains_on_two_processes_like_one(stage2):
    one, two = stage2
    ref, got = _training_steps(one), _training_steps(two)
    assert sorted(got) == list(range(1, STAGE2_STEPS + 1))
    worst = _worst(got, ref)
    print("stage 2, max relative difference, 2 processes x 4 devices vs 1 x 8:", json.dumps(worst))
    assert all(v <= 1e-5 for v in worst.values()), worst
    assert all(got[s]["sim"] == 0 for s in got)   # stage 2: the CE alone
    print("wall times (s):", json.dumps({k: round(v, 1) for k, v in TIMES.items()}))


# What the loop and the evaluation rely on, in 2 real processes without a model: the global
# batch's fingerprint, every process's data state handed to process 0, arrays spanning
# processes fetched whole, process 0's text handed to all, a barrier that outlasts gloo's
# 30 s (process 0 arrives late), and SIGTERM to one process stopping both at the same step.
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
    res["broadcast"] = distributed.broadcast_text("é from p0 " * 40 if pid == 0 else "not sent")
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
        assert r["broadcast"] == "é from p0 " * 40
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
