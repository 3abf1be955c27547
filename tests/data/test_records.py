"""Canonical records: validation messages, JSONL round trip, drop policy counts."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from ilvr_jax.data import records as R


@pytest.fixture
def root(tmp_path):
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "q.png")
    Image.new("RGB", (30, 40), (0, 255, 0)).save(tmp_path / "h1.png")
    Image.new("RGB", (30, 40), (0, 0, 255)).save(tmp_path / "h2.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    return tmp_path


def good(**kw):
    rec = R.make_record(
        "Which one?",
        ["q.png"],
        [R.text_step("think"), R.latent_step("h1.png"), R.text_step("more"), R.latent_step("h2.png")],
        "B",
        id="r1",
        task="t",
    )
    rec.update(kw)
    return rec


def test_good_record_passes(root):
    rec = good()
    assert R.validate_record(rec, root, where="f.jsonl:line 1") is rec
    assert R.helper_images(rec) == ["h1.png", "h2.png"]
    assert R.num_segments(rec) == 2
    # absolute paths work regardless of root
    rec2 = good(image_input=[str(root / "q.png")])
    R.validate_record(rec2, "/nonexistent", where="x", check_images=False)
    R.validate_record(dict(rec2, sequence_plan=[R.text_step("a")]), "/nonexistent", where="x")


@pytest.mark.parametrize(
    "mutate, reason, fragment",
    [
        (lambda r: r.pop("text_input"), R.MISSING_KEY, "missing key 'text_input'"),
        (lambda r: r.pop("original_final_answer"), R.MISSING_KEY, "'original_final_answer'"),
        (lambda r: r.__setitem__("text_input", 3), R.WRONG_TYPE, "'text_input' must be a string"),
        (lambda r: r.__setitem__("image_input", "q.png"), R.WRONG_TYPE, "'image_input'"),
        (lambda r: r.__setitem__("sequence_plan", []), R.EMPTY_PLAN, "empty"),
        (lambda r: r.__setitem__("sequence_plan", {"a": 1}), R.WRONG_TYPE, "'sequence_plan'"),
        (lambda r: r["sequence_plan"].append({"type": "video"}), R.BAD_STEP, "unknown type 'video'"),
        (lambda r: r["sequence_plan"].append({"type": "text"}), R.BAD_STEP, "sequence_plan[4]"),
        (lambda r: r["sequence_plan"].append({"type": "latent"}), R.HELPER_COUNT, "no 'helper_image'"),
        (lambda r: r.__setitem__("helper_images", ["h1.png"]), R.HELPER_COUNT, "1 helper images for 2"),
        (lambda r: r.__setitem__("image_input", ["nope.png"]), R.MISSING_IMAGE, "'nope.png' not found"),
        (lambda r: r["sequence_plan"].append(R.latent_step("gone.png")), R.MISSING_IMAGE, "helper image 2"),
        (lambda r: r.__setitem__("image_input", ["broken.png"]), R.UNREADABLE_IMAGE, "not a readable image"),
        (lambda r: r.__setitem__("id", [1]), R.WRONG_TYPE, "'id'"),
    ],
)
def test_bad_records_name_file_record_and_problem(root, mutate, reason, fragment):
    rec = good()
    mutate(rec)
    with pytest.raises(R.RecordError) as ei:
        R.validate_record(rec, root, where="data/train.jsonl:line 7")
    err = ei.value
    assert isinstance(err, ValueError)
    assert err.reason == reason
    msg = str(err)
    assert "data/train.jsonl:line 7" in msg
    assert fragment in msg
    if isinstance(rec.get("id"), str):
        assert "(id=r1)" in msg


def test_non_object_record(root):
    with pytest.raises(R.RecordError, match="must be a JSON object"):
        R.validate_record([1, 2], root, where="w")


def test_helper_images_key_consistent(root):
    R.validate_record(good(helper_images=["h1.png", "h2.png"]), root, where="w")
    with pytest.raises(R.RecordError, match="differ"):
        R.validate_record(good(helper_images=["h2.png", "h1.png"]), root, where="w")


def test_jsonl_roundtrip_and_locations(root):
    recs = [good(id=f"r{i}", text_input=f"question {i} ü") for i in range(3)]
    path = root / "recs.jsonl"
    assert R.write_jsonl(path, recs) == 3
    # a blank line and a broken line in the middle
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([lines[0], "", "{broken", lines[1], lines[2]]) + "\n", encoding="utf-8")
    located = list(R.read_jsonl(path))
    assert [loc.where.split(":line ")[1] for loc in located] == ["1 (id=r0)", "3", "4 (id=r1)", "5 (id=r2)"]
    assert located[0].root == str(root)
    assert located[0].record == recs[0]
    with pytest.raises(R.RecordError) as ei:
        R.validate_located(located[1])
    assert ei.value.reason == R.BAD_JSON and "recs.jsonl:line 3" in str(ei.value)


def test_drop_policy_error_and_skip(root, caplog):
    recs = [good(id="a"), good(id="b", image_input=["missing.png"]), good(id="c", sequence_plan=[]),
            good(id="d", image_input=["missing2.png"]), good(id="e")]
    path = root / "mixed.jsonl"
    R.write_jsonl(path, recs)
    with pytest.raises(R.RecordError, match=r"mixed.jsonl:line 2 \(id=b\)"):
        R.load_records(path)
    policy = R.DropPolicy("skip")
    with caplog.at_level(logging.WARNING, logger="ilvr_jax.data.records"):
        kept = R.load_records(path, policy=policy)
    assert [r["id"] for r, _, _ in kept] == ["a", "e"]
    assert policy.counter.as_dict() == {R.EMPTY_PLAN: 1, R.MISSING_IMAGE: 2}
    assert policy.counter.total == 3
    assert "missing_image=2" in policy.counter.summary()
    assert sum("skipping record" in m for m in caplog.messages) == 3
    with pytest.raises(ValueError):
        R.DropPolicy("ignore")


def test_record_error_pickles():
    import pickle

    e = R.RecordError("f:line 1", R.MISSING_KEY, "missing key 'x'")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.where, e2.reason, str(e2)) == (e.where, e.reason, str(e))
    assert json.dumps(R.DropCounter().as_dict()) == "{}"
