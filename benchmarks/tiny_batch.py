"""The benchmarks' shared setup: the tiny Qwen2.5-VL (``untied_gqa2``, random weights, latent
tokens added) and one real batch of generated mazes through ``DataPipeline``."""

from __future__ import annotations

import os


def tiny_model_and_batch(work: str, *, latent_size: int, batch_size: int, max_length: int, mazes: int,
                         sizes: tuple[int, int], max_helper_patches: int, max_segments: int):
    """(model config, numpy params, one host batch) in the scratch directory ``work``."""
    import jax
    import numpy as np

    from ilvr_jax import tiny
    from ilvr_jax.checkpoint.latent_tokens import add_latent_tokens
    from ilvr_jax.data import maze
    from ilvr_jax.data.pipeline import DataConfig, DataPipeline
    from ilvr_jax.model import qwen25vl
    from ilvr_jax.model.config import ModelConfig

    tok = tiny.build_tokenizer()
    cfg = ModelConfig.from_hf(tiny.hf_config(tok, "untied_gqa2", latent_size=latent_size))
    params = jax.tree.map(np.asarray, jax.jit(qwen25vl.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0)))
    tok, params, cfg = add_latent_tokens(tok, params, cfg, latent_size=latent_size)
    tok.save_pretrained(os.path.join(work, "tok"))
    path = maze.generate_maze_dataset(os.path.join(work, "maze"), n=mazes, seed=0, sizes=sizes, cell_px=20)
    dc = DataConfig(batch_size=batch_size, max_length=max_length, max_question_patches=64,
                    max_helper_patches=max_helper_patches, max_segments=max_segments, latent_size=latent_size,
                    min_pixels=28 * 28, max_pixels=16 * 28 * 28, shuffle=False, drop_policy="skip")
    host = next(iter(DataPipeline.from_jsonl(path, os.path.join(work, "tok"), dc).iterator()))
    return cfg, params, host
