"""Evaluation during training (``train.eval_every``): every N optimizer steps the student
generates on a held-out split with its latents (``ilvr_jax.evaluate.evaluate``), the data
set's scorer judges the answers, and the accuracy goes to the metrics log and TensorBoard.

The held-out split is ``data.eval_path`` (through the run's adapter, as the training data);
with the maze adapter and no path, ``data.eval_records`` mazes are generated into the
workdir from another seed, leaving out every map that is also in the training set, so the
evaluation never sees a training maze.

With several processes, ``train.eval_batch_size`` is the global batch: every process
generates its rows of each batch on the training mesh, and process 0 writes the samples and
the summary, which equal those of one process evaluating the same parameters on the same
mesh (``tests/train/test_multiprocess.py``).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from typing import Any

import jax
import ml_collections

from ilvr_jax import storage

logger = logging.getLogger("ilvr_jax")

# The scorer of each adapter's data set (canonical records need data.scorer).
ADAPTER_SCORERS = {"maze": "maze", "vsp": "vsp", "comt": "comt", "zebra": "zebra"}
EVAL_DIR = "eval"


def scorer_name(c: ml_collections.ConfigDict) -> str:
    return str(c.data.scorer) or ADAPTER_SCORERS.get(str(c.data.adapter), "")


def config_errors(c: ml_collections.ConfigDict) -> list[str]:
    """The eval settings' problems (checked with the rest of the config, before any work)."""
    if int(c.train.eval_every) <= 0:
        return []
    errs = []
    if not scorer_name(c):
        errs.append(f"train.eval_every needs data.scorer for adapter {c.data.adapter!r} (comt, vsp, maze or zebra)")
    if not c.data.eval_path and c.data.adapter != "maze":
        errs.append("train.eval_every needs data.eval_path (the held-out records)")
    if c.data.eval_path:
        try:
            if not storage.exists(c.data.eval_path):
                errs.append(f"data.eval_path: {c.data.eval_path} does not exist")
        except storage.StorageError as e:   # a bucket path without its storage package
            errs.append(f"data.eval_path: {e}")
    if int(c.train.eval_max_new_tokens) < 1:
        errs.append(f"train.eval_max_new_tokens must be >= 1, got {c.train.eval_max_new_tokens}")
    return errs


def heldout_mazes(out_dir: str, n: int, seed: int, sizes: tuple[int, int], train_path: str) -> str:
    """``out_dir/eval.jsonl``: ``n`` mazes from ``seed`` that share no map with the records
    of ``train_path`` (small grids repeat), with their images; returns the path. ``out_dir``
    may be in a bucket: the images are drawn into a local directory and copied there."""
    from ilvr_jax.data import maze
    from ilvr_jax.data.records import write_jsonl

    path = storage.join(out_dir, "eval.jsonl")
    if storage.isfile(path):
        return path
    seen = {json.dumps(json.loads(line).get("map_desc")) for line in storage.read_text(train_path).split("\n")
            if line.strip()}
    kept = [r for r in maze.generate_maze_records(4 * n, seed, tuple(sizes))
            if json.dumps(r.get("map_desc")) not in seen][:n]
    if jax.process_index() == 0:
        storage.makedirs(out_dir)
        # The maze renderer writes local files only; a bucket gets a copy. The JSONL takes its
        # name last, so the other processes never read it before its images are there.
        local = out_dir if storage.is_local(out_dir) else tempfile.mkdtemp(prefix="ilvr_eval_maze_")
        for r in kept:
            maze.write_record_images(r, local)
        write_jsonl(storage.join(local, "eval.jsonl.tmp"), kept)
        if local != out_dir:
            storage.copy_tree(local, out_dir)
            shutil.rmtree(local)
        storage.replace(path + ".tmp", path)
    deadline = time.time() + 600
    while not storage.isfile(path):   # the other processes wait for process 0's files
        if time.time() > deadline:
            raise TimeoutError(f"waited 600 s for {path} (written by process 0)")
        time.sleep(0.5)
    return path


def eval_records_path(c: ml_collections.ConfigDict, workdir: str, train_path: str) -> tuple[str, str | None]:
    """(held-out JSONL, image root or None) for ``train.eval_every``."""
    out_dir = storage.join(workdir, "data", EVAL_DIR)
    storage.makedirs(out_dir)
    if not c.data.eval_path:
        return heldout_mazes(out_dir, int(c.data.eval_records), int(c.seed) + 1, tuple(c.data.maze_sizes),
                             train_path), None
    if c.data.adapter == "canonical":
        return str(c.data.eval_path), c.data.image_root or None
    from ilvr_jax.data.adapters import convert_to_jsonl
    from ilvr_jax.train import distributed

    path = storage.join(out_dir, "eval.jsonl")
    if not storage.isfile(path) and jax.process_index() == 0:
        convert_to_jsonl(c.data.adapter, c.data.eval_path, path, c.data.image_root or None)
    distributed.barrier("ilvr eval data")   # the others read what process 0 wrote
    return path, None


class EvalHook:
    """``hook(step, params)`` -> scalars for the metrics log (``eval_accuracy``, and per
    ablation ``eval_accuracy_<mode>``); writes ``WORKDIR/eval/step_N/`` (samples + summary)."""

    def __init__(self, c: ml_collections.ConfigDict, workdir: str, train_path: str, model_cfg, tok_dir: str,
                 image_cfg, mesh=None):
        from ilvr_jax.data.records import read_jsonl
        from ilvr_jax.evaluate.loading import load_tokenizer

        self.every = int(c.train.eval_every)
        path, root = eval_records_path(c, workdir, train_path)
        self.records = list(read_jsonl(path, root))
        self.scorer = scorer_name(c)
        self.model_cfg, self.image_cfg, self.mesh = model_cfg, image_cfg, mesh
        self.tokenizer = load_tokenizer(tok_dir)   # a bucket's tokenizer dir through a local copy
        self.out_root = storage.join(workdir, EVAL_DIR)
        self.kw = dict(batch_size=int(c.train.eval_batch_size), max_new_tokens=int(c.train.eval_max_new_tokens),
                       ablations=str(c.train.eval_ablations), seed=int(c.seed), latent_size=int(c.ilvr.latent_size))
        logger.info("evaluation every %d steps on %d held-out records of %s (scorer %s)", self.every,
                    len(self.records), path, self.scorer)

    def due(self, step: int, last_step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == last_step)

    def __call__(self, step: int, params: Any) -> dict[str, float]:
        from ilvr_jax.evaluate.run import evaluate, format_table

        summary = evaluate(params, self.model_cfg, self.tokenizer, self.image_cfg, self.records, self.scorer,
                           out_dir=storage.join(self.out_root, f"step_{step}"), mesh=self.mesh, progress=False,
                           **self.kw)
        logger.info("evaluation at step %d:\n%s", step, format_table(summary))
        out = {}
        for mode, entry in summary["modes"].items():
            out["eval_accuracy" if mode == "normal" else f"eval_accuracy_{mode}"] = float(entry["accuracy"])
        return out
