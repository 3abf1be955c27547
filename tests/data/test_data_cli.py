"""``python -m ilvr_jax.data`` subcommands, run as a user would (subprocess) on small data."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from ilvr_jax.data import maze
from ilvr_jax.data import records as R
from ilvr_jax.data.pipeline import DataConfig, DataPipeline
from ilvr_jax.data.processor import ImageProcessorConfig
from ilvr_jax.data.segments import SequenceFormat, build_sample


def _cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "ilvr_jax.data", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def maze_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("maze")
    rc, stdout, stderr = _cli("maze", "--out", out, "--n", 12, "--seed", 3)
    assert rc == 0, stderr
    assert "wrote 12 maze records" in stdout and "records/s" in stdout
    return out


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_maze_subcommand_matches_library(maze_dir, tmp_path):
    lib = maze.generate_maze_dataset(str(tmp_path / "lib"), 12, seed=3)
    with open(lib, "rb") as a, open(maze_dir / "data.jsonl", "rb") as b:
        assert a.read() == b.read()


def _summary(values):
    """min, mean, p50/p90/p99 as the nearest value at or above the rank, max (by sorting)."""
    v = sorted(values)
    rank = lambda q: v[math.ceil(q / 100 * (len(v) - 1))]  # noqa: E731
    return {"min": v[0], "mean": round(sum(v) / len(v), 3), "p50": rank(50), "p90": rank(90), "p99": rank(99),
            "max": v[-1]}


def test_validate_and_stats(maze_dir, tmp_path):
    rc, stdout, _ = _cli("validate", "--data", maze_dir / "data.jsonl")
    assert rc == 0 and "12 valid records, 0 bad" in stdout

    records = _read(maze_dir / "data.jsonl")
    segments = [sum(s["type"] == "latent" for s in r["sequence_plan"]) for r in records]
    rc, stdout, stderr = _cli("stats", "--data", maze_dir / "data.jsonl", "--json")
    assert rc == 0, stderr
    stats = json.loads(stdout)
    assert stats["records"] == 12 and stats["question_images"] == 12
    assert stats["helper_images"] == sum(segments)
    assert stats["segments_per_record"] == _summary(segments)
    assert stats["tasks"] == {"maze": 12} and stats["dropped"] == {}
    assert "sequence_length_per_record" not in stats and "max_length" not in stats["suggested"]

    from ilvr_jax.tiny import build_tokenizer

    tok_dir = tmp_path / "tok"
    tok = build_tokenizer(str(tok_dir))
    expected = [
        sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in
            [r["text_input"], r["original_final_answer"]] + [s["content"] for s in r["sequence_plan"]
                                                              if s["type"] == "text"])
        for r in records
    ]
    rc, stdout, stderr = _cli("stats", "--data", maze_dir / "data.jsonl", "--tokenizer", tok_dir, "--json",
                              "--latent-size", 4, "--max-pixels", 64 * 28 * 28)
    assert rc == 0, stderr
    stats = json.loads(stdout)
    assert stats["text_tokens"] == sum(expected)
    assert stats["text_tokens_per_record"]["max"] == max(expected)
    # Full lengths and patch counts are those of the samples training builds.
    img = ImageProcessorConfig(max_pixels=64 * 28 * 28)
    fmt = SequenceFormat(latent_size=4)
    built = [build_sample(r, maze_dir, tok, img, fmt) for r in records]
    assert stats["sequence_length_per_record"] == _summary([len(b.input_ids) for b in built])
    assert stats["question_patches_per_record"] == _summary([len(b.pixel_values) for b in built])
    assert stats["helper_patches_per_record"] == _summary([len(b.helper_pixel_values) for b in built])
    # The suggested shapes hold every record: a pipeline with them drops nothing.
    sug = stats["suggested"]
    assert sug["max_length"] % 64 == 0 and sug["max_length"] >= max(len(b.input_ids) for b in built)
    cfg = DataConfig(batch_size=2, max_length=sug["max_length"], buckets=sug["buckets"],
                     bucket_patches=sug["bucket_patches"], max_question_patches=sug["max_question_patches"],
                     max_helper_patches=sug["max_helper_patches"], max_question_images=sug["max_question_images"],
                     max_segments=sug["max_segments"], latent_size=4, max_pixels=64 * 28 * 28, drop_policy="error")
    pipe = DataPipeline.from_jsonl(maze_dir / "data.jsonl", tok, cfg, process_index=0, process_count=1)
    assert pipe.num_records == 12
    auto = DataPipeline.from_jsonl(maze_dir / "data.jsonl", tok, DataConfig(
        **{**cfg.to_dict(), "buckets": "auto", "bucket_patches": "auto"}), process_index=0, process_count=1)
    assert auto.buckets == pipe.buckets
    rc, stdout, _ = _cli("stats", "--data", maze_dir / "data.jsonl", "--tokenizer", tok_dir)
    assert rc == 0 and "records: 12" in stdout and "segments per record: min" in stdout
    assert "sequence length per record: min" in stdout and "p99" in stdout and "suggested data config" in stdout


def _bad_canonical(tmp_path):
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "q.png")
    good = {"id": "g", "text_input": "Q?", "image_input": ["q.png"],
            "sequence_plan": [{"type": "text", "content": "t"}, {"type": "latent", "helper_image": "q.png"}],
            "original_final_answer": "A"}
    missing = dict(good, id="m", image_input=["gone.png"])
    no_plan = {k: v for k, v in good.items() if k != "sequence_plan"}
    path = tmp_path / "data.jsonl"
    with open(path, "w") as f:
        for rec in (good, missing, no_plan, good):
            f.write(json.dumps(rec) + "\n")
    return path


def test_validate_reports_reasons_and_exit_status(tmp_path):
    path = _bad_canonical(tmp_path)
    rc, stdout, _ = _cli("validate", "--data", path)
    assert rc == 1
    assert "2 valid records, 2 bad" in stdout
    assert "missing_image: 1" in stdout and "missing_key: 1" in stdout
    assert f"{path}:line 2 (id=m)" in stdout and "gone.png" in stdout
    assert f"{path}:line 3" in stdout
    rc, stdout, _ = _cli("validate", "--data", path, "--skip-bad")
    assert rc == 0 and "2 bad" in stdout
    rc, _, stderr = _cli("validate", "--data", tmp_path / "absent.jsonl")
    assert rc == 2 and "absent.jsonl" in stderr


def test_validate_an_empty_file_fails(tmp_path):
    for name, text in [("empty.jsonl", ""), ("blank.jsonl", "\n  \n")]:
        (tmp_path / name).write_text(text)
        rc, stdout, stderr = _cli("validate", "--data", tmp_path / name, "--skip-bad")
        assert rc == 1 and "0 valid records, 0 bad" in stdout and "holds no records" in stderr


BAD_LINE = re.compile(r"^(?P<file>.+):line (?P<line>\d+)(?: \(id=(?P<id>[^)]*)\))?: .* \[(?P<reason>\w+)\]$")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from ilvr_jax.tiny import build_tokenizer

    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(str(d))
    return d


def _mixed(tmp_path):
    """Good records and every kind of record validate used to pass but training dropped."""
    import numpy as np

    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    Image.new("RGB", (402, 2)).save(tmp_path / "wide.png")
    for ext in ("png", "jpg"):
        Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"full.{ext}")
        data = (tmp_path / f"full.{ext}").read_bytes()
        (tmp_path / f"cut.{ext}").write_bytes(data[: len(data) // 2])

    def rec(i, q="ok.png", h="ok.png", text="Q?"):
        return R.make_record(text, [q], [R.text_step("look"), R.latent_step(h)], "A", id=f"r{i}")

    recs = [rec(0), rec(1, text="Q?<|im_end|>"), rec(2, q="wide.png"), rec(3, h="cut.png"), rec(4, q="cut.jpg"),
            rec(5), rec(6, text="x <|latent_start|>"), rec(7, text="long " * 300)]
    path = tmp_path / "mixed.jsonl"
    R.write_jsonl(path, recs)
    want = {2: "special_token_in_text", 3: "bad_aspect", 4: "unreadable_image", 5: "unreadable_image",
            7: "special_token_in_text", 8: "too_long"}
    return path, want


def test_validate_lists_every_bad_record_as_training_drops_it(tmp_path, tok_dir):
    path, want = _mixed(tmp_path)
    rc, stdout, stderr = _cli("validate", "--data", path, "--tokenizer", tok_dir, "--max-length", 512,
                              "--max-pixels", 16 * 28 * 28)
    assert rc == 1, stderr
    found = {}
    for line in stdout.splitlines():
        m = BAD_LINE.match(line)
        if m:
            assert m["file"] == str(path) and m["id"] == f"r{int(m['line']) - 1}"
            found[int(m["line"])] = m["reason"]
    assert found == want
    assert f"2 valid records, {len(want)} bad" in stdout
    assert "  special_token_in_text: 2" in stdout and "  unreadable_image: 2" in stdout
    assert "  bad_aspect: 1" in stdout and "  too_long: 1" in stdout

    # The training pipeline drops exactly these, for the same reasons (verify_images at indexing;
    # without it the truncated images are counted when their batches are built).
    counts = {}
    for r in want.values():
        counts[r] = counts.get(r, 0) + 1
    base = dict(batch_size=1, max_length=512, max_pixels=16 * 28 * 28, drop_policy="skip", shuffle=False)
    for verify in (True, False):
        pipe = DataPipeline.from_jsonl(path, str(tok_dir), DataConfig(**base, verify_images=verify),
                                       process_index=0, process_count=1)
        n_real = sum(int(b["sample_mask"].sum()) for b in pipe.iterator())
        assert pipe.drops.as_dict() == dict(sorted(counts.items())) and n_real == 2
    # Without a tokenizer the token-free checks still agree; the length is not checked.
    rc, stdout, _ = _cli("validate", "--data", path, "--max-pixels", 16 * 28 * 28)
    assert rc == 1 and "3 valid records, 5 bad" in stdout and "no --tokenizer" in stdout


def test_convert(maze_dir, tmp_path):
    # maze -> a JSONL beside the images: relative paths; elsewhere: absolute paths that resolve.
    rc, stdout, stderr = _cli("convert", "--adapter", "maze", "--source", maze_dir, "--out",
                              maze_dir / "converted.jsonl")
    assert rc == 0, stderr
    assert "wrote 12 records" in stdout
    assert _read(maze_dir / "converted.jsonl") == _read(maze_dir / "data.jsonl")
    rc, _, stderr = _cli("convert", "--adapter", "vsp", "--source", maze_dir / "data.jsonl", "--out",
                         tmp_path / "x" / "vsp.jsonl", "--limit", 5)
    assert rc == 0, stderr
    recs = _read(tmp_path / "x" / "vsp.jsonl")
    assert len(recs) == 5 and all(os.path.isfile(p) for r in recs for p in r["image_input"])
    rc, stdout, _ = _cli("validate", "--data", tmp_path / "x" / "vsp.jsonl")
    assert rc == 0 and "5 valid records" in stdout

    # A bad record stops the conversion with its location; --skip-bad counts it instead.
    bad = _bad_canonical(tmp_path)
    rc, _, stderr = _cli("convert", "--adapter", "comt", "--source", bad, "--out", tmp_path / "c.jsonl")
    assert rc == 1 and f"{bad}:line 2 (id=m)" in stderr
    assert not os.path.exists(tmp_path / "c.jsonl") and not os.path.exists(tmp_path / "c.jsonl.tmp")
    rc, stdout, stderr = _cli("convert", "--adapter", "comt", "--source", bad, "--out", tmp_path / "c.jsonl",
                              "--skip-bad")
    assert rc == 0, stderr
    assert "wrote 2 records" in stdout and "missing_image=1" in stdout and "missing_key=1" in stdout
    assert [r["task"] for r in _read(tmp_path / "c.jsonl")] == ["comt", "comt"]

    rc, _, stderr = _cli("convert", "--adapter", "nope", "--source", bad, "--out", tmp_path / "n.jsonl")
    assert rc == 2 and "unknown adapter 'nope'" in stderr and "zebra" in stderr
    rc, _, stderr = _cli("convert", "--adapter", "comt", "--source", bad, "--out", tmp_path / "n.jsonl",
                         "--domains", "x")
    assert rc == 2 and "--domains does not apply to adapter 'comt'" in stderr


def test_convert_zebra(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import io

    buf = io.BytesIO()
    Image.new("RGB", (6, 6), (1, 2, 3)).save(buf, format="PNG")
    image = {"bytes": buf.getvalue(), "path": None}
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"Question": f"Q{i} <image_start>[problem_image_1]<image_end>",
             "Text Reasoning Trace": "THOUGHT 0: a <image_start>[reasoning_image_1]<image_end> THOUGHT 1: b",
             "Final Answer": str(i), "problem_image_1": image, "reasoning_image_1": image} for i in range(5)]
    schema = pa.schema([("Question", pa.string()), ("Text Reasoning Trace", pa.string()),
                        ("Final Answer", pa.string()), ("problem_image_1", struct), ("reasoning_image_1", struct)])
    shard = tmp_path / "src" / "Geometry & Graphs" / "train-00000-of-00001.parquet"
    os.makedirs(shard.parent)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), shard, row_group_size=2)
    out = tmp_path / "out" / "zebra.jsonl"
    rc, stdout, stderr = _cli("convert", "--adapter", "zebra", "--source", tmp_path / "src", "--out", out,
                              "--max-records", 3, "--seed", 1)
    assert rc == 0, stderr
    recs = _read(out)
    assert len(recs) == 3 and "wrote 3 records" in stdout
    assert all(not os.path.isabs(p) and p.startswith("images/Geometry_Graphs/") for r in recs
               for p in r["image_input"])
    rc, stdout, _ = _cli("validate", "--data", out)
    assert rc == 0 and "3 valid records, 0 bad" in stdout


def test_maze_convert_validate_and_stats_on_a_bucket(tok_dir, tmp_path, monkeypatch, capsys):
    """Every subcommand with its paths on gs:// (in memory, through etils.epath; run in this
    process, where the bucket lives) reads and writes there what it does locally: the
    generated mazes and a conversion byte for byte, the same validation and statistics; a
    failed conversion leaves no object behind."""
    import importlib.util

    from ilvr_jax import storage
    from ilvr_jax.data.__main__ import main

    spec = importlib.util.spec_from_file_location(
        "_fb", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fake_bucket.py"))
    fake_bucket = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake_bucket)
    monkeypatch.chdir(tmp_path)   # nothing may land in a local folder named after the URI
    local = tmp_path / "local"
    stats_args = ["--latent-size", "4", "--max-pixels", str(64 * 28 * 28), "--json"]
    assert main(["maze", "--out", str(local), "--n", "6", "--seed", "3"]) == 0
    generated = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert main(["convert", "--adapter", "maze", "--source", str(local), "--out", str(local / "converted.jsonl")]) == 0
    assert main(["convert", "--adapter", "vsp", "--source", str(local / "data.jsonl"), "--out",
                 str(tmp_path / "other" / "vsp.jsonl"), "--limit", "3"]) == 0
    capsys.readouterr()
    assert main(["stats", "--data", str(local / "data.jsonl"), "--tokenizer", str(tok_dir), *stats_args]) == 0
    want_stats = json.loads(capsys.readouterr().out)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = _bad_canonical(bad_dir)
    with fake_bucket.load().install():
        storage.copy_tree(str(tok_dir), "gs://models/tok")
        assert main(["maze", "--out", "gs://d/maze", "--n", "6", "--seed", "3"]) == 0
        for rel in generated:
            assert storage.read_bytes(f"gs://d/maze/{rel}") == (local / rel).read_bytes(), rel
        assert main(["convert", "--adapter", "maze", "--source", "gs://d/maze", "--out",
                     "gs://d/maze/converted.jsonl"]) == 0
        assert storage.read_bytes("gs://d/maze/converted.jsonl") == (local / "converted.jsonl").read_bytes()
        # Images elsewhere keep their absolute paths (here the bucket's).
        assert main(["convert", "--adapter", "vsp", "--source", "gs://d/maze/data.jsonl", "--out",
                     "gs://d/other/vsp.jsonl", "--limit", "3"]) == 0
        assert storage.read_text("gs://d/other/vsp.jsonl") == (tmp_path / "other" / "vsp.jsonl").read_text().replace(
            str(local), "gs://d/maze")
        assert not storage.exists("gs://d/maze/converted.jsonl.tmp")
        capsys.readouterr()
        assert main(["convert", "--adapter", "comt", "--source", str(bad), "--out", "gs://d/bad/c.jsonl"]) == 1
        assert f"{bad}:line 2 (id=m)" in capsys.readouterr().err
        assert not storage.exists("gs://d/bad/c.jsonl")
        assert main(["validate", "--data", "gs://d/maze/converted.jsonl"]) == 0
        assert "gs://d/maze/converted.jsonl: 6 valid records, 0 bad" in capsys.readouterr().out
        assert main(["stats", "--data", "gs://d/maze/data.jsonl", "--tokenizer", "gs://models/tok", *stats_args]) == 0
        assert json.loads(capsys.readouterr().out) == want_stats
        with pytest.raises(SystemExit) as e:   # as a missing local file
            main(["validate", "--data", "gs://d/absent.jsonl"])
        assert e.value.code == 2
        assert "'gs://d/absent.jsonl' does not exist" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["bad", "local", "other"]
