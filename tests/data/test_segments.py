"""Record -> token ids, labels, latent segments and patches."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ilvr_jax.data import processor as P
from ilvr_jax.data import records as R
from ilvr_jax.data import segments as S
from ilvr_jax.tiny import build_tokenizer

CFG = P.ImageProcessorConfig(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)
K = 3


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def root(tmp_path):
    rng = np.random.RandomState(0)
    for name, (h, w) in {"q1.png": (37, 301), "q2.png": (56, 56), "h1.png": (90, 60), "h2.png": (30, 200)}.items():
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    return tmp_path


def record(**kw):
    rec = R.make_record(
        "Which path reaches the goal? A. up B. down",
        ["q1.png", "q2.png"],
        [R.text_step("look at the map"), R.latent_step("h1.png"), R.text_step(" then move down"),
         R.latent_step("h2.png")],
        "B",
        id="s1",
    )
    rec.update(kw)
    return rec


def enc(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_ids_and_labels_by_hand(tokenizer, root):
    rec = record()
    fmt = S.SequenceFormat(latent_size=K, answer_format="\n{answer}")
    sample = S.build_sample(rec, root, tokenizer, CFG, fmt, where="t")
    ids = S.SpecialIds.from_tokenizer(tokenizer)
    q_grids = [tuple(g) for g in sample.image_grid_thw]

    # The expected token list, piece by piece (every boundary is a special token or a
    # newline/letter split of the pre-tokenizer).
    prompt = P.build_prompt_ids(tokenizer, rec["text_input"], q_grids)
    seg = [ids.latent_start] + [ids.latent_pad] * K + [ids.latent_end]
    expected = (prompt + enc(tokenizer, "look at the map") + seg + enc(tokenizer, " then move down") + seg
                + enc(tokenizer, "\nB") + [ids.im_end] + enc(tokenizer, "\n"))
    assert sample.input_ids.tolist() == expected

    # Labels by hand: the prompt ends with "<|im_start|>assistant\n"; everything before the
    # final "\n" is ignored, every later token is a target except latent pads.
    newline = enc(tokenizer, "\n")
    assert prompt[-len(newline):] == newline
    first_target = len(prompt) - len(newline)
    want = []
    for t, tok in enumerate(expected):
        if t < first_target or tok == ids.latent_pad:
            want.append(-100)
        else:
            want.append(tok)
    assert sample.labels.tolist() == want
    # targets include both segment boundaries, im_end and the trailing newline
    targets = [x for x in want if x != -100]
    assert targets.count(ids.latent_start) == 2 and targets.count(ids.latent_end) == 2
    assert targets[-1 - len(newline)] == ids.im_end and ids.latent_pad not in targets

    # The assistant <|im_start|>, then the role tokens 'assistant' (ignored), then the targets.
    a = sample.assistant_start
    assert expected[a] == ids.im_start and a == len(prompt) - len(enc(tokenizer, "<|im_start|>assistant\n"))
    assert sample.labels[: first_target].max() == -100
    # Latent segments.
    assert sample.latent_starts.tolist() == [i for i, t in enumerate(expected) if t == ids.latent_start]
    for p in sample.latent_starts:
        assert expected[p + 1:p + 1 + K] == [ids.latent_pad] * K and expected[p + K + 1] == ids.latent_end
    assert sample.segment_mask.tolist() == [True, True]
    assert sample.attention_mask.tolist() == [1] * len(expected)


def test_full_text_equals_chat_template(tokenizer, root):
    rec = record()
    fmt = S.SequenceFormat(latent_size=K, answer_format="\n{answer}")
    content = S.assistant_text(rec, fmt)
    assert content == ("look at the map" + S.LATENT_START + S.LATENT_PAD * K + S.LATENT_END + " then move down"
                       + S.LATENT_START + S.LATENT_PAD * K + S.LATENT_END + "\nB")
    msgs = P.user_messages(rec["text_input"], 2) + [{"role": "assistant", "content": content}]
    templ = tokenizer.apply_chat_template(msgs, tokenize=False)
    grids = [P.image_grid_thw(37, 301, CFG), P.image_grid_thw(56, 56, CFG)]
    tok = S.tokenize_record(rec, tokenizer, grids, fmt)
    ref = P.expand_image_pads(enc(tokenizer, templ), tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                              [P.num_image_tokens(g) for g in grids])
    assert tok.input_ids.tolist() == ref


def test_patches_and_grids(tokenizer, root):
    sample = S.build_sample(record(), root, tokenizer, CFG, S.SequenceFormat(latent_size=K))
    q_pv, q_grid = P.preprocess_images([Image.open(root / "q1.png"), Image.open(root / "q2.png")], CFG)
    h_pv, h_grid = P.preprocess_images([Image.open(root / "h1.png"), Image.open(root / "h2.png")], CFG)
    np.testing.assert_array_equal(sample.pixel_values, q_pv)
    np.testing.assert_array_equal(sample.image_grid_thw, q_grid)
    np.testing.assert_array_equal(sample.helper_pixel_values, h_pv)
    np.testing.assert_array_equal(sample.helper_grid_thw, h_grid)
    # helper images are not in the token sequence: image pads count question images only
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (sample.input_ids == pad).sum() == sum(P.num_image_tokens(g) for g in q_grid)
    size = S.measure_record(record(), root, tokenizer, CFG, S.SequenceFormat(latent_size=K))
    later = S.later_chunk_length(sample.latent_starts, K, len(sample.input_ids))
    first = int(sample.latent_starts[0]) + 1
    assert size == S.SampleSize(len(sample.input_ids), 2, len(q_pv), 2, len(h_pv), later, first)


@pytest.mark.parametrize("starts", [[], [7], [3, 20], [3, 15, 40]])
def test_later_chunk_length_is_the_stage2_recurrence_chunks(starts):
    """The longest chunk after the first and the first chunk, as ilvr.recurrence.chunk_bounds
    cuts the sequence."""
    from ilvr_jax.ilvr import recurrence

    seq_len, k = 60, 4
    m = max(len(starts), 1)
    ls = np.zeros((1, m), np.int32)
    seg = np.zeros((1, m), bool)
    ls[0, :len(starts)] = starts
    seg[0, :len(starts)] = True
    lo, hi = recurrence.chunk_bounds(jnp.asarray(ls), jnp.asarray(seg), k, seq_len)
    want = int(np.max(np.asarray(hi - lo)[0, 1:])) if starts else 0
    assert S.later_chunk_length(np.asarray(starts, np.int32), k, seq_len) == want
    assert S.first_chunk_length(np.asarray(starts, np.int32), seq_len) == int(np.asarray(hi - lo)[0, 0])


def test_default_assistant_turn_is_the_plan_alone(tokenizer, root):
    """Reference behaviour: the assistant content is the sequence_plan only; the record's
    original_final_answer is never appended (here "B" would otherwise follow the plan)."""
    rec = record(image_input=[], sequence_plan=[R.latent_step("h1.png"), R.text_step("so the answer is B")])
    fmt = S.SequenceFormat(latent_size=2)
    assert fmt.answer_format is None
    sample = S.build_sample(rec, root, tokenizer, CFG, fmt)
    ids = S.SpecialIds.from_tokenizer(tokenizer)
    tail = [ids.im_start] + enc(tokenizer, "assistant\n") + [ids.latent_start, ids.latent_pad, ids.latent_pad,
                                                              ids.latent_end] + enc(
        tokenizer, "so the answer is B") + [ids.im_end] + enc(tokenizer, "\n")
    assert sample.input_ids[-len(tail):].tolist() == tail
    assert S.assistant_text(rec, fmt) == S.latent_segment_text(2) + "so the answer is B"
    assert sample.pixel_values.shape == (0, CFG.patch_dim) and sample.image_grid_thw.shape == (0, 3)
    fmt2 = S.SequenceFormat(latent_size=2, answer_format=" Answer: {answer}.")
    assert S.assistant_text(rec, fmt2).endswith("so the answer is B Answer: B.")


def test_control_tokens_in_text_rejected(tokenizer, root):
    rec = record(text_input="look <|image_pad|> here")
    with pytest.raises(R.RecordError, match="control token") as ei:
        S.build_sample(rec, root, tokenizer, CFG, S.SequenceFormat(latent_size=K), where="f.jsonl:line 3")
    assert ei.value.reason == S.SPECIAL_IN_TEXT and "f.jsonl:line 3" in str(ei.value)
    rec = record()
    rec["sequence_plan"][0]["content"] = "<|latent_pad|>"
    with pytest.raises(R.RecordError, match=r"sequence_plan\[0\]"):
        S.tokenize_record(rec, tokenizer, [(1, 2, 2), (1, 2, 2)], S.SequenceFormat(latent_size=K))


def test_missing_latent_tokens_clear_error():
    tok = build_tokenizer(latent_tokens=False)
    with pytest.raises(ValueError, match="latent_pad"):
        S.SpecialIds.from_tokenizer(tok)


VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"


def place_input_image(text, image_pad=VISION_BLOCK, image_placeholder="<image>", sep_token="<|im_start|>assistant"):
    """Transcription of the reference's ``place_input_image`` (applied to the images-first
    chat template text): in the part before the assistant turn, drop every vision block and
    put one at each ``<image>``."""
    if sep_token is not None and sep_token in text:
        t1, t2 = text.split(sep_token, 1)
        if image_placeholder in t1:
            t1 = t1.replace(image_pad, "")
            t1 = t1.replace(image_placeholder, image_pad)
        return t1 + sep_token + t2
    if image_placeholder in text:
        text = text.replace(image_pad, "").replace(image_placeholder, image_pad)
    return text


def reference_ids(tokenizer, rec, grids, fmt):
    """The reference's conversation (all question images, then the text), its chat template
    text, its placement, then tokenise and expand the pads in image order."""
    user = [{"type": "image"} for _ in grids] + [{"type": "text", "text": rec["text_input"]}]
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": S.assistant_text(rec, fmt)}]
    text = place_input_image(tokenizer.apply_chat_template(msgs, tokenize=False))
    return P.expand_image_pads(enc(tokenizer, text), tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                               [P.num_image_tokens(g) for g in grids])


@pytest.mark.parametrize("question", [
    "Compare <image> with\n<image> : which is larger?",
    "<image>\n<image>\nWhich is larger?",
    "Left:<image>Right: <image>",
    "  <image> and <image> \n",
])
def test_image_placeholders_place_the_question_images(tokenizer, root, question):
    rec = record(text_input=question)
    fmt = S.SequenceFormat(latent_size=K)
    sample = S.build_sample(rec, root, tokenizer, CFG, fmt, where="t")
    grids = [tuple(int(v) for v in g) for g in sample.image_grid_thw]
    ids = S.SpecialIds.from_tokenizer(tokenizer)
    counts = [P.num_image_tokens(g) for g in grids]
    assert counts[0] != counts[1]  # the two images are told apart by their pad counts

    # By hand: each placeholder replaced by one vision block, nothing else changed.
    a, b, c = question.split("<image>")
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            + a + VISION_BLOCK + b + VISION_BLOCK + c + "<|im_end|>\n<|im_start|>assistant\n"
            + S.assistant_text(rec, fmt) + "<|im_end|>\n")
    want = P.expand_image_pads(enc(tokenizer, text), ids.image_pad, counts)
    assert sample.input_ids.tolist() == want
    # The reference's own placement, transcribed.
    assert sample.input_ids.tolist() == reference_ids(tokenizer, rec, grids, fmt)
    # Image i sits at placeholder i: the first run of pads has image 0's count.
    runs = np.flatnonzero(sample.input_ids == ids.vision_start)
    assert (sample.input_ids[runs[0] + 1:runs[0] + 1 + counts[0]] == ids.image_pad).all()
    assert sample.input_ids[runs[0] + 1 + counts[0]] == ids.vision_end
    # Labels still start after the assistant role; the prompt is ignored.
    assert (sample.labels[: sample.assistant_start + len(ids.assistant_role)] == -100).all()
    # The inference prompt places the images the same way.
    prompt = P.build_prompt_ids(tokenizer, question, grids)
    assert prompt == want[: len(prompt)]
    assert len(prompt) == sample.assistant_start + len(enc(tokenizer, "<|im_start|>assistant\n"))


def test_placeholders_at_the_front_equal_images_first(tokenizer, root):
    fmt = S.SequenceFormat(latent_size=K)
    front = S.build_sample(record(text_input="<image><image>Which is larger?"), root, tokenizer, CFG, fmt)
    plain = S.build_sample(record(text_input="Which is larger?"), root, tokenizer, CFG, fmt)
    assert front.input_ids.tolist() == plain.input_ids.tolist()
    moved = S.build_sample(record(text_input="Which is larger?<image><image>"), root, tokenizer, CFG, fmt)
    assert moved.input_ids.tolist() != plain.input_ids.tolist()
    assert sorted(moved.input_ids.tolist()) == sorted(plain.input_ids.tolist())


@pytest.mark.parametrize("question,images", [
    ("Only one <image> here", ["q1.png", "q2.png"]),
    ("<image> <image> <image>", ["q1.png", "q2.png"]),
    ("No image but <image>", []),
])
def test_image_placeholder_count_mismatch_is_a_record_error(tokenizer, root, question, images):
    rec = record(text_input=question, image_input=images)
    with pytest.raises(R.RecordError, match="placeholders") as ei:
        S.build_sample(rec, root, tokenizer, CFG, S.SequenceFormat(latent_size=K), where="f.jsonl:line 7")
    assert ei.value.reason == R.IMAGE_PLACEHOLDERS and "f.jsonl:line 7" in str(ei.value)
    with pytest.raises(R.RecordError) as ei:
        R.validate_record(rec, root, where="f.jsonl:line 7")
    assert ei.value.reason == R.IMAGE_PLACEHOLDERS and "f.jsonl:line 7" in str(ei.value)
    with pytest.raises(ValueError, match="placeholders"):
        P.user_messages(question, len(images))


def test_image_placeholder_in_the_plan_stays_text(tokenizer, root):
    """Only the user turn's placeholders are replaced (the reference splits at the assistant turn)."""
    rec = record()
    rec["sequence_plan"][0]["content"] = "see <image> here"
    sample = S.build_sample(rec, root, tokenizer, CFG, S.SequenceFormat(latent_size=K))
    want = reference_ids(tokenizer, rec, [tuple(g) for g in sample.image_grid_thw], S.SequenceFormat(latent_size=K))
    assert sample.input_ids.tolist() == want
    a = sample.assistant_start
    assert tokenizer.decode(sample.input_ids[a:]).count("<image>") == 1
