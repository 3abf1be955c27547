"""Smoke test of the paper-claims study (benchmarks/paper_claims.py --quick): every method of
the quick grid trains, is evaluated on held-out mazes, and lands in the table, the plot and
the results JSON; a rerun skips the finished runs."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "paper_claims.py")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import paper_claims  # noqa: E402


def _run(*args, timeout=900):
    # One CPU device: the study's runs use the demo preset's (1, 1, 1) mesh (the suite's
    # conftest asks for 8 fake devices).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(env, JAX_PLATFORMS="cpu"))


@pytest.mark.slow
def test_quick_study_runs_every_method_and_writes_table_and_plot(tmp_path):
    study = str(tmp_path / "study")
    p = _run("--quick", "--study-dir", study)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    agg = json.load(open(os.path.join(study, "results.json")))
    methods = agg["methods"]
    assert sorted(methods) == sorted(paper_claims.QUICK_METHODS)
    n_test = len(open(os.path.join(study, "data", "test.jsonl")).read().splitlines())
    for name, e in methods.items():
        assert e["seeds_done"] == [0], name
        assert 0.0 <= e["normal"]["low"] <= e["normal"]["accuracy"] <= e["normal"]["high"] <= 1.0, name
        assert set(e["normal"]["by_grid"]) == set(agg["grid_names"])
        res = json.load(open(paper_claims.result_path(os.path.join(study, "results"), name, 0)))
        assert len(res["correct"]["normal"]) == n_test, name
        # One bucket per data variant: its longest record rounded up to 64 (the quick records are short).
        assert res["train"]["length"] % 64 == 0 and 64 <= res["train"]["length"] < 512, name
        # The latent methods are also evaluated with their latents zeroed; text-only SFT is not.
        assert ("zeros" in e) == paper_claims.all_methods()[name].uses_latents, name
    for key in ("random_moves", "constant_answer"):
        assert 0.0 <= agg["chance"][key]["accuracy"] <= 1.0
    table = open(os.path.join(study, "table.md")).read()
    for name in methods:
        assert paper_claims.all_methods()[name].label in table
    png = Image.open(os.path.join(study, "paper_claims.png"))
    assert png.size == (1200, 520) and np.asarray(png.convert("L")).std() > 5   # something is drawn
    # A rerun trains nothing: every run is skipped and the table is rewritten from the results.
    again = _run("--quick", "--study-dir", study, "--only", "ilvr")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done before, skipped" in again.stdout and "stage 1" not in again.stdout


def test_a_changed_budget_is_refused_and_unknown_methods_are_named(tmp_path):
    study = str(tmp_path / "study")
    os.makedirs(study)
    with open(os.path.join(study, "budget.json"), "w") as f:
        json.dump({"steps": 1}, f)
    p = _run("--quick", "--study-dir", study)
    assert p.returncode == 2 and "another budget" in p.stderr
    p = _run("--quick", "--study-dir", str(tmp_path / "other"), "--only", "nope")
    assert p.returncode == 2 and "unknown method(s) nope" in p.stderr


def test_more_than_one_device_is_refused_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, "--quick", "--study-dir", str(tmp_path / "s")], cwd=REPO,
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert p.returncode == 2 and "use one device" in p.stderr and "sees 2 cpu devices" in p.stderr
    assert not os.path.isdir(tmp_path / "s" / "runs")


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_records():
    rng = np.random.default_rng(0)
    small = (rng.random((3, 40)) < 0.3).astype(float)
    big = (rng.random((3, 4000)) < 0.3).astype(float)
    m, lo, hi = paper_claims.bootstrap_accuracy(small, n=500)
    mb, lob, hib = paper_claims.bootstrap_accuracy(big, n=200)
    assert lo <= m <= hi and lob <= mb <= hib
    assert hib - lob < (hi - lo) / 3
    assert abs(mb - 0.3) < 0.03
    assert paper_claims.bootstrap_accuracy(np.ones((2, 5))) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("text_acc, low, warns", [(0.5, 0.45, False), (0.15, 0.12, True), (0.5, 0.05, True)])
def test_chance_warning(text_acc, low, warns):
    agg = {"chance": {"random_moves": {"accuracy": 0.08}, "constant_answer": {"accuracy": 0.06}},
           "methods": {"text_sft": {"normal": {"accuracy": text_acc, "low": low, "high": text_acc + 0.05}}}}
    assert (paper_claims.check_chance(agg) is not None) == warns


def test_each_method_trains_what_it_claims():
    """The stage configs of every method: same steps, batch and length limit; the baselines'
    data variant, targets and loss weights."""
    b = paper_claims.Budget()
    methods = paper_claims.all_methods()
    assert len(methods) == 11 and paper_claims.grid_name(8, 1.0) not in methods   # that cell is ``ilvr``
    total = set()
    for name, m in methods.items():
        stages = [paper_claims.stage_config(1, m, b, 0, f"/d/train_{m.data}.jsonl", b.steps // (1 + m.two_stage))]
        if m.two_stage:
            stages.append(paper_claims.stage_config(2, m, b, 0, f"/d/train_{m.data}.jsonl", b.steps // 2))
        total.add(sum(int(c.train.num_steps) for c in stages))
        for c in stages:
            assert (c.data.batch_size, c.data.buckets, c.data.max_length) == (b.batch, "", 640), name
            assert c.data.drop_policy == "error"   # no method trains on fewer records
            assert c.ilvr.latent_size == m.latent_size and c.model.tiny_shape == b.shape
        for c in stages:   # one segment at most without interleaving (stage 2 unrolls one chunk per segment)
            assert c.data.max_segments == (8 if m.data == "interleaved" else 1), name
        c1 = stages[0]
        assert c1.ilvr.target_selection == {"mirage": "mean_pool", "ilvr_random": "random"}.get(name, "teacher")
        assert c1.ilvr.ce_weight == (0.1 if name == "mirage" else 1.0)
        assert c1.data.train_path.endswith({"text_sft": "text", "mirage": "single"}.get(name, "interleaved") + ".jsonl")
        if name.startswith("ilvr_K"):
            k, sim = name[len("ilvr_K"):].split("_sim")
            assert (c1.ilvr.latent_size, c1.ilvr.sim_weight) == (int(k), float(sim))
    assert total == {b.steps}   # the same compute budget for every method


def test_report_from_finished_runs(tmp_path):
    """Table, claims, BENCHMARKS section and plot from result files (synthetic correctness),
    with some runs unfinished."""
    study = str(tmp_path)
    os.makedirs(os.path.join(study, "data"))
    test = [{"id": f"m{side}-{i}", "map_desc": [[0] * side for _ in range(side)]} for side in (3, 4, 5, 6)
            for i in range(10)]
    with open(os.path.join(study, "data", "test.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in test)
    methods = paper_claims.all_methods()
    b = paper_claims.Budget()
    rates = {"text_sft": 0.5, "ilvr": 0.9}
    for name, m in methods.items():
        if name == paper_claims.grid_name(2, 0.1):
            continue   # unfinished
        for seed in b.seeds:
            p = rates.get(name, 0.3)
            correct = {"normal": {r["id"]: (i % 10) < 10 * p for i, r in enumerate(test)}}
            if m.uses_latents:
                correct["zeros"] = {r["id"]: False for r in test}
            res = {"seed": seed, "correct": correct, "wall_s": 60.0, "train_s": 50.0, "eval_s": 10.0,
                   "mean_latent_spans": 2.0, "load_avg": [3.0, 3.0, 3.0],
                   "train": {"stage1": {"ce": 1.0, "sim": 0.2}}}
            os.makedirs(os.path.dirname(paper_claims.result_path(study, name, seed)), exist_ok=True)
            with open(paper_claims.result_path(study, name, seed), "w") as f:
                json.dump(res, f)
    chance = {k: {"accuracy": 0.1, "answer": "\\boxed{D}", "by_grid": {f"{s}x{s}": 0.1 for s in (3, 4, 5, 6)}}
              for k in ("random_moves", "constant_answer")}
    agg = paper_claims.write_report(study, study, methods, b, {"test": os.path.join(study, "data", "test.jsonl")}, chance)
    ilvr = agg["methods"]["ilvr"]
    assert ilvr["normal"]["accuracy"] == pytest.approx(0.9) and ilvr["vs_text_sft"]["diff"] == pytest.approx(0.4)
    assert ilvr["vs_text_sft"]["low"] > 0 and ilvr["ablation_change"]["diff"] == pytest.approx(-0.9)
    assert agg["chance_warning"] is None     # text-only 50 % against chance 10 %
    assert any(line.startswith("ILVR (K=8, sim 1) vs text-only SFT: +40.0 pts") and "(better;" in line
               for line in agg["claims"])
    table = open(os.path.join(study, "table.md")).read()
    assert "| ILVR K=2 sim 0.1 | 0/3 (unfinished) | not run |" in table
    section = open(os.path.join(study, "BENCHMARKS_section.md")).read()
    assert "Runs finished: 30 of 33" in section and table.strip() in section
    assert Image.open(os.path.join(study, "paper_claims.png")).size == (1200, 520)


def test_a_finished_stage_is_not_trained_again(tmp_path):
    m = paper_claims.all_methods()["mirage"]
    c = paper_claims.stage_config(1, m, paper_claims.Budget(), 0, str(tmp_path / "missing.jsonl"), 5)
    os.makedirs(tmp_path / "stage1" / "checkpoints" / "5")
    with open(tmp_path / "stage1" / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 4, "ce": 2.0}) + "\n")
        f.write(json.dumps({"step": 5, "ce": 1.5, "sim": 0.25, "batch_fingerprint": "ab", "finite": True}) + "\n")
    # The training data does not exist: training would fail; the finished stage is read instead.
    assert paper_claims.train_stage(c, str(tmp_path / "stage1")) == {"ce": 1.5, "sim": 0.25}


def test_runs_are_claimed_by_one_invocation_at_a_time(tmp_path):
    run = str(tmp_path / "run")
    assert paper_claims.claim_run(run) and paper_claims.claim_run(run)   # this process, again
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with open(os.path.join(run, "owner.pid"), "w") as f:
            f.write(str(other.pid))
        assert not paper_claims.claim_run(run)          # a live process holds it
    finally:
        other.kill()
        other.wait()
    assert paper_claims.claim_run(run)                  # its lock is stale now
    assert open(os.path.join(run, "owner.pid")).read() == str(os.getpid())


def test_results_of_another_budget_are_left_out(tmp_path):
    """A results directory kept across budget changes: only runs of this budget count."""
    b = paper_claims.Budget(seeds=(0, 1))
    for seed, steps in ((0, b.steps), (1, b.steps + 1)):
        with open(paper_claims.result_path(str(tmp_path), "ilvr", seed), "w") as f:
            json.dump({"seed": seed, "budget": dataclasses.asdict(dataclasses.replace(b, steps=steps))}, f)
    assert [r["seed"] for r in paper_claims.load_results(str(tmp_path), "ilvr", b)] == [0]
    # Other seeds and keys unknown to an older result file do not make it another budget.
    old = {k: v for k, v in dataclasses.asdict(b).items() if k != "cell_px"}
    assert paper_claims.same_budget(dict(old, seeds=[5]), dataclasses.asdict(b))
    assert not paper_claims.same_budget(dict(old, lr=1.0), dataclasses.asdict(b))
