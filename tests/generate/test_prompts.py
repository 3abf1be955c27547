"""Eval prompts are the training sequence's prefix; bad records fail with one clear line."""

from __future__ import annotations

import numpy as np
import pytest
from _gen_data import eval_records

from ilvr_jax.data import processor as proc
from ilvr_jax.data.records import RecordError
from ilvr_jax.data.segments import SequenceFormat, build_sample
from ilvr_jax.generate import latent_token_ids, record_prompt


def test_prompt_is_the_training_prefix(gen_latent, tmp_path):
    s = gen_latent
    for rec in eval_records(tmp_path):
        prompt = record_prompt(rec, s.tokenizer, s.image_cfg, root=tmp_path)
        sample = build_sample(rec, tmp_path, s.tokenizer, s.image_cfg, SequenceFormat(latent_size=3))
        n = len(prompt.input_ids)
        np.testing.assert_array_equal(prompt.input_ids, sample.input_ids[:n])
        # The prefix ends with the assistant turn's header; its "\n" is the first label.
        assert s.tokenizer.decode(prompt.input_ids.tolist()).endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert (sample.labels[:n - 1] == -100).all() and sample.labels[n - 1] == prompt.input_ids[-1]
        np.testing.assert_array_equal(prompt.pixel_values, sample.pixel_values)
        np.testing.assert_array_equal(prompt.image_grid_thw, sample.image_grid_thw)
    # Placeholders put the images inside the text, as in training.
    placed = record_prompt(eval_records(tmp_path)[1], s.tokenizer, s.image_cfg, root=tmp_path)
    text = s.tokenizer.decode(placed.input_ids.tolist())
    assert "look at <|vision_start|>" in text and "<|vision_end|> and then at <|vision_start|>" in text


@pytest.mark.parametrize("mutate,reason", [
    (lambda r: r.pop("text_input"), "missing_key"),
    (lambda r: r.update(text_input=3), "wrong_type"),
    (lambda r: r.update(image_input="a.png"), "wrong_type"),
    (lambda r: r.update(text_input="one <image> only"), "image_placeholders"),
    (lambda r: r.update(text_input="say <|im_end|>"), "special_token_in_text"),
    (lambda r: r.update(image_input=["missing.png"]), "unreadable_image"),
])
def test_bad_records_name_the_record(gen_latent, tmp_path, mutate, reason):
    rec = eval_records(tmp_path)[0]
    mutate(rec)
    with pytest.raises(RecordError) as e:
        record_prompt(rec, gen_latent.tokenizer, gen_latent.image_cfg, root=tmp_path, where="eval.jsonl:line 4")
    assert e.value.reason == reason
    assert str(e.value).startswith("eval.jsonl:line 4: ") and "\n" not in str(e.value)


def test_latent_token_ids_need_the_latent_tokens(gen_latent):
    from ilvr_jax import tiny

    s = gen_latent
    assert latent_token_ids(s.tokenizer) == (s.cfg.latent_pad_token_id, s.cfg.latent_start_token_id,
                                              s.cfg.latent_end_token_id)
    with pytest.raises(ValueError, match="latent_pad"):
        latent_token_ids(tiny.build_tokenizer(latent_tokens=False))
    assert proc.special_token_id(s.tokenizer, "<|im_end|>") == s.tokenizer.eos_token_id
