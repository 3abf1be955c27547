"""Adding the ILVR latent tokens: ids recorded; the embedding / head resized to exactly
``len(tokenizer)`` rows as HF ``resize_token_embeddings(len(tokenizer))`` does (the ILVR
reference), or kept padded and grown only when needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ilvr_jax.checkpoint.hf import load_hf_params, save_hf
from ilvr_jax.checkpoint.latent_tokens import add_latent_tokens
from ilvr_jax.model.config import LATENT_TOKENS
from ilvr_jax.tiny import build_tokenizer

SHAPES = ["untied_gqa2", "tied_mqa"]


def _clear_latent_ids(cfg):
    return cfg.replace(latent_pad_token_id=None, latent_start_token_id=None, latent_end_token_id=None,
                       latent_size=None)


def _hf_model(src):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()


def _hf_tables(model):
    """(embedding [V, D], head weight [V, D]) of a torch model as numpy."""
    emb = model.get_input_embeddings().weight.detach().numpy()
    head = model.get_output_embeddings().weight.detach().numpy()
    return emb, head


def _ours_tables(params, cfg):
    """(embedding [V, D], head [V, D]) of our tree; the head is the embedding when tied."""
    emb = np.asarray(params["text"]["embed_tokens"]["embedding"])
    head = emb if cfg.text.tie_word_embeddings else np.asarray(params["lm_head"]["kernel"]).T
    return emb, head


def _text_logits(params, cfg, ids):
    import jax.numpy as jnp

    from ilvr_jax.model import qwen25vl

    ids = jnp.asarray(ids, jnp.int32)
    out = qwen25vl.forward(params, cfg, ids, jnp.ones_like(ids))
    return np.asarray(out.logits)


def _check_ids(tok, cfg):
    ids = tuple(tok.convert_tokens_to_ids(t) for t in LATENT_TOKENS)
    assert (cfg.latent_pad_token_id, cfg.latent_start_token_id, cfg.latent_end_token_id) == ids
    assert cfg.to_hf_dict()["latent_end_token_id"] == ids[2]
    return ids


@pytest.mark.parametrize("shape", SHAPES)
def test_exact_shrinks_a_padded_table_like_hf_resize(tiny_dirs, shape):
    src = tiny_dirs(shape)  # a padded table: 512 rows
    cfg, params = load_hf_params(src)
    cfg = _clear_latent_ids(cfg)
    v_old = cfg.text.vocab_size
    tok = build_tokenizer(latent_tokens=False)
    tok, new, new_cfg = add_latent_tokens(tok, params, cfg, latent_size=6)
    n = len(tok)
    assert n < v_old  # the case under test: the table shrinks
    ids = _check_ids(tok, new_cfg)
    assert ids == (n - 3, n - 2, n - 1) and new_cfg.latent_size == 6
    assert new_cfg.text.vocab_size == n

    emb, head = _ours_tables(params, cfg)
    new_emb, new_head = _ours_tables(new, new_cfg)
    assert new_emb.shape == (n, cfg.text.hidden_size) and new_emb.dtype == emb.dtype
    np.testing.assert_array_equal(new_emb, emb[:n])  # the first n rows, bit for bit
    np.testing.assert_array_equal(new_head, head[:n])
    # An owned copy: holding the result does not keep the full padded table alive.
    assert not np.shares_memory(new["text"]["embed_tokens"]["embedding"], params["text"]["embed_tokens"]["embedding"])
    assert params["text"]["embed_tokens"]["embedding"].shape[0] == v_old  # input not mutated
    if cfg.text.tie_word_embeddings:
        assert "lm_head" not in new
    else:
        assert new["lm_head"]["kernel"].flags["C_CONTIGUOUS"]
        assert not np.shares_memory(new["lm_head"]["kernel"], params["lm_head"]["kernel"])
    assert new["text"]["layers"] is params["text"]["layers"]  # the rest is shared, not copied

    # Our model's logits are the unshrunk model's, restricted to the kept classes.
    x = np.array([[5, 17, 90, 300, ids[1], ids[0], ids[2], 7]])
    full = _text_logits(params, cfg.replace(latent_pad_token_id=ids[0], latent_start_token_id=ids[1],
                                            latent_end_token_id=ids[2]), x)
    shrunk = _text_logits(new, new_cfg, x)
    assert full.shape[-1] == v_old and shrunk.shape[-1] == n
    np.testing.assert_allclose(shrunk, full[..., :n], rtol=1e-6, atol=1e-6)

    # The same tables as HF's resize_token_embeddings(len(tokenizer)) on the torch model.
    model = _hf_model(src)
    model.resize_token_embeddings(n)
    hf_emb, hf_head = _hf_tables(model)
    assert model.config.get_text_config().vocab_size == n
    np.testing.assert_array_equal(new_emb, hf_emb)
    np.testing.assert_array_equal(new_head, hf_head)


def test_exact_with_pad_to_multiple_of_matches_hf(tiny_dir):
    cfg, params = load_hf_params(tiny_dir)
    tok = build_tokenizer(latent_tokens=True)
    n = len(tok)
    _, new, new_cfg = add_latent_tokens(tok, params, _clear_latent_ids(cfg), pad_to_multiple_of=64)
    rows = -(-n // 64) * 64
    assert len(tok) == n and rows < cfg.text.vocab_size and new_cfg.text.vocab_size == rows
    model = _hf_model(tiny_dir)
    model.resize_token_embeddings(n, pad_to_multiple_of=64)
    hf_emb, hf_head = _hf_tables(model)
    new_emb, new_head = _ours_tables(new, new_cfg)
    assert new_emb.shape == hf_emb.shape == (rows, cfg.text.hidden_size)
    np.testing.assert_array_equal(new_emb, hf_emb)
    np.testing.assert_array_equal(new_head, hf_head)


@pytest.mark.parametrize("resize", ["exact", "grow_only"])
@pytest.mark.parametrize("shape", SHAPES)
def test_rows_grow_when_the_ids_fall_outside_the_table(tiny_dirs, shape, resize, tmp_path):
    tok = build_tokenizer(latent_tokens=False)
    n_tok = len(tok)
    src = tiny_dirs(shape, vocab_size=n_tok)  # no spare rows
    cfg, params = load_hf_params(src)
    cfg = _clear_latent_ids(cfg)
    assert cfg.text.vocab_size == n_tok
    emb, head = (a.copy() for a in _ours_tables(params, cfg))

    tok, new, new_cfg = add_latent_tokens(tok, params, cfg, latent_size=6, resize=resize)
    ids = _check_ids(tok, new_cfg)
    assert ids == (n_tok, n_tok + 1, n_tok + 2)
    assert new_cfg.latent_size == 6
    v_new = n_tok + 3
    assert new_cfg.text.vocab_size == v_new == len(tok)
    # Each latent token is one special token, kept whole by the tokenizer.
    enc = tok.encode("a<|latent_start|><|latent_pad|><|latent_end|>", add_special_tokens=False)
    assert enc[-3:] == [ids[1], ids[0], ids[2]]
    assert all(t in tok.all_special_tokens for t in LATENT_TOKENS)

    new_emb, new_head = _ours_tables(new, new_cfg)
    assert new_emb.shape == (v_new, cfg.text.hidden_size) and new_emb.dtype == emb.dtype
    np.testing.assert_array_equal(new_emb[:n_tok], emb)
    # Mean rows: float32 accumulation against a float64 reference.
    np.testing.assert_allclose(new_emb[n_tok:], np.broadcast_to(emb.astype(np.float64).mean(0), (3, emb.shape[1])),
                               rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(_ours_tables(params, cfg)[0], emb)  # input not mutated
    if cfg.text.tie_word_embeddings:
        assert "lm_head" not in new
    else:
        assert new["lm_head"]["kernel"].shape == (cfg.text.hidden_size, v_new)
        np.testing.assert_array_equal(new_head[:n_tok], head)
        np.testing.assert_allclose(new_head[n_tok:], np.broadcast_to(head.astype(np.float64).mean(0), (3, head.shape[1])),
                                   rtol=1e-5, atol=1e-8)
    assert new["text"]["layers"] is params["text"]["layers"]

    # HF's resize_token_embeddings(len(tokenizer)): the old rows are ours bit for bit; HF samples
    # the new rows from N(mean, 1e-9 * covariance) of the old rows, so they lie within a few
    # sqrt(1e-9 * variance) of our mean rows.
    torch.manual_seed(0)
    model = _hf_model(src)
    model.resize_token_embeddings(len(tok))
    hf_emb, hf_head = _hf_tables(model)
    assert hf_emb.shape == new_emb.shape and hf_head.shape == new_head.shape
    np.testing.assert_array_equal(hf_emb[:n_tok], new_emb[:n_tok])
    np.testing.assert_array_equal(hf_head[:n_tok], new_head[:n_tok])
    for ours, hf, old in ((new_emb, hf_emb, emb), (new_head, hf_head, head)):
        spread = np.sqrt(1e-9 * old.var(0))
        assert np.all(np.abs(hf[n_tok:] - ours[n_tok:]) <= 10 * spread + 1e-7)

    # The grown model exports and loads in torch; old tokens' logits are unchanged and a new
    # token's logit is the mean of the old ones (head = mean column).
    from transformers import AutoTokenizer

    out = str(tmp_path / "grown")
    save_hf(new, new_cfg, out, tokenizer_dir=src, tokenizer=tok)
    reloaded = _hf_model(out)
    original = _hf_model(src)
    assert reloaded.config.latent_pad_token_id == ids[0]
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(LATENT_TOKENS[1]) == ids[1]
    x = torch.tensor([[5, 17, 90, 300, 7]])
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x), mm_token_type_ids=torch.zeros_like(x))
    with torch.no_grad():
        a = original(**kw).logits
        b = reloaded(**kw).logits
    torch.testing.assert_close(b[..., :n_tok], a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b[..., n_tok], a.mean(-1), rtol=1e-4, atol=1e-5)


def test_grow_only_keeps_the_padded_table(tiny_dir):
    cfg, params = load_hf_params(tiny_dir)
    cfg = _clear_latent_ids(cfg)
    v = cfg.text.vocab_size

    # A tokenizer that already carries the tokens (as ILVR's released tokenizer does).
    tok = build_tokenizer(latent_tokens=True)
    n = len(tok)
    assert n < v
    tok, new, new_cfg = add_latent_tokens(tok, params, cfg, resize="grow_only")
    assert len(tok) == n and new is params
    ids = _check_ids(tok, new_cfg)
    assert new_cfg.text.vocab_size == v and new_cfg.latent_size is None

    # A tokenizer without them: they are added inside the padded table, nothing changes size.
    tok2 = build_tokenizer(latent_tokens=False)
    tok2, new2, cfg2 = add_latent_tokens(tok2, params, cfg, latent_size=8, resize="grow_only",
                                         pad_to_multiple_of=64)
    assert _check_ids(tok2, cfg2) == ids and max(ids) < v
    assert new2 is params and cfg2.text.vocab_size == v and cfg2.latent_size == 8


def test_grow_only_pads_growth_to_a_multiple(tiny_dirs):
    tok = build_tokenizer(latent_tokens=False)
    n_tok = len(tok)
    cfg, params = load_hf_params(tiny_dirs("untied_gqa2", vocab_size=n_tok))
    emb = params["text"]["embed_tokens"]["embedding"]
    tok, new, new_cfg = add_latent_tokens(tok, params, cfg, resize="grow_only", pad_to_multiple_of=64)
    v_new = -(-(n_tok + 3) // 64) * 64
    assert new_cfg.text.vocab_size == v_new > n_tok + 3
    assert new["text"]["embed_tokens"]["embedding"].shape == (v_new, cfg.text.hidden_size)
    assert new["lm_head"]["kernel"].shape == (cfg.text.hidden_size, v_new)
    np.testing.assert_allclose(new["text"]["embed_tokens"]["embedding"][n_tok:],
                               np.broadcast_to(emb.astype(np.float64).mean(0), (v_new - n_tok, emb.shape[1])),
                               rtol=1e-5, atol=1e-8)


def test_exact_is_idempotent_on_a_matching_table(tiny_dirs):
    tok = build_tokenizer(latent_tokens=True)
    cfg, params = load_hf_params(tiny_dirs("untied_gqa2", vocab_size=len(tok)))
    tok, new, new_cfg = add_latent_tokens(tok, params, _clear_latent_ids(cfg))
    assert new is params and new_cfg.text.vocab_size == len(tok)
    _check_ids(tok, new_cfg)


@pytest.mark.parametrize("tokenizer_latent", [False, True])  # grows / shrinks
def test_jax_leaves_stay_jax(tiny_dirs, tokenizer_latent):
    import jax
    import jax.numpy as jnp

    v_table = 414 if not tokenizer_latent else 512
    cfg, params = load_hf_params(tiny_dirs("untied_gqa2", vocab_size=v_table))
    tok = build_tokenizer(latent_tokens=tokenizer_latent)
    jparams = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    _, new, new_cfg = add_latent_tokens(tok, jparams, cfg)
    emb = new["text"]["embed_tokens"]["embedding"]
    assert isinstance(emb, jax.Array) and emb.dtype == jnp.bfloat16
    assert emb.shape[0] == new_cfg.text.vocab_size == new["lm_head"]["kernel"].shape[1] == len(tok)
    np.testing.assert_array_equal(np.asarray(emb[:414].astype(jnp.float32)),
                                  np.asarray(jparams["text"]["embed_tokens"]["embedding"][:414].astype(jnp.float32)))


def test_rejects_bad_arguments_and_mismatched_tokenizers(tiny_dir):
    cfg, params = load_hf_params(tiny_dir)
    with pytest.raises(ValueError, match="resize must be one of"):
        add_latent_tokens(build_tokenizer(), params, cfg, resize="shrink")
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        add_latent_tokens(build_tokenizer(), params, cfg, pad_to_multiple_of=0)
    # A config whose image token lies past the tokenizer: shrinking would drop its row.
    with pytest.raises(ValueError, match="image_token_id"):
        add_latent_tokens(build_tokenizer(), params, cfg.replace(image_token_id=500))
    # grow_only keeps the row, so the same config passes.
    _, _, kept = add_latent_tokens(build_tokenizer(), params, cfg.replace(image_token_id=500), resize="grow_only")
    assert kept.text.vocab_size == cfg.text.vocab_size
