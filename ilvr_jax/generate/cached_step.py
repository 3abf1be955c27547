"""One-token decoder step that updates the KV cache in place.

The same maths as ``qwen25vl.decode_step`` (same layers, same cache layout
``{"k", "v": [L, B, T, Hkv, hd], "mask": [B, T], "index"}``), arranged for a decode loop:
the stacked cache rides in the carry of the scan over layers, each layer writes only its
new token's key/value (``dynamic_update_slice`` of one slot) and reads its own layer of the
cache. ``decoder_forward`` instead passes the cache through the scan as per-layer inputs and
outputs, which copies the whole cache every step: a cost that grows with batch x cache
length and dominated small-model decoding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ilvr_jax.model import layers, qwen25vl
from ilvr_jax.model.config import ModelConfig
from ilvr_jax.model.rope import mrope_cos_sin
from ilvr_jax.model.text import attention_mask_4d

Params = dict[str, Any]


def decode_step_inplace(params: Params, cfg: ModelConfig, embeds: jax.Array, cache: dict, rope_deltas: jax.Array,
                        *, dtype=jnp.float32, attn_impl: str | None = None):
    """embeds [B, 1, D] -> (logits [B, 1, V] fp32, hidden [B, 1, D] after the final norm, cache).

    The new token takes slot ``cache["index"]`` and the M-RoPE id ``(valid slots) +
    rope_deltas`` on all three axes, as in ``qwen25vl.decode_step``.
    """
    tcfg = cfg.text
    b = embeds.shape[0]
    hq, hkv, hd = tcfg.num_attention_heads, tcfg.num_key_value_heads, tcfg.head_dim
    index = jnp.asarray(cache["index"], jnp.int32)
    pos = jnp.sum(cache["mask"], axis=1, dtype=jnp.int32) + jnp.asarray(rope_deltas, jnp.int32).reshape(b)
    cos, sin = mrope_cos_sin(jnp.broadcast_to(pos[None, :, None], (3, b, 1)), tcfg)
    new_mask = jax.lax.dynamic_update_slice(cache["mask"], jnp.ones((b, 1), bool), (0, index))
    mask = attention_mask_4d(new_mask, index[None])
    n_layers = tcfg.num_hidden_layers

    def body(carry, xs):
        h, ck, cv = carry
        p, layer = xs
        x = layers.rms_norm(h, p["input_layernorm"]["scale"], tcfg.rms_norm_eps)
        a = p["self_attn"]
        q = layers.apply_rotary(layers.dense(x, a["q_proj"], dtype).reshape(b, 1, hq, hd), cos, sin)
        k = layers.apply_rotary(layers.dense(x, a["k_proj"], dtype).reshape(b, 1, hkv, hd), cos, sin)
        v = layers.dense(x, a["v_proj"], dtype).reshape(b, 1, hkv, hd)
        ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (layer, 0, index, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (layer, 0, index, 0, 0))
        k_all = jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False).astype(dtype)
        v_all = jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False).astype(dtype)
        out = layers.attention(q, k_all, v_all, mask, attn_impl).reshape(b, 1, hq * hd)
        h = h + layers.dense(out, a["o_proj"], dtype)
        x = layers.rms_norm(h, p["post_attention_layernorm"]["scale"], tcfg.rms_norm_eps)
        h = h + layers.gated_mlp(x, p["mlp"], dtype)
        return (h, ck, cv), None

    h0 = embeds.astype(dtype)
    (h, ck, cv), _ = jax.lax.scan(body, (h0, cache["k"], cache["v"]),
                                  (params["text"]["layers"], jnp.arange(n_layers, dtype=jnp.int32)))
    h = layers.rms_norm(h, params["text"]["norm"]["scale"], tcfg.rms_norm_eps)
    new_cache = {"k": ck, "v": cv, "mask": new_mask, "index": index + 1}
    return qwen25vl.lm_logits(params, cfg, h), h, new_cache
