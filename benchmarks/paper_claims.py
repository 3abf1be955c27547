"""The paper's claims at laptop scale: ILVR vs text-only SFT vs Mirage-style latents vs random
patch selection, and the K / lambda_sim ablation, each over several seeds.

    python benchmarks/paper_claims.py --study-dir /tmp/paper_claims_study      # the full study
    python benchmarks/paper_claims.py --study-dir DIR --only text_sft          # one method alone
    python benchmarks/paper_claims.py --study-dir DIR --report                 # table + plot only
    python benchmarks/paper_claims.py --study-dir DIR --quick                  # smoke test (CI)

Task: generated FrozenLake mazes shaped like ILVR's VSP split (square maps 3x3 .. 6x6, the
answer a move sequence checked by walking it on the map, one helper image per move = the
board after that move). The training set holds ``--train-records`` mazes of random sizes,
the test set ``--test-per-size`` mazes of every size, none of them a training map. Paths
longer than ``data.max_segments`` (8) moves are left out of both sets for every method
(about 2 % of the 6x6 maps), so all methods see the same maps.

Methods (one tiny Qwen2.5-VL trained from scratch per method and seed, vision tower frozen as
in the paper):

* ``text_sft``: the same reasoning text and answer, no helper images, no latents; CE only.
* ``mirage``: one latent segment before the reasoning text whose helper image is the whole
  path drawn on the board, mean-pooled into K = 8 latents (``ilvr.target_selection=mean_pool``);
  stage 1 = 0.1 CE + L_sim, stage 2 = CE with the model's own latents.
* ``ilvr``: ILVR as the paper sets it (one latent segment per move, momentum-teacher top-p
  patch selection, K = 8, lambda_sim = 1), stage 1 then stage 2. This is also the grid's
  ``ilvr_K8_sim1`` cell.
* ``ilvr_random``: ILVR with the teacher's K* patches drawn at random (the selection ablation).
* ``ilvr_K{2,4,8,16}_sim{0.1,1}``: the K ablation of the paper's Figure 4 at two loss weights.

Same compute per method: every run makes ``--steps`` optimizer steps of ``--batch`` records
drawn from all its records alike; a two-stage method spends half of them in stage 1 and half in
stage 2, text-only SFT spends all of them in one CE stage.

Evaluation: greedy generation with latents on the test set, the answer walked on the map
(``ilvr_jax.evaluate``); the latent methods are evaluated a second time with their fed
latents replaced by zeros (the diagnostics' ``zeros`` ablation). Chance level is measured
with the simulator on the same test set: random moves of the true path's length (the
expected accuracy over 200 draws per map) and the single constant answer that solves the
most training maps. The script warns when text-only SFT does not beat the better of the two
by a clear margin (10 points and a confidence interval above it).

Intervals: 95 % percentile bootstrap that resamples both the seeds and the test records
(the same records for every seed), so they carry the seed-to-seed spread as well as the test
set's size.

Model size and steps: ``--shape study`` (hidden 128, 4 decoder layers, 4 heads / 2 kv heads,
MLP 256, the tests' ``untied_gqa2`` vision tower with a 128-wide merger, frozen) and
``--steps 1200`` at batch 8 (lr 2e-3, cosine after 20 warm-up steps), every batch padded to
one length per data variant, its longest record rounded up to 64 (``fit_length``: 448 tokens
for text-only SFT, 512 for ILVR at K = 8; padding is masked, so it changes the computation
only by rounding, and the cost), and stage 2's latent steps inlined
(``train.stage2_unroll``). Buckets of several lengths (``data.buckets='auto'``) would be
cheaper still, but their batches hold records of one length class only (a batch of 3x3
mazes, a batch of 6x6 ones), a change of the training itself: text-only SFT seed 0 trained
that way read the start cell in 3.5 % of the test mazes and solved 8.8 %, against 100 % and
23.0 % with mixed batches (one seed each). The boards are drawn with 28-pixel cells
(``--cell-px``: one merged vision token per cell) and each cell's row and column drawn into
it (``maze.render_board(coordinates=True)``; ``--plain-boards`` turns it off). The records'
question is a short form of ``maze.QUESTION_TEMPLATE`` (``STUDY_QUESTION``, 73 instead of
236 tokens): a model trained from scratch learns nothing from the wording, and the long
prompt was half of every sequence.

How that budget was chosen (text-only SFT, seed 0, 50 test mazes per size, on the shared
2-core host, 2026-12-01; "start read" = the first move names the true start cell):

| boards | vision tower | steps | train mazes | accuracy | start read | final CE |
|---|---|---|---|---|---|---|
| 32-px cells (a token straddles cells) | frozen | 200 | 1000 | 7.5 % | 5 % | 0.19 |
| 28-px cells | frozen | 400 | 1000 | 11.0 % | 18.5 % | 0.094 |
| 28-px cells | trained | 400 | 1000 | 8.5 % | 6.0 % | 0.098 |
| 28-px cells | frozen | 1200 | 1000 | 11.5 % | 48.5 % | 0.053 |
| 28-px cells | frozen | 1200 | 3000 | 9.0 % | 28.5 % | 0.065 |

Chance is 7.6 % there (random moves of the true length). Aligning a cell with a vision
token and more steps taught the model to find the start cell, but not to plan: its answers
walk a stock shape (right, right, down, ...) from the start, because it cannot say where
the goal or the holes are. Nothing in the model gives a cell's absolute coordinates: a
patch's features depend on its pixels only and RoPE carries relative positions in the
attention scores, not in the values, so writing "(2, 3)" for a cell means learning to
count tokens, which a pretrained Qwen2.5-VL has learned and a 4-layer model trained for
minutes has not. Drawing each cell's row and column into the cell puts the coordinates in
the patch itself; it does the same for every method. Training the vision tower did not help
at 400 steps, and 3000 mazes learned more slowly per step than 1000. On the shared 2-core
host with one run per core, a 1200-step text-only run took about 35 minutes and a
two-stage run 24-49 minutes (stage 1 runs the teacher on the helper images; stage 2 makes
up to 64 one-token latent steps per row), so the 33 runs take about 11 hours on 2 cores,
far more than the 2 hours aimed at; ``--steps``, ``--seeds``, ``--only`` and
``--test-per-size`` trade it down. The chance check prints a warning line until text-only
SFT clears chance by 10 points.

Several invocations of the same command may share one study directory (e.g. one per free
core): each run is claimed with ``runs/METHOD/seedN/owner.pid`` while it trains.

Outputs under ``--study-dir``: ``data/`` (the three record variants and their images),
``runs/METHOD/seedN/`` (stage workdirs and the evaluation's samples), ``results/METHOD__seedN.json``
(one per finished run: a rerun skips it; ``--results-dir`` puts them elsewhere, e.g.
``benchmarks/paper_claims_results/``, where the study behind BENCHMARKS.md keeps its runs, so
that a study spread over several machines or days adds up), ``results.json`` (everything,
aggregated), ``table.md`` and ``paper_claims.png``. A result file records its budget; one of
another budget is left out of the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DATA_SEED = 20261201
MAX_SEGMENTS = 8
# The question of every record in the study: maze.QUESTION_TEMPLATE's instructions in a third
# of its tokens (a model trained from scratch learns nothing from the wording, and the prompt
# would otherwise be half of every sequence).
STUDY_QUESTION = ("Frozen lake {rows}x{cols} grid map: move the agent from the start to the goal and avoid holes "
                  "(L, R, U, D). Final answer in \\boxed{{}}.")
GRID_KS = (2, 4, 8, 16)
GRID_SIMS = (0.1, 1.0)
HEADLINE = ("text_sft", "ilvr", "mirage", "ilvr_random")

# A tiny Qwen2.5-VL a little wider and deeper than the tests' ``untied_gqa2`` (same vision
# tower): its training CE fell about twice as fast per step on these mazes (module doc).
STUDY_SHAPES = {
    "study": dict(
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[4, 6, 6], vocab_size=512),
        vision=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128,
                    fullatt_block_indexes=[1, 3], window_size=56),
        tie=False,
    ),
}


@dataclasses.dataclass(frozen=True)
class Method:
    """One training recipe of the study."""

    name: str
    label: str
    data: str                 # "interleaved" (one latent per move), "text" (none), "single" (one latent)
    latent_size: int = 8
    sim_weight: float = 1.0
    ce_weight: float = 1.0    # stage 1's CE weight
    selection: str = "teacher"
    two_stage: bool = True

    @property
    def uses_latents(self) -> bool:
        return self.data != "text"


def grid_name(k: int, sim: float) -> str:
    return f"ilvr_K{k}_sim{sim:g}"


def all_methods() -> dict[str, Method]:
    ms = [Method("text_sft", "text-only SFT", "text", sim_weight=0.0, two_stage=False),
          Method("mirage", "Mirage-style (1 segment, mean-pooled)", "single", ce_weight=0.1, selection="mean_pool"),
          Method("ilvr", "ILVR (K=8, sim 1)", "interleaved"),
          Method("ilvr_random", "ILVR, random patches", "interleaved", selection="random")]
    for k in GRID_KS:
        for s in GRID_SIMS:
            if (k, s) != (8, 1.0):   # that cell is ``ilvr`` itself
                ms.append(Method(grid_name(k, s), f"ILVR K={k} sim {s:g}", "interleaved", latent_size=k,
                                 sim_weight=s))
    return {m.name: m for m in ms}


def grid_cell(name: str) -> str:
    """The run that holds grid cell ``name`` (the K=8, sim 1 cell is ``ilvr``)."""
    return "ilvr" if name == grid_name(8, 1.0) else name


@dataclasses.dataclass(frozen=True)
class Budget:
    steps: int = 1200
    batch: int = 8
    lr: float = 2e-3
    train_records: int = 1000
    test_per_size: int = 100
    sizes: tuple[int, int] = (3, 6)
    shape: str = "study"
    eval_batch: int = 16
    seeds: tuple[int, ...] = (0, 1, 2)
    ablation: str = "zeros"
    max_segments: int = MAX_SEGMENTS  # data.max_segments; longer paths are left out of both sets
    buckets: str = "fit"           # data.buckets; "fit": one bucket, the variant's longest record (see fit_length)
    max_length: int = 640          # the longest record allowed in any variant (K=16: 546 tokens)
    max_new_tokens: int = 0        # 0: room for the longest test answer
    cell_px: int = 28              # board cell size: 28 = one merged vision token per cell
    board_coordinates: bool = True  # each cell's row and column drawn in it (maze.render_board)
    train_vision: bool = False     # train the vision tower too (optim.frozen = ())


# The smoke test: one fixed bucket, 3x3 mazes of at most 2 moves (stage 2's compiled program
# grows with data.max_segments), a few steps.
QUICK = Budget(steps=2, batch=4, train_records=16, test_per_size=4, sizes=(3, 3), shape="untied_mha_full",
               eval_batch=4, seeds=(0,), max_segments=2, max_length=512, max_new_tokens=48)
# The three code paths (no latents; one mean-pooled segment, one window of S in stage 2; one
# teacher-selected segment per move); ``ilvr_random`` and the grid differ from ``ilvr`` in
# config values only (tests/test_paper_claims.py checks them).
QUICK_METHODS = ("text_sft", "ilvr", "mirage")


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- data
def build_data(data_dir: str, budget: Budget) -> dict[str, str]:
    """The training set in its three variants and the test set (written once; reused)."""
    from ilvr_jax.data import maze
    from ilvr_jax.data.records import write_jsonl

    paths = {v: os.path.join(data_dir, f"train_{v}.jsonl") for v in ("interleaved", "text", "single")}
    paths["test"] = os.path.join(data_dir, "test.jsonl")
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    os.makedirs(data_dir, exist_ok=True)

    def short(r):
        return len(maze.parse_answer(r["original_final_answer"])) <= budget.max_segments

    train, seen = [], set()
    for r in maze.generate_maze_records(3 * budget.train_records, DATA_SEED, budget.sizes):
        if short(r):
            train.append(r)
            seen.add(json.dumps(r["map_desc"]))
        if len(train) == budget.train_records:
            break
    test = []
    for side in range(budget.sizes[0], budget.sizes[1] + 1):
        kept = 0
        for r in maze.generate_maze_records(50 * budget.test_per_size, DATA_SEED + side, (side, side)):
            key = json.dumps(r["map_desc"])
            if short(r) and key not in seen:
                seen.add(key)
                test.append(r)
                kept += 1
                if kept == budget.test_per_size:
                    break
    for r in train + test:
        r["text_input"] = STUDY_QUESTION.format(rows=len(r["map_desc"]), cols=len(r["map_desc"][0]))
        maze.write_record_images(r, data_dir, cell_px=budget.cell_px, coordinates=budget.board_coordinates)
    single = [maze.single_latent_record(r, f"images/{r['id']}/path.png") for r in train]
    for r in single:
        maze.write_path_image(r, data_dir, cell_px=budget.cell_px, coordinates=budget.board_coordinates)
    for key, recs in (("interleaved", train), ("text", [maze.text_only_record(r) for r in train]),
                      ("single", single), ("test", test)):   # the test file last: its presence means done
        write_jsonl(paths[key] + ".tmp", recs)
        os.replace(paths[key] + ".tmp", paths[key])
    log(f"data: {len(train)} training mazes, {len(test)} test mazes in {data_dir}")
    return paths


def chance_levels(train_path: str, test_path: str, draws: int = 200) -> dict:
    """Accuracy of two trivial answerers, walked on the test maps with the simulator."""
    from ilvr_jax.data import maze

    train = [json.loads(line) for line in open(train_path, encoding="utf-8") if line.strip()]
    test = [json.loads(line) for line in open(test_path, encoding="utf-8") if line.strip()]
    rng = np.random.default_rng(0)
    letters = np.array(list(maze.MOVES))
    per_grid: dict[str, list[float]] = {}
    rand = []
    for r in test:
        n = len(maze.parse_answer(r["original_final_answer"]))
        hits = np.mean([maze.simulate(r["map_desc"], letters[rng.integers(0, 4, n)]).success for _ in range(draws)])
        rand.append(hits)
        per_grid.setdefault(f"{len(r['map_desc'])}x{len(r['map_desc'])}", []).append(hits)
    answers = sorted({r["original_final_answer"] for r in train})
    best = max(answers, key=lambda a: (sum(maze.score_answer(t["map_desc"], a) for t in train), a))
    const = [maze.score_answer(r["map_desc"], best) for r in test]
    const_grid: dict[str, list[float]] = {}
    for r, c in zip(test, const):
        const_grid.setdefault(f"{len(r['map_desc'])}x{len(r['map_desc'])}", []).append(c)
    return {"random_moves": {"accuracy": float(np.mean(rand)), "by_grid": {k: float(np.mean(v)) for k, v in
                                                                             sorted(per_grid.items())}},
            "constant_answer": {"answer": best, "accuracy": float(np.mean(const)),
                                "by_grid": {k: float(np.mean(v)) for k, v in sorted(const_grid.items())}}}


# ----------------------------------------------------------------------------- one run
def register_shapes() -> None:
    from ilvr_jax import tiny

    for k, v in STUDY_SHAPES.items():
        tiny.TINY_SHAPES.setdefault(k, v)


def stage_config(stage: int, method: Method, budget: Budget, seed: int, train_path: str, steps: int):
    from ilvr_jax.demo import load_config

    c = load_config(f"stage{stage}.py", "demo")
    c.seed = 1000 + seed
    c.model.tiny_shape = budget.shape
    c.data.adapter = "canonical"
    c.data.train_path = train_path
    c.data.generate_records = 0
    c.data.maze_sizes = tuple(budget.sizes)
    c.data.max_length = budget.max_length
    c.data.buckets = "" if budget.buckets == "fit" else budget.buckets   # "fit": train_run sets the length
    c.data.drop_policy = "error"   # every method trains on every record: a record too long stops the run
    # Stage 2 unrolls one chunk per possible segment: the one-segment and text-only variants
    # compile (and run) it for one.
    segments = budget.max_segments if method.data == "interleaved" else 1
    c.data.max_segments = segments
    c.data.max_helper_patches = 256 * segments
    c.data.batch_size = budget.batch
    c.ilvr.latent_size = method.latent_size
    c.ilvr.num_candidates = 64     # >= the merged tokens of a 6x6 board (49): every token is a candidate
    c.ilvr.sim_weight = method.sim_weight if stage == 1 else 1.0
    c.ilvr.ce_weight = method.ce_weight if stage == 1 else 1.0
    c.ilvr.target_selection = method.selection
    c.optim.lr = budget.lr
    c.optim.warmup_steps = max(1, min(20, steps // 10))
    c.optim.schedule = "cosine"
    c.optim.frozen = () if budget.train_vision else ("visual/.*",)
    c.train.num_steps = steps
    c.train.log_every = max(1, steps // 6)
    c.train.checkpoint_every = max(1, steps // 4)   # a killed study loses at most a quarter of a stage
    c.train.keep_checkpoints = 1
    c.train.export_at_end = False
    # Stage 2's later text chunks in windows of the data's longest one (a move's text between
    # two segments; for Mirage's one segment the whole reasoning after it).
    c.train.stage2_chunk_len = "auto"
    # The recurrence's latent steps and layer loops inlined: a third off stage 2's step on the CPU.
    c.train.stage2_unroll = True
    return c


def fit_length(c, budget: Budget) -> int:
    """The one bucket of ``budget.buckets="fit"``: the stage's longest training record (image
    pads and latent segments included), rounded up to a multiple of 64, at most
    ``budget.max_length``. Every batch still mixes records of every length, as with one
    bucket of ``max_length``; padding is masked, so the computation changes only by
    rounding, and the cost falls (text-only SFT's records are at most 402 tokens, ILVR's at
    K = 8 482)."""
    import tempfile

    c = c.copy_and_resolve_references()
    c.stage, c.data.buckets, c.data.max_length, c.data.drop_policy = 1, "", budget.max_length, "error"
    with tempfile.TemporaryDirectory(prefix="study_lengths_") as tmp:
        longest = max(it.size.seq_len for it in stage_pipeline(c, tmp)[3].items)
    return min(budget.max_length, -(-longest // 64) * 64)


def stage_pipeline(c, workdir: str):
    """A stage-1 config's (model config, initial params, tokenizer dir, training pipeline),
    set up in ``workdir`` as ``loop.train_and_evaluate`` sets them up."""
    from ilvr_jax.data.pipeline import DataPipeline
    from ilvr_jax.train import loop, run_model

    model_cfg, params, tok_dir = run_model.prepare_model(c, workdir)
    image_cfg = run_model.image_config(c, tok_dir)
    train_path, root = loop.prepare_data(c, workdir)
    pipe = DataPipeline.from_jsonl(train_path, tok_dir, loop.data_config(c, int(c.data.batch_size), image_cfg),
                                   root=root, image_cfg=image_cfg)
    return model_cfg, params, tok_dir, pipe


def train_stage(c, workdir: str) -> dict:
    """Trains (or resumes) one stage; a stage whose last checkpoint exists is not touched
    again (its last logged metrics are returned), so a finished stage survives later
    changes of the study's settings that only concern the stages still to run."""
    from ilvr_jax.train import loop
    from ilvr_jax.train.metrics import METRICS_FILE

    if os.path.isdir(os.path.join(workdir, "checkpoints", str(int(c.train.num_steps)))):
        with open(os.path.join(workdir, METRICS_FILE), encoding="utf-8") as f:
            last = [json.loads(line) for line in f if line.strip()][-1]
        return {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and k != "step"}
    return loop.train_and_evaluate(c, workdir, print_config=False)


def train_run(method: Method, budget: Budget, seed: int, paths: dict, run_dir: str) -> dict:
    train_path = paths[method.data]
    s1 = budget.steps // 2 if method.two_stage else budget.steps
    t0 = time.time()
    c1 = stage_config(1, method, budget, seed, train_path, s1)
    length = fit_length(c1, budget) if budget.buckets == "fit" else None
    if length:
        c1.data.max_length, c1.data.buckets = length, str(length)
    out = {"stage1": train_stage(c1, os.path.join(run_dir, "stage1")), "stage1_steps": s1,
           "stage1_s": time.time() - t0, "length": int(c1.data.max_length)}
    final = os.path.join(run_dir, "stage1")
    if method.two_stage:
        t1 = time.time()
        c2 = stage_config(2, method, budget, seed, train_path, budget.steps - s1)
        if length:
            c2.data.max_length, c2.data.buckets = length, str(length)
        c2.train.init_from = final
        final = os.path.join(run_dir, "stage2")
        out.update(stage2=train_stage(c2, final), stage2_steps=budget.steps - s1, stage2_s=time.time() - t1)
    out["final_dir"] = final
    return out


def eval_run(method: Method, budget: Budget, seed: int, test_path: str, final_dir: str, out_dir: str) -> dict:
    from transformers import AutoTokenizer

    from ilvr_jax.convert import load_training_params
    from ilvr_jax.data import processor as proc
    from ilvr_jax.data.records import read_jsonl
    from ilvr_jax.evaluate.run import evaluate
    from ilvr_jax.train import run_model

    tok_dir = os.path.join(final_dir, run_model.TOKENIZER_DIR)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    image_cfg = proc.ImageProcessorConfig.from_hf(tok_dir)
    cfg, params, _ = load_training_params(final_dir)
    records = list(read_jsonl(test_path))
    # The longest test answer: 8 moves of text (about 26 tokens each) and latent segments, plus the answer.
    max_new = budget.max_new_tokens or budget.max_segments * (30 + method.latent_size + 2) + 64
    return evaluate(params, cfg, tokenizer, image_cfg, records, "maze", batch_size=budget.eval_batch,
                    max_new_tokens=max_new, ablations=(budget.ablation,) if method.uses_latents else (),
                    seed=seed, latent_size=method.latent_size, progress=False, out_dir=out_dir)


def result_path(results: str, name: str, seed: int) -> str:
    """``results``: the directory of the per-run result files (``--results-dir``)."""
    return os.path.join(results, f"{name}__seed{seed}.json")


def claim_run(run_dir: str) -> bool:
    """Takes ``run_dir/owner.pid`` for this process unless a live process holds it, so that
    several invocations of the same command can share one study directory."""
    os.makedirs(run_dir, exist_ok=True)
    lock = os.path.join(run_dir, "owner.pid")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(open(lock, encoding="utf-8").read().strip() or 0)
                os.kill(pid, 0)
                return pid == os.getpid()
            except (ValueError, ProcessLookupError):   # a stale lock of a killed invocation
                os.remove(lock)
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def run_one(study: str, results: str, method: Method, budget: Budget, seed: int, paths: dict) -> dict:
    """Trains and evaluates (method, seed) unless its result file exists; returns the result."""
    out = result_path(results, method.name, seed)
    done = load_results(results, method.name, dataclasses.replace(budget, seeds=(seed,)))
    if done:
        return done[0]
    run_dir = os.path.join(study, "runs", method.name, f"seed{seed}")
    if not claim_run(run_dir):
        raise RunBusy(f"{run_dir} is being run by another invocation")
    try:
        t0 = time.time()
        tr = train_run(method, budget, seed, paths, run_dir)
        t1 = time.time()
        summary = eval_run(method, budget, seed, paths["test"], tr["final_dir"], os.path.join(run_dir, "eval"))
        t2 = time.time()
    except BaseException:
        os.remove(os.path.join(run_dir, "owner.pid"))   # another invocation may take the run over
        raise
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "eval", "samples.jsonl"), encoding="utf-8")
               if line.strip()]
    correct = {m: {r["id"]: bool(r["correct"]) for r in samples if r["mode"] == m} for m in summary["modes"]}
    spans = [r["num_latent_spans"] for r in samples if r["mode"] == "normal"]
    test = [json.loads(line) for line in open(paths["test"], encoding="utf-8") if line.strip()]
    res = {"method": method.name, "seed": seed, "config": dataclasses.asdict(method),
           "budget": dataclasses.asdict(budget),
           "train": {k: v for k, v in tr.items() if k != "final_dir"}, "train_s": t1 - t0, "eval_s": t2 - t1,
           "wall_s": t2 - t0, "load_avg": os.getloadavg(),
           "modes": {m: {k: e[k] for k in ("accuracy", "correct", "count", "by_grid", "vs_normal") if k in e}
                     for m, e in summary["modes"].items()},
           "correct": correct, "mean_latent_spans": float(np.mean(spans)) if spans else 0.0,
           "answers": answer_diagnostics(study, method.name, seed, test),
           "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    os.replace(out + ".tmp", out)
    os.remove(os.path.join(run_dir, "owner.pid"))
    return res


class RunBusy(RuntimeError):
    """Another invocation sharing the study directory is training this run."""


# ----------------------------------------------------------------------------- aggregation
def bootstrap_accuracy(mat: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of a [seeds, records] 0/1 matrix; 95 % percentile interval over
    resampled seeds and records."""
    s, r = mat.shape
    rng = np.random.default_rng(seed)
    si = rng.integers(0, s, (n, s))
    ri = rng.integers(0, r, (n, r))
    means = mat[si[:, :, None], ri[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(mat.mean()), float(lo), float(hi)


def bootstrap_difference(a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean(a) - mean(b), low, high) of two [seeds, records] 0/1 matrices over the same
    records: the records are resampled together (paired), each method's seeds on their own."""
    rng = np.random.default_rng(seed)
    ri = rng.integers(0, a.shape[1], (n, a.shape[1]))
    sa = rng.integers(0, a.shape[0], (n, a.shape[0]))
    sb = rng.integers(0, b.shape[0], (n, b.shape[0]))
    diffs = a[sa[:, :, None], ri[:, None, :]].mean(axis=(1, 2)) - b[sb[:, :, None], ri[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(a.mean() - b.mean()), float(lo), float(hi)


_FROM = re.compile(r"from \((\d+), (\d+)\)")


def answer_diagnostics(study: str, name: str, seed: int, test: list[dict]) -> dict[str, float] | None:
    """What the normal-mode answers get right short of solving the maze: the start cell named
    in the first move's text (does the model read the board?), a parsable \\boxed{} answer,
    and how the walks end."""
    from ilvr_jax.data import maze

    maps = {r["id"]: r["map_desc"] for r in test}
    path = os.path.join(study, "runs", name, f"seed{seed}", "eval", "samples.jsonl")
    if not os.path.isfile(path):   # a result file without its run directory
        return None
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    rows = [r for r in rows if r["mode"] == "normal" and r["id"] in maps]
    start = parsed = 0
    ends = {maze.REACHED_GOAL: 0, maze.FELL_IN_HOLE: 0, maze.LEFT_GRID: 0, maze.STOPPED_SHORT: 0}
    for r in rows:
        m = _FROM.search(r["output"])
        start += bool(m) and (int(m.group(1)), int(m.group(2))) == maze.find_cell(maps[r["id"]], maze.START)
        moves = maze.parse_answer(r["output"])
        if moves is not None:
            parsed += 1
            ends[maze.simulate(maps[r["id"]], moves).outcome] += 1
    n = max(1, len(rows))
    return {"start_cell_read": start / n, "parsable": parsed / n, **{k: v / n for k, v in ends.items()}}


def same_budget(a: dict, b: dict) -> bool:
    """Two budgets (as dicts) train the same runs: equal but for the seeds (keys added to
    ``Budget`` later take their defaults)."""
    base = json.loads(json.dumps(dataclasses.asdict(Budget())))
    a, b = {**base, **json.loads(json.dumps(a))}, {**base, **json.loads(json.dumps(b))}
    return {k: v for k, v in a.items() if k != "seeds"} == {k: v for k, v in b.items() if k != "seeds"}


def load_results(results: str, name: str, budget: Budget) -> list[dict]:
    """The finished runs of ``name`` at ``budget``'s seeds; a result file of another budget
    is left out with a log line (a results directory may outlive a change of the budget)."""
    runs = []
    for seed in budget.seeds:
        p = result_path(results, name, seed)
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                r = json.load(f)
            if "budget" in r and not same_budget(r["budget"], dataclasses.asdict(budget)):
                log(f"{p}: trained with another budget; left out")
                continue
            runs.append(r)
    return runs


def aggregate(study: str, results: str, methods: dict[str, Method], budget: Budget, chance: dict,
              test_path: str) -> dict:
    test = [json.loads(line) for line in open(test_path, encoding="utf-8") if line.strip()]
    ids = [r["id"] for r in test]
    grids = {r["id"]: f"{len(r['map_desc'])}x{len(r['map_desc'])}" for r in test}
    grid_names = sorted(set(grids.values()), key=lambda g: int(g.split("x")[0]))
    mats: dict[tuple[str, str], np.ndarray] = {}
    out = {"chance": chance, "methods": {}, "grid_names": grid_names, "_mats": mats}
    for name, m in methods.items():
        runs = load_results(results, name, budget)
        entry: dict = {"label": m.label, "seeds_done": [r["seed"] for r in runs], "seeds_planned": list(budget.seeds),
                 "config": dataclasses.asdict(m)}
        if runs:
            modes = ["normal"] + ([budget.ablation] if m.uses_latents else [])
            for mode in modes:
                mat = np.array([[r["correct"][mode][i] for i in ids] for r in runs], np.float64)
                acc, lo, hi = bootstrap_accuracy(mat)
                by = {}
                for g in grid_names:
                    cols = [j for j, i in enumerate(ids) if grids[i] == g]
                    by[g] = dict(zip(("accuracy", "low", "high"), bootstrap_accuracy(mat[:, cols])))
                entry[mode] = {"accuracy": acc, "low": lo, "high": hi, "by_grid": by,
                               "per_seed": [float(x) for x in mat.mean(1)]}
                mats[(name, mode)] = mat
            if name != "text_sft" and ("text_sft", "normal") in mats:
                entry["vs_text_sft"] = dict(zip(("diff", "low", "high"), bootstrap_difference(
                    mats[(name, "normal")], mats[("text_sft", "normal")])))
            if m.uses_latents:
                entry["ablation_change"] = dict(zip(("diff", "low", "high"), bootstrap_difference(
                    mats[(name, budget.ablation)], mats[(name, "normal")])))
            entry["wall_s"] = float(np.mean([r["wall_s"] for r in runs]))
            entry["train_s"] = float(np.mean([r["train_s"] for r in runs]))
            entry["eval_s"] = float(np.mean([r["eval_s"] for r in runs]))
            entry["mean_latent_spans"] = float(np.mean([r["mean_latent_spans"] for r in runs]))
            reads = [d for d in (r.get("answers") or answer_diagnostics(study, name, r["seed"], test)
                                 for r in runs) if d]
            if reads:
                entry["answers"] = {k: float(np.mean([d[k] for d in reads])) for k in reads[0]}
            last = [r["train"].get("stage2", r["train"]["stage1"]) for r in runs]
            entry["final_ce"] = float(np.mean([x.get("ce", np.nan) for x in last]))
            s1 = [r["train"]["stage1"] for r in runs]
            if m.uses_latents:
                entry["stage1_sim"] = float(np.mean([x.get("sim", np.nan) for x in s1]))
        out["methods"][name] = entry
    return out


def chance_best(chance: dict) -> float:
    return max(chance["random_moves"]["accuracy"], chance["constant_answer"]["accuracy"])


def check_chance(agg: dict, margin: float = 0.10) -> str | None:
    """A warning line when text-only SFT does not clearly beat chance, else None."""
    t = agg["methods"].get("text_sft", {}).get("normal")
    c = chance_best(agg["chance"])
    if t is None:
        return "WARNING: text-only SFT has no finished run; chance check not made"
    if t["accuracy"] < c + margin or t["low"] <= c:
        return (f"WARNING: text-only SFT ({100 * t['accuracy']:.1f}%, CI low {100 * t['low']:.1f}%) does not beat "
                f"chance ({100 * c:.1f}%) by {100 * margin:.0f} points with its interval above it")
    return None


def pct(e: dict | None) -> str:
    if not e:
        return "n/a"
    return f"{100 * e['accuracy']:.1f} [{100 * e['low']:.1f}, {100 * e['high']:.1f}]"


def diff(e: dict | None) -> str:
    if not e:
        return "-"
    return f"{100 * e['diff']:+.1f} [{100 * e['low']:+.1f}, {100 * e['high']:+.1f}]"


def markdown_table(agg: dict, budget: Budget) -> str:
    g = agg["grid_names"]
    ch = agg["chance"]
    head = ["method", "seeds", "accuracy % [95% CI]", "vs text-only, pts [95% CI]"] + [f"{x} %" for x in g] + \
        [f"latents {budget.ablation} %", "change, pts [95% CI]", "latent spans / answer", "start cell read %",
         "parsable %", "final CE", "wall s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in agg["methods"].items():
        done = len(e["seeds_done"])
        seeds = f"{done}/{len(e['seeds_planned'])}" + ("" if done == len(e["seeds_planned"]) else " (unfinished)")
        if not done:
            lines.append("| " + " | ".join([e["label"], seeds, "not run"] + ["-"] * (len(head) - 3)) + " |")
            continue
        n = e["normal"]
        abl = pct(e.get(budget.ablation)) if budget.ablation in e else "-"
        row = [e["label"], seeds, pct(n), diff(e.get("vs_text_sft"))] + \
            [f"{100 * n['by_grid'][x]['accuracy']:.1f}" for x in g] + \
            [abl, diff(e.get("ablation_change")), f"{e['mean_latent_spans']:.2f}",
             *([f"{100 * e['answers'][k]:.1f}" for k in ("start_cell_read", "parsable")] if "answers" in e
               else ["n/a", "n/a"]),
             f"{e['final_ce']:.3f}", f"{e['wall_s']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    for key, label in (("random_moves", "chance: random moves of the true length"),
                       ("constant_answer", f"chance: constant answer {ch['constant_answer']['answer']}")):
        c = ch[key]
        row = [label, "-", f"{100 * c['accuracy']:.1f}", "-"] + [f"{100 * c['by_grid'][x]:.1f}" for x in g] + \
            ["-"] * 7
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def compare(agg: dict, a: str, b: str) -> str:
    """One line: method a against method b (paired over the test records, seeds resampled)."""
    ea, eb = agg["methods"].get(a, {}), agg["methods"].get(b, {})
    if "normal" not in ea or "normal" not in eb:
        return f"{a} vs {b}: not both run yet"
    ma, mb = agg["_mats"][(a, "normal")], agg["_mats"][(b, "normal")]
    d, lo, hi = bootstrap_difference(ma, mb)
    verdict = "better" if lo > 0 else "worse" if hi < 0 else "no clear difference"
    return (f"{ea['label']} vs {eb['label']}: {100 * d:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}] "
            f"({verdict}; {ma.shape[0]} vs {mb.shape[0]} seeds)")


def claim_lines(agg: dict, budget: Budget) -> list[str]:
    """The paper's claims, each checked on this study's numbers."""
    lines = [compare(agg, "ilvr", "text_sft"), compare(agg, "ilvr", "mirage"), compare(agg, "ilvr", "ilvr_random"),
             compare(agg, "mirage", "text_sft")]
    ms = agg["methods"]
    for sim in GRID_SIMS:
        cells = [(k, ms.get(grid_cell(grid_name(k, sim)), {}).get("normal")) for k in GRID_KS]
        done = [(k, e) for k, e in cells if e]
        if done:
            best = max(done, key=lambda ke: ke[1]["accuracy"])
            lines.append(f"K ablation at sim weight {sim:g}: " + ", ".join(
                f"K={k} {100 * e['accuracy']:.1f}%" for k, e in done) + f"; best K={best[0]}")
    for name in ("ilvr", "mirage", "ilvr_random"):
        e = ms.get(name, {})
        if "ablation_change" in e:
            c = e["ablation_change"]
            lines.append(f"{e['label']} with its latents {budget.ablation}: {100 * c['diff']:+.1f} pts "
                         f"[{100 * c['low']:+.1f}, {100 * c['high']:+.1f}] (does the answer depend on the latents?)")
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def benchmarks_section(agg: dict, budget: Budget, study: str, results: str, table: str) -> str:
    import jax

    runs = [(r["wall_s"], r["load_avg"][0]) for name in agg["methods"] for r in load_results(results, name, budget)]
    planned = sum(len(e["seeds_planned"]) for e in agg["methods"].values())
    total = sum(w for w, _ in runs)
    loads = [x for _, x in runs]
    ch = agg["chance"]
    out = [
        "## The paper's claims at laptop scale (ILVR vs text-only SFT vs Mirage-style vs random patches, K ablation)",
        "",
        f"Machine: {machine()}; jax {jax.__version__}, CPU backend; "
        f"{datetime.date.today().isoformat()}. Command: `python benchmarks/paper_claims.py --study-dir {study}`"
        " (resumable: rerunning it completes unfinished runs).",
        "",
        f"Budget per run: {budget.steps} optimizer steps x batch {budget.batch} (two-stage methods: "
        f"{budget.steps // 2} + {budget.steps - budget.steps // 2}), lr {budget.lr:g} cosine, model "
        f"`{budget.shape}` from scratch; {budget.train_records} training mazes, {budget.test_per_size} test mazes "
        f"per grid size {budget.sizes[0]}x{budget.sizes[0]}..{budget.sizes[1]}x{budget.sizes[1]}; seeds "
        f"{list(budget.seeds)}.",
        f"Runs finished: {len(runs)} of {planned}; their wall time {total / 60:.0f} min in all "
        f"({total / max(1, len(runs)):.0f} s per run), 1-minute load average at their ends "
        + (f"{min(loads):.1f}..{max(loads):.1f}" if loads else "n/a") + " on the shared host.",
        "",
        "Accuracy = the generated moves walked on the map reach the goal; intervals are 95 % bootstrap over "
        "seeds and test mazes; \"vs text-only\" and the ablation change are paired over the test mazes.",
        "",
        table,
        "",
        f"Chance: random moves of the true path's length {100 * ch['random_moves']['accuracy']:.1f} %, the best "
        f"constant answer ({ch['constant_answer']['answer']}) {100 * ch['constant_answer']['accuracy']:.1f} %.",
        "",
        "Claims checked:",
        "",
    ]
    out += [f"- {line}" for line in claim_lines(agg, budget)]
    if agg.get("chance_warning"):
        out += ["", agg["chance_warning"]]
    out += ["", f"Plot: `{os.path.join(study, 'paper_claims.png')}` (left: accuracy vs K at both sim weights, "
            "like the paper's Figure 4; right: the methods side by side)."]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- plot (PIL only)
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot(agg: dict, path: str) -> str:
    """Two panels: accuracy against K at both loss weights (Figure 4's layout), and the
    methods side by side; 95 % intervals as bars, chance and text-only SFT as lines."""
    from PIL import Image, ImageDraw

    w, h, pad = 1200, 520, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    panels = [(pad, 40, w // 2 - 20, h - 110), (w // 2 + pad, 40, w - 20, h - 110)]
    ms = agg["methods"]

    def axes(box, title):
        x0, y0, x1, y1 = box
        d.rectangle(box, outline="black")
        d.text((x0, y0 - 22), title, fill="black")
        for t in range(0, 101, 20):
            y = y1 - (y1 - y0) * t / 100
            d.line([(x0 - 4, y), (x0, y)], fill="black")
            d.line([(x0, y), (x1, y)], fill=(230, 230, 230))
            d.text((x0 - 34, y - 6), f"{t}%", fill="black")

    def ypos(box, v):
        return box[3] - (box[3] - box[1]) * max(0.0, min(1.0, v))

    def hline(box, v, color, label):
        y = ypos(box, v)
        for x in range(box[0], box[2], 12):
            d.line([(x, y), (min(x + 6, box[2]), y)], fill=color, width=2)
        d.text((box[2] - 150, y - 14), label, fill=color)

    chance = chance_best(agg["chance"])
    text = ms.get("text_sft", {}).get("normal")
    # Panel 1: K ablation.
    box = panels[0]
    axes(box, "ILVR accuracy vs K (latents per helper image)")
    xs = {k: box[0] + (box[2] - box[0]) * (i + 0.5) / len(GRID_KS) for i, k in enumerate(GRID_KS)}
    for k, x in xs.items():
        d.text((x - 10, box[3] + 6), f"K={k}", fill="black")
    for si, sim in enumerate(GRID_SIMS):
        color = _PALETTE[si]
        pts = []
        for k in GRID_KS:
            e = ms.get(grid_cell(grid_name(k, sim)), {}).get("normal")
            if e:
                x = xs[k] + (si - 0.5) * 8
                pts.append((x, ypos(box, e["accuracy"])))
                d.line([(x, ypos(box, e["low"])), (x, ypos(box, e["high"]))], fill=color, width=2)
        if len(pts) > 1:
            d.line(pts, fill=color, width=3)
        for p in pts:
            d.ellipse([p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4], fill=color)
        d.text((box[0] + 10, box[1] + 8 + 16 * si), f"sim weight {sim:g}", fill=color)
    hline(box, chance, (120, 120, 120), "chance")
    if text:
        hline(box, text["accuracy"], (214, 39, 40), "text-only SFT")
    # Panel 2: methods side by side.
    box = panels[1]
    axes(box, "methods (K=8 where latents; 95% CI over seeds and mazes)")
    names = [n for n in ("text_sft", "mirage", "ilvr", "ilvr_random") if n in ms]
    bw = (box[2] - box[0]) / max(1, len(names))
    for i, n in enumerate(names):
        e = ms[n].get("normal")
        x0 = box[0] + bw * i + bw * 0.2
        x1 = box[0] + bw * (i + 1) - bw * 0.2
        d.text((x0, box[3] + 6), n, fill="black")
        if not e:
            d.text((x0, box[3] - 20), "not run", fill="black")
            continue
        d.rectangle([x0, ypos(box, e["accuracy"]), x1, box[3]], fill=_PALETTE[i % len(_PALETTE)])
        xm = (x0 + x1) / 2
        d.line([(xm, ypos(box, e["low"])), (xm, ypos(box, e["high"]))], fill="black", width=2)
        d.text((x0, ypos(box, e["accuracy"]) - 14), f"{100 * e['accuracy']:.1f}%", fill="black")
        z = ms[n].get("zeros")
        if z:
            d.text((x0, box[3] + 22), f"zeroed {100 * z['accuracy']:.1f}%", fill="black")
    hline(box, chance, (120, 120, 120), "chance")
    img.save(path, format="PNG")
    return path


def write_report(study: str, results: str, methods: dict[str, Method], budget: Budget, paths: dict, chance: dict,
                 wall_s: float | None = None) -> dict:
    agg = aggregate(study, results, methods, budget, chance, paths["test"])
    agg["budget"] = dataclasses.asdict(budget)
    if wall_s is not None:
        agg["this_invocation_wall_s"] = wall_s
    table = markdown_table(agg, budget)
    with open(os.path.join(study, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    plot(agg, os.path.join(study, "paper_claims.png"))
    agg["chance_warning"] = check_chance(agg)
    agg["claims"] = claim_lines(agg, budget)
    with open(os.path.join(study, "BENCHMARKS_section.md"), "w", encoding="utf-8") as f:
        f.write(benchmarks_section(agg, budget, study, results, table))
    mats = agg.pop("_mats")
    with open(os.path.join(study, "results.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(agg, f, indent=1)
    os.replace(os.path.join(study, "results.json.tmp"), os.path.join(study, "results.json"))
    agg["_mats"] = mats
    return agg


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study-dir", default="/tmp/paper_claims_study", help="where everything goes (resumable)")
    ap.add_argument("--results-dir", default="", help="the per-run result files (default STUDY_DIR/results); "
                    "e.g. a directory kept with the code, so that a study spread over several machines adds up")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: text_sft, ilvr and mirage, 1 seed, 2 steps, tiny sets")
    ap.add_argument("--only", default="", help="comma-separated methods to run (others are only reported)")
    ap.add_argument("--seeds", default="", help="comma-separated seeds (default 0,1,2; --quick: 0)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per method (both stages together)")
    ap.add_argument("--shape", default=None, help="model shape (study, or one of ilvr_jax.tiny.TINY_SHAPES)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--train-records", type=int, default=None)
    ap.add_argument("--test-per-size", type=int, default=None)
    ap.add_argument("--cell-px", type=int, default=None, help="board cell size in pixels (28: one vision token)")
    ap.add_argument("--train-vision", action="store_true", default=None, help="train the vision tower too")
    ap.add_argument("--plain-boards", action="store_true", help="boards without their cells' coordinates drawn in")
    ap.add_argument("--report", action="store_true", help="only aggregate the finished runs (table, plot, JSON)")
    ap.add_argument("--list", action="store_true", help="list the methods and exit")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    methods = all_methods()
    if args.list:
        for m in methods.values():
            print(f"{m.name:<18} {m.label}")
        return 0
    budget = QUICK if args.quick else Budget()
    over = {k: v for k, v in (("steps", args.steps), ("shape", args.shape), ("lr", args.lr),
                              ("train_records", args.train_records), ("test_per_size", args.test_per_size),
                              ("cell_px", args.cell_px), ("train_vision", args.train_vision),
                              ("board_coordinates", False if args.plain_boards else None))
            if v is not None}
    if args.seeds:
        over["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    budget = dataclasses.replace(budget, **over)
    if args.quick:
        methods = {k: methods[k] for k in QUICK_METHODS}
    only = [s for s in args.only.split(",") if s]
    unknown = [s for s in only if s not in methods]
    if unknown:
        print(f"error: --only: unknown method(s) {', '.join(unknown)}; --list shows them", file=sys.stderr)
        return 2
    study = os.path.abspath(args.study_dir)
    os.makedirs(study, exist_ok=True)
    results = os.path.abspath(args.results_dir or os.path.join(study, "results"))
    saved = os.path.join(study, "budget.json")
    if os.path.isfile(saved):
        with open(saved, encoding="utf-8") as f:
            old = json.load(f)
        if not same_budget(old, dataclasses.asdict(budget)):
            print(f"error: {saved}: this study was started with another budget ({old}); use the same options "
                  "or another --study-dir", file=sys.stderr)
            return 2
    else:
        with open(saved, "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(budget), f, indent=1)

    import jax

    if jax.device_count() != 1:
        print(f"error: the study's runs use one device (mesh (1, 1, 1)), this process sees {jax.device_count()} "
              f"{jax.default_backend()} devices; limit it to one (e.g. no --xla_force_host_platform_device_count in "
              "XLA_FLAGS, CUDA_VISIBLE_DEVICES=0)", file=sys.stderr)
        return 2
    # Runs of the same shapes (every seed) reuse each other's compiled programs.
    jax.config.update("jax_compilation_cache_dir", os.path.join(study, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    register_shapes()
    t0 = time.time()
    paths = build_data(os.path.join(study, "data"), budget)
    chance_file = os.path.join(study, "chance.json")
    if os.path.isfile(chance_file):
        with open(chance_file, encoding="utf-8") as f:
            chance = json.load(f)
    else:
        chance = chance_levels(paths["interleaved"], paths["test"])
        with open(chance_file, "w", encoding="utf-8") as f:
            json.dump(chance, f, indent=1)
    log(f"chance: random moves {100 * chance['random_moves']['accuracy']:.1f}%, constant answer "
        f"{chance['constant_answer']['answer']} {100 * chance['constant_answer']['accuracy']:.1f}%")
    from ilvr_jax.train import preemption

    failed = []
    if not args.report:
        # The methods compared head to head first (every seed), then the K / lambda grid: what
        # has finished when a study is cut short answers the main question first.
        chosen = [m for m in methods.values() if not only or m.name in only]
        todo = [(m, s) for s in budget.seeds for m in chosen if m.name in HEADLINE] + \
            [(m, s) for s in budget.seeds for m in chosen if m.name not in HEADLINE]
        for i, (m, seed) in enumerate(todo):
            if load_results(results, m.name, dataclasses.replace(budget, seeds=(seed,))):
                log(f"run {i + 1}/{len(todo)} {m.name} seed {seed}: done before, skipped")
                continue
            ts = time.time()
            try:
                res = run_one(study, results, m, budget, seed, paths)
            except RunBusy as e:
                log(f"run {i + 1}/{len(todo)} {m.name} seed {seed}: {e}; skipped")
                continue
            except preemption.Stopped as e:   # SIGTERM / Ctrl-C: the whole study stops (resumable)
                log(f"run {i + 1}/{len(todo)} {m.name} seed {seed}: {e} (the study stops here)")
                return e.exit_code
            except Exception as e:   # one failed run must not end the study; it is rerun next time
                failed.append(f"{m.name} seed {seed}: {type(e).__name__}: {e}")
                log(f"run {i + 1}/{len(todo)} {m.name} seed {seed}: FAILED after {time.time() - ts:.0f} s: "
                    f"{type(e).__name__}: {e}")
                traceback.print_exc()
                continue
            acc = res["modes"]["normal"]["accuracy"]
            abl = res["modes"].get(budget.ablation)
            log(f"run {i + 1}/{len(todo)} {m.name} seed {seed}: accuracy {100 * acc:.1f}%"
                + (f", latents {budget.ablation} {100 * abl['accuracy']:.1f}%" if abl else "")
                + f"; train {res['train_s']:.0f} s, eval {res['eval_s']:.0f} s, wall {res['wall_s']:.0f} s, "
                  f"load {os.getloadavg()[0]:.1f}")
            write_report(study, results, methods, budget, paths, chance, time.time() - t0)
    agg = write_report(study, results, methods, budget, paths, chance, time.time() - t0)
    print(markdown_table(agg, budget))
    log(f"table {os.path.join(study, 'table.md')}, plot {os.path.join(study, 'paper_claims.png')}, "
        f"results {os.path.join(study, 'results.json')}; {time.time() - t0:.0f} s")
    if agg["chance_warning"]:
        log(agg["chance_warning"])
    for f in failed:
        log(f"failed: {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
