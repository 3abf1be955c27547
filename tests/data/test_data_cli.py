"""``python -m ilvr_jax.data`` subcommands, run as a user would (subprocess) on small data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from ilvr_jax.data import maze


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
    assert stats["segments_per_record"] == {"min": min(segments), "mean": round(sum(segments) / 12, 3),
                                            "max": max(segments)}
    assert stats["tasks"] == {"maze": 12} and stats["dropped"] == {}

    from ilvr_jax.tiny import build_tokenizer

    tok_dir = tmp_path / "tok"
    tok = build_tokenizer(str(tok_dir))
    expected = [
        sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in
            [r["text_input"], r["original_final_answer"]] + [s["content"] for s in r["sequence_plan"]
                                                              if s["type"] == "text"])
        for r in records
    ]
    rc, stdout, stderr = _cli("stats", "--data", maze_dir / "data.jsonl", "--tokenizer", tok_dir, "--json")
    assert rc == 0, stderr
    stats = json.loads(stdout)
    assert stats["text_tokens"] == sum(expected)
    assert stats["text_tokens_per_record"]["max"] == max(expected)
    rc, stdout, _ = _cli("stats", "--data", maze_dir / "data.jsonl")
    assert rc == 0 and "records: 12" in stdout and "segments per record: min" in stdout


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
