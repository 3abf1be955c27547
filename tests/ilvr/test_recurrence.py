"""Stage-2 KV-cached latent recurrence == the naive per-latent prefix recompute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilvr_jax import tiny
from ilvr_jax.ilvr import recurrence
from ilvr_jax.model import qwen25vl, text
from ilvr_jax.model.config import ModelConfig

K = 3
S = 40


@pytest.fixture(scope="module")
def setup():
    tok = tiny.build_tokenizer()
    cfg = ModelConfig.from_hf(tiny.hf_config(tok, "untied_gqa2"))
    params = qwen25vl.init_params(cfg, jax.random.PRNGKey(0))
    # Larger weights than the init so the recurrence visibly changes the output.
    params = jax.tree.map(lambda x: x * 2.0 if x.ndim >= 2 else x, params)
    b = 3
    rng = np.random.default_rng(0)
    embeds = jnp.asarray(rng.normal(size=(b, S, cfg.text.hidden_size)).astype(np.float32))
    attention_mask = np.ones((b, S), np.int32)
    attention_mask[1, :5] = 0            # left padding
    attention_mask[2, 33:] = 0           # right padding
    # Segments: row 0 has 3, row 1 has 1, row 2 has 2 (different positions per row).
    latent_starts = np.array([[6, 15, 27], [12, 0, 0], [4, 10, 0]], np.int32)
    segment_mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], bool)
    pos = np.cumsum(attention_mask, axis=1) - 1
    pos = np.where(attention_mask == 1, pos, 1)
    position_ids = jnp.asarray(np.broadcast_to(pos[None], (3, b, S)).copy())
    return cfg, params, embeds, jnp.asarray(attention_mask), position_ids, jnp.asarray(latent_starts), \
        jnp.asarray(segment_mask)


def naive_recurrence(params_text, cfg, embeds, attention_mask, position_ids, latent_starts, segment_mask, K):
    """The reference's way: for every latent pad, left to right, recompute the whole
    sequence and feed the hidden state at the previous position into the pad."""
    e = embeds
    b = e.shape[0]
    ls = np.asarray(latent_starts)
    sm = np.asarray(segment_mask)
    order = sorted({(m, k) for r in range(b) for m in range(ls.shape[1]) if sm[r, m] for k in range(K)})
    for m, k in order:
        h, _ = text.decoder_forward(params_text, cfg, e, position_ids, attention_mask)
        for r in range(b):
            if sm[r, m]:
                p = int(ls[r, m]) + 1 + k
                e = e.at[r, p].set(h[r, p - 1])
    h, _ = text.decoder_forward(params_text, cfg, e, position_ids, attention_mask)
    return h


@pytest.mark.parametrize("chunk_len", [None, 26, (13, 24)])
def test_chunked_recurrence_equals_naive(setup, chunk_len):
    cfg, params, embeds, am, pos, ls, sm = setup
    tc = cfg.text
    fast = jax.jit(lambda p, e: recurrence.latent_recurrence_forward(
        p, tc, e, am, pos, ls, sm, K, chunk_len=chunk_len))(params["text"], embeds)
    slow = jax.jit(lambda p, e: naive_recurrence(p, tc, e, am, pos, ls, sm, K))(params["text"], embeds)
    valid = np.asarray(am).astype(bool)
    diff = np.abs(np.asarray(fast) - np.asarray(slow))[valid]
    scale = np.abs(np.asarray(slow))[valid].max()
    assert diff.max() <= 1e-5 * scale, diff.max()
    # The recurrence matters: feeding the plain embeddings gives different states.
    plain, _ = text.decoder_forward(params["text"], tc, embeds, pos, am)
    assert np.abs(np.asarray(plain) - np.asarray(slow))[valid].max() > 1e-2 * scale


def test_chunked_recurrence_gradients_equal_naive(setup):
    cfg, params, embeds, am, pos, ls, sm = setup
    tc = cfg.text
    w = jax.random.normal(jax.random.PRNGKey(1), embeds.shape)
    valid = am.astype(jnp.float32)[..., None]

    def loss(fn, p, e):
        return jnp.sum(fn(p, e) * w * valid)

    fast = lambda p, e: recurrence.latent_recurrence_forward(p, tc, e, am, pos, ls, sm, K, chunk_len=26)
    slow = lambda p, e: naive_recurrence(p, tc, e, am, pos, ls, sm, K)
    g_fast = jax.jit(jax.grad(lambda p, e: loss(fast, p, e), argnums=(0, 1)))(params["text"], embeds)
    g_slow = jax.jit(jax.grad(lambda p, e: loss(slow, p, e), argnums=(0, 1)))(params["text"], embeds)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_slow)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * max(np.abs(b).max(), 1e-6), np.abs(a - b).max()


def test_unrolled_latent_steps_equal_the_naive_recurrence(setup):
    """``unroll=True`` inlines the loops (fewer while loops in the program) with the same
    states; unrolling is a property of ``lax.scan`` that autodiff goes through unchanged,
    so the looped program's gradient test above stands for it (its unrolled backward
    compiles for a minute)."""
    cfg, params, embeds, am, pos, ls, sm = setup
    tc = cfg.text
    fast = lambda p, e: recurrence.latent_recurrence_forward(p, tc, e, am, pos, ls, sm, K, chunk_len=(13, 24),
                                                             unroll=True)
    slow = lambda p, e: naive_recurrence(p, tc, e, am, pos, ls, sm, K)
    h_fast, h_slow = jax.jit(fast)(params["text"], embeds), jax.jit(slow)(params["text"], embeds)
    mask = np.asarray(am).astype(bool)
    scale = np.abs(np.asarray(h_slow))[mask].max()
    assert np.abs(np.asarray(h_fast) - np.asarray(h_slow))[mask].max() <= 1e-5 * scale
    looped = lambda p, e: recurrence.latent_recurrence_forward(p, tc, e, am, pos, ls, sm, K, chunk_len=(13, 24))
    count = lambda fn: jax.jit(fn).lower(params["text"], embeds).as_text().count("stablehlo.while")
    assert count(fast) < count(looped)


def test_chunk_bounds_and_max_chunk_length(setup):
    _, _, _, am, _, ls, sm = setup
    starts, ends = recurrence.chunk_bounds(ls, sm, K, S)
    np.testing.assert_array_equal(np.asarray(starts), [[0, 10, 19, 31], [0, 16, S, S], [0, 8, 14, S]])
    np.testing.assert_array_equal(np.asarray(ends), [[7, 16, 28, S], [13, S, S, S], [5, 11, S, S]])
    assert recurrence.max_chunk_length(np.asarray(ls), np.asarray(sm), K, S) == 26
    # Row 2 is right-padded from 33 on: its last chunk ends at its last real token.
    starts, ends = recurrence.chunk_bounds(ls, sm, K, S, am)
    np.testing.assert_array_equal(np.asarray(starts), [[0, 10, 19, 31], [0, 16, S, S], [0, 8, 14, 33]])
    np.testing.assert_array_equal(np.asarray(ends), [[7, 16, 28, S], [13, S, S, S], [5, 11, 33, 33]])
    assert recurrence.max_chunk_length(np.asarray(ls), np.asarray(sm), K, S, np.asarray(am)) == 24


def test_chunk_len_below_one_is_rejected_and_wider_is_cut_to_the_sequence(setup):
    cfg, params, embeds, am, pos, ls, sm = setup
    for bad in (0, (S, 0)):
        with pytest.raises(ValueError, match="chunk_len"):
            recurrence.latent_recurrence_forward(params["text"], cfg.text, embeds, am, pos, ls, sm, K,
                                                 chunk_len=bad)
    # One window for the whole run may exceed a short bucket's length: it means the sequence.
    assert recurrence.chunk_windows((None, S + 40), 3, S) == (S, S, S)
    assert recurrence.chunk_windows((S + 1, 16), 3, S) == (S, 16, 16)


def test_check_chunk_len_names_the_sample(setup):
    _, _, _, am, _, ls, sm = setup
    recurrence.check_chunk_len(np.asarray(ls), np.asarray(sm), K, S, 26)
    recurrence.check_chunk_len(np.asarray(ls), np.asarray(sm), K, S, None)
    recurrence.check_chunk_len(np.asarray(ls), np.asarray(sm), K, S, (13, 26))
    recurrence.check_chunk_len(np.asarray(ls), np.asarray(sm), K, S, (13, 24), np.asarray(am))
    with pytest.raises(ValueError, match="sample 2: text chunk 2 has 26 tokens"):
        recurrence.check_chunk_len(np.asarray(ls), np.asarray(sm), K, S, 25)
    with pytest.raises(ValueError, match="sample 1: text chunk 1 has 24 tokens"):
        recurrence.check_chunk_len(np.asarray(ls), np.asarray(sm), K, S, (13, 23), np.asarray(am))
    with pytest.raises(ValueError, match="sample 1: text chunk 0 has 13 tokens"):
        recurrence.check_chunk_len(np.asarray(ls), np.asarray(sm), K, S, (12, 26))
