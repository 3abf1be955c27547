"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling.

The filters follow HF's logits processors in HF's order (temperature, then top-k, then
top-p): top-k keeps the tokens whose logit is at least the k-th largest (ties kept),
top-p keeps the smallest set of most probable tokens whose probability reaches ``top_p``
(the most probable token always stays). ``temperature <= 0`` means greedy. All knobs are
traced scalars, so changing them does not recompile. Work a setting does not need is skipped
at run time: no sort of the vocabulary unless top-k or top-p is on, no draw at temperature 0
(as HF, which adds the top-k / top-p warpers only when they are on).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; seed of the step keys."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [B, V] / temperature with the tokens outside top-k / top-p set to -inf."""
    neg_inf = jnp.finfo(jnp.float32).min
    x = logits.astype(jnp.float32) / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
    desc = -jnp.sort(-x, axis=-1)
    v = x.shape[-1]
    k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, v)
    kth = jnp.take(desc, k - 1, axis=-1)[..., None]
    x = jnp.where((top_k > 0) & (x < kth), neg_inf, x)
    desc = jnp.where((top_k > 0) & (desc < kth), neg_inf, desc)
    probs = jax.nn.softmax(desc, axis=-1)
    # Exclusive cumulative mass before each sorted token: a token is kept while the tokens
    # ranked above it have not yet reached top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < jnp.asarray(top_p, jnp.float32)
    n_keep = jnp.maximum(jnp.sum(keep_sorted, axis=-1), 1)
    cutoff = jnp.take_along_axis(desc, (n_keep - 1)[..., None], axis=-1)
    return jnp.where(x < cutoff, neg_inf, x)


def first_argmax(logits: jax.Array) -> jax.Array:
    """``jnp.argmax(logits, -1)`` as int32 (the first maximal index; the first NaN if any).

    Two plain reductions (a max, then the smallest index holding it) instead of argmax's
    (value, index) pair reduction, which XLA on CPU runs as a scalar loop: at batch 8 it cost
    more than the vocabulary projection.
    """
    v = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)  # NaN when the row holds one
    hit = (logits == top) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1).astype(jnp.int32)


def choose_tokens(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, *, sample: bool) -> tuple[jax.Array, jax.Array]:
    """(chosen [B] int32, argmax [B] int32) for logits [B, V].

    ``sample`` (static) compiles the sampling branch; without it the choice is the argmax.
    With it, ``temperature <= 0`` still picks the argmax (and skips the draw), and the
    top-k / top-p filter runs only when one of them is on.
    """
    greedy = first_argmax(logits)
    if not sample:
        return greedy, greedy
    temperature = jnp.asarray(temperature, jnp.float32)
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p = jnp.asarray(top_p, jnp.float32)

    def draw(_):
        scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
        filtered = jax.lax.cond((top_k > 0) | (top_p < 1.0), lambda: filter_logits(logits, temperature, top_k, top_p),
                                lambda: scaled)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    chosen = jax.lax.cond(temperature <= 0, lambda _: greedy, draw, None)
    return chosen, greedy
