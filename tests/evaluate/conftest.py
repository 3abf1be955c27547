"""Shared fixtures of the evaluation tests: a tiny Qwen2.5-VL directory whose
``<|latent_start|>`` wins where its most frequent greedy token would (so generations open
latent spans with text between them), and a few generated maze records."""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pytest

K = 4  # latent size of the evaluation tests (the tiny config's latent_size)
N_RECORDS = 6


@dataclasses.dataclass
class EvalSetup:
    hf_dir: str
    tokenizer: object
    cfg: object
    params: dict
    image_cfg: object
    data_path: str      # canonical JSONL of N_RECORDS maze records
    records: list       # read_jsonl of data_path
    latent_size: int = K


def _most_frequent_token(s: EvalSetup, stops) -> int:
    from ilvr_jax.generate import generate_records

    gens = generate_records(s.params, s.cfg, s.records, s.tokenizer, s.image_cfg, batch_size=N_RECORDS,
                            max_new_tokens=16, latent_size=K)
    toks = np.concatenate([g.token_ids for g in gens])
    toks = toks[~np.isin(toks, list(stops))]
    return int(np.bincount(toks).argmax())


@pytest.fixture(scope="session")
def eval_setup(tiny_dir, tmp_path_factory) -> EvalSetup:
    from safetensors.numpy import load_file, save_file
    from transformers import AutoTokenizer

    from ilvr_jax.checkpoint.hf import load_hf_params
    from ilvr_jax.data import maze
    from ilvr_jax.data import processor as proc
    from ilvr_jax.data.records import read_jsonl
    from ilvr_jax.generate import stop_token_ids

    root = tmp_path_factory.mktemp("eval")
    data_path = maze.generate_maze_dataset(str(root / "maze"), n=N_RECORDS, seed=0, sizes=(2, 3), cell_px=20)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg, params = load_hf_params(tiny_dir)
    s = EvalSetup(tiny_dir, tok, cfg, params, proc.ImageProcessorConfig.from_hf(tiny_dir), data_path,
                  list(read_jsonl(data_path)))
    frequent = _most_frequent_token(s, stop_token_ids(tok, cfg))
    hf_dir = str(root / "tiny_latent")
    shutil.copytree(tiny_dir, hf_dir)
    (weights,) = [f for f in os.listdir(hf_dir) if f.endswith(".safetensors")]
    tensors = load_file(os.path.join(hf_dir, weights))
    (head,) = [k for k in tensors if k.endswith("lm_head.weight")]
    w = tensors[head].copy()
    w[cfg.latent_start_token_id] = 1.05 * w[frequent]
    tensors[head] = w
    save_file(tensors, os.path.join(hf_dir, weights), metadata={"format": "pt"})
    cfg, params = load_hf_params(hf_dir)
    return dataclasses.replace(s, hf_dir=hf_dir, cfg=cfg, params=params)
