"""Helpers of the training-program tests: run ``python -m ilvr_jax.main`` in a subprocess on
one CPU device (the way a user runs it), read its metrics log, and a small cache of
finished runs shared by the test modules of one pytest process.

Load with :func:`load` (test modules are imported with ``--import-mode=importlib``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGE1 = os.path.join(REPO, "configs", "stage1.py")
STAGE2 = os.path.join(REPO, "configs", "stage2.py")
_CACHE: dict[str, str] = {}


def load():
    """This module, once per process (so the run cache is shared)."""
    name = "ilvr_train_runs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.abspath(__file__))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def env(cache_dir: str | None = None) -> dict[str, str]:
    """One CPU device, no network; a shared persistent compilation cache makes repeated
    runs of the same program skip most of the compile time."""
    e = dict(os.environ)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    e["JAX_PLATFORMS"] = "cpu"
    e["HF_HUB_OFFLINE"] = "1"
    e["TOKENIZERS_PARALLELISM"] = "false"
    if cache_dir:
        e["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    return e


def main_cmd(workdir: str, *overrides: str, config: str = STAGE1 + ":debug") -> list[str]:
    return [sys.executable, "-m", "ilvr_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides]


def run_main(workdir: str, *overrides: str, config: str = STAGE1 + ":debug", timeout: float = 600,
             check: bool = True, cache_dir: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(main_cmd(workdir, *overrides, config=config), cwd=REPO, env=env(cache_dir),
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"main failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def start_main(workdir: str, *overrides: str, config: str = STAGE1 + ":debug", cache_dir: str | None = None,
               log_path: str | None = None) -> subprocess.Popen:
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen(main_cmd(workdir, *overrides, config=config), cwd=REPO, env=env(cache_dir),
                            stdout=out, stderr=subprocess.STDOUT)


def metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def finished_steps(workdir: str) -> list[int]:
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def wait_for(pred, timeout: float, interval: float = 0.02) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(interval)
    return False


# The debug preset with every step logged: 8 steps, a checkpoint every 2.
RUN_OVERRIDES = ("--config.train.num_steps=8", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
                 "--config.train.keep_checkpoints=0")


def stage1_run(tmp_root: str, cache_dir: str) -> str:
    """A finished stage-1 debug run (cached per process): the reference of the resume,
    fallback, stage-2 and export tests. Copy it before modifying."""
    if "stage1" not in _CACHE:
        wd = os.path.join(tmp_root, "stage1_reference")
        shutil.rmtree(wd, ignore_errors=True)
        run_main(wd, *RUN_OVERRIDES, cache_dir=cache_dir)
        _CACHE["stage1"] = wd
    return _CACHE["stage1"]


def corrupt_checkpoint_arrays(step_dir: str) -> int:
    """Truncates every array data file of a checkpoint step's ``state`` item to half its
    size (a write cut short); returns how many files were truncated (asserted > 0)."""
    n = 0
    for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
        for f in files:
            path = os.path.join(dirpath, f)
            if os.sep + "d" in dirpath and os.path.getsize(path) > 64:
                with open(path, "r+b") as fh:
                    fh.truncate(os.path.getsize(path) // 2)
                n += 1
    assert n, f"{step_dir}: no array data file found to corrupt"
    return n
