"""Shared fixtures of the train-step tests: a tiny Qwen2.5-VL with the latent tokens and
real contract batches from generated mazes through ``DataPipeline`` (built once per session).

The batch mixes helper images of 1, 4 and 9 merged tokens (L = 8 candidates, K = 4), so
some segments have fewer candidates than K and the cutoff K* < K occurs; samples carry 1 to
3 latent segments.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

K = 4                 # latent size
L = 8                 # candidates per helper image
BATCH = 8
MAX_LENGTH = 448
MAX_SEGMENTS = 4


@dataclasses.dataclass
class TinySetup:
    model_cfg: object          # ModelConfig with the latent ids
    params: dict               # numpy fp32 parameters (vocab resized to the tokenizer with the latent tokens)
    batch: dict                # numpy contract batch of BATCH samples
    tokenizer_dir: str


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory) -> TinySetup:
    from ilvr_jax import tiny
    from ilvr_jax.checkpoint.latent_tokens import add_latent_tokens
    from ilvr_jax.data import maze
    from ilvr_jax.data.pipeline import DataConfig, DataPipeline
    from ilvr_jax.model import qwen25vl
    from ilvr_jax.model.config import ModelConfig

    root = tmp_path_factory.mktemp("train_tiny")
    tok = tiny.build_tokenizer()
    cfg = ModelConfig.from_hf(tiny.hf_config(tok, "untied_gqa2", latent_size=K))
    params = jax.jit(qwen25vl.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(np.asarray, params)
    tok, params, cfg = add_latent_tokens(tok, params, cfg, latent_size=K)
    tok_dir = str(root / "tokenizer")
    tok.save_pretrained(tok_dir)

    # 20 px cells: 2x2 boards -> 1 merged token, 3x3 -> 4, 4x4 -> 9 (pooled to L = 8).
    path = maze.generate_maze_dataset(str(root / "maze"), n=16, seed=0, sizes=(2, 4), cell_px=20)
    dc = DataConfig(batch_size=BATCH, max_length=MAX_LENGTH, max_question_patches=64,
                    max_helper_patches=256, max_segments=MAX_SEGMENTS, latent_size=K,
                    min_pixels=28 * 28, max_pixels=16 * 28 * 28, shuffle=False, drop_policy="skip")
    pipe = DataPipeline.from_jsonl(path, tok_dir, dc)
    batch = next(iter(pipe.iterator()))
    assert batch["sample_mask"].all(), "the fixture needs a full batch"
    return TinySetup(cfg, params, {k: np.asarray(v) for k, v in batch.items()}, tok_dir)


def step_config(setup: TinySetup, **kw):
    from ilvr_jax.train.step import StepConfig

    base = dict(model=setup.model_cfg, stage=1, latent_size=K, num_candidates=L)
    base.update(kw)
    return StepConfig(**base)


def sub_batch(batch: dict, rows) -> dict:
    return {k: np.asarray(v)[np.asarray(rows)] for k, v in batch.items()}


def fresh_state(setup: TinySetup, cfg, tx, seed: int = 0, params=None):
    """A new TrainState on device (the compiled step donates its state argument)."""
    from ilvr_jax.train.step import init_train_state

    p = jax.tree.map(jnp.asarray, setup.params if params is None else params)
    return init_train_state(p, tx, cfg, jax.random.PRNGKey(seed))


def to_np(tree):
    return jax.tree.map(lambda x: np.asarray(x), tree)


def max_abs_diff(a, b) -> float:
    diffs = jax.tree.leaves(jax.tree.map(
        lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        if np.size(x) else 0.0, a, b))
    return max(diffs) if diffs else 0.0


@pytest.fixture(scope="session")
def tt():
    """The helpers above as one namespace (test modules cannot import this conftest)."""
    import types

    return types.SimpleNamespace(K=K, L=L, BATCH=BATCH, step_config=step_config, sub_batch=sub_batch,
                                 fresh_state=fresh_state, to_np=to_np, max_abs_diff=max_abs_diff)
