"""Records (JSONL) in, generations out: filler rows, fixed compiled shapes, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _latent_reference import K
from _gen_data import eval_records

from ilvr_jax.data.records import RecordError
from ilvr_jax.generate import generate_jsonl, generate_prompts, record_prompt
from ilvr_jax.generate.generation import decode_config
from ilvr_jax.generate.sampler import compiled


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_generations_equal_prompts_alone_and_reuse_compiled_shapes(gen_latent, tmp_path):
    s = gen_latent
    records = eval_records(tmp_path)
    path = _write_jsonl(tmp_path / "eval.jsonl", records)
    kw = dict(max_new_tokens=20, latent_size=K)
    got = generate_jsonl(s.params, s.cfg, path, s.tokenizer, s.image_cfg, batch_size=2, **kw)
    assert len(got) == 3  # the second batch's filler row is dropped
    pre, loop = compiled(s.cfg, decode_config(s.tokenizer, s.cfg, latent_size=K))
    sizes = (pre._cache_size(), loop._cache_size())
    for rec, g in zip(records, got):
        prompt = record_prompt(rec, s.tokenizer, s.image_cfg, root=tmp_path)
        (alone,) = generate_prompts(s.params, s.cfg, [prompt], s.tokenizer, batch_size=2, **kw)
        np.testing.assert_array_equal(g.token_ids, alone.token_ids)
        scale = max(1.0, float(np.abs(alone.latents).max(initial=0)))
        np.testing.assert_allclose(g.latents, alone.latents, rtol=0, atol=1e-5 * scale)
        assert g.text == s.tokenizer.decode(g.token_ids.tolist())
        assert len(g.token_ids) == 20 or g.stopped
    # Prompts of other lengths and image counts within the same buckets: no new compilation.
    assert (pre._cache_size(), loop._cache_size()) == sizes
    plain = generate_jsonl(s.params, s.cfg, path, s.tokenizer, s.image_cfg, batch_size=2, skip_special_tokens=True,
                           **kw)
    assert plain[0].text == s.tokenizer.decode(got[0].token_ids.tolist(), skip_special_tokens=True)


def test_bad_line_names_file_and_line(gen_latent, tmp_path):
    s = gen_latent
    records = eval_records(tmp_path)
    records[1]["image_input"] = records[1]["image_input"][:1]  # two <image> placeholders, one image
    path = _write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(RecordError, match=r"bad\.jsonl:line 2 \(id=placed\): .*placeholders"):
        generate_jsonl(s.params, s.cfg, path, s.tokenizer, s.image_cfg, batch_size=2, max_new_tokens=4, latent_size=K)
    path.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(RecordError, match=r"bad\.jsonl:line 2: not valid JSON"):
        generate_jsonl(s.params, s.cfg, path, s.tokenizer, s.image_cfg, max_new_tokens=4, latent_size=K)


def test_latent_size_comes_from_the_config_or_must_be_given(gen_latent):
    s = gen_latent
    assert decode_config(s.tokenizer, s.cfg).latent_size == s.cfg.latent_size
    with pytest.raises(ValueError, match="latent_size"):
        decode_config(s.tokenizer, s.cfg.replace(latent_size=None))
