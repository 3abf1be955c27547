"""Adding the ILVR latent tokens: ids recorded, embedding / head rows grown only when needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ilvr_jax.checkpoint.hf import load_hf_params, save_hf
from ilvr_jax.checkpoint.latent_tokens import add_latent_tokens
from ilvr_jax.model.config import LATENT_TOKENS
from ilvr_jax.tiny import build_tokenizer


def _clear_latent_ids(cfg):
    return cfg.replace(latent_pad_token_id=None, latent_start_token_id=None, latent_end_token_id=None,
                       latent_size=None)


@pytest.mark.parametrize("shape", ["untied_gqa2", "tied_mqa"])
def test_rows_grow_when_the_ids_fall_outside_the_table(tiny_dirs, shape, tmp_path):
    tok = build_tokenizer(latent_tokens=False)
    n_tok = len(tok)
    src = tiny_dirs(shape, vocab_size=n_tok)  # no spare rows
    cfg, params = load_hf_params(src)
    cfg = _clear_latent_ids(cfg)
    assert cfg.text.vocab_size == n_tok
    emb = params["text"]["embed_tokens"]["embedding"].copy()

    tok, new, new_cfg = add_latent_tokens(tok, params, cfg, latent_size=6)
    ids = [tok.convert_tokens_to_ids(t) for t in LATENT_TOKENS]
    assert ids == [n_tok, n_tok + 1, n_tok + 2]
    assert (new_cfg.latent_pad_token_id, new_cfg.latent_start_token_id, new_cfg.latent_end_token_id) == tuple(ids)
    assert new_cfg.latent_size == 6
    v_new = -(-(n_tok + 3) // 64) * 64
    assert new_cfg.text.vocab_size == v_new and v_new % 64 == 0 and v_new >= n_tok + 3
    # Each latent token is one special token, kept whole by the tokenizer.
    enc = tok.encode("a<|latent_start|><|latent_pad|><|latent_end|>", add_special_tokens=False)
    assert enc[-3:] == [ids[1], ids[0], ids[2]]
    assert all(t in tok.all_special_tokens for t in LATENT_TOKENS)

    got = new["text"]["embed_tokens"]["embedding"]
    assert got.shape == (v_new, cfg.text.hidden_size) and got.dtype == emb.dtype
    np.testing.assert_array_equal(got[:n_tok], emb)
    np.testing.assert_allclose(got[n_tok:], np.broadcast_to(emb.mean(0), (v_new - n_tok, emb.shape[1])), rtol=1e-6)
    np.testing.assert_array_equal(params["text"]["embed_tokens"]["embedding"], emb)  # input not mutated
    if cfg.text.tie_word_embeddings:
        assert "lm_head" not in new
    else:
        head = params["lm_head"]["kernel"]
        new_head = new["lm_head"]["kernel"]
        assert new_head.shape == (cfg.text.hidden_size, v_new)
        np.testing.assert_array_equal(new_head[:, :n_tok], head)
        np.testing.assert_allclose(new_head[:, n_tok:], np.broadcast_to(head.mean(1, keepdims=True), (head.shape[0], v_new - n_tok)), rtol=1e-6)
    assert new["text"]["layers"] is params["text"]["layers"]  # the rest is shared, not copied

    # The grown model exports and loads in torch; old tokens' logits are unchanged and a new
    # token's logit is the mean of the old ones (head = mean column).
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    out = str(tmp_path / "grown")
    save_hf(new, new_cfg, out, tokenizer_dir=src, tokenizer=tok)
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    original = Qwen2_5_VLForConditionalGeneration.from_pretrained(src).eval()
    assert reloaded.config.latent_pad_token_id == ids[0]
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(LATENT_TOKENS[1]) == ids[1]
    x = torch.tensor([[5, 17, 90, 300, 7]])
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x), mm_token_type_ids=torch.zeros_like(x))
    with torch.no_grad():
        a = original(**kw).logits
        b = reloaded(**kw).logits
    torch.testing.assert_close(b[..., :n_tok], a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b[..., n_tok], a.mean(-1), rtol=1e-4, atol=1e-5)


def test_no_growth_when_the_table_has_room(tiny_dir):
    cfg, params = load_hf_params(tiny_dir)
    cfg = _clear_latent_ids(cfg)
    v = cfg.text.vocab_size

    # A tokenizer that already carries the tokens (as ILVR's released tokenizer does).
    tok = build_tokenizer(latent_tokens=True)
    n = len(tok)
    tok, new, new_cfg = add_latent_tokens(tok, params, cfg)
    assert len(tok) == n and new is params
    ids = tuple(tok.convert_tokens_to_ids(t) for t in LATENT_TOKENS)
    assert (new_cfg.latent_pad_token_id, new_cfg.latent_start_token_id, new_cfg.latent_end_token_id) == ids
    assert new_cfg.text.vocab_size == v and new_cfg.latent_size is None

    # A tokenizer without them: they are added inside the padded table, nothing grows.
    tok2 = build_tokenizer(latent_tokens=False)
    tok2, new2, cfg2 = add_latent_tokens(tok2, params, cfg, latent_size=8)
    ids2 = tuple(tok2.convert_tokens_to_ids(t) for t in LATENT_TOKENS)
    assert ids2 == ids and max(ids2) < v
    assert new2 is params and cfg2.text.vocab_size == v and cfg2.latent_size == 8
    assert cfg2.to_hf_dict()["latent_end_token_id"] == ids2[2]


def test_jax_leaves_stay_jax(tiny_dirs):
    import jax
    import jax.numpy as jnp

    tok = build_tokenizer(latent_tokens=False)
    cfg, params = load_hf_params(tiny_dirs("untied_gqa2", vocab_size=len(tok)))
    jparams = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    _, new, new_cfg = add_latent_tokens(tok, jparams, cfg)
    emb = new["text"]["embed_tokens"]["embedding"]
    assert isinstance(emb, jax.Array) and emb.dtype == jnp.bfloat16
    assert emb.shape[0] == new_cfg.text.vocab_size == new["lm_head"]["kernel"].shape[1]
