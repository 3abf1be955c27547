"""The compiled decode loop against HF's greedy generate (text) and against a naive
no-cache latent-mode decoder (tokens and fed latents), batched against one-by-one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _latent_reference import K, naive_generate

from ilvr_jax.generate import DecodeConfig, decode_config, generate_batch, generate_prompts, pad_prompts, unpack
from ilvr_jax.generate.sampler import compiled
from ilvr_jax.generate.sampling import SamplingParams
from ilvr_jax.ilvr.latent_decoding import LatentIds

N_TEXT = 24
N_LATENT = 40


def _hf_inputs(setup):
    """The prompts as HF takes them: left-padded ids, mask, mm_token_type_ids, pixels, grids."""
    s = max(len(p.input_ids) for p in setup.prompts)
    pad = setup.tokenizer.pad_token_id
    ids = np.full((len(setup.prompts), s), pad, np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(setup.prompts):
        ids[i, s - len(p.input_ids):] = p.input_ids
        mask[i, s - len(p.input_ids):] = 1
    return dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                mm_token_type_ids=torch.from_numpy((ids == setup.cfg.image_token_id).astype(np.int64)),
                pixel_values=torch.from_numpy(np.concatenate([p.pixel_values for p in setup.prompts])),
                image_grid_thw=torch.from_numpy(
                    np.concatenate([p.image_grid_thw for p in setup.prompts]).astype(np.int64)))


def _hf_generate(model, setup, eos_ids):
    inputs = _hf_inputs(setup)
    model.model.rope_deltas = None
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=N_TEXT, eos_token_id=list(eos_ids),
                             pad_token_id=setup.tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
    new = out[:, inputs["input_ids"].shape[1]:].numpy()
    rows = []
    for r in new:
        stop = [i for i, t in enumerate(r) if t in eos_ids]
        rows.append(r[: stop[0] + 1] if stop else r)
    return rows


def test_greedy_text_equals_hf_generate(gen_text):
    from transformers import Qwen2_5_VLForConditionalGeneration

    s = gen_text
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(s.hf_dir, torch_dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    eos = s.tokenizer.eos_token_id
    free = _hf_generate(model, s, [eos])
    # A second stop token that row 0 emits mid-way ends rows at different steps.
    extra = int(free[0][7])
    stops = [eos, extra]
    want = _hf_generate(model, s, stops)
    lengths = [len(r) for r in want]
    assert min(lengths) < N_TEXT and max(lengths) == N_TEXT, lengths
    assert not any(s.cfg.latent_start_token_id in r for r in want)  # text only: HF has no latent mode
    got = generate_prompts(s.params, s.cfg, s.prompts, s.tokenizer, batch_size=4, max_new_tokens=N_TEXT,
                           latent_size=K, stop_ids=stops)
    for r, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(g.token_ids, w, err_msg=f"row {r}")
        assert g.stopped == (len(w) < N_TEXT or int(w[-1]) in stops)
        assert g.num_latent_spans == 0 and g.latents.shape == (0, s.cfg.text.hidden_size)
        assert g.text == s.tokenizer.decode(w.tolist())


def _latent_ids(cfg):
    return (cfg.latent_pad_token_id, cfg.latent_start_token_id, cfg.latent_end_token_id)


@pytest.mark.parametrize("end_early", [False, True])
def test_latent_mode_equals_naive_decoder(request, end_early):
    s = request.getfixturevalue("gen_latent_early" if end_early else "gen_latent")
    stops = [s.tokenizer.eos_token_id]
    got = generate_prompts(s.params, s.cfg, s.prompts, s.tokenizer, batch_size=4, max_new_tokens=N_LATENT,
                           latent_size=K, latent_end_early=end_early, stop_ids=stops)
    pad, start, end = _latent_ids(s.cfg)
    total = max(len(p.input_ids) for p in s.prompts) + N_LATENT
    n_early = 0
    for r, (p, g) in enumerate(zip(s.prompts, got)):
        tokens, latents, at = naive_generate(s.params, s.cfg, p.input_ids, p.pixel_values, p.image_grid_thw,
                                             latent_size=K, latent_ids=(pad, start, end), max_new_tokens=N_LATENT,
                                             stop_ids=set(stops), end_early=end_early, total_len=total)
        np.testing.assert_array_equal(g.token_ids, tokens, err_msg=f"row {r}")
        np.testing.assert_array_equal(g.latent_positions, at)
        assert g.latents.shape == latents.shape
        scale = float(np.max(np.abs(latents)))
        np.testing.assert_allclose(g.latents, latents, rtol=0, atol=1e-5 * scale, err_msg=f"row {r}")
        # The feedback is really exercised: at least two spans, and consecutive fed vectors differ.
        assert g.num_latent_spans >= 2 and int(np.sum(tokens == start)) == g.num_latent_spans
        assert np.max(np.abs(np.diff(latents, axis=0))) > 1e3 * 1e-5 * scale
        spans = "".join("S" if t == start else "p" if t == pad else "E" if t == end else "." for t in tokens)
        print(f"\nrow {r} (S start, p pad, E end): {spans}; max|latent diff| {np.max(np.abs(g.latents - latents)):.2e}")
        if not end_early:
            assert all(seg.startswith("p" * K + "E") for seg in spans.split("S")[1:-1]), spans
        n_early += spans.count("SE") + spans.count("SpE") + spans.count("SppE")
    if end_early:
        assert n_early >= 2  # early ends happened
    else:
        assert any("E." in "".join("E" if t == end else "." for t in g.token_ids) for g in got)  # text after a span


def test_batch_equals_rows_alone(gen_latent):
    s = gen_latent
    kw = dict(max_new_tokens=N_LATENT, latent_size=K, stop_ids=[s.tokenizer.eos_token_id], min_prompt_len=64,
              min_patches=64, min_images=2)  # one compiled shape for the rows alone
    batched = generate_prompts(s.params, s.cfg, s.prompts, s.tokenizer, batch_size=4, **kw)
    pre, loop = compiled(s.cfg, decode_config(s.tokenizer, s.cfg, latent_size=K))
    for r, p in enumerate(s.prompts):
        (alone,) = generate_prompts(s.params, s.cfg, [p], s.tokenizer, batch_size=1, **kw)
        b = batched[r]
        np.testing.assert_array_equal(b.token_ids, alone.token_ids, err_msg=f"row {r}")
        np.testing.assert_array_equal(b.latent_positions, alone.latent_positions)
        assert b.num_latent_spans == alone.num_latent_spans >= 2
        np.testing.assert_allclose(b.latents, alone.latents, rtol=0, atol=1e-5 * float(np.max(np.abs(alone.latents))))
        if r == 0:
            sizes = (pre._cache_size(), loop._cache_size())
    assert (pre._cache_size(), loop._cache_size()) == sizes  # rows of 0-2 images, one shape


def _decode_config(s, sample):
    pad, start, end = _latent_ids(s.cfg)
    return DecodeConfig(latent_ids=LatentIds(pad, start, end), latent_size=K, pad_id=s.tokenizer.pad_token_id,
                        sample=sample)


def test_per_row_budgets_and_prompt_ending_in_latent_start(gen_latent):
    """Rows stop at their own budgets; a prompt that ends with <|latent_start|> starts in a span."""
    s = gen_latent
    pad, start, end = _latent_ids(s.cfg)
    prompts = [s.prompts[0], s.prompts[1]._replace(input_ids=np.append(s.prompts[1].input_ids, start))]
    batch = pad_prompts(prompts, s.tokenizer.pad_token_id, patch_dim=s.cfg.vision.patch_dim)
    out = generate_batch(s.params, s.cfg, _decode_config(s, False), batch, [5, 11], [s.tokenizer.eos_token_id])
    g0, g1 = unpack(out, 2)
    assert len(g0.token_ids) == 5 and len(g1.token_ids) == 11 and not g0.stopped
    np.testing.assert_array_equal(g1.token_ids[:K + 1], [pad] * K + [end])
    np.testing.assert_array_equal(g1.latent_positions[:K], np.arange(K))
    tokens, latents, at = naive_generate(s.params, s.cfg, prompts[1].input_ids, prompts[1].pixel_values,
                                         prompts[1].image_grid_thw, latent_size=K, latent_ids=(pad, start, end),
                                         max_new_tokens=11, stop_ids=set(), total_len=80, in_span=True)
    np.testing.assert_array_equal(g1.token_ids, tokens)
    np.testing.assert_array_equal(g1.latent_positions, at)
    np.testing.assert_allclose(g1.latents, latents, rtol=0, atol=1e-5 * float(np.max(np.abs(latents))))
    assert int(np.asarray(out.tokens)[0, 5:].max()) == s.tokenizer.pad_token_id  # done rows write padding


def test_sampling_is_seeded_and_limits_to_greedy(gen_text):
    s = gen_text
    kw = dict(batch_size=4, max_new_tokens=16, latent_size=K, stop_ids=[])
    run = lambda **sp: [g.token_ids for g in generate_prompts(s.params, s.cfg, s.prompts, s.tokenizer,  # noqa: E731
                                                              sampling=SamplingParams(**sp), **kw)]
    greedy = run()
    a, b, c = run(temperature=1.0, seed=1), run(temperature=1.0, seed=1), run(temperature=1.0, seed=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))
    assert any(not np.array_equal(x, y) for x, y in zip(a, greedy))
    for limit in (dict(temperature=1e-4, seed=3), dict(temperature=1.0, top_k=1, seed=4),
                  dict(temperature=1.0, top_p=1e-6, seed=5)):
        for x, y in zip(run(**limit), greedy):
            np.testing.assert_array_equal(x, y, err_msg=str(limit))


@pytest.mark.parametrize("end_early", [False, True])
def test_equals_torch_twin_on_the_exported_model(request, tmp_path, end_early):
    """The PyTorch twin (stock HF model of the exported directory, one sample at a time)
    gives the same tokens and fed latents."""
    from ilvr_jax.checkpoint.hf import save_hf
    from ilvr_jax.generate import torch_latent

    s = request.getfixturevalue("gen_latent_early" if end_early else "gen_latent")
    save_hf(s.params, s.cfg, str(tmp_path), tokenizer_dir=s.hf_dir)
    model, tok, _ = torch_latent.load_export(str(tmp_path))
    stops = [s.tokenizer.eos_token_id]
    got = generate_prompts(s.params, s.cfg, s.prompts, s.tokenizer, batch_size=4, max_new_tokens=N_LATENT,
                           latent_size=K, latent_end_early=end_early, stop_ids=stops)
    n_latents = 0
    for r, (p, g) in enumerate(zip(s.prompts, got)):
        want = torch_latent.generate_from_prompt(model, tok, p.input_ids.tolist(), p.pixel_values, p.image_grid_thw,
                                                 max_new_tokens=N_LATENT, latent_end_early=end_early, latent_size=K,
                                                 stop_ids=stops)
        np.testing.assert_array_equal(g.token_ids, want.token_ids, err_msg=f"row {r}")
        np.testing.assert_array_equal(g.latent_positions, want.latent_positions)
        np.testing.assert_allclose(g.latents, want.latents, rtol=0, atol=1e-4 * float(np.max(np.abs(want.latents))))
        n_latents += len(want.latent_positions)
    assert n_latents >= 4 * 2 * K if not end_early else n_latents >= 4 * K


def test_bfloat16_decoding_tracks_float32(gen_latent):
    """bf16 compute and cache: the same first spans as fp32 and fed latents within bf16 error."""
    import jax.numpy as jnp

    s = gen_latent
    kw = dict(batch_size=4, max_new_tokens=12, latent_size=K, stop_ids=[s.tokenizer.eos_token_id])
    f32 = generate_prompts(s.params, s.cfg, s.prompts, s.tokenizer, **kw)
    bf16 = generate_prompts(s.params, s.cfg, s.prompts, s.tokenizer, dtype=jnp.bfloat16, **kw)
    agree = 0
    for a, b in zip(f32, bf16):
        assert b.latents.dtype == np.float32 and np.all(np.isfinite(b.latents))
        n = 0
        while n < min(len(a.token_ids), len(b.token_ids)) and a.token_ids[n] == b.token_ids[n]:
            n += 1
        agree += n
        shared = [i for i, p in enumerate(a.latent_positions) if p < n]
        if shared:
            x, y = a.latents[shared], b.latents[shared]
            cos = np.sum(x * y, -1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
            assert cos.min() > 0.99, cos
    assert agree >= 2 * len(f32)
