"""ILVR stage 2 (relaxed end-to-end training: the model's own hidden states fill the latent
pads; CE only, no teacher), initialised from a stage-1 run's final student.

    python -m ilvr_jax.main --config configs/stage2.py --workdir runs/s2 \
        --config.train.init_from=runs/s1 --config.data.train_path=/data/comt/train.jsonl

Presets as in ``configs/stage1.py``; the stage-1 file holds the shared keys.
"""

from __future__ import annotations

import importlib.util
import os


def _stage1():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stage1.py")
    spec = importlib.util.spec_from_file_location("ilvr_stage1_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str | None = None):
    stage1 = _stage1()
    return stage1.apply_preset(stage1.base_config(stage=2), arg or "paper")


def describe(c) -> str:
    """Every key with its value and what it means (the keys are stage 1's)."""
    return _stage1().describe(c)
