"""Adapters on fixtures written here in each data set's released layout."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ilvr_jax.data import maze
from ilvr_jax.data.adapters import ADAPTER_NAMES, get_adapter, relative_paths
from ilvr_jax.data.adapters import zebra
from ilvr_jax.data.records import DropPolicy, RecordError, helper_images


def _png_bytes(color, size=(8, 6), fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _write_png(path, color):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(_png_bytes(color))


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


# ------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------


def test_registry_names_and_unknown():
    assert set(ADAPTER_NAMES) == {"canonical", "comt", "vsp", "zebra", "maze"}
    for name in ADAPTER_NAMES:
        adapter = get_adapter(name)
        assert adapter.name == name and callable(adapter.iter_records)
    with pytest.raises(ValueError) as e:
        get_adapter("mirage")
    assert "'mirage'" in str(e.value)
    for name in ADAPTER_NAMES:
        assert name in str(e.value)


# ------------------------------------------------------------------------------------------
# CoMT / canonical
# ------------------------------------------------------------------------------------------


def _comt_record(i, helpers=2):
    plan = []
    for k in range(helpers):
        plan += [{"type": "text", "content": f"step {k}"},
                 {"type": "latent", "helper_image": f"images/h{i}_{k}.png"}]
    return {"id": f"c{i}", "text_input": f"Question {i}? A. x B. y", "image_input": [f"images/q{i}.png"],
            "sequence_plan": plan + [{"type": "text", "content": "So B."}], "original_final_answer": "B"}


@pytest.fixture
def comt_dir(tmp_path):
    root = tmp_path / "comt"
    for i in range(3):
        _write_png(str(root / f"images/q{i}.png"), (i * 40, 0, 0))
        for k in range(2):
            _write_png(str(root / f"images/h{i}_{k}.png"), (0, i * 40, k * 90))
    return root


def test_comt_resolves_paths_and_sets_task(comt_dir):
    recs = [_comt_record(0), _comt_record(1), dict(_comt_record(2), task="comt/selection")]
    recs[1]["helper_images"] = ["images/h1_0.png", "images/h1_1.png"]
    _write_jsonl(comt_dir / "test.jsonl", recs)
    out = list(get_adapter("comt").iter_records(str(comt_dir / "test.jsonl")))
    assert [r["id"] for r in out] == ["c0", "c1", "c2"]
    assert [r["task"] for r in out] == ["comt", "comt", "comt/selection"]
    for rec, src in zip(out, recs):
        assert rec["image_input"] == [str(comt_dir / p) for p in src["image_input"]]
        assert helper_images(rec) == [str(comt_dir / s["helper_image"]) for s in src["sequence_plan"]
                                      if s["type"] == "latent"]
        assert all(os.path.isabs(p) and os.path.isfile(p) for p in rec["image_input"] + helper_images(rec))
        assert [s.get("content") for s in rec["sequence_plan"]] == [s.get("content") for s in src["sequence_plan"]]
    assert out[1]["helper_images"] == helper_images(out[1])
    # canonical: the same reader without a default task; relative_paths undoes the resolution.
    canon = list(get_adapter("canonical").iter_records(str(comt_dir / "test.jsonl")))
    assert "task" not in canon[0] and canon[2]["task"] == "comt/selection"
    assert relative_paths(canon[0], str(comt_dir))["image_input"] == ["images/q0.png"]


def test_comt_image_root_option(comt_dir, tmp_path):
    data = tmp_path / "elsewhere" / "d.jsonl"
    os.makedirs(data.parent)
    _write_jsonl(data, [_comt_record(0)])
    with pytest.raises(RecordError, match="not found"):
        list(get_adapter("comt").iter_records(str(data)))
    (rec,) = get_adapter("comt").iter_records(str(data), image_root=str(comt_dir))
    assert rec["image_input"] == [str(comt_dir / "images/q0.png")]


def test_comt_bad_records_name_file_and_record(comt_dir):
    missing = _comt_record(1)
    missing["sequence_plan"][1]["helper_image"] = "images/nope.png"
    count = _comt_record(2)
    count["helper_images"] = ["images/h2_0.png"]  # 1 listed, 2 latent steps
    path = comt_dir / "bad.jsonl"
    _write_jsonl(path, [_comt_record(0), missing, count])
    with open(path, "a") as f:
        f.write("{not json\n")
    it = get_adapter("comt").iter_records(str(path))
    assert next(it)["id"] == "c0"
    with pytest.raises(RecordError) as e:
        next(it)
    assert e.value.reason == "missing_image"
    assert f"{path}:line 2" in str(e.value) and "id=c1" in str(e.value) and "images/nope.png" in str(e.value)

    policy = DropPolicy("skip")
    good = list(get_adapter("comt").iter_records(str(path), policy=policy))
    assert [r["id"] for r in good] == ["c0"]
    assert policy.counter.as_dict() == {"bad_json": 1, "helper_count": 1, "missing_image": 1}
    assert "line 3" in policy.counter.first_message["helper_count"]


# ------------------------------------------------------------------------------------------
# VSP
# ------------------------------------------------------------------------------------------

MAP = [[1, 0, 0], [0, -1, 0], [0, 0, 2]]


@pytest.fixture
def vsp_dir(tmp_path):
    root = tmp_path / "vsp"
    _write_png(str(root / "maps/q.png"), (200, 200, 255))
    for k in range(1, 5):
        _write_png(str(root / f"maps/s{k}.png"), (0, 50 * k, 0))
    return root


def _vsp_record(**kw):
    rec = {"id": "v0", "text_input": "Find a path.", "image_input": ["maps/q.png"], "map_desc": MAP,
           "helper_images": [f"maps/s{k}.png" for k in range(1, 5)], "original_final_answer": "\\boxed{R,R,D,D}"}
    rec.update(kw)
    return {k: v for k, v in rec.items() if v is not None}


def test_vsp_builds_plan_from_helper_images(vsp_dir):
    plan = [{"type": "text", "content": "go"}, {"type": "latent", "helper_image": "maps/s1.png"},
            {"type": "text", "content": "down"}, {"type": "latent", "helper_image": "maps/s3.png"}]
    recs = [
        _vsp_record(),
        _vsp_record(id="v1", helper_images=None, sequence_plan=plan, original_final_answer=None, answer="DDRR"),
        _vsp_record(id="v2", step_texts=["a", "b", "c", "d"], original_final_answer="\\boxed{right right down down}"),
        _vsp_record(id="v3", original_final_answer="The answer is \\boxed{RRDD}."),
    ]
    _write_jsonl(vsp_dir / "vsp.jsonl", recs)
    out = list(get_adapter("vsp").iter_records(str(vsp_dir / "vsp.jsonl")))
    assert [r["id"] for r in out] == ["v0", "v1", "v2", "v3"]
    for rec in out:
        assert rec["task"] == "vsp" and rec["map_desc"] == MAP
        assert "helper_images" not in rec and "answer" not in rec and "step_texts" not in rec
        assert maze.score_answer(MAP, rec["original_final_answer"])
    assert out[0]["original_final_answer"] == "\\boxed{R,R,D,D}"
    assert [s.get("content") for s in out[0]["sequence_plan"][::2]] == [
        "Move 1: from (0, 0) go right to (0, 1).", "Move 2: from (0, 1) go right to (0, 2).",
        "Move 3: from (0, 2) go down to (1, 2).", "Move 4: from (1, 2) go down to (2, 2)."]
    assert helper_images(out[0]) == [str(vsp_dir / f"maps/s{k}.png") for k in range(1, 5)]
    assert out[1]["original_final_answer"] == "\\boxed{D,D,R,R}"
    assert helper_images(out[1]) == [str(vsp_dir / "maps/s1.png"), str(vsp_dir / "maps/s3.png")]
    assert [s.get("content") for s in out[2]["sequence_plan"][::2]] == ["a", "b", "c", "d"]
    assert out[3]["original_final_answer"] == "\\boxed{R,R,D,D}"


@pytest.mark.parametrize(
    "change, reason, text",
    [
        ({"original_final_answer": "\\boxed{R,D}"}, "wrong_solution", "fell_in_hole"),
        ({"original_final_answer": "\\boxed{go east}"}, "bad_answer", "not a move sequence"),
        ({"helper_images": ["maps/s1.png", "maps/s2.png", "maps/s3.png"]}, "helper_count",
         "3 helper images for 4 moves"),
        ({"step_texts": ["a"]}, "helper_count", "1 step_texts for 4 helper images"),
        ({"map_desc": [[1, 1], [0, 2]]}, "bad_map", "exactly one start"),
        ({"map_desc": None}, "missing_key", "map_desc"),
        ({"helper_images": ["maps/s1.png", "maps/s2.png", "maps/s3.png", "maps/s9.png"]}, "missing_image",
         "s9.png"),
    ],
)
def test_vsp_bad_records(vsp_dir, change, reason, text):
    path = vsp_dir / "bad.jsonl"
    _write_jsonl(path, [_vsp_record(), _vsp_record(id="bad", **change)])
    with pytest.raises(RecordError) as e:
        list(get_adapter("vsp").iter_records(str(path)))
    assert e.value.reason == reason
    assert text in str(e.value) and f"{path}:line 2" in str(e.value) and "id=bad" in str(e.value)


def test_maze_adapter_reads_generated_data(tmp_path):
    path = maze.generate_maze_dataset(str(tmp_path / "m"), 6, seed=4)
    with open(path) as f:
        raw = [json.loads(line) for line in f]
    _write_jsonl(tmp_path / "m" / "other.jsonl", raw[:2])  # a folder source reads data.jsonl only
    out = list(get_adapter("maze").iter_records(str(tmp_path / "m")))
    assert len(out) == 6
    for rec, src in zip(out, raw):
        assert rec["task"] == "maze"
        assert relative_paths(rec, str(tmp_path / "m")) == src


# ------------------------------------------------------------------------------------------
# Zebra-CoT
# ------------------------------------------------------------------------------------------

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
DOMAIN = "Visual Logic & Strategic Games"
JIGSAW, SEARCH = "2D Visual Reasoning - Visual Jigsaw", "2D Visual Reasoning - Visual Search"
COLORS = {name: (17 * i % 256, 53 * i % 256, 97 * i % 256) for i, name in enumerate(
    ["p1", "p2", "r1", "r2", "r3", "q1", "t1", "x"], start=1)}


def _img(name, fmt="PNG"):
    return {"bytes": _png_bytes(COLORS[name], fmt=fmt), "path": f"{name}.{fmt.lower()}"}


def _zebra_rows():
    ph = lambda s: f"<image_start>[{s}]<image_end>"  # noqa: E731
    return [
        {"Question": f"Look at {ph('problem_image_2')} and {ph('problem_image_1')}. Which piece?",
         "Text Reasoning Trace": f"THOUGHT 0: look. {ph('reasoning_image_1')} THOUGHT 1: more. "
                                 f"{ph('reasoning_image_2')} THOUGHT 2: done.",
         "Final Answer": " B ", "problem_image_1": _img("p1"), "problem_image_2": _img("p2"),
         "reasoning_image_1": _img("r1"), "reasoning_image_2": _img("r2"), "reasoning_image_3": None},
        {"Question": f"{ph('problem_image_1')}\nHow many?",
         "Text Reasoning Trace": f"THOUGHT 0: see {ph('problem_image_1')} again. {ph('reasoning_image_1')}",
         "Final Answer": "3", "problem_image_1": _img("q1"), "problem_image_2": None,
         "reasoning_image_1": _img("r3", "JPEG"), "reasoning_image_2": None, "reasoning_image_3": None},
        {"Question": "No placeholder here.",
         "Text Reasoning Trace": f"{ph('reasoning_image_1')}{ph('reasoning_image_2')} THOUGHT 1: two.",
         "Final Answer": "7", "problem_image_1": _img("t1"), "problem_image_2": None,
         "reasoning_image_1": _img("r1"), "reasoning_image_2": _img("r2"), "reasoning_image_3": _img("x")},
    ]


def _write_shard(path, rows, row_group_size=2):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    schema = pa.schema([("Question", pa.string()), ("Text Reasoning Trace", pa.string()),
                        ("Final Answer", pa.string())]
                       + [(f"problem_image_{i}", IMAGE_STRUCT) for i in (1, 2)]
                       + [(f"reasoning_image_{i}", IMAGE_STRUCT) for i in (1, 2, 3)])
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.fixture
def zebra_root(tmp_path):
    root = tmp_path / "Zebra-CoT"
    rows = _zebra_rows()
    _write_shard(str(root / DOMAIN / "train-00000-of-00002.parquet"), rows[:3])
    _write_shard(str(root / DOMAIN / "train-00001-of-00002.parquet"), [rows[2], rows[0]])
    _write_shard(str(root / JIGSAW / "train-00000-of-00001.parquet"), [rows[1]])
    _write_shard(str(root / SEARCH / "train-00000-of-00001.parquet"), [rows[2]])
    return root


def _decoded(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_zebra_converts_rows(zebra_root, tmp_path):
    out_dir = tmp_path / "out"
    recs = list(get_adapter("zebra").iter_records(str(zebra_root), out_dir=str(out_dir)))
    shard0 = f"{DOMAIN}/train-00000-of-00002"
    # Domains, shards and rows in sorted order.
    assert [r["id"] for r in recs] == [f"{JIGSAW}/train-00000-of-00001/0", f"{SEARCH}/train-00000-of-00001/0",
                                       f"{shard0}/0", f"{shard0}/1", f"{shard0}/2",
                                       f"{DOMAIN}/train-00001-of-00002/0", f"{DOMAIN}/train-00001-of-00002/1"]
    assert {r["task"] for r in recs} == {"zebra"}
    assert [r["domain"] for r in recs] == [JIGSAW, SEARCH] + [DOMAIN] * 5

    r0, r1, r2 = recs[2:5]
    assert r0["text_input"] == "Look at and . Which piece?"
    assert r0["original_final_answer"] == "B"
    # Question images in order of appearance (problem_image_2 first), bytes copied as PNG.
    expected_dir = out_dir / "images" / "Visual_Logic_Strategic_Games" / "train-00000-of-00002"
    assert r0["image_input"] == [str(expected_dir / "r000000_problem_image_2.png"),
                                 str(expected_dir / "r000000_problem_image_1.png")]
    with open(r0["image_input"][0], "rb") as f:
        assert f.read() == _img("p2")["bytes"]
    assert r0["sequence_plan"] == [
        {"type": "text", "content": "THOUGHT 0: look."},
        {"type": "latent", "helper_image": str(expected_dir / "r000000_reasoning_image_1.png")},
        {"type": "text", "content": "THOUGHT 1: more."},
        {"type": "latent", "helper_image": str(expected_dir / "r000000_reasoning_image_2.png")},
        {"type": "text", "content": "THOUGHT 2: done."},
    ]
    # A problem placeholder in the trace is dropped; a JPEG helper becomes a PNG of the same pixels.
    assert r1["text_input"] == "How many?"
    assert [s.get("content") for s in r1["sequence_plan"]] == ["THOUGHT 0: see again.", None]
    jpeg_helper = helper_images(r1)[0]
    with open(jpeg_helper, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    ref = np.asarray(Image.open(io.BytesIO(_img("r3", "JPEG")["bytes"])).convert("RGB"))
    np.testing.assert_array_equal(_decoded(jpeg_helper), ref)
    # An unreferenced problem image is still a question image; consecutive latents stay separate;
    # an unreferenced reasoning image is not used.
    assert r2["text_input"] == "No placeholder here." and len(r2["image_input"]) == 1
    assert [s["type"] for s in r2["sequence_plan"]] == ["latent", "latent", "text"]
    np.testing.assert_array_equal(_decoded(r2["image_input"][0])[0, 0], COLORS["t1"])
    assert not any("reasoning_image_3" in p for p in os.listdir(expected_dir))


def test_zebra_is_deterministic_and_filters_domains(zebra_root, tmp_path):
    ad = get_adapter("zebra")
    a = [relative_paths(r, str(tmp_path / "a")) for r in ad.iter_records(str(zebra_root), out_dir=str(tmp_path / "a"))]
    b = [relative_paths(r, str(tmp_path / "b")) for r in ad.iter_records(str(zebra_root), out_dir=str(tmp_path / "b"))]
    assert a == b
    for rec in a:
        for p in rec["image_input"] + helper_images(rec):
            assert not os.path.isabs(p)
            with open(tmp_path / "a" / p, "rb") as fa, open(tmp_path / "b" / p, "rb") as fb:
                assert fa.read() == fb.read()

    only = list(ad.iter_records(str(zebra_root), out_dir=str(tmp_path / "c"), domains=["visual jigsaw"]))
    assert [r["domain"] for r in only] == [JIGSAW]
    held_out = list(ad.iter_records(str(zebra_root), out_dir=str(tmp_path / "c"),
                                    exclude_domains=zebra.HELD_OUT_DOMAINS))
    assert {r["domain"] for r in held_out} == {DOMAIN} and len(held_out) == 5
    one_domain = list(ad.iter_records(str(zebra_root / DOMAIN), out_dir=str(tmp_path / "c")))
    assert len(one_domain) == 5
    one_shard = list(ad.iter_records(str(zebra_root / DOMAIN / "train-00001-of-00002.parquet"),
                                     out_dir=str(tmp_path / "c")))
    assert [r["id"].split("/")[-1] for r in one_shard] == ["0", "1"]
    with pytest.raises(ValueError, match="unknown selected domain 'Chess'.*Visual Jigsaw"):
        list(ad.iter_records(str(zebra_root), out_dir=str(tmp_path / "c"), domains=["Chess"]))


def test_zebra_held_out_domains_are_the_download_folders(tmp_path):
    """HELD_OUT_DOMAINS names the real folders, so excluding them drops exactly those; names
    match exactly (any case) or by an unambiguous suffix that starts a word; an unknown or
    ambiguous name, in either list, is one error line naming the domains."""
    rows = _zebra_rows()
    root = tmp_path / "Zebra-CoT"
    decoy = "3D Visual Reasoning - Visual Search"
    folders = [JIGSAW, SEARCH, DOMAIN, decoy, "Visual Search"]
    for i, folder in enumerate(folders):
        _write_shard(str(root / folder / "train-00000-of-00001.parquet"), [rows[i % 3]])
    ad = get_adapter("zebra")

    def domains(**kw):
        return sorted(r["domain"] for r in ad.iter_records(str(root), out_dir=str(tmp_path / "o"), **kw))

    assert set(zebra.HELD_OUT_DOMAINS) == {JIGSAW, SEARCH}
    assert domains(exclude_domains=zebra.HELD_OUT_DOMAINS) == sorted(set(folders) - {JIGSAW, SEARCH})
    assert domains(domains=["visual jigsaw"]) == [JIGSAW]  # unambiguous suffix
    assert domains(domains=["Jigsaw", DOMAIN.upper()]) == sorted([JIGSAW, DOMAIN])
    assert domains(domains=["VISUAL SEARCH"]) == ["Visual Search"]  # an exact name wins over suffixes
    assert domains(exclude_domains=["visual search"]) == sorted(set(folders) - {"Visual Search"})
    with pytest.raises(ValueError, match=r"^unknown excluded domain 'Visual Jigsaws'; available: 2D Visual"):
        domains(exclude_domains=["Visual Jigsaws"])
    with pytest.raises(ValueError, match="^unknown selected domain 'igsaw'; available: .*Visual Logic"):
        domains(domains=["igsaw"])  # a suffix must start a word
    os.rename(root / "Visual Search", tmp_path / "moved")
    with pytest.raises(ValueError, match=f"^ambiguous excluded domain 'Visual Search': matches {SEARCH}, {decoy}$"):
        domains(exclude_domains=["Visual Search"])


def test_zebra_sample_is_deterministic_subset(zebra_root, tmp_path):
    ad = get_adapter("zebra")
    full = [r["id"] for r in ad.iter_records(str(zebra_root), out_dir=str(tmp_path / "f"))]

    def sample(seed, n=3):
        return [r["id"] for r in ad.iter_records(str(zebra_root), out_dir=str(tmp_path / "s"),
                                                  max_records=n, seed=seed)]

    s0 = sample(0)
    assert len(s0) == 3 and s0 == sample(0)
    assert set(s0) <= set(full) and s0 == [i for i in full if i in s0]  # shard / row order
    assert len({tuple(sample(seed)) for seed in range(8)}) > 1
    assert sample(0, n=100) == full


def test_zebra_bad_placeholder_and_null_image(tmp_path):
    rows = _zebra_rows()
    bad = dict(rows[0], **{"Text Reasoning Trace": "THOUGHT 0: <image_start>[reasoning_image_one]<image_end>"})
    null = dict(rows[0], **{"Text Reasoning Trace": "THOUGHT 0: <image_start>[reasoning_image_3]<image_end>"})
    shard = tmp_path / "z" / DOMAIN / "train-00000-of-00001.parquet"
    _write_shard(str(shard), [rows[0], rows[1], bad, null])
    ad = get_adapter("zebra")
    with pytest.raises(RecordError) as e:
        list(ad.iter_records(str(tmp_path / "z"), out_dir=str(tmp_path / "o")))
    assert e.value.reason == "bad_placeholder"
    assert f"{shard}:row 2" in str(e.value) and "reasoning_image_one" in str(e.value)

    policy = DropPolicy("skip")
    good = list(ad.iter_records(str(tmp_path / "z"), out_dir=str(tmp_path / "o"), policy=policy))
    assert len(good) == 2
    assert policy.counter.as_dict() == {"bad_placeholder": 1, "missing_image": 1}
    assert "row 3" in policy.counter.first_message["missing_image"]
    assert "'reasoning_image_3' is null" in policy.counter.first_message["missing_image"]


def test_zebra_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(get_adapter("zebra").iter_records(str(tmp_path / "none"), out_dir=str(tmp_path)))
    os.makedirs(tmp_path / "empty" / "dom")
    with pytest.raises(FileNotFoundError, match="no \\*.parquet"):
        list(get_adapter("zebra").iter_records(str(tmp_path / "empty"), out_dir=str(tmp_path)))
