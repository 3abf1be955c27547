"""Latent diagnostics: the paired bootstrap against a plain NumPy loop, the ablation
functions, and each ablation inside the compiled decode loop changing exactly the fed
vectors it names (checked against a full forward over the finished generation)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilvr_jax.evaluate import diagnostics
from ilvr_jax.evaluate.run import evaluate


def _bootstrap_reference(base, other, n_resamples, seed, level):
    """The textbook paired percentile bootstrap, one resample at a time."""
    base, other = np.asarray(base, float), np.asarray(other, float)
    n = len(base)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    diffs = []
    for r in range(n_resamples):
        acc_o = sum(other[i] for i in idx[r]) / n
        acc_b = sum(base[i] for i in idx[r]) / n
        diffs.append(acc_o - acc_b)
    diffs = sorted(diffs)
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2

    def percentile(q):  # linear interpolation between closest ranks (NumPy's default)
        pos = q * (n_resamples - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, n_resamples - 1)
        return diffs[lo] + (pos - lo) * (diffs[hi] - diffs[lo])

    return other.mean() - base.mean(), percentile(lo_q), percentile(hi_q)


@pytest.mark.parametrize("seed", [0, 7])
def test_paired_bootstrap_matches_a_plain_loop(seed):
    base = [1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 1]
    other = [1, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0, 1, 0, 0]
    got = diagnostics.paired_bootstrap(base, other, n_resamples=500, seed=seed, level=0.9)
    diff, lo, hi = _bootstrap_reference(base, other, 500, seed, 0.9)
    assert got["diff"] == pytest.approx(diff, abs=1e-12) == pytest.approx(-0.3)
    assert got["low"] == pytest.approx(lo, abs=1e-12)
    assert got["high"] == pytest.approx(hi, abs=1e-12)
    assert got["low"] < got["diff"] < got["high"] < 0  # every resample of this pair loses accuracy
    assert got["n"] == 20 and got["n_resamples"] == 500


def test_paired_bootstrap_edge_cases():
    same = diagnostics.paired_bootstrap([1, 0, 1], [1, 0, 1], n_resamples=50)
    assert (same["diff"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    flip = diagnostics.paired_bootstrap([0, 0, 0, 0], [1, 1, 1, 1], n_resamples=50)
    assert (flip["diff"], flip["low"], flip["high"]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="equal length"):
        diagnostics.paired_bootstrap([1, 0], [1])


def test_parse_ablations():
    assert diagnostics.parse_ablations("zeros, noise,zeros") == ("zeros", "noise")
    assert diagnostics.parse_ablations("") == ()
    with pytest.raises(ValueError, match="unknown latent ablation 'zero'"):
        diagnostics.parse_ablations("zero")
    with pytest.raises(ValueError, match="always made"):
        diagnostics.parse_ablations("normal")


def test_ablation_functions():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(3, 16)) * np.asarray([[1.0], [5.0], [0.1]]), jnp.float32)
    pad = jnp.arange(16, dtype=jnp.float32)
    assert not np.any(np.asarray(diagnostics.ablate_fed_latents("zeros", h)))
    np.testing.assert_array_equal(diagnostics.ablate_fed_latents("pad", h, pad_embedding=pad), np.tile(pad, (3, 1)))
    np.testing.assert_array_equal(diagnostics.ablate_fed_latents("none", h), h)
    key = jax.random.PRNGKey(3)
    n1 = np.asarray(diagnostics.ablate_fed_latents("noise", h, key=key))
    np.testing.assert_allclose(np.linalg.norm(n1, axis=-1), np.linalg.norm(h, axis=-1), rtol=1e-5)
    np.testing.assert_array_equal(n1, diagnostics.ablate_fed_latents("noise", h, key=key))  # seeded
    assert not np.allclose(n1, diagnostics.ablate_fed_latents("noise", h, key=jax.random.PRNGKey(4)))
    cos = np.sum(n1 * np.asarray(h), -1) / (np.linalg.norm(n1, axis=-1) * np.linalg.norm(h, axis=-1))
    assert np.all(np.abs(cos) < 0.9)
    donors = rng.normal(size=(3, 4, 16)).astype(np.float32)
    counts = np.asarray([3, 0, 4], np.int32)
    idx = np.asarray([4, 1, 2], np.int32)
    got = np.asarray(diagnostics.ablate_fed_latents("shuffle", h, donor_latents=donors, donor_counts=counts,
                                                    latent_index=idx))
    np.testing.assert_array_equal(got[0], donors[0, 4 % 3])  # cycles over the donor's latents
    np.testing.assert_array_equal(got[1], 0)                 # a donor without latents gives zeros
    np.testing.assert_array_equal(got[2], donors[2, 2])
    np.testing.assert_array_equal(diagnostics.shuffle_donors(3), [1, 2, 0])


SEQ = 512  # the full-forward reference runs right-padded to one length (one compilation)


def _fed_and_replaced(s, item, gen):
    """(the vectors fed at the pads of a generation, the final-norm hidden state each one
    replaced), the latter from one full forward over prompt + generated tokens with the
    recorded vectors at the pads."""
    from ilvr_jax.generate import record_prompt
    from ilvr_jax.model import qwen25vl

    p = record_prompt(item.record, s.tokenizer, s.image_cfg, root=item.root)
    seq = np.concatenate([p.input_ids, gen.token_ids])
    assert len(seq) <= SEQ
    ids = np.zeros((1, SEQ), np.int32)
    ids[0, : len(seq)] = seq
    mask = (np.arange(SEQ) < len(seq)).astype(np.int32)[None]
    pv = np.zeros((1, max(4, p.pixel_values.shape[0]), p.pixel_values.shape[1]), np.float32)
    pv[0, : p.pixel_values.shape[0]] = p.pixel_values
    at = len(p.input_ids) + gen.latent_positions
    hidden = _reference_hidden(s.params, s.cfg, ids, mask, pv, p.image_grid_thw[None], at, gen.latents)
    return gen.latents, np.asarray(hidden[0, at - 1])


@functools.partial(jax.jit, static_argnums=1)
def _reference_hidden(params, cfg, ids, mask, pv, grid, at, fed):
    from ilvr_jax.model import qwen25vl

    emb = qwen25vl.embed_tokens(params, ids)
    emb = qwen25vl.merge_image_features(emb, ids, qwen25vl.image_features(params, cfg, pv, grid), cfg)
    emb = emb.at[0, at].set(fed)
    return qwen25vl.forward(params, cfg, ids, mask, None, grid, inputs_embeds=emb, return_logits=False).hidden


@pytest.fixture(scope="module")
def ablation_runs(eval_setup, monkeypatch_module):
    """Every mode on the six records in batches of 4 (a full batch and a short one), with the
    generations kept next to their rows."""
    from ilvr_jax.evaluate import run as run_lib

    kept = {}
    real_row = run_lib._sample_row

    def keep(item, mode, prompt_text, gen, scorer, cfg, extra=None):
        row = real_row(item, mode, prompt_text, gen, scorer, cfg, extra)
        kept[(item.id, mode)] = gen
        return row

    monkeypatch_module.setattr(run_lib, "_sample_row", keep)
    s = eval_setup
    summary = evaluate(s.params, s.cfg, s.tokenizer, s.image_cfg, s.records, "maze", batch_size=4,
                       max_new_tokens=16, ablations="zeros,pad,shuffle,noise", seed=3, progress=False)
    return s, summary, kept


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_ablations_replace_the_fed_vectors(ablation_runs):
    s, summary, kept = ablation_runs
    K = s.latent_size
    ids = [r.record["id"] for r in s.records]
    assert set(summary["modes"]) == {"normal", "zeros", "pad", "shuffle", "noise"}
    normal = {i: kept[(i, "normal")] for i in ids}
    assert sum(len(g.latents) for g in normal.values()) >= 2 * K, "the fixture model must open latent spans"
    pad = np.asarray(s.params["text"]["embed_tokens"]["embedding"][s.cfg.latent_pad_token_id])
    for i in ids:
        z, p = kept[(i, "zeros")], kept[(i, "pad")]
        assert not np.any(z.latents)
        np.testing.assert_array_equal(p.latents, np.tile(pad, (len(p.latents), 1)))
        for g in (z, p, kept[(i, "noise")], kept[(i, "shuffle")]):
            assert len(g.latents) == K * g.num_latent_spans or not g.stopped or len(g.latents) % K
    # The first fed vector of a row is computed before any ablated input: same trajectory.
    some = [i for i in ids if len(normal[i].latents)]
    assert some
    for i in some:
        n = kept[(i, "noise")]
        if len(n.latents):
            assert np.linalg.norm(n.latents[0]) == pytest.approx(np.linalg.norm(normal[i].latents[0]), rel=1e-4)


def test_noise_keeps_the_norm_of_each_vector_it_replaces(ablation_runs):
    s, _, kept = ablation_runs
    checked = 0
    for r in s.records:
        gen = kept[(r.record["id"], "noise")]
        if not len(gen.latents):
            continue
        fed, replaced = _fed_and_replaced(s, r, gen)
        np.testing.assert_allclose(np.linalg.norm(fed, axis=-1), np.linalg.norm(replaced, axis=-1), rtol=1e-3)
        cos = np.sum(fed * replaced, -1) / (np.linalg.norm(fed, axis=-1) * np.linalg.norm(replaced, axis=-1))
        assert np.all(np.abs(cos) < 0.5)  # a random direction in D dims, not the hidden state
        checked += len(fed)
    assert checked >= s.latent_size


def test_shuffle_feeds_the_donor_rows_normal_latents(ablation_runs):
    s, _, kept = ablation_runs
    ids = [r.record["id"] for r in s.records]
    batches = [ids[:4], ids[4:]]  # batch_size 4: rows take row (r + 1) mod n of their batch
    checked = 0
    for batch in batches:
        for r, i in enumerate(batch):
            donor = kept[(batch[(r + 1) % len(batch)], "normal")].latents
            fed = kept[(i, "shuffle")].latents
            for j, v in enumerate(fed):
                want = donor[j % len(donor)] if len(donor) else np.zeros_like(v)
                np.testing.assert_allclose(v, want, rtol=0, atol=1e-6)
                checked += 1
    assert checked >= s.latent_size


def test_shuffle_with_one_row_per_batch_takes_a_neighbouring_batch(eval_setup, monkeypatch, tmp_path):
    from ilvr_jax.evaluate import run as run_lib

    kept = {}
    real_row = run_lib._sample_row

    def keep(item, mode, prompt_text, gen, scorer, cfg, extra=None):
        kept[(item.id, mode)] = gen
        return real_row(item, mode, prompt_text, gen, scorer, cfg, extra)

    monkeypatch.setattr(run_lib, "_sample_row", keep)
    s = eval_setup
    recs = s.records[:3]
    ids = [r.record["id"] for r in recs]
    evaluate(s.params, s.cfg, s.tokenizer, s.image_cfg, recs, "maze", batch_size=1, max_new_tokens=16,
             ablations="shuffle", progress=False, out_dir=str(tmp_path))
    donors = {ids[0]: ids[1], ids[1]: ids[0], ids[2]: ids[1]}  # the first takes the next batch's row
    rows = run_lib.read_samples(str(tmp_path / run_lib.SAMPLES_FILE))
    assert {r["id"]: r["donor"] for r in rows if r["mode"] == "shuffle"} == donors
    checked = 0
    for i, d in donors.items():
        donor = kept[(d, "normal")].latents
        for j, v in enumerate(kept[(i, "shuffle")].latents):
            np.testing.assert_allclose(v, donor[j % len(donor)], rtol=0, atol=1e-6)
            checked += 1
    assert checked >= s.latent_size
