"""Latent-mode generation on an exported HF directory (PyTorch), against references written here:
a cache-free loop that re-runs HF's full forward over the whole sequence at every step (HF
computes the M-RoPE positions itself), and HF's own ``generate`` where no latent is emitted."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from ilvr_jax.generate import torch_latent as tl

QUESTION = "where is the hole"
MAX_NEW = 48


def _image(height=56, width=84, seed=0):
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


def _seeded_params(params):
    """The tiny model's tree refilled from one NumPy seed (norm scales ~1, biases ~0), so the
    weights, and hence the steered behaviour below, do not depend on torch's initialisers."""
    import jax

    rng = np.random.RandomState(0)

    def draw(path, leaf):
        x = rng.standard_normal(leaf.shape).astype(np.float32)
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return 1.0 + 0.1 * x
        return 0.1 * x if name.endswith("['bias']") else 0.05 * x

    return jax.tree_util.tree_map_with_path(draw, params)


def _export(tiny_dir, out_dir, steer: bool) -> str:
    """The tiny model with seeded weights, exported by ``save_hf``. ``steer``: lm_head columns
    set so that greedy decoding opens latent spans now and then (``<|latent_start|>``'s column
    is a frequent token's, scaled up), ``<|latent_end|>`` is the argmax at some pad steps (its
    column copies that of the usual pad-step argmax, id 417) and ``<|im_end|>`` ends the
    replies. Unsteered, the model emits no latent token."""
    from ilvr_jax.checkpoint.hf import load_hf_params, save_hf

    cfg, params = load_hf_params(tiny_dir)
    params = _seeded_params(params)
    if steer:
        kernel = params["lm_head"]["kernel"].copy()  # [hidden, vocab]
        kernel[:, cfg.latent_start_token_id] = kernel[:, 13] * 1.1
        kernel[:, cfg.latent_end_token_id] = kernel[:, 417]
        kernel[:, cfg.eos_token_id] = kernel[:, 498]
        params = dict(params, lm_head={"kernel": kernel})
    save_hf(params, cfg, out_dir, tokenizer_dir=tiny_dir)
    return out_dir


@pytest.fixture(scope="module")
def exported_dir(tiny_dir, tmp_path_factory):
    return _export(tiny_dir, str(tmp_path_factory.mktemp("exported")), steer=True)


@pytest.fixture(scope="module")
def plain_dir(tiny_dir, tmp_path_factory):
    return _export(tiny_dir, str(tmp_path_factory.mktemp("plain")), steer=False)


@pytest.fixture(scope="module")
def exported(exported_dir):
    return tl.load_export(exported_dir)


def _hf_prompt(model, tokenizer, hf_dir, images):
    """Prompt ids and pixels through HF's own image processor and chat template."""
    import transformers

    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    if images:
        # The slow (PIL) processor: ``Qwen2VLImageProcessorPil`` in transformers 5, ``Qwen2VLImageProcessor`` in 4.5x.
        slow = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
        proc = slow.from_pretrained(hf_dir)
        out = proc(images=images, return_tensors="np")
        pix, grid = out["pixel_values"].astype(np.float32), out["image_grid_thw"].astype(np.int64)
        merge = model.config.vision_config.spatial_merge_size ** 2
        parts = text.split("<|image_pad|>")
        text = parts[0] + "".join("<|image_pad|>" * int(np.prod(grid[j]) // merge) + part
                                  for j, part in enumerate(parts[1:]))
    else:
        pix, grid = np.zeros((0, 1176), np.float32), np.zeros((0, 3), np.int64)
    return tokenizer(text, add_special_tokens=False)["input_ids"], pix, grid


def _mm_types(model, ids):
    """``mm_token_type_ids`` where the model takes it (transformers 5: without it HF uses 1-D
    positions for image tokens too); 4.5x builds M-RoPE positions from the grid alone."""
    if "mm_token_type_ids" not in inspect.signature(model.forward).parameters:
        return {}
    return {"mm_token_type_ids": (ids == model.config.image_token_id).long()}


def _naive_latent_generation(model, prompt_ids, pix, grid, lt, stops, max_new, latent_end_early):
    """Greedy latent decoding without a cache: HF's full forward over the whole sequence at
    every step, the fed vectors put into ``inputs_embeds`` at their pad positions."""
    ids = list(prompt_ids)
    fed: dict[int, torch.Tensor] = {}
    gen, latents, latent_positions = [], [], []
    in_span, pads = False, 0
    embed = model.get_input_embeddings()
    while True:
        t = torch.tensor([ids])
        with torch.no_grad():
            e = embed(t).clone()
            for p, v in fed.items():
                e[0, p] = v
            kw = dict(input_ids=t, inputs_embeds=e, attention_mask=torch.ones_like(t), use_cache=False,
                      output_hidden_states=True)
            if len(grid):
                kw.update(pixel_values=torch.from_numpy(pix), image_grid_thw=torch.from_numpy(grid),
                          **_mm_types(model, t))
            model.model.rope_deltas = None
            out = model(**kw)
            logits, h = out.logits[0, -1], out.hidden_states[-1][0, -1]
            # The last hidden state is the one lm_head reads (after the final norm).
            torch.testing.assert_close(model.lm_head(h), logits, rtol=1e-5, atol=1e-5)
        argmax = int(torch.argmax(logits))
        if in_span and pads < lt.size and not (latent_end_early and argmax == lt.end):
            token = lt.pad
            fed[len(ids)] = h
            latent_positions.append(len(gen))
            latents.append(h.numpy())
            pads += 1
        elif in_span:
            token, in_span = lt.end, False
        else:
            token = argmax
            in_span, pads = token == lt.start, 0
        ids.append(token)
        gen.append(token)
        if (token in stops and token != lt.pad) or len(gen) >= max_new:
            return gen, np.asarray(latents, np.float32).reshape(-1, h.shape[-1]), latent_positions


def _spans(token_ids, lt):
    """(start index, number of pads, closed by <|latent_end|>) for each latent span."""
    spans, i = [], 0
    while i < len(token_ids):
        if token_ids[i] == lt.start:
            j = i + 1
            while j < len(token_ids) and token_ids[j] == lt.pad:
                j += 1
            spans.append((i, j - i - 1, j < len(token_ids) and token_ids[j] == lt.end))
            i = j
        else:
            i += 1
    return spans


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text_only"])
@pytest.mark.parametrize("latent_end_early", [False, True], ids=["k_pads", "end_early"])
def test_matches_naive_full_forward_reference(exported, exported_dir, with_image, latent_end_early):
    model, tokenizer, image_config = exported
    images = [_image()] if with_image else []
    lt = tl.latent_tokens(model.config, tokenizer)
    assert (lt.start, lt.pad, lt.end, lt.size) == (415, 414, 416, 4)  # read from the export's config.json
    stops = tl.stop_token_ids(model, tokenizer)
    got = tl.generate_latent(model, tokenizer, QUESTION, images, image_config=image_config,
                             max_new_tokens=MAX_NEW, latent_end_early=latent_end_early)

    prompt_ids, pix, grid = _hf_prompt(model, tokenizer, exported_dir, images)
    want_ids, want_latents, want_pos = _naive_latent_generation(
        model, prompt_ids, pix, grid, lt, stops, MAX_NEW, latent_end_early)

    spans = _spans(got.token_ids, lt)
    print(f"\n{len(got.token_ids)} tokens, spans (start, pads, closed): {spans}")
    assert len(spans) >= 2, "the steered model should open at least two latent spans"
    if latent_end_early:
        assert any(closed and n < lt.size for _, n, closed in spans), "no span ended early"
    else:
        assert all(n == lt.size for _, n, closed in spans if closed)
        assert all(got.token_ids[s + lt.size + 1] == lt.end for s, _, closed in spans if closed)
    assert got.token_ids == want_ids
    assert got.latent_positions == want_pos
    assert [got.token_ids[p] for p in got.latent_positions] == [lt.pad] * len(want_pos)
    assert got.latents.shape == (len(want_pos), model.config.text_config.hidden_size)
    assert got.latents.dtype == np.float32
    np.testing.assert_allclose(got.latents, want_latents, rtol=0, atol=1e-5)
    if len(want_pos):
        print(f"{len(want_pos)} fed latents: max|diff| {np.max(np.abs(got.latents - want_latents)):.2e}")
    if len(want_pos) >= 2:
        # Consecutive fed vectors differ: the feedback really is the previous hidden state.
        assert not np.allclose(got.latents[0], got.latents[1])
    assert got.text == tokenizer.decode(want_ids, skip_special_tokens=False)


def test_stops_at_im_end(exported):
    model, tokenizer, image_config = exported
    got = tl.generate_latent(model, tokenizer, QUESTION, [], image_config=image_config, max_new_tokens=MAX_NEW)
    assert got.token_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(got.token_ids) < MAX_NEW and got.text.endswith("<|im_end|>")
    lt = tl.latent_tokens(model.config, tokenizer)
    start = _spans(got.token_ids, lt)[-1][0]
    cut = start + 3  # inside the last span: two pads generated, the latents so far kept
    short = tl.generate_latent(model, tokenizer, QUESTION, [], image_config=image_config, max_new_tokens=cut)
    assert short.token_ids == got.token_ids[:cut] and short.token_ids[-2:] == [lt.pad, lt.pad]
    assert short.latent_positions == [p for p in got.latent_positions if p < cut]
    np.testing.assert_array_equal(short.latents, got.latents[:len(short.latent_positions)])


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text_only"])
def test_without_latents_equals_hf_generate(plain_dir, with_image):
    """The unsteered model emits no latent token: the result is plain greedy decoding."""
    model, tokenizer, image_config = tl.load_export(plain_dir)
    images = [_image(84, 56, seed=3)] if with_image else []
    got = tl.generate_latent(model, tokenizer, QUESTION, images, image_config=image_config, max_new_tokens=32)
    prompt_ids, pix, grid = _hf_prompt(model, tokenizer, plain_dir, images)
    ids = torch.tensor([prompt_ids])
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if images:
        kw.update(pixel_values=torch.from_numpy(pix), image_grid_thw=torch.from_numpy(grid), **_mm_types(model, ids))
    model.model.rope_deltas = None
    with torch.no_grad():
        want = model.generate(**kw, do_sample=False, max_new_tokens=32, min_new_tokens=0,
                              eos_token_id=sorted(tl.stop_token_ids(model, tokenizer)),
                              pad_token_id=tokenizer.pad_token_id)
    want_ids = want[0, len(prompt_ids):].tolist()
    lt = tl.latent_tokens(model.config, tokenizer)
    assert lt.start not in want_ids and got.latent_positions == []
    assert got.latents.shape == (0, model.config.text_config.hidden_size)
    assert got.token_ids == want_ids


def test_generate_records_from_directory(exported, exported_dir, tmp_path):
    model, tokenizer, image_config = exported
    path = str(tmp_path / "q.png")
    _image(seed=5).save(path)
    rec = {"id": "r1", "text_input": QUESTION, "image_input": [path]}
    (from_dir,) = tl.generate_records(exported_dir, [rec], max_new_tokens=20)
    direct = tl.generate_latent(model, tokenizer, QUESTION, [_image(seed=5)], image_config=image_config,
                                max_new_tokens=20)
    assert from_dir.token_ids == direct.token_ids and len(direct.latent_positions) > 0
    np.testing.assert_array_equal(from_dir.latents, direct.latents)
    # Prompts built elsewhere (int32 ids, as the JAX side's record_prompt returns) give the same.
    ids, pix, grids = tl.prompt_inputs(tokenizer, QUESTION, [_image(seed=5)], image_config)
    from_ids = tl.generate_from_prompt(model, tokenizer, np.asarray(ids, np.int32), pix, grids.astype(np.int32),
                                       max_new_tokens=20)
    assert from_ids.token_ids == direct.token_ids


def test_bad_input_messages(exported, tmp_path):
    import types

    model, tokenizer, _ = exported
    with pytest.raises(ValueError, match=r"record 'r2': text_input must be a string"):
        tl.generate_records(model, [{"id": "r2", "image_input": []}], tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match=r"record 'r3': question image '.*missing.png' does not exist"):
        tl.generate_records(model, [{"id": "r3", "text_input": "q", "image_input": [str(tmp_path / "missing.png")]}],
                            tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"config.json has no latent_size"):
        tl.latent_tokens(types.SimpleNamespace(), tokenizer)
    assert tl.latent_tokens(types.SimpleNamespace(), tokenizer, latent_size=8).size == 8
    with pytest.raises(FileNotFoundError, match=r"no config.json"):
        tl.load_export(str(tmp_path))
