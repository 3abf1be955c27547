"""One-token decoder step that updates the KV cache in place.

The same maths as ``qwen25vl.decode_step`` (same layers, same cache layout
``{"k", "v": [L, B, T, Hkv, hd], "mask": [B, T], "index"}``), arranged for a decode loop:
each layer reads its layer of the cache, attends to it and to the new token's own key/value
(:func:`single_query_attention`), and after the scan the new keys/values of all layers go
into their slot with one ``dynamic_update_slice`` per cache, in place. ``decoder_forward``
instead passes the cache through the scan as per-layer inputs and outputs, which copies the
whole cache every step (and its dot attention transposes each layer's cache): costs that
grow with batch x cache length and dominated small-model decoding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ilvr_jax.model import layers, qwen25vl
from ilvr_jax.model.config import ModelConfig
from ilvr_jax.model.rope import mrope_cos_sin

Params = dict[str, Any]


def single_query_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cache_valid: jax.Array,
                           k_new: jax.Array, v_new: jax.Array) -> jax.Array:
    """Softmax attention of one new token per row over the cache plus itself.

    q [B, 1, Hq, hd]; k_cache, v_cache [B, T, Hkv, hd] as stored (before the new token is
    written); cache_valid [B, T] bool (the slots the token may see, its own slot excluded);
    k_new, v_new [B, 1, Hkv, hd]. GQA: query head j reads kv head j // (Hq / Hkv). Returns
    [B, 1, Hq, hd] fp32. The cache is read as it is stored, with multiply-and-reduce: one
    query is bound by reading the cache, and a dot would first transpose it into the
    batch-major layout a dot needs, every step; reading it before the write lets the write
    update the buffer in place.
    """
    b, _, hq, hd = q.shape
    hkv = k_cache.shape[2]
    qg = q.reshape(b, 1, hkv, hq // hkv, hd).astype(jnp.float32) / jnp.sqrt(jnp.float32(hd))
    s_old = jnp.sum(qg * k_cache[:, :, :, None, :].astype(jnp.float32), axis=-1)  # [B, T, Hkv, G]
    s_old = jnp.where(cache_valid[:, :, None, None], s_old, -jnp.inf)
    s_new = jnp.sum(qg * k_new[:, :, :, None, :].astype(jnp.float32), axis=-1)  # [B, 1, Hkv, G]
    m = jnp.maximum(jnp.max(s_old, axis=1, keepdims=True), s_new)
    e_old, e_new = jnp.exp(s_old - m), jnp.exp(s_new - m)
    denom = jnp.sum(e_old, axis=1) + e_new[:, 0]  # [B, Hkv, G]
    num = (jnp.sum(e_old[..., None] * v_cache[:, :, :, None, :].astype(jnp.float32), axis=1)
           + e_new[:, 0, ..., None] * v_new[:, 0, :, None, :].astype(jnp.float32))  # [B, Hkv, G, hd]
    return (num / denom[..., None]).reshape(b, 1, hq, hd)


def decode_step_inplace(params: Params, cfg: ModelConfig, embeds: jax.Array, cache: dict, rope_deltas: jax.Array,
                        *, dtype=jnp.float32):
    """embeds [B, 1, D] -> (logits [B, 1, V] fp32, hidden [B, 1, D] after the final norm, cache).

    The new token takes slot ``cache["index"]`` and the M-RoPE id ``(valid slots) +
    rope_deltas`` on all three axes, and sees the valid slots before its own, as in
    ``qwen25vl.decode_step``.
    """
    tcfg = cfg.text
    b = embeds.shape[0]
    hq, hkv, hd = tcfg.num_attention_heads, tcfg.num_key_value_heads, tcfg.head_dim
    index = jnp.asarray(cache["index"], jnp.int32)
    pos = jnp.sum(cache["mask"], axis=1, dtype=jnp.int32) + jnp.asarray(rope_deltas, jnp.int32).reshape(b)
    cos, sin = mrope_cos_sin(jnp.broadcast_to(pos[None, :, None], (3, b, 1)), tcfg)
    slots = jnp.arange(cache["mask"].shape[1], dtype=jnp.int32)
    cache_valid = cache["mask"] & (slots < index)[None]
    new_mask = jax.lax.dynamic_update_slice(cache["mask"], jnp.ones((b, 1), bool), (0, index))

    def body(h, xs):
        p, k_layer, v_layer = xs
        x = layers.rms_norm(h, p["input_layernorm"]["scale"], tcfg.rms_norm_eps)
        a = p["self_attn"]
        q = layers.apply_rotary(layers.dense(x, a["q_proj"], dtype).reshape(b, 1, hq, hd), cos, sin)
        k = layers.apply_rotary(layers.dense(x, a["k_proj"], dtype).reshape(b, 1, hkv, hd), cos, sin)
        v = layers.dense(x, a["v_proj"], dtype).reshape(b, 1, hkv, hd)
        k, v = k.astype(k_layer.dtype), v.astype(v_layer.dtype)  # attend to what the cache will keep
        out = single_query_attention(q, k_layer, v_layer, cache_valid, k, v)
        h = h + layers.dense(out.reshape(b, 1, hq * hd).astype(dtype), a["o_proj"], dtype)
        x = layers.rms_norm(h, p["post_attention_layernorm"]["scale"], tcfg.rms_norm_eps)
        h = h + layers.gated_mlp(x, p["mlp"], dtype)
        return h, (k, v)

    # The layers only read the cache; the new keys/values of all layers go in afterwards, one
    # write per cache, the cache's last use: XLA updates the buffer in place.
    h, (k_new, v_new) = jax.lax.scan(body, embeds.astype(dtype), (params["text"]["layers"], cache["k"], cache["v"]))
    ck = jax.lax.dynamic_update_slice(cache["k"], k_new, (0, 0, index, 0, 0))
    cv = jax.lax.dynamic_update_slice(cache["v"], v_new, (0, 0, index, 0, 0))
    h = layers.rms_norm(h, params["text"]["norm"]["scale"], tcfg.rms_norm_eps)
    new_cache = {"k": ck, "v": cv, "mask": new_mask, "index": index + 1}
    return qwen25vl.lm_logits(params, cfg, h), h, new_cache
