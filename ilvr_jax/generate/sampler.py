"""Batched generation with ILVR's latent mode: one prefill, then one compiled decode loop.

Layout: prompts are left-padded into ``[B, S]`` (S a bucket), so every row writes its next
token at the same cache slot; each new token takes the M-RoPE id ``(valid tokens so far) +
rope_delta`` (counted once after the prefill, then one per step), so padding never shifts
positions. The prefill hands the loop its cache in ``cached_step``'s decode layout (one
buffer per layer, keys ``[B * Hkv, hd, T]``), which the loop updates in place. The loop (``jax.lax.while_loop``) carries per row: the logits and final-norm
hidden state of the last forward, the latent state (``ilvr.latent_decoding``), the number of
tokens generated, a done flag and the outputs. Each iteration

1. chooses a token from the logits (greedy or sampled with this step's key),
2. applies the latent rules: the recorded token, and whether the input is the token's
   embedding or the previous hidden state (at ``<|latent_pad|>``),
3. marks rows done at a stop token or at their budget (done rows record ``pad_id``),
4. runs one cached decoder step on the chosen inputs (``cached_step.decode_step``: the
   cache is updated in place),

and the loop ends when every row is done or after ``max_steps``. Nothing leaves the device
inside the loop; the cache is donated to it.

Compiled shapes are a small fixed set: batch, prompt length, output length, patches per row
and images per row are bucketed (:func:`bucket`), the cache holds exactly prompt + output
slots (:func:`cache_length`), and sampling knobs, budgets and stop ids are traced arrays.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ilvr_jax.generate.cached_step import (DecodeCache, decode_cache, decode_step, first_token_positions,
                                           layer_params)
from ilvr_jax.generate.sampling import SamplingParams, choose_tokens
from ilvr_jax.ilvr.latent_decoding import LatentIds, initial_span_left, latent_step
from ilvr_jax.model import qwen25vl
from ilvr_jax.model.config import ModelConfig

Params = dict[str, Any]


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Static settings of the decode loop (one compiled loop per distinct value).

    latent_size: K pads per span. latent_end_early: an argmax ``<|latent_end|>`` during the
    pads ends the span early. sample: compile the sampling branch (greedy otherwise).
    pad_id: recorded after a row is done. dtype: compute dtype; cache_dtype: KV cache dtype
    (the compute dtype when None); attn_impl: the prefill's attention implementation (decode
    steps use ``cached_step.cached_attention``).
    """

    latent_ids: LatentIds
    latent_size: int
    pad_id: int
    latent_end_early: bool = False
    sample: bool = False
    dtype: Any = jnp.float32
    cache_dtype: Any = None
    attn_impl: str | None = None
    # Latent diagnostics: "none", or a mode of ilvr.latent_ablation.ABLATIONS that replaces
    # the vector fed at latent pads ("shuffle" reads decode_loop's latent_source).
    latent_ablation: str = "none"

    def __post_init__(self) -> None:
        if self.latent_ablation != "none":
            from ilvr_jax.ilvr.latent_ablation import check_ablation

            check_ablation(self.latent_ablation)
        if self.latent_size < 0:
            raise ValueError(f"latent_size must be >= 0, got {self.latent_size}")


class PromptBatch(NamedTuple):
    """Left-padded prompts: input_ids / attention_mask [B, S]; pixel_values [B, P, patch_dim]
    (None when no row has an image); image_grid_thw [B, I, 3] (zero rows = no image)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    pixel_values: np.ndarray | None
    image_grid_thw: np.ndarray


class DecodeOutput(NamedTuple):
    """tokens [B, T] int32 (pad_id past each row's end); fed_hidden [B, T] bool (the input at
    step t was the previous hidden state); latents [B, T, D] (the vectors fed, zeros elsewhere);
    num_generated [B]; num_spans [B]; stopped [B] (ended at a stop token); steps (loop
    iterations run)."""

    tokens: jax.Array
    fed_hidden: jax.Array
    latents: jax.Array
    num_generated: jax.Array
    num_spans: jax.Array
    stopped: jax.Array
    steps: jax.Array


def pad_prompts(prompts: Sequence[tuple[Sequence[int], np.ndarray, np.ndarray]], pad_id: int, *,
                batch_size: int | None = None, min_len: int = 16, min_patches: int = 0, min_images: int = 1,
                patch_dim: int) -> PromptBatch:
    """(ids, patches [p, patch_dim], grids [n, 3]) per row -> a bucketed, left-padded batch.

    Rows past ``len(prompts)`` (up to ``batch_size``) are filler rows of one pad token.
    S, patches per row and images per row are rounded up with :func:`bucket` (at least
    ``min_len``, ``min_patches``, ``min_images``). Without any image and ``min_patches == 0``
    the batch has no pixel values (the vision tower is not run).
    """
    b = len(prompts) if batch_size is None else batch_size
    if b < len(prompts):
        raise ValueError(f"{len(prompts)} prompts for batch_size {b}")
    s = bucket(max(len(p[0]) for p in prompts), min_len)
    n_img = bucket(max(len(p[2]) for p in prompts), min_images)
    n_patch = max(max(p[1].shape[0] for p in prompts), min_patches)
    input_ids = np.full((b, s), pad_id, np.int32)
    mask = np.zeros((b, s), np.int32)
    mask[:, -1] = 1  # filler rows: one valid pad token, so no row is empty
    grids = np.zeros((b, n_img, 3), np.int32)
    pixel_values = np.zeros((b, bucket(n_patch, 4), patch_dim), np.float32) if n_patch else None
    for i, (ids, pv, grid) in enumerate(prompts):
        input_ids[i, s - len(ids):] = ids
        mask[i, :] = 0
        mask[i, s - len(ids):] = 1
        grids[i, : len(grid)] = grid
        if pixel_values is not None:
            pixel_values[i, : pv.shape[0]] = pv
    return PromptBatch(input_ids, mask, pixel_values, grids)


def cache_length(prompt_len: int, max_steps: int) -> int:
    """Cache slots for a padded prompt of ``prompt_len`` and ``max_steps`` new tokens: exactly
    their sum (both are buckets already, so this adds no compiled shape); every decode step
    attends over all of them."""
    return int(prompt_len) + int(max_steps)


def prefill(params: Params, cfg: ModelConfig, dcfg: DecodeConfig, batch: PromptBatch, cache_len: int):
    """Prompt forward into a fresh cache; returns (logits [B, V], hidden [B, D] at the last
    prompt token, the cache in decode layout (``cached_step.DecodeCache``), rope_deltas [B])."""
    cache = qwen25vl.init_cache(cfg, batch.input_ids.shape[0], cache_len, dcfg.cache_dtype or dcfg.dtype)
    out = qwen25vl.forward(params, cfg, batch.input_ids, batch.attention_mask, batch.pixel_values,
                           batch.image_grid_thw, cache=cache, dtype=dcfg.dtype, attn_impl=dcfg.attn_impl,
                           return_logits=False)
    h_last = out.hidden[:, -1]  # left padding: the last column is every row's last token
    return qwen25vl.lm_logits(params, cfg, h_last), h_last, decode_cache(out.cache), out.rope_deltas


def decode_loop(params: Params, cfg: ModelConfig, dcfg: DecodeConfig, max_steps: int, cache: DecodeCache,
                logits: jax.Array, hidden: jax.Array, rope_deltas: jax.Array, last_prompt_token: jax.Array,
                budgets: jax.Array, stop_ids: jax.Array, key: jax.Array, temperature: jax.Array,
                top_k: jax.Array, top_p: jax.Array,
                latent_source: tuple[jax.Array, jax.Array] | None = None) -> tuple[DecodeOutput, DecodeCache]:
    """The compiled loop of the module docstring (``max_steps`` = T, the output length).

    budgets [B]: max new tokens per row (<= T; 0 = nothing to generate); stop_ids [N]: tokens
    that end a row when fed as tokens (recorded, then the row is done; a pad whose input is
    a hidden state never stops a row). Returns (outputs, final cache): the
    cache is returned so that the donated input buffers can hold it. latent_source: (donor
    latents [B, J, D], counts [B]) for ``latent_ablation="shuffle"``.
    """
    b = logits.shape[0]
    d = hidden.shape[-1]
    rows_done = jnp.asarray(budgets) <= 0
    per_layer = layer_params(params)  # sliced once here, not in every iteration
    carry = dict(
        step=jnp.zeros((), jnp.int32), cache=cache, positions=first_token_positions(cache, rope_deltas),
        logits=logits, hidden=hidden, key=key,
        span_left=initial_span_left(last_prompt_token, dcfg.latent_size, dcfg.latent_ids),
        done=rows_done, stopped=jnp.zeros((b,), bool), n_gen=jnp.zeros((b,), jnp.int32),
        n_spans=jnp.zeros((b,), jnp.int32), tokens=jnp.full((b, max_steps), dcfg.pad_id, jnp.int32),
        fed=jnp.zeros((b, max_steps), bool), latents=jnp.zeros((b, max_steps, d), hidden.dtype),
    )

    def cond(c):
        return (c["step"] < max_steps) & ~jnp.all(c["done"])

    def body(c):
        key, sub = jax.random.split(c["key"])
        chosen, greedy = choose_tokens(c["logits"], sub, temperature, top_k, top_p, sample=dcfg.sample)
        rule = latent_step(chosen, greedy, c["span_left"], dcfg.latent_size, dcfg.latent_ids,
                           dcfg.latent_end_early)
        active = ~c["done"]
        token = jnp.where(active, rule.token, dcfg.pad_id)
        feed = active & rule.feed_hidden
        n_gen = c["n_gen"] + active.astype(jnp.int32)
        hit_stop = active & ~feed & jnp.any(token[:, None] == stop_ids[None, :], axis=1)
        done = c["done"] | hit_stop | (n_gen >= budgets)
        fed_in = c["hidden"]
        if dcfg.latent_ablation != "none":
            fed_in = _ablated(params, dcfg, c, sub, latent_source)
        embeds = jnp.where(feed[:, None], fed_in, qwen25vl.embed_tokens(params, token).astype(c["hidden"].dtype))
        fed_vec = jnp.where(feed[:, None], fed_in, 0)
        step = c["step"]
        new_logits, new_hidden, new_cache = decode_step(params, per_layer, cfg, embeds, c["cache"], c["positions"],
                                                        dtype=dcfg.dtype)
        return dict(
            step=step + 1, cache=new_cache, positions=c["positions"] + 1, logits=new_logits,
            hidden=new_hidden.astype(c["hidden"].dtype),
            key=key, span_left=jnp.where(active, rule.span_left, c["span_left"]), done=done,
            stopped=c["stopped"] | hit_stop, n_gen=n_gen,
            n_spans=c["n_spans"] + (active & rule.opened).astype(jnp.int32),
            tokens=jax.lax.dynamic_update_slice(c["tokens"], token[:, None], (0, step)),
            fed=jax.lax.dynamic_update_slice(c["fed"], feed[:, None], (0, step)),
            latents=jax.lax.dynamic_update_slice(c["latents"], fed_vec[:, None, :].astype(c["latents"].dtype),
                                                 (0, step, 0)),
        )

    out = jax.lax.while_loop(cond, body, carry)
    return DecodeOutput(tokens=out["tokens"], fed_hidden=out["fed"], latents=out["latents"],
                        num_generated=out["n_gen"], num_spans=out["n_spans"], stopped=out["stopped"],
                        steps=out["step"]), out["cache"]


def _ablated(params: Params, dcfg: DecodeConfig, carry: dict, step_key: jax.Array, latent_source):
    """The latent diagnostics' replacement of the fed vector (``ilvr.latent_ablation.ablate_fed_latents``)."""
    from ilvr_jax.ilvr.latent_ablation import ablate_fed_latents

    donors, counts = latent_source if latent_source is not None else (None, None)
    return ablate_fed_latents(
        dcfg.latent_ablation, carry["hidden"],
        pad_embedding=qwen25vl.embed_tokens(params, jnp.int32(dcfg.latent_ids.pad)),
        key=jax.random.fold_in(step_key, 1), donor_latents=donors, donor_counts=counts,
        latent_index=jnp.sum(carry["fed"], axis=1, dtype=jnp.int32))


@functools.lru_cache(maxsize=None)
def compiled(cfg: ModelConfig, dcfg: DecodeConfig):
    """(prefill, decode_loop) jitted for one model and decode config; shapes key the caches
    below them (cache_len and max_steps are static)."""
    pre = jax.jit(functools.partial(prefill, cfg=cfg, dcfg=dcfg), static_argnames=("cache_len",))
    loop = jax.jit(functools.partial(decode_loop, cfg=cfg, dcfg=dcfg), static_argnames=("max_steps",),
                   donate_argnames=("cache",))
    return pre, loop


def generate_batch(params: Params, cfg: ModelConfig, dcfg: DecodeConfig, batch: PromptBatch,
                   max_new_tokens: int | Sequence[int], stop_ids: Sequence[int],
                   sampling: SamplingParams = SamplingParams(),
                   latent_source: tuple[Any, Any] | None = None) -> DecodeOutput:
    """Prefill + decode loop for one padded batch; outputs stay on the device.

    ``max_new_tokens``: one budget for all rows or one per row; the loop's output length T
    is the bucketed largest budget and the cache length S + T. latent_source:
    see :func:`decode_loop` (only with ``dcfg.latent_ablation == "shuffle"``).
    """
    if dcfg.sample != (not sampling.greedy):
        raise ValueError(f"DecodeConfig.sample={dcfg.sample} but sampling temperature {sampling.temperature}")
    b, s = batch.input_ids.shape
    budgets = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (b,)).copy()
    if budgets.min() < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {budgets.tolist()}")
    t = bucket(int(budgets.max()), 8)
    pre, loop = compiled(cfg, dcfg)
    logits, hidden, cache, deltas = pre(params, batch=batch, cache_len=cache_length(s, t))
    stops = np.asarray(sorted(set(int(x) for x in stop_ids)) or [-1], np.int32)
    out, _ = loop(params, max_steps=t, cache=cache, logits=logits, hidden=hidden, rope_deltas=deltas,
                last_prompt_token=jnp.asarray(batch.input_ids[:, -1]), budgets=jnp.asarray(budgets),
                stop_ids=jnp.asarray(stops), key=jax.random.PRNGKey(sampling.seed),
                temperature=jnp.float32(sampling.temperature), top_k=jnp.int32(sampling.top_k),
                top_p=jnp.float32(sampling.top_p),
                **({} if latent_source is None else {"latent_source": latent_source}))
    return out
