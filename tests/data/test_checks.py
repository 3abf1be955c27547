"""The one set of record checks (``checks.RecordChecker``): every reason the pipeline drops for."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ilvr_jax.data import checks as C
from ilvr_jax.data import processor as P
from ilvr_jax.data import records as R
from ilvr_jax.data import segments as S
from ilvr_jax.tiny import build_tokenizer

IMG = P.ImageProcessorConfig(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
FMT = S.SequenceFormat(latent_size=2)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("checks")
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (50, 70, 3), dtype=np.uint8)).save(d / "ok.png")
    Image.new("RGB", (402, 2)).save(d / "wide.png")  # aspect ratio 201
    for ext in ("png", "jpg"):
        Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"full.{ext}")
        data = (d / f"full.{ext}").read_bytes()
        (d / f"truncated.{ext}").write_bytes(data[: len(data) // 2])
    return d


def loc(root, **kw):
    rec = R.make_record("Which?", ["ok.png"], [R.text_step("look"), R.latent_step("ok.png")], "A", id="x")
    rec.update(kw)
    return R.LocatedRecord(rec, "d.jsonl:line 3 (id=x)", str(root))


def check(tokenizer, root, limits=C.RecordLimits(), verify=True, **kw):
    return C.RecordChecker(tokenizer, IMG, FMT, limits, verify_images=verify).check(loc(root, **kw))


def test_good_record_size_is_the_built_sample(tokenizer, root):
    rec, size = check(tokenizer, root)
    sample = S.build_sample(rec, root, tokenizer, IMG, FMT)
    later = S.later_chunk_length(sample.latent_starts, FMT.latent_size, len(sample.input_ids))
    assert size == S.SampleSize(len(sample.input_ids), 1, len(sample.pixel_values), 1, len(sample.helper_pixel_values),
                                later, int(sample.latent_starts[0]) + 1)


@pytest.mark.parametrize("kw, reason, fragment", [
    (dict(text_input="Which?<|im_end|> more"), S.SPECIAL_IN_TEXT, "'<|im_end|>'"),
    (dict(sequence_plan=[R.text_step("a <|latent_pad|>"), R.latent_step("ok.png")]), S.SPECIAL_IN_TEXT, "latent_pad"),
    (dict(image_input=["wide.png"]), S.BAD_ASPECT, "aspect ratio above 200"),
    (dict(image_input=["truncated.png"]), R.UNREADABLE_IMAGE, "truncated"),
    (dict(sequence_plan=[R.latent_step("truncated.jpg")]), R.UNREADABLE_IMAGE, "truncated"),
    (dict(sequence_plan=[]), R.EMPTY_PLAN, "empty"),
])
def test_bad_records(tokenizer, root, kw, reason, fragment):
    with pytest.raises(R.RecordError) as ei:
        check(tokenizer, root, **kw)
    assert ei.value.reason == reason and fragment in str(ei.value)
    assert str(ei.value).startswith("d.jsonl:line 3 (id=x): ") and "\n" not in str(ei.value)


def test_truncated_images_pass_without_decoding_and_fail_when_built(tokenizer, root):
    rec, _ = check(tokenizer, root, verify=False, image_input=["truncated.jpg"])
    with pytest.raises(R.RecordError) as ei:
        S.build_sample(rec, root, tokenizer, IMG, FMT)
    assert ei.value.reason == R.UNREADABLE_IMAGE  # the reason validate gives when it decodes


def test_fit_limits(tokenizer, root):
    _, size = check(tokenizer, root)
    exact = C.RecordLimits(size.seq_len, 1, size.question_patches, 1, size.helper_patches)
    check(tokenizer, root, exact)
    for field, reason in [("max_length", C.TOO_LONG), ("max_question_images", C.TOO_MANY_QUESTION_IMAGES),
                          ("max_question_patches", C.TOO_MANY_QUESTION_PATCHES),
                          ("max_segments", C.TOO_MANY_SEGMENTS), ("max_helper_patches", C.TOO_MANY_HELPER_PATCHES)]:
        tight = C.RecordLimits(**{**exact.__dict__, field: getattr(exact, field) - 1})
        with pytest.raises(R.RecordError) as ei:
            check(tokenizer, root, tight)
        assert ei.value.reason == reason


def test_without_tokenizer_patches_only_and_fixed_control_tokens(root):
    _, size = check(None, root, C.RecordLimits(max_length=1))  # no length to check
    assert size.seq_len is None and size.question_patches > 0
    with pytest.raises(R.RecordError, match="control token"):
        check(None, root, text_input="a <|vision_start|>")
