"""One-token decoder step for the decode loop, on a cache laid out for decoding.

The same maths as ``qwen25vl.decode_step`` (same layers, same positions, same visible
slots), arranged so that nothing in a loop iteration copies the cache:

* :class:`DecodeCache` keeps one buffer per layer instead of the model's stacked
  ``[L, B, T, Hkv, hd]`` arrays: a layer reads and writes its own buffer, where slicing a
  stacked cache inside the loop materialises every layer's slice, every step.
* keys are stored ``[B * Hkv, hd, T]`` and values ``[B * Hkv, T, hd]``: the score and the
  value products are then plain batched matmuls over the stored layout (no per-step
  transpose of the cache into the layout a dot wants). Rows and kv heads share one batch
  axis because XLA drops a batch axis of size 1 (batch 1) by a reshape of the buffer, and
  then duplicates the in-place write for the reshaped reader, copying the buffer twice per
  layer and step (still the case when B * Hkv = 1).
* each layer writes its new key/value into slot ``index`` first and attends to the buffer
  it just wrote (self included through the validity mask). The read then depends on the
  write, so XLA updates the loop-carried buffer in place; reading the old buffer and writing
  afterwards leaves the two unordered and makes XLA copy the buffer to keep the old value.
* the layers are unrolled over per-layer parameters sliced once before the loop
  (:func:`layer_params`), not scanned: a scan would slice the stacked weights and caches
  again in every iteration.

:func:`decode_cache` converts the cache a prefill wrote; :func:`model_cache` converts back.

The attention stays two batched dots and a softmax: on CPU, elementwise multiply-and-reduce
products, values stored ``[B * Hkv, hd, T]``, keys stored ``[B * Hkv, T, hd]``, one masked
matmul per row over all its kv heads, normalising after the value product and an additive
mask built once per step were all as fast or slower; q/k/v and gate/up kernels concatenated
before the loop gained 2-5 % at batch 8 only, for a second copy of those weights during
generation (BENCHMARKS.md, "Latent-mode decoding, tiny model, CPU").
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ilvr_jax.model import layers, qwen25vl
from ilvr_jax.model.config import ModelConfig
from ilvr_jax.model.rope import mrope_cos_sin

Params = dict[str, Any]


class DecodeCache(NamedTuple):
    """keys: per layer [B * Hkv, hd, T]; values: per layer [B * Hkv, T, hd] (row-major over
    (row, kv head)); valid [B, T] bool
    (slots a token may attend to); index: the shared write slot of the next token (every row
    writes its t-th new token at the same slot, prompts being left-padded).

    Slots at or after ``index`` are never valid: the prefill marks only its own S slots and
    each step marks the slot it writes."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array


def decode_cache(cache: dict) -> DecodeCache:
    """The model's cache (``{"k", "v": [L, B, T, Hkv, hd], "mask", "index"}``) in decode layout."""
    n = cache["k"].shape[0]
    b, t, hkv, hd = cache["k"].shape[1:]
    return DecodeCache(keys=tuple(jnp.transpose(cache["k"][i], (0, 2, 3, 1)).reshape(b * hkv, hd, t) for i in range(n)),
                       values=tuple(jnp.transpose(cache["v"][i], (0, 2, 1, 3)).reshape(b * hkv, t, hd) for i in range(n)),
                       valid=jnp.asarray(cache["mask"], bool), index=jnp.asarray(cache["index"], jnp.int32))


def model_cache(cache: DecodeCache) -> dict:
    """The inverse of :func:`decode_cache`."""
    b, t = cache.valid.shape
    return {"k": jnp.stack([jnp.transpose(k.reshape(b, -1, *k.shape[1:]), (0, 3, 1, 2)) for k in cache.keys]),
            "v": jnp.stack([jnp.transpose(v.reshape(b, -1, *v.shape[1:]), (0, 2, 1, 3)) for v in cache.values]),
            "mask": cache.valid, "index": cache.index}


def layer_params(params: Params) -> tuple[Params, ...]:
    """``params["text"]["layers"]`` (stacked on a leading axis) as one tree per layer."""
    stacked = params["text"]["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    return tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n))


def first_token_positions(cache: DecodeCache, rope_deltas: jax.Array) -> jax.Array:
    """[B] M-RoPE id of each row's next token: its valid slots so far plus its rope delta
    (as ``qwen25vl.decode_step``); each step adds 1."""
    b = cache.valid.shape[0]
    return jnp.sum(cache.valid, axis=1, dtype=jnp.int32) + jnp.asarray(rope_deltas, jnp.int32).reshape(b)


def cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, valid: jax.Array) -> jax.Array:
    """Softmax attention of one query per row over a layer's cache.

    q [B, Hq, hd]; keys [B * Hkv, hd, T]; values [B * Hkv, T, hd]; valid [B, T] (at least one
    slot per row: the query's own). GQA: query head j reads kv head j // (Hq / Hkv).
    Returns [B, Hq, hd] fp32.
    """
    b, hq, hd = q.shape
    hkv = keys.shape[0] // b
    qg = q.reshape(b * hkv, hq // hkv, hd).astype(jnp.float32) / jnp.sqrt(jnp.float32(hd))
    scores = jnp.einsum("ngd,ndt->ngt", qg, keys.astype(jnp.float32)).reshape(b, hkv, hq // hkv, -1)
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1).reshape(b * hkv, hq // hkv, -1)
    return jnp.einsum("ngt,ntd->ngd", weights, values.astype(jnp.float32)).reshape(b, hq, hd)


def decode_step(params: Params, per_layer: tuple[Params, ...], cfg: ModelConfig, embeds: jax.Array,
                cache: DecodeCache, positions: jax.Array, *, dtype=jnp.float32):
    """embeds [B, D] at M-RoPE ids ``positions`` [B] (all three axes) -> (logits [B, V] fp32,
    hidden [B, D] after the final norm, cache with the token at slot ``index``).

    ``per_layer``: :func:`layer_params` of ``params``. Every row's token becomes valid and
    attends to the valid slots before it and to itself, as in ``qwen25vl.decode_step``.
    """
    tcfg = cfg.text
    b = embeds.shape[0]
    hq, hkv, hd = tcfg.num_attention_heads, tcfg.num_key_value_heads, tcfg.head_dim
    index = cache.index
    valid = jax.lax.dynamic_update_slice(cache.valid, jnp.ones((b, 1), bool), (0, index))
    cos, sin = mrope_cos_sin(jnp.broadcast_to(positions.astype(jnp.int32)[None, :, None], (3, b, 1)), tcfg)
    h = embeds.astype(dtype)[:, None, :]
    keys, values = [], []
    for p, k_buf, v_buf in zip(per_layer, cache.keys, cache.values):
        x = layers.rms_norm(h, p["input_layernorm"]["scale"], tcfg.rms_norm_eps)
        a = p["self_attn"]
        q = layers.apply_rotary(layers.dense(x, a["q_proj"], dtype).reshape(b, 1, hq, hd), cos, sin)
        k = layers.apply_rotary(layers.dense(x, a["k_proj"], dtype).reshape(b, 1, hkv, hd), cos, sin)
        v = layers.dense(x, a["v_proj"], dtype).reshape(b, 1, hkv, hd)
        k_buf = jax.lax.dynamic_update_slice(k_buf, k.reshape(b * hkv, hd, 1).astype(k_buf.dtype), (0, 0, index))
        v_buf = jax.lax.dynamic_update_slice(v_buf, v.reshape(b * hkv, 1, hd).astype(v_buf.dtype), (0, index, 0))
        keys.append(k_buf)
        values.append(v_buf)
        out = cached_attention(q[:, 0], k_buf, v_buf, valid)
        h = h + layers.dense(out.reshape(b, 1, hq * hd).astype(dtype), a["o_proj"], dtype)
        x = layers.rms_norm(h, p["post_attention_layernorm"]["scale"], tcfg.rms_norm_eps)
        h = h + layers.gated_mlp(x, p["mlp"], dtype)
    h = layers.rms_norm(h[:, 0], params["text"]["norm"]["scale"], tcfg.rms_norm_eps)
    new_cache = DecodeCache(keys=tuple(keys), values=tuple(values), valid=valid, index=index + 1)
    return qwen25vl.lm_logits(params, cfg, h), h, new_cache
