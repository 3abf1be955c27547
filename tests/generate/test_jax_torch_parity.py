"""The JAX generation (batched, compiled) and the PyTorch function for exports
(``generate.torch_latent``, stock transformers) agree token for token on an exported model,
latent spans and the vectors fed at the latent pads included, so what a user trains in JAX
behaves the same in the PyTorch world."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _latent_reference import K  # noqa: E402

MAX_NEW = 40


def _export(setup, out: str) -> str:
    """A setup's (steered) parameters exported as an HF directory (fp32)."""
    from ilvr_jax.checkpoint.hf import save_hf

    save_hf(setup.params, setup.cfg.replace(latent_size=K), out, tokenizer_dir=setup.hf_dir, dtype="float32")
    return out


def _closed_span_pads(ids: list[int], cfg) -> list[list[int]]:
    """The pad runs of the spans that were closed by ``<|latent_end|>``."""
    spans, current = [], None
    for t in ids:
        if t == cfg.latent_start_token_id:
            current = []
        elif current is not None and t == cfg.latent_pad_token_id:
            current.append(t)
        elif current is not None and t == cfg.latent_end_token_id:
            spans.append(current)
            current = None
    return spans


# ``gen_latent_early``'s head also makes ``<|latent_end|>`` the argmax at some pad steps.
@pytest.mark.parametrize("setup, latent_end_early", [("gen_latent", False), ("gen_latent_early", True)])
def test_jax_generation_equals_the_torch_function_on_the_export(request, tmp_path, setup, latent_end_early):
    from ilvr_jax.generate import generate_prompts, stop_token_ids
    from ilvr_jax.generate.torch_latent import generate_from_prompt, load_export

    s = request.getfixturevalue(setup)
    model, tok, _ = load_export(_export(s, str(tmp_path / "export")))
    stops = stop_token_ids(s.tokenizer, s.cfg)
    jax_gens = generate_prompts(s.params, s.cfg, s.prompts, s.tokenizer, batch_size=4, max_new_tokens=MAX_NEW,
                                latent_size=K, latent_end_early=latent_end_early, stop_ids=stops)
    spans, early = 0, 0
    for p, g in zip(s.prompts, jax_gens):
        t = generate_from_prompt(model, tok, p.input_ids.tolist(), p.pixel_values if len(p.image_grid_thw) else None,
                                 p.image_grid_thw, max_new_tokens=MAX_NEW, latent_size=K,
                                 latent_end_early=latent_end_early, stop_ids=stops)
        assert t.token_ids == g.token_ids.tolist()
        assert t.latent_positions == g.latent_positions.tolist()
        np.testing.assert_allclose(t.latents, g.latents, atol=2e-5, rtol=1e-4)
        spans += g.num_latent_spans
        early += sum(0 < len(span) < K for span in _closed_span_pads(t.token_ids, s.cfg))
    assert spans >= 2 * len(s.prompts)   # the comparison covers several spans per row
    assert (early > 0) == latent_end_early
