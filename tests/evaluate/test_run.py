"""The evaluation program: samples and summary files, resuming, determinism, the summary's
numbers against the rows, and one-line errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ilvr_jax.evaluate import diagnostics
from ilvr_jax.evaluate.__main__ import main
from ilvr_jax.evaluate.run import SAMPLES_FILE, SUMMARY_FILE, evaluate, read_samples


def _cli(s, out, *extra):
    return main(["--model", s.hf_dir, "--data", s.data_path, "--adapter", "canonical", "--scorer", "maze",
                 "--out", str(out), "--batch-size", "4", "--max-new-tokens", "16", "--no-progress", *extra])


def test_resume_skips_done_ids_and_keeps_written_lines(eval_setup, tmp_path, capsys):
    s = eval_setup
    out = tmp_path / "eval"
    assert _cli(s, out, "--limit", "3") == 0
    first = (out / SAMPLES_FILE).read_text().splitlines()
    assert [json.loads(x)["id"] for x in first] == [r.record["id"] for r in s.records[:3]]
    assert _cli(s, out) == 0
    lines = (out / SAMPLES_FILE).read_text().splitlines()
    ids = [json.loads(x)["id"] for x in lines]
    assert sorted(ids) == sorted(r.record["id"] for r in s.records)  # each id once
    assert lines[:3] == first
    # A fresh, uninterrupted run writes the same rows (batches do not depend on what was done).
    fresh = tmp_path / "fresh"
    assert _cli(s, fresh) == 0
    assert sorted((fresh / SAMPLES_FILE).read_text().splitlines()) == sorted(lines)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["num_records"] == 6 and summary["modes"]["normal"]["count"] == 6
    assert summary["config"]["adapter"] == "canonical" and summary["config"]["max_new_tokens"] == 16
    # 3 rows found; both batches of 4 had a row to do.
    assert (summary["resumed_rows"], summary["generated_batches"]) == (3, 2)
    printed = capsys.readouterr().out
    assert "normal" in printed and "samples.jsonl" in printed
    # Everything done: nothing generated, the same summary.
    assert _cli(s, out) == 0
    again = json.loads((out / SUMMARY_FILE).read_text())
    assert (again["resumed_rows"], again["generated_batches"]) == (6, 0)
    assert again["modes"] == summary["modes"] and (out / SAMPLES_FILE).read_text().splitlines() == lines


def test_rows_hold_the_generation_and_its_score(eval_setup, tmp_path):
    from ilvr_jax.data import processor as proc
    from ilvr_jax.evaluate import scorers

    s = eval_setup
    evaluate(s.params, s.cfg, s.tokenizer, s.image_cfg, s.records[:2], "maze", batch_size=4, max_new_tokens=16,
             out_dir=str(tmp_path), progress=False)
    rows = read_samples(str(tmp_path / SAMPLES_FILE))
    for loc, row in zip(s.records, rows):
        rec = loc.record
        assert row["mode"] == "normal" and row["task"] == "maze" and row["grid"] == f"{len(rec['map_desc'])}x" \
            f"{len(rec['map_desc'][0])}"
        assert row["prompt"] == proc.build_prompt_text(s.tokenizer, rec["text_input"], 1)
        assert (row["answer"], row["correct"]) == scorers.score_vsp(row["output"], rec)
        assert row["num_latents"] == s.latent_size * sum(1 for a, b in row["latent_spans"] if b >= 0) + sum(
            row["num_tokens"] - a - 1 for a, b in row["latent_spans"] if b < 0)
        assert row["num_latent_spans"] == len(row["latent_spans"])


def test_summary_numbers_come_from_the_rows(eval_setup, tmp_path):
    s = eval_setup

    def by_length(output, record):  # a scorer with a mix of right and wrong answers
        return None, len(output) % 3 != 0

    summary = evaluate(s.params, s.cfg, s.tokenizer, s.image_cfg, s.records, by_length, batch_size=4,
                       max_new_tokens=16, ablations=("zeros",), seed=5, out_dir=str(tmp_path), progress=False,
                       n_resamples=200)
    rows = read_samples(str(tmp_path / SAMPLES_FILE))
    assert len(rows) == 12
    for mode in ("normal", "zeros"):
        mine = [r for r in rows if r["mode"] == mode]
        assert summary["modes"][mode]["accuracy"] == pytest.approx(np.mean([r["correct"] for r in mine]))
        grids = {r["grid"] for r in mine}
        assert set(summary["modes"][mode]["by_grid"]) == grids
        for g in grids:
            sub = [r["correct"] for r in mine if r["grid"] == g]
            assert summary["modes"][mode]["by_grid"][g] == {"accuracy": np.mean(sub), "correct": sum(sub),
                                                           "count": len(sub)}
    normal = {r["id"]: r["correct"] for r in rows if r["mode"] == "normal"}
    zeros = {r["id"]: r["correct"] for r in rows if r["mode"] == "zeros"}
    order = [r.record["id"] for r in s.records]
    want = diagnostics.paired_bootstrap([normal[i] for i in order], [zeros[i] for i in order], n_resamples=200, seed=5)
    assert summary["modes"]["zeros"]["vs_normal"] == want
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["modes"]["zeros"]["vs_normal"] == want


def test_cut_off_last_line_is_dropped_on_resume(eval_setup, tmp_path):
    s = eval_setup
    kw = dict(batch_size=4, max_new_tokens=16, out_dir=str(tmp_path), progress=False)
    evaluate(s.params, s.cfg, s.tokenizer, s.image_cfg, s.records[:2], "maze", **kw)
    path = tmp_path / SAMPLES_FILE
    whole = path.read_text()
    path.write_text(whole[: len(whole) - 20])  # the second row cut mid-write
    evaluate(s.params, s.cfg, s.tokenizer, s.image_cfg, s.records[:2], "maze", **kw)
    assert path.read_text() == whole
    path.write_text(whole[:-1])  # cut just before the last newline: the row is kept, the newline restored
    evaluate(s.params, s.cfg, s.tokenizer, s.image_cfg, s.records[:3], "maze", **kw)
    lines = path.read_text().splitlines()
    assert lines[:2] == whole.splitlines() and len(lines) == 3 and json.loads(lines[2])["id"] == s.records[2].record["id"]
    path.write_text("{not json\n" + whole)
    with pytest.raises(ValueError, match=r"samples\.jsonl:line 1: not valid JSON"):
        evaluate(s.params, s.cfg, s.tokenizer, s.image_cfg, s.records[:3], "maze", **kw)


def test_bad_input_is_one_line(eval_setup, tmp_path, capsys):
    s = eval_setup
    dup = [dict(s.records[0].record), dict(s.records[1].record, id=s.records[0].record["id"])]
    with pytest.raises(ValueError, match=r"record 2 \(id=maze-0-000000\): id 'maze-0-000000' repeats"):
        evaluate(s.params, s.cfg, s.tokenizer, s.image_cfg, dup, "maze", path="dup.jsonl", progress=False)
    with pytest.raises(ValueError, match="shuffle ablation needs at least 2 records"):
        evaluate(s.params, s.cfg, s.tokenizer, s.image_cfg, s.records[:1], "maze", ablations="shuffle")
    bad = tmp_path / "bad.jsonl"
    rec = dict(s.records[0].record, image_input=["missing.png"])
    bad.write_text(json.dumps(rec) + "\n")
    assert main(["--model", s.hf_dir, "--data", str(bad), "--scorer", "maze", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl:line 1 (id=maze-0-000000)" in err and "missing.png" in err
    assert main(["--model", s.hf_dir, "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "pass --scorer" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "nowhere"), "--data", s.data_path, "--scorer", "maze",
                 "--out", str(tmp_path / "o")]) == 2
    assert "nowhere: does not exist" in capsys.readouterr().err
    assert main(["--model", s.hf_dir, "--teacher", "--data", s.data_path, "--scorer", "maze",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--teacher needs a training checkpoint" in capsys.readouterr().err
    for mesh, msg in (("1;8", "--mesh '1;8': expected three comma-separated integers"),
                      ("1,3,1", "needs 3 devices, but 8 are available")):
        assert _cli(s, tmp_path / "o", "--mesh", mesh) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, err


def test_rows_sharded_over_a_mesh_give_the_same_generations(eval_setup, tmp_path, monkeypatch):
    """Parameters laid out as training lays them out (fsdp-sharded) and the rows split over
    the same axis generate what one device does."""
    import jax
    from jax.sharding import PartitionSpec

    from ilvr_jax.evaluate import run as run_lib
    from ilvr_jax.model import qwen25vl
    from ilvr_jax.train.mesh import make_mesh, tree_shardings

    specs = []
    real = run_lib.generate_batch

    def recording(params, cfg, dcfg, batch, *a, **k):
        specs.append(getattr(batch.input_ids, "sharding", None))
        return real(params, cfg, dcfg, batch, *a, **k)

    monkeypatch.setattr(run_lib, "generate_batch", recording)

    s = eval_setup
    if len(jax.devices()) < 2:
        pytest.fail("the test process needs 2 devices (tests/conftest.py sets 8 host devices)")
    mesh = make_mesh((1, 2, 1), jax.devices()[:2])
    params = run_lib.params_on_mesh(s.params, s.cfg, mesh)
    want = tree_shardings(mesh, qwen25vl.param_axes(s.cfg), s.params)
    assert jax.tree.map(lambda x: x.sharding.spec, params) == jax.tree.map(lambda w: w.spec, want)
    assert any(sp.spec != PartitionSpec() for sp in jax.tree.leaves(want))   # some leaves really are split
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), params, s.params)
    kw = dict(batch_size=4, max_new_tokens=16, progress=False)
    with pytest.raises(ValueError, match=r"batch_size 3 must be divisible by the mesh's batch axes \(data x fsdp"):
        evaluate(params, s.cfg, s.tokenizer, s.image_cfg, s.records, "maze", mesh=mesh, **dict(kw, batch_size=3))
    evaluate(params, s.cfg, s.tokenizer, s.image_cfg, s.records, "maze", out_dir=str(tmp_path / "mesh"), mesh=mesh,
             **kw)
    assert specs and all(sp.spec == PartitionSpec("fsdp", None) for sp in specs)  # rows split over 2 devices
    evaluate(s.params, s.cfg, s.tokenizer, s.image_cfg, s.records, "maze", out_dir=str(tmp_path / "one"), **kw)
    sharded = read_samples(str(tmp_path / "mesh" / SAMPLES_FILE))
    single = read_samples(str(tmp_path / "one" / SAMPLES_FILE))
    assert [r["output"] for r in sharded] == [r["output"] for r in single]
    assert [r["latent_spans"] for r in sharded] == [r["latent_spans"] for r in single]


def test_one_compiled_shape_for_prompts_of_mixed_lengths_and_images(eval_setup, tmp_path):
    from ilvr_jax.generate.generation import decode_config
    from ilvr_jax.generate.sampler import compiled

    s = eval_setup
    recs = [dict(loc.record) for loc in s.records[:4]]
    recs[1]["text_input"] = recs[1]["text_input"] + " Think about every cell of the board." * 30
    recs[2]["image_input"] = []  # text only
    pre, loop = compiled(s.cfg, decode_config(s.tokenizer, s.cfg))
    before = pre._cache_size(), loop._cache_size()
    summary = evaluate(s.params, s.cfg, s.tokenizer, s.image_cfg, recs, "maze", batch_size=2, max_new_tokens=16,
                       root=s.records[0].root, progress=False)
    assert summary["modes"]["normal"]["count"] == 4
    assert (pre._cache_size() - before[0], loop._cache_size() - before[1]) in ((1, 1), (0, 0))


def test_adapter_records_and_its_default_scorer(eval_setup, tmp_path):
    import os

    s = eval_setup
    out = tmp_path / "maze"
    assert main(["--model", s.hf_dir, "--data", os.path.dirname(s.data_path), "--adapter", "maze", "--out", str(out),
                 "--batch-size", "4", "--max-new-tokens", "16", "--limit", "4", "--no-progress"]) == 0
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["config"]["scorer"] == "maze" and summary["modes"]["normal"]["count"] == 4
    canonical = tmp_path / "canonical"
    assert _cli(s, canonical, "--limit", "4") == 0
    # The same records, hence the same rows, whichever reader.
    assert read_samples(str(out / SAMPLES_FILE)) == read_samples(str(canonical / SAMPLES_FILE))


def _fake_bucket():
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "_fb", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fake_bucket.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load()


def test_a_bucket_out_dir_is_written_and_resumed_as_a_local_one(eval_setup, tmp_path, monkeypatch):
    """The command with its model, records and --out on gs:// (in memory, through
    etils.epath) writes the samples and summary a local run writes, and resumes the same way:
    after --limit 3, after a last row cut mid-write, after a last newline lost."""
    import os

    from ilvr_jax import storage

    monkeypatch.chdir(tmp_path)   # nothing may land in a local folder named after the URI
    s = eval_setup
    steps = (("--limit", "3"), (), "cut", (), "newline", ())

    def run_all(model, data, out, read, write):
        """Each step's (samples bytes, summary without its timing and paths)."""
        seen = []
        for step in steps:
            if step == "cut":
                write(read()[:-20])
                continue
            if step == "newline":
                write(read()[:-1])
                continue
            assert main(["--model", model, "--data", data, "--adapter", "canonical", "--scorer", "maze",
                         "--out", out, "--batch-size", "4", "--max-new-tokens", "16", "--no-progress", *step]) == 0
            summary = json.loads(storage.read_text(storage.join(out, SUMMARY_FILE)))
            summary.pop("seconds")
            for key in ("model", "data"):
                summary["config"].pop(key)
            seen.append((read(), summary))
        return seen

    local_out = str(tmp_path / "local")
    local_samples = os.path.join(local_out, SAMPLES_FILE)
    want = run_all(s.hf_dir, s.data_path, local_out, lambda: open(local_samples, "rb").read(),
                   lambda b: open(local_samples, "wb").write(b))
    # Resumed: 3 rows, then the 6th regenerated, then nothing generated.
    assert [(w[1]["resumed_rows"], w[1]["generated_batches"]) for w in want] == [(0, 1), (3, 2), (5, 1), (6, 0)]
    with _fake_bucket().install():
        storage.copy_tree(s.hf_dir, "gs://models/tiny")
        storage.copy_tree(os.path.dirname(s.data_path), "gs://data/maze")
        out = "gs://evals/run"
        got = run_all("gs://models/tiny", "gs://data/maze/" + os.path.basename(s.data_path), out,
                      lambda: storage.read_bytes(storage.join(out, SAMPLES_FILE)),
                      lambda b: storage.write_bytes(storage.join(out, SAMPLES_FILE), b))
        assert sorted(storage.listdir(out)) == [SAMPLES_FILE, SUMMARY_FILE]
    assert sorted(os.listdir(tmp_path)) == ["local"]
    for (want_bytes, want_summary), (got_bytes, got_summary) in zip(want, got):
        assert got_bytes == want_bytes
        assert got_summary == want_summary
