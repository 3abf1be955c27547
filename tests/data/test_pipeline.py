"""The grain pipeline: shapes, determinism, restore, process shards, drops, workers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from ilvr_jax.data import pipeline as PL
from ilvr_jax.data import records as R
from ilvr_jax.data import segments as S
from ilvr_jax.data import processor as P
from ilvr_jax.tiny import build_tokenizer

MINP, MAXP = 4 * 28 * 28, 16 * 28 * 28
N_RECORDS = 13
BASE = dict(
    batch_size=2, max_length=256, max_question_images=2, max_question_patches=128, max_helper_patches=192,
    max_segments=3, latent_size=2, min_pixels=MINP, max_pixels=MAXP, seed=3,
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(str(d))
    return str(d)


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return PL.load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """N_RECORDS records with 0-2 question images, 1-3 segments and varying text lengths."""
    d = tmp_path_factory.mktemp("data")
    (d / "img").mkdir()
    rng = np.random.RandomState(0)
    recs = []
    for i in range(N_RECORDS):
        n_q = i % 3
        n_seg = 1 + i % 3
        q = []
        for j in range(n_q):
            h, w = rng.randint(20, 120, size=2)
            Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(d / "img" / f"q{i}_{j}.png")
            q.append(f"img/q{i}_{j}.png")
        plan = []
        for j in range(n_seg):
            h, w = rng.randint(20, 120, size=2)
            Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(d / "img" / f"h{i}_{j}.png")
            plan.append(R.text_step(" step " + "move up then left " * (i % 5)))
            plan.append(R.latent_step(f"img/h{i}_{j}.png"))
        recs.append(R.make_record(f"question {i}: which way?", q, plan, "ABCD"[i % 4], id=f"r{i}"))
    R.write_jsonl(d / "train.jsonl", recs)
    return d


def make(data_dir, tok, **kw):
    cfg = PL.DataConfig(**{**BASE, **kw})
    return PL.DataPipeline.from_jsonl(data_dir / "train.jsonl", tok, cfg, process_index=kw.pop("pi", 0),
                                      process_count=1)


def ids_of(batches):
    """A hashable digest of a batch list: the input ids of each sample."""
    return [b["input_ids"].tobytes() + b["pixel_values"].tobytes() for b in batches]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y) == set(PL.BATCH_KEYS)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_layout_and_content(data_dir, tokenizer):
    pipe = make(data_dir, tokenizer, shuffle=False)
    cfg = pipe.cfg
    batches = list(pipe.iterator())
    assert len(batches) == pipe.plan.batches_per_epoch == -(-N_RECORDS // 2)
    B, S_, M = cfg.batch_size, cfg.max_length, cfg.max_segments
    shapes = {
        "input_ids": ((B, S_), np.int32), "attention_mask": ((B, S_), np.int32), "labels": ((B, S_), np.int32),
        "pixel_values": ((B, 128, 1176), np.float32), "image_grid_thw": ((B, 2, 3), np.int32),
        "helper_pixel_values": ((B, 192, 1176), np.float32), "helper_grid_thw": ((B, M, 3), np.int32),
        "latent_starts": ((B, M), np.int32), "segment_mask": ((B, M), np.bool_), "assistant_start": ((B,), np.int32),
        "sample_mask": ((B,), np.bool_),
    }
    for b in batches:
        for k, (shape, dtype) in shapes.items():
            assert b[k].shape == shape and b[k].dtype == dtype, k
    # Unshuffled: sample r is record r; compare with building it directly.
    recs = [r for r, _, _ in R.load_records(data_dir / "train.jsonl")]
    fmt = cfg.sequence_format
    icfg = cfg.image_config()
    ids = S.SpecialIds.from_tokenizer(tokenizer)
    for r, rec in enumerate(recs):
        b, row = batches[r // 2], r % 2
        s = S.build_sample(rec, data_dir, tokenizer, icfg, fmt)
        n, pq, ph, m = len(s.input_ids), len(s.pixel_values), len(s.helper_pixel_values), len(s.helper_grid_thw)
        np.testing.assert_array_equal(b["input_ids"][row, :n], s.input_ids)
        assert (b["input_ids"][row, n:] == ids.pad).all()
        np.testing.assert_array_equal(b["labels"][row, :n], s.labels)
        assert (b["labels"][row, n:] == -100).all()
        assert b["attention_mask"][row].tolist() == [1] * n + [0] * (S_ - n)
        np.testing.assert_array_equal(b["pixel_values"][row, :pq], s.pixel_values)
        assert not b["pixel_values"][row, pq:].any()
        np.testing.assert_array_equal(b["image_grid_thw"][row, : len(s.image_grid_thw)], s.image_grid_thw)
        assert not b["image_grid_thw"][row, len(s.image_grid_thw):].any()
        np.testing.assert_array_equal(b["helper_pixel_values"][row, :ph], s.helper_pixel_values)
        np.testing.assert_array_equal(b["helper_grid_thw"][row, :m], s.helper_grid_thw)
        assert b["segment_mask"][row].tolist() == [True] * m + [False] * (M - m)
        np.testing.assert_array_equal(b["latent_starts"][row, :m], s.latent_starts)
        for p in b["latent_starts"][row, :m]:
            assert b["input_ids"][row, p] == ids.latent_start
            assert (b["input_ids"][row, p + 1:p + 3] == ids.latent_pad).all()
            assert b["input_ids"][row, p + 3] == ids.latent_end
        assert b["input_ids"][row, b["assistant_start"][row]] == ids.im_start
        assert b["sample_mask"][row]
    # 13 records in batches of 2: the last batch has one padding sample.
    last = batches[-1]
    assert last["sample_mask"].tolist() == [True, False]
    assert not last["attention_mask"][1].any() and (last["labels"][1] == -100).all()
    assert not last["segment_mask"][1].any() and not last["helper_pixel_values"][1].any()


def test_drop_remainder(data_dir, tokenizer):
    pipe = make(data_dir, tokenizer, drop_remainder=True)
    batches = list(pipe.iterator())
    assert len(batches) == N_RECORDS // 2
    assert all(b["sample_mask"].all() for b in batches)


def test_determinism_by_seed_and_epochs(data_dir, tokenizer):
    a = list(make(data_dir, tokenizer, num_epochs=2).iterator())
    b = list(make(data_dir, tokenizer, num_epochs=2).iterator())
    assert_batches_equal(a, b)
    threaded = list(make(data_dir, tokenizer, num_epochs=2, read_threads=3, prefetch=4).iterator())
    assert_batches_equal(a, threaded)
    c = list(make(data_dir, tokenizer, num_epochs=2, seed=4).iterator())
    assert ids_of(a) != ids_of(c)
    # two epochs: each record once per epoch, different order in epoch 2
    nb = len(a) // 2
    assert ids_of(a[:nb]) != ids_of(a[nb:])

    def sample_set(batches):
        return sorted(b["input_ids"][r].tobytes() for b in batches for r in range(2) if b["sample_mask"][r])

    assert sample_set(a[:nb]) == sample_set(a[nb:])
    assert len(sample_set(a[:nb])) == N_RECORDS


def test_infinite_epochs(data_dir, tokenizer):
    pipe = make(data_dir, tokenizer, num_epochs=None)
    it = pipe.iterator()
    nb = pipe.plan.batches_per_epoch
    batches = [next(it) for _ in range(2 * nb + 1)]
    assert it.epoch == 2 and it.next_batch == 2 * nb + 1
    it.close()
    assert len(batches) == 2 * nb + 1


def test_restore_mid_epoch(data_dir, tokenizer, tmp_path):
    pipe = make(data_dir, tokenizer, num_epochs=2)
    full = list(pipe.iterator())
    it = pipe.iterator()
    for _ in range(5):
        next(it)
    state = it.get_state()
    assert json.loads(json.dumps(state)) == state  # JSON-serialisable
    PL.save_state(tmp_path / "data_state.json", it)
    rest_a = list(it)
    # a fresh pipeline (as after a restart), restored from the saved file
    pipe2 = make(data_dir, tokenizer, num_epochs=2)
    it2 = pipe2.iterator(PL.load_state(tmp_path / "data_state.json"))
    rest_b = list(it2)
    assert_batches_equal(rest_a, full[5:])
    assert_batches_equal(rest_b, full[5:])
    # a state from another configuration is refused
    other = make(data_dir, tokenizer, num_epochs=2, seed=9)
    with pytest.raises(ValueError, match="different pipeline"):
        other.iterator(state)


def test_state_restores_from_a_moved_data_dir(data_dir, tokenizer, tmp_path):
    """The fingerprint names records by file base name + line and image paths relative to the
    root: a copy of the data directory elsewhere restores the state (and gives the same
    batches); changed content, order, image sizes or process layout are refused."""
    import shutil

    pipe = make(data_dir, tokenizer)
    it = pipe.iterator()
    next(it), next(it)
    state = json.loads(json.dumps(it.get_state()))
    rest = list(it)

    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(data_dir, moved)
    assert str(moved) not in str(data_dir) and str(data_dir) not in str(moved)
    it2 = make(moved, tokenizer).iterator(state)
    assert it2.next_batch == 2
    assert_batches_equal(list(it2), rest)

    # Absolute image paths below the root count as relative ones: a converter that writes
    # absolute paths into each copy gives the same fingerprint in both places.
    from ilvr_jax.data.adapters import absolute_paths

    fps = []
    for d in (tmp_path / "abs_a", tmp_path / "abs_b"):
        shutil.copytree(data_dir, d)
        recs = [absolute_paths(r, d) for r, _, _ in R.load_records(d / "train.jsonl")]
        assert os.path.isabs(recs[0]["sequence_plan"][1]["helper_image"])
        R.write_jsonl(d / "train.jsonl", recs)
        fps.append(make(d, tokenizer).fingerprint)
    assert fps[0] == fps[1] == pipe.fingerprint

    def refused(d):
        with pytest.raises(ValueError, match="different pipeline"):
            make(d, tokenizer).iterator(state)

    lines = (data_dir / "train.jsonl").read_text().splitlines(keepends=True)
    changed = tmp_path / "changed"
    shutil.copytree(data_dir, changed)
    (changed / "train.jsonl").write_text("".join([lines[0].replace("which way?", "which way now?")] + lines[1:]))
    refused(changed)
    (changed / "train.jsonl").write_text("".join([lines[1], lines[0]] + lines[2:]))  # order
    refused(changed)
    (changed / "train.jsonl").write_text("".join(lines))
    (changed / "train.jsonl").rename(changed / "other.jsonl")  # same lines, another file
    with pytest.raises(ValueError, match="different pipeline"):
        PL.DataPipeline.from_jsonl(changed / "other.jsonl", tokenizer, pipe.cfg, process_index=0,
                                   process_count=1).iterator(state)
    (changed / "other.jsonl").rename(changed / "train.jsonl")
    # A helper image of another size (same path): other patch counts, other batches.
    Image.fromarray(np.zeros((300, 28, 3), np.uint8)).save(changed / "img" / "h0_0.png")
    assert make(changed, tokenizer).items[0].size.helper_patches != pipe.items[0].size.helper_patches
    refused(changed)
    with pytest.raises(ValueError, match="different pipeline"):
        PL.DataPipeline.from_jsonl(moved / "train.jsonl", tokenizer, pipe.cfg, process_index=0,
                                   process_count=2).iterator(state)


def test_orbax_checkpoint_of_iterator(data_dir, tokenizer, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    pipe = make(data_dir, tokenizer)
    full = list(pipe.iterator())
    it = pipe.iterator()
    next(it), next(it), next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        it2 = make(data_dir, tokenizer).iterator()
        mngr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    assert it2.next_batch == 3
    assert_batches_equal(list(it2), full[3:])


def test_two_processes_disjoint_and_covering(data_dir, tokenizer):
    cfg = PL.DataConfig(**BASE)
    path = data_dir / "train.jsonl"
    parts = [PL.DataPipeline.from_jsonl(path, tokenizer, cfg, process_index=p, process_count=2) for p in range(2)]
    batches = [list(p.iterator()) for p in parts]
    assert len(batches[0]) == len(batches[1])  # same number of steps on both processes
    for b0, b1 in zip(*batches):
        assert b0["input_ids"].shape == b1["input_ids"].shape  # same shapes at every step
    seen = [[b["input_ids"][r].tobytes() for b in bs for r in range(2) if b["sample_mask"][r]] for bs in batches]
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == N_RECORDS
    single = [b["input_ids"][r].tobytes() for b in make(data_dir, tokenizer).iterator() for r in range(2)
              if b["sample_mask"][r]]
    assert sorted(seen[0] + seen[1]) == sorted(single)


def test_buckets_give_fixed_shapes(data_dir, tokenizer):
    pipe = make(data_dir, tokenizer, buckets=(96, 128, 256))
    lens = [it.size.seq_len for it in pipe.items]
    assert min(lens) <= 96 < max(lens)  # the fixture spans several buckets
    batches = list(pipe.iterator())
    shapes = {b["input_ids"].shape for b in batches}
    assert shapes <= {(2, 96), (2, 128), (2, 256)} and len(shapes) >= 2
    n_real = 0
    for b in batches:
        S_ = b["input_ids"].shape[1]
        for r in range(2):
            if b["sample_mask"][r]:
                n = int(b["attention_mask"][r].sum())
                # the smallest bucket that holds the sample
                assert n <= S_ and not any(n <= x < S_ for x in (96, 128, 256))
                n_real += 1
    assert n_real == N_RECORDS
    assert pipe.describe()["records"] == N_RECORDS


def test_bad_records_error_or_skip(data_dir, tokenizer, tmp_path):
    good = [json.loads(x) for x in (data_dir / "train.jsonl").read_text().splitlines()]
    for g in good:  # absolute image paths, so the file can live elsewhere
        g["image_input"] = [str(data_dir / p) for p in g["image_input"]]
        for s in g["sequence_plan"]:
            if s["type"] == "latent":
                s["helper_image"] = str(data_dir / s["helper_image"])
    bad_missing = dict(good[0], id="bad1", image_input=["nope.png"])
    bad_plan = dict(good[1], id="bad2", sequence_plan=[])
    too_long = dict(good[2], id="bad3", text_input="left right " * 400)
    too_many_seg = dict(good[3], id="bad4", sequence_plan=good[3]["sequence_plan"] * 4)
    recs = good[:4] + [bad_missing, bad_plan, too_long, too_many_seg] + good[4:]
    path = tmp_path / "mixed.jsonl"
    R.write_jsonl(path, recs)
    with open(path, "a") as f:
        f.write("{not json\n")
    cfg = PL.DataConfig(**BASE)
    with pytest.raises(R.RecordError, match=r"mixed.jsonl:line 5 \(id=bad1\)") as ei:
        PL.DataPipeline.from_jsonl(path, tokenizer, cfg, process_index=0, process_count=1)
    assert ei.value.reason == R.MISSING_IMAGE
    pipe = PL.DataPipeline.from_jsonl(path, tokenizer, PL.DataConfig(**BASE, drop_policy="skip"), process_index=0,
                                      process_count=1)
    assert pipe.drops.as_dict() == {R.MISSING_IMAGE: 1, R.EMPTY_PLAN: 1, PL.TOO_LONG: 1, PL.TOO_MANY_SEGMENTS: 1,
                                    R.BAD_JSON: 1}
    assert pipe.num_records == N_RECORDS
    assert pipe.describe()["dropped"][PL.TOO_LONG] == 1
    n_real = sum(int(b["sample_mask"].sum()) for b in pipe.iterator())
    assert n_real == N_RECORDS
    # patch limits
    small = PL.DataConfig(**{**BASE, "max_helper_patches": 16, "max_question_patches": 16}, drop_policy="skip")
    pipe = PL.DataPipeline.from_jsonl(data_dir / "train.jsonl", tokenizer, small, process_index=0, process_count=1)
    assert set(pipe.drops.as_dict()) <= {PL.TOO_MANY_HELPER_PATCHES, PL.TOO_MANY_QUESTION_PATCHES}
    assert pipe.drops.total > 0 and pipe.num_records + pipe.drops.total == N_RECORDS
    for it in pipe.items:
        assert it.size.helper_patches <= 16 and it.size.question_patches <= 16


def test_workers_match_in_process(data_dir, tok_dir):
    a = list(make(data_dir, tok_dir, worker_count=0, num_epochs=2).iterator())
    pipe = make(data_dir, tok_dir, worker_count=2, num_epochs=2)
    it = pipe.iterator()
    b = list(it)
    it.close()
    assert_batches_equal(a, b)
    # restoring with workers gives the same continuation
    in_process = make(data_dir, tok_dir, worker_count=0, num_epochs=2).iterator()
    for _ in range(4):
        next(in_process)
    it = pipe.iterator(in_process.get_state())  # the worker count is not part of the state
    c = list(it)
    it.close()
    assert_batches_equal(c, a[4:])


def test_empty_data_is_a_clear_error(data_dir, tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    R.write_jsonl(path, [{"text_input": "q"}])
    cfg = PL.DataConfig(**BASE, drop_policy="skip")
    pipe = PL.DataPipeline.from_jsonl(path, tokenizer, cfg, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no batches: 0 usable records.*missing_key=1"):
        pipe.iterator()


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of 4"):
        PL.DataConfig(max_question_patches=30)
    with pytest.raises(ValueError, match="increasing"):
        PL.DataConfig(buckets=(128, 64))
    with pytest.raises(ValueError, match="unknown data config keys"):
        PL.DataConfig.from_dict({"batch_size": 2, "max_len": 5})
    cfg = PL.DataConfig(buckets=[64, 128])
    assert PL.DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_defaults_follow_the_reference():
    """The plan alone as the assistant turn, and Qwen2.5-VL's pixel budget (the checkpoint's
    preprocessor_config.json: min_pixels 3136, max_pixels 12845056)."""
    cfg = PL.DataConfig()
    assert cfg.answer_format is None and cfg.sequence_format.answer_format is None
    assert (cfg.min_pixels, cfg.max_pixels) == (3136, 12845056)
    img = cfg.image_config()
    assert (img.min_pixels, img.max_pixels) == (3136, 12845056)
    assert P.smart_resize(4000, 4000, 28, cfg.min_pixels, cfg.max_pixels) == (3584, 3584)
    assert PL.DataConfig(answer_format="\n{answer}").sequence_format.answer_format == "\n{answer}"


def _expected_bucket_shapes(pipe, max_q, max_h):
    """Per record, the (S, Pq, Ph) the task defines: the smallest power of two >= 64 (capped at
    max_length) that holds it, and its bucket's largest patch totals rounded up to 64."""
    limit = pipe.cfg.max_length
    def length_of(n):
        s = 64
        while s < n and s < limit:
            s *= 2
        return min(s, limit)
    lengths = [length_of(it.size.seq_len) for it in pipe.items]
    budget = {}
    for s, it in zip(lengths, pipe.items):
        q, h = budget.get(s, (0, 0))
        budget[s] = (max(q, it.size.question_patches), max(h, it.size.helper_patches))
    up = lambda n, cap: min(cap, max(64, -(-n // 64) * 64))  # noqa: E731
    return [(s, up(budget[s][0], max_q), up(budget[s][1], max_h)) for s in lengths]


def test_auto_buckets_and_patch_budgets(data_dir, tokenizer):
    pipe = make(data_dir, tokenizer, buckets="auto", bucket_patches="auto", max_question_patches=512,
                max_helper_patches=512)
    expected = _expected_bucket_shapes(pipe, 512, 512)
    assert len(set(expected)) >= 2  # the fixture spans several buckets
    assert [(b.length, b.question_patches, b.helper_patches) for b in pipe.buckets] == sorted(set(expected))
    assert pipe.num_records == N_RECORDS and pipe.drops.total == 0
    shapes = pipe.batch_shapes()
    assert [s["input_ids"][1] for s in shapes] == [b.length for b in pipe.buckets]
    seen = set()
    by_ids = {}
    for b in pipe.iterator():
        shape = (b["input_ids"].shape[1], b["pixel_values"].shape[1], b["helper_pixel_values"].shape[1])
        bucket = [(x.length, x.question_patches, x.helper_patches) for x in pipe.buckets].index(shape)
        assert {k: v.shape for k, v in b.items()} == shapes[bucket]
        assert all(b[k].dtype == PL.BATCH_DTYPES[k] for k in b)
        for r in range(2):
            if b["sample_mask"][r]:
                by_ids[b["input_ids"][r, :int(b["attention_mask"][r].sum())].tobytes()] = shape
        seen.add(shape)
    assert seen == set(expected)
    # every record's batch shape is its bucket's, and none is missing
    assert len(by_ids) == N_RECORDS
    for it, want in zip(pipe.items, expected):
        s = S.build_sample(it.record, it.root, tokenizer, pipe.image_cfg, pipe.cfg.sequence_format)
        assert by_ids[s.input_ids.tobytes()] == want
    info = pipe.describe()
    assert [b["records"] for b in info["buckets"]] == [expected.count(sh) for sh in sorted(set(expected))]
    assert [(b["length"], b["question_patches"], b["helper_patches"]) for b in info["buckets"]] == sorted(set(expected))


def test_paper_maxima_on_small_records_build_small_batches(data_dir, tokenizer):
    paper = dict(max_length=32768, max_question_patches=16384, max_helper_patches=16384)
    pipe = make(data_dir, tokenizer, buckets="auto", bucket_patches="auto", **paper)
    assert pipe.num_records == N_RECORDS
    total = 0
    for b in pipe.iterator():
        assert b["input_ids"].shape[1] <= 256
        assert b["pixel_values"].shape[1] <= 128 and b["helper_pixel_values"].shape[1] <= 192
        total = max(total, sum(v.nbytes for v in b.values()))
        shape = (b["input_ids"].shape[1], b["pixel_values"].shape[1], b["helper_pixel_values"].shape[1])
        info = next(x for x in pipe.describe()["buckets"]
                    if (x["length"], x["question_patches"], x["helper_patches"]) == shape)
        assert info["batch_bytes"] == sum(v.nbytes for v in b.values())
    assert total < 2 * 192 * 1176 * 4 * 2  # a couple of MB, not the 2 x 2 x 16384 x 1176 x 4 (308 MB) of the maxima
    fixed = make(data_dir, tokenizer, **paper)  # today's behaviour: every batch at the maxima
    assert fixed.batch_shapes()[0]["pixel_values"] == (2, 16384, 1176)
    assert fixed.batch_shapes()[0]["input_ids"] == (2, 32768)


def test_auto_buckets_restore_exactly_and_enter_the_fingerprint(data_dir, tokenizer):
    kw = dict(buckets="auto", bucket_patches="auto", num_epochs=2)
    pipe = make(data_dir, tokenizer, **kw)
    full = list(pipe.iterator())
    it = make(data_dir, tokenizer, **kw).iterator()
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert_batches_equal(list(make(data_dir, tokenizer, **kw).iterator(state)), full[3:])
    assert make(data_dir, tokenizer, buckets="auto", num_epochs=2).fingerprint != pipe.fingerprint
    explicit = [b.length for b in pipe.buckets]
    pairs = [(b.question_patches, b.helper_patches) for b in pipe.buckets]
    same = make(data_dir, tokenizer, buckets=explicit, bucket_patches=pairs, num_epochs=2)
    assert same.buckets == pipe.buckets
    assert_batches_equal(list(same.iterator()), full)


def test_bucket_config_checks():
    with pytest.raises(ValueError, match="'auto', None or lengths"):
        PL.DataConfig(buckets="automatic")
    with pytest.raises(ValueError, match="one .question, helper. pair per bucket"):
        PL.DataConfig(buckets="auto", bucket_patches=[(64, 64)])
    with pytest.raises(ValueError, match="multiples of 4 within"):
        PL.DataConfig(buckets=[64, 128], bucket_patches=[(64, 64), (62, 64)])
    cfg = PL.DataConfig(buckets=[64, 128], bucket_patches=[(64, 64), (128, 256)])
    assert PL.DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    auto = PL.DataConfig(buckets="auto", bucket_patches="auto")
    assert PL.DataConfig.from_dict(json.loads(json.dumps(auto.to_dict()))) == auto


def _with_truncated_helper(data_dir, tmp_path, index=3):
    """A copy of the data whose record ``index`` has a helper image cut in half (header intact)."""
    import shutil

    d = tmp_path / "trunc"
    shutil.copytree(data_dir, d)
    rec = json.loads((d / "train.jsonl").read_text().splitlines()[index])
    helper = d / rec["sequence_plan"][1]["helper_image"]
    data = helper.read_bytes()
    helper.write_bytes(data[: len(data) // 2])
    return d, rec


def test_image_failing_at_build_time_is_counted_once(data_dir, tokenizer, tmp_path):
    d, rec = _with_truncated_helper(data_dir, tmp_path)
    pipe = make(d, tokenizer, num_epochs=3, drop_policy="skip")
    assert pipe.num_records == N_RECORDS and pipe.drops.total == 0  # the header is fine
    batches = list(pipe.iterator())
    assert sum(int(b["sample_mask"].sum()) for b in batches) == 3 * (N_RECORDS - 1)
    assert pipe.drops.as_dict() == {R.UNREADABLE_IMAGE: 1}
    assert pipe.describe()["dropped"] == {R.UNREADABLE_IMAGE: 1}
    # a resumed iterator keeps the count (and does not count it again)
    it = make(d, tokenizer, num_epochs=3, drop_policy="skip").iterator()
    for _ in range(len(batches) // 2):
        next(it)
    restored = make(d, tokenizer, num_epochs=3, drop_policy="skip")
    list(restored.iterator(it.get_state()))
    assert restored.drops.as_dict() == {R.UNREADABLE_IMAGE: 1}
    # verify_images finds it while indexing, under the same reason
    early = make(d, tokenizer, verify_images=True, drop_policy="skip")
    assert early.drops.as_dict() == {R.UNREADABLE_IMAGE: 1} and early.num_records == N_RECORDS - 1


@pytest.mark.parametrize("workers", [0, 2])
def test_build_failure_under_error_policy_is_one_line(data_dir, tok_dir, tmp_path, workers):
    d, rec = _with_truncated_helper(data_dir, tmp_path)
    pipe = make(d, tok_dir, shuffle=False, drop_policy="error", worker_count=workers)
    it = pipe.iterator()
    with pytest.raises(R.RecordError) as ei:
        for _ in it:
            pass
    it.close()
    msg = str(ei.value)
    assert msg.startswith(f"{d / 'train.jsonl'}:line 4 (id={rec['id']}): ") and msg.endswith("[unreadable_image]")
    assert "\n" not in msg and ei.value.__cause__ is None and ei.value.__context__ is None


def test_records_images_tokenizer_and_state_in_a_bucket(data_dir, tok_dir, tokenizer):
    """The JSONL, its images (relative paths), the tokenizer directory and the iterator state
    on gs:// (in memory, through etils.epath) give exactly the local pipeline's batches."""
    import importlib.util

    from ilvr_jax import storage

    spec = importlib.util.spec_from_file_location("_fb", os.path.join(os.path.dirname(__file__), "..",
                                                                      "fake_bucket.py"))
    fake_bucket = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake_bucket)
    cfg = PL.DataConfig(**BASE)
    local = list(PL.DataPipeline.from_jsonl(data_dir / "train.jsonl", tokenizer, cfg, process_index=0,
                                            process_count=1).iterator())
    with fake_bucket.load().install():
        storage.copy_tree(str(data_dir), "gs://data/set")
        storage.copy_tree(tok_dir, "gs://data/tok")
        located = list(R.read_jsonl("gs://data/set/train.jsonl"))
        assert located[0].root == "gs://data/set" and located[0].source == "train.jsonl"
        pipe = PL.DataPipeline.from_jsonl("gs://data/set/train.jsonl", "gs://data/tok", cfg, process_index=0,
                                          process_count=1)
        it = pipe.iterator()
        remote = [next(it), next(it)]
        PL.save_state("gs://data/state.json", it)
        rest = list(pipe.iterator(PL.load_state("gs://data/state.json")))
        assert_batches_equal(remote + rest, local)
        # A missing image in the bucket is the usual one-line record error.
        storage.remove("gs://data/set/img/h0_0.png")
        with pytest.raises(R.RecordError, match=r"helper image 0 'img/h0_0.png' not found \(resolved to "
                                                r"'gs://data/set/img/h0_0.png'\)"):
            R.load_records("gs://data/set/train.jsonl")


def test_fingerprint_is_that_of_sizes_without_the_first_chunk_length(data_dir, tokenizer):
    """Iterator states saved before the record sizes carried the first chunk's length (a
    stage-2 window, derived from the tokens) still restore: the fingerprint is the one of
    the six-field sizes, computed here as it was then."""
    import dataclasses
    import hashlib

    pipe = make(data_dir, tokenizer)
    assert all(it.size.first_chunk_len == S.first_chunk_length(
        S.build_sample(it.record, it.root, tokenizer, pipe.image_cfg, pipe.cfg.sequence_format).latent_starts,
        it.size.seq_len) for it in pipe.items)
    h = hashlib.sha256()
    order_cfg = {k: v for k, v in pipe.cfg.to_dict().items() if k not in PL.THROUGHPUT_KEYS}
    h.update(json.dumps(order_cfg, sort_keys=True).encode())
    h.update(json.dumps([0, 1]).encode())
    h.update(json.dumps([dataclasses.astuple(b) for b in pipe.buckets]).encode())
    for it in pipe.items:
        s = it.size
        old = [s.seq_len, s.num_question_images, s.question_patches, s.num_segments, s.helper_patches,
               s.later_chunk_len]
        rec = PL.relative_paths(it.record, it.root) if it.root is not None else it.record
        h.update(json.dumps([it.source, it.line, rec, old, it.bucket], sort_keys=True).encode())
    assert pipe.fingerprint == h.hexdigest()[:16]
