"""Optimizer: AdamW with linear warm-up + linear decay, global-norm clipping, decoupled
weight decay on matrices only, and a frozen subset of parameters chosen by regex.

Frozen parameters are split off *before* differentiation, so they get neither gradients
nor optimizer state (a frozen vision tower costs no Adam moments).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import optax
from flax import traverse_util

Params = dict[str, Any]


def path_str(path: Sequence[str]) -> str:
    return "/".join(str(p) for p in path)


def split_frozen(params: Params, frozen_patterns: Sequence[str]) -> tuple[Params, Params]:
    """Splits ``params`` into (trainable, frozen) nested dicts with disjoint leaves.

    A leaf is frozen when its path (``"visual/blocks/attn/qkv/kernel"``) matches any of
    ``frozen_patterns`` with ``re.fullmatch``.
    """
    regexes = [re.compile(p) for p in frozen_patterns]
    flat = traverse_util.flatten_dict(params)
    trainable, frozen = {}, {}
    for k, v in flat.items():
        (frozen if any(r.fullmatch(path_str(k)) for r in regexes) else trainable)[k] = v
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: Params, frozen: Params) -> Params:
    """Inverse of :func:`split_frozen`."""
    flat = dict(traverse_util.flatten_dict(frozen))
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)


def decay_mask(params: Params) -> Params:
    """Weight decay on kernels and embeddings only: not on biases or norm scales (as HF's
    Trainer, which excludes biases and LayerNorm weights)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: k[-1] in ("kernel", "embedding") for k in flat})


def learning_rate_schedule(lr: float, warmup_steps: int, total_steps: int,
                           kind: str = "linear") -> optax.Schedule:
    """HF ``get_linear_schedule_with_warmup``: 0 -> lr over ``warmup_steps`` (the first
    update uses lr * 0 / warmup), then linear decay to 0 at ``total_steps``.
    ``kind="constant"`` keeps lr after warm-up; ``"cosine"`` decays with a cosine."""
    warmup_steps = max(int(warmup_steps), 0)
    decay_steps = max(int(total_steps) - warmup_steps, 1)
    if kind == "linear" and int(total_steps) <= warmup_steps:
        # HF: max(0, (total - step) / max(1, total - warmup)) = 0 once warm-up ends.
        decay = optax.constant_schedule(0.0)
    elif kind == "linear":
        decay = optax.linear_schedule(lr, 0.0, decay_steps)
    elif kind == "constant":
        decay = optax.constant_schedule(lr)
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps)
    else:
        raise ValueError(f"unknown schedule {kind!r} (linear, constant, cosine)")
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])


def make_optimizer(lr: float = 1e-5, weight_decay: float = 0.01, warmup_steps: int = 10,
                   total_steps: int = 1000, clip_norm: float | None = 1.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, schedule: str = "linear"
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (torch defaults) after global-norm clipping; returns (tx, schedule)."""
    sched = learning_rate_schedule(lr, warmup_steps, total_steps, schedule)
    parts = []
    if clip_norm is not None and clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts), sched
