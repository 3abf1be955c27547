"""Worker processes die with the process that started them, and take their shared memory along.

A child Python process runs a pipeline with two grain workers and reads a batch; every process
it starts (workers, multiprocessing's resource tracker) inherits a marker in its environment,
so they can be found after they were re-parented. The child also puts the marker into the
names of the ``/dev/shm`` entries it and its workers create (grain's batch segments ``psm_*``
and its queue semaphores ``sem.mp-*``): none may be left afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from ilvr_jax.data import records as R
from ilvr_jax.tiny import build_tokenizer

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc") or not os.path.isdir("/dev/shm"),
                                reason="needs Linux /proc and /dev/shm")

CHILD = textwrap.dedent("""
    import functools, os, secrets, sys, time
    import multiprocessing.shared_memory
    import multiprocessing.synchronize
    from ilvr_jax.data import pipeline as PL
    from ilvr_jax.data import workers

    MARK = os.environ["ILVR_TEST_MARKER"][:12]

    def tag_names():
        # Names that carry the marker, so the test can tell this run's /dev/shm entries from
        # those of other processes on the machine (the tracker's cleanup does not look at names).
        multiprocessing.shared_memory._make_filename = lambda: f"/psm_{MARK}_{secrets.token_hex(4)}"
        multiprocessing.synchronize.SemLock._make_name = staticmethod(lambda: f"/mp-{MARK}-{secrets.token_hex(4)}")

    def tagged_worker_init(inner, index, count):
        tag_names()
        inner(index, count)

    def main(data_dir, mode):
        tag_names()
        make_init = workers.worker_init
        workers.worker_init = lambda *a, **k: functools.partial(tagged_worker_init, make_init(*a, **k))
        cfg = PL.DataConfig(batch_size=2, max_length=128, max_question_images=1, max_question_patches=64,
                            max_helper_patches=64, max_segments=2, latent_size=2, min_pixels=3136,
                            max_pixels=16 * 784, num_epochs=None, worker_count=2)
        pipe = PL.DataPipeline.from_jsonl(data_dir + "/train.jsonl", data_dir + "/tok", cfg,
                                          process_index=0, process_count=1)
        it = pipe.iterator()
        batch = next(it)
        assert batch["sample_mask"].all()
        print("ready", flush=True)
        if mode == "hang":
            time.sleep(120)
        sys.stdin.readline()  # "exit": return normally when the test has looked

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2])
""")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("workers")
    (d / "img").mkdir()
    build_tokenizer(str(d / "tok"))
    rng = np.random.RandomState(0)
    recs = []
    for i in range(12):
        Image.fromarray(rng.randint(0, 256, (60, 60, 3), dtype=np.uint8)).save(d / "img" / f"h{i}.png")
        recs.append(R.make_record(f"q {i}", [], [R.text_step("go"), R.latent_step(f"img/h{i}.png")], "A", id=i))
    R.write_jsonl(d / "train.jsonl", recs)
    (d / "child.py").write_text(CHILD)
    return d


def _marked(marker: bytes) -> list[int]:
    """Pids of live processes whose environment carries ``marker`` (zombies excluded)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if marker not in f.read():
                    continue
            with open(f"/proc/{name}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        pids.append(int(name))
    return pids


def _shm(mark: str) -> set[str]:
    """This run's batch segments and queue semaphores (the child puts ``mark`` in their names)."""
    return {n for n in os.listdir("/dev/shm") if n.startswith((f"psm_{mark}_", f"sem.mp-{mark}-"))}


def _run_child(data_dir, mode: str, kill: bool):
    marker = uuid.uuid4().hex
    mark = marker[:12]
    env = dict(os.environ, ILVR_TEST_MARKER=marker)
    child = subprocess.Popen([sys.executable, str(data_dir / "child.py"), str(data_dir), mode],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # the workers fill their queues
        descendants = [p for p in _marked(marker.encode()) if p != child.pid]
        created = _shm(mark)
        assert len(descendants) >= 2, "the child should run two workers"
        assert any(n.startswith("psm_") for n in created), "the workers should pass batches through /dev/shm"
        if kill:
            child.send_signal(signal.SIGKILL)
        else:
            child.stdin.write("\n")
            child.stdin.flush()
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    deadline = time.time() + 10.0
    while time.time() < deadline:
        alive, left = _marked(marker.encode()), _shm(mark)
        if not alive and not left:
            return child.returncode
        time.sleep(0.2)
    # Do not leave survivors behind for the rest of the suite: end the workers, then give the
    # resource tracker (which unlinks what they registered) time to exit on its own.
    for pid in alive:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"resource_tracker" not in f.read():
                    os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(2.0)
    raise AssertionError(f"survivors of the child: processes {alive}, /dev/shm entries {sorted(left)[:10]}")


def test_sigkill_of_the_main_process_leaves_no_worker_and_no_shared_memory(data_dir):
    assert _run_child(data_dir, "hang", kill=True) == -signal.SIGKILL


def test_normal_exit_leaves_no_worker_and_no_shared_memory(data_dir):
    assert _run_child(data_dir, "exit", kill=False) == 0
