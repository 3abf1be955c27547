"""The Qwen2 language model of Qwen2.5-VL: a stack of pre-norm decoder layers.

One layer, for the residual stream ``h`` [B, S, D]::

    x   = RMSNorm(h)
    q,k,v = x Wq + bq, x Wk + bk, x Wv + bv           (Hq query heads, Hkv kv heads)
    q,k = M-RoPE(q, k, position_ids)                  (chunked, see rope.py)
    h   = h + softmax(q k^T / sqrt(hd) + mask) v Wo   (GQA; o_proj has no bias)
    h   = h + down(silu(gate(RMSNorm(h))) * up(RMSNorm(h)))

and the output is ``RMSNorm(h)`` after the last layer. Layers are stacked on a leading
axis and run with ``jax.lax.scan``; the scanned body goes through ``layers.remat``.

Mask: a query attends to a key when the key is a real token (``attention_mask``) and not
in the future. Each query also attends to itself, which changes nothing for real tokens
but keeps rows of padded queries non-empty (no NaN in any attention implementation).

KV cache (``init_cache``): ``{"k", "v": [L, B, T, Hkv, hd], "mask": [B, T] bool, "index": int32}``.
A call with a cache writes its S new keys/values and their validity (``attention_mask``)
at slots ``index .. index+S-1`` (``lax.dynamic_update_slice``), attends to all valid
earlier slots plus causally among the new tokens, and returns the new cache with
``index + S``. Alternatively ``slots`` [B, S] gives every new token its own cache slot
(per row; e.g. absolute sequence positions, with one spare slot absorbing writes of tokens
whose ``attention_mask`` is 0): keys/values and validity are scattered there, a query
attends to valid slots ``<=`` its own slot, and ``index`` is left unchanged. Either way the
call is a pure function of its inputs, and differentiable.

Context blocks (``context``): keys/values of tokens that precede every new token, kept by
the caller from earlier calls (``return_kv=True`` returns a call's own keys/values
[L, B, S, Hkv, hd]), each ``(k, v, mask [B, T])``. The new tokens attend to the valid keys
of every block and causally among themselves, with one softmax over all of them
(``layers.attention_over_blocks``). Unlike a cache, the blocks are never written to, so a
differentiated prefix computed piece by piece holds each piece once.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ilvr_jax import sharding
from ilvr_jax.model import layers
from ilvr_jax.model.config import TextConfig
from ilvr_jax.model.rope import apply_rotary, mrope_cos_sin

Params = dict[str, Any]
Cache = dict[str, jax.Array]


def init_cache(cfg: TextConfig, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
    """An empty KV cache for ``max_len`` tokens (no valid slot, write index 0)."""
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "mask": jnp.zeros((batch, max_len), bool),
        "index": jnp.zeros((), jnp.int32),
    }


def attention_mask_4d(key_valid: jax.Array, q_slots: jax.Array) -> jax.Array:
    """Boolean [B, 1, Sq, Sk]: key j visible to query i iff (valid_j and j <= slot_i) or j == slot_i.

    key_valid: [B, Sk] bool; q_slots: [Sq] or [B, Sq] int, the key slot each query occupies.
    """
    k_slots = jnp.arange(key_valid.shape[1], dtype=jnp.int32)
    q_slots = jnp.asarray(q_slots, jnp.int32)
    if q_slots.ndim == 1:
        q_slots = q_slots[None]
    causal = k_slots[None, None, :] <= q_slots[:, :, None]  # [B or 1, Sq, Sk]
    self_slot = k_slots[None, None, :] == q_slots[:, :, None]
    m = (key_valid[:, None, :] & causal) | self_slot
    return m[:, None]


def _write_cache(c: jax.Array, x: jax.Array, index, slots) -> jax.Array:
    """Writes x [B, S, ...] into the cache c [B, T, ...] at index (contiguous) or at slots [B, S]."""
    x = x.astype(c.dtype)
    if slots is None:
        return jax.lax.dynamic_update_slice(c, x, (0, index) + (0,) * (c.ndim - 2))
    rows = jnp.arange(c.shape[0])[:, None]
    return c.at[rows, slots].set(x)


def _attention_block(x: jax.Array, p: Params, cfg: TextConfig, cos: jax.Array, sin: jax.Array,
                     mask: jax.Array | layers.SegmentMask, kv_cache, index, slots, dtype, attn_impl,
                     context=None):
    b, s, _ = x.shape
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = layers.dense(x, p["q_proj"], dtype).reshape(b, s, hq, hd)
    k = layers.dense(x, p["k_proj"], dtype).reshape(b, s, hkv, hd)
    v = layers.dense(x, p["v_proj"], dtype).reshape(b, s, hkv, hd)
    q = sharding.constrain(apply_rotary(q, cos, sin), ("batch", "seq", "act_heads", None))
    k = sharding.constrain(apply_rotary(k, cos, sin), ("batch", "seq", "act_kv_heads", None))
    v = sharding.constrain(v, ("batch", "seq", "act_kv_heads", None))
    new_kv = None
    if kv_cache is not None:
        ck, cv = kv_cache
        ck = _write_cache(ck, k, index, slots)
        cv = _write_cache(cv, v, index, slots)
        new_kv = (ck, cv)
        k, v = ck.astype(dtype), cv.astype(dtype)
    if context is not None:
        new_kv = (k, v)
    if context:
        blocks = [(ck.astype(dtype), cv.astype(dtype), cm[:, None, None, :]) for ck, cv, cm in context]
        out = layers.attention_over_blocks(q, blocks + [(k, v, mask)], attn_impl)
    else:
        out = layers.attention(q, k, v, mask, attn_impl)
    out = sharding.constrain(out, ("batch", "seq", "act_heads", None)).reshape(b, s, hq * hd)
    return layers.dense(out, p["o_proj"], dtype), new_kv


def decoder_layer(h: jax.Array, p: Params, cfg: TextConfig, cos: jax.Array, sin: jax.Array,
                  mask: jax.Array | layers.SegmentMask, kv_cache=None, index=None, slots=None, *,
                  dtype=jnp.float32, attn_impl=None, context=None):
    """One decoder layer on the residual stream h [B, S, D] (params of one layer, unstacked).
    ``context``: this layer's slices ``(k [B,T,Hkv,hd], v, mask [B,T])`` of the context blocks.

    Returns (h, (k_cache, v_cache), or the new tokens' (k, v) with a context, or None)."""
    x = layers.rms_norm(h, p["input_layernorm"]["scale"], cfg.rms_norm_eps)
    attn, new_kv = _attention_block(x, p["self_attn"], cfg, cos, sin, mask, kv_cache, index, slots, dtype,
                                    attn_impl, context)
    h = sharding.constrain(h + attn, ("batch", "seq", "act_embed"))
    x = layers.rms_norm(h, p["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
    h = sharding.constrain(h + layers.gated_mlp(x, p["mlp"], dtype), ("batch", "seq", "act_embed"))
    return h, new_kv


def decoder_forward(params_text: Params, cfg: TextConfig, embeds: jax.Array, position_ids: jax.Array,
                    attention_mask: jax.Array | None, *, cache: Cache | None = None,
                    slots: jax.Array | None = None, dtype=jnp.float32, remat_policy: str = "none",
                    attn_impl: str | None = None, context=None, return_kv: bool = False,
                    unroll: int | bool = 1):
    """The decoder stack on input embeddings.

    Args:
      params_text: ``params["text"]`` (only ``layers`` and ``norm`` are read).
      embeds: [B, S, D] input embeddings.
      position_ids: [3, B, S] M-RoPE ids.
      attention_mask: [B, S] (1 = real token) or None (all real).
      cache: None, or a cache from :func:`init_cache`; the S tokens are written at its index.
      slots: [B, S] int cache slot of every new token (instead of the write index); needs a
        cache. Valid tokens need distinct slots; tokens with ``attention_mask`` 0 may share
        one spare slot.
      dtype: compute dtype of activations and matmuls (RMSNorm statistics and RoPE in fp32).
      context: a sequence of context blocks ``(k, v, mask)``, k and v [L, B, T, Hkv, hd],
        mask [B, T] (True = a valid key); every new token attends to all their valid keys.
        Not with a cache.
      return_kv: return the new tokens' keys/values (as the context blocks hold them)
        instead of a cache. Not with a cache.
      unroll: ``lax.scan``'s unroll of the layer loop (True = all layers inline). A scan
        compiles once per layer stack; unrolling removes the loop's per-layer overhead, which
        dominates one-token steps of a small model.

    Returns:
      (hidden [B, S, D] after the final norm, new cache or None), or with ``return_kv``
      (hidden, {"k", "v": [L, B, S, Hkv, hd]}).
    """
    b, s, _ = embeds.shape
    valid = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    cos, sin = mrope_cos_sin(position_ids, cfg)
    if cache is not None and (context is not None or return_kv):
        raise ValueError("context blocks and return_kv are not for a call with a cache")
    if return_kv and context is None:
        context = ()
    if cache is None:
        if slots is not None:
            raise ValueError("slots given without a cache")
        positions = jnp.arange(s, dtype=jnp.int32)
        # The same mask by its structure, for the splash kernel: real tokens share segment 0,
        # every padding token is a segment of its own (so it only ever sees itself there,
        # where the dense mask also shows it the real keys before it: padding rows differ).
        ids = jnp.where(valid, 0, -1 - positions[None, :])
        mask = layers.SegmentMask(ids, ids, dense=attention_mask_4d(valid, positions), causal=True)
        index = None
        new_mask = None
    else:
        index = jnp.asarray(cache["index"], jnp.int32)
        if slots is None:
            new_mask = jax.lax.dynamic_update_slice(cache["mask"], valid, (0, index))
            mask = attention_mask_4d(new_mask, index + jnp.arange(s, dtype=jnp.int32))
        else:
            slots = jnp.asarray(slots, jnp.int32)
            # A slot shared by several tokens (the spare slot) must only receive invalid ones:
            # which of the duplicate writes lands is unspecified.
            new_mask = cache["mask"].at[jnp.arange(b)[:, None], slots].set(valid)
            mask = attention_mask_4d(new_mask, slots)

    def body(h, xs):
        lp, kv, ctx_kv = xs
        ctx = None if context is None else [(ck, cv, cm) for (ck, cv), (_, _, cm) in zip(ctx_kv, context)]
        h, new_kv = decoder_layer(h, lp, cfg, cos, sin, mask, kv, index, slots, dtype=dtype,
                                  attn_impl=attn_impl, context=ctx)
        return h, new_kv

    body = layers.remat(body, remat_policy)
    h = sharding.constrain(embeds.astype(dtype), ("batch", "seq", "act_embed"))
    kv_xs = None if cache is None else (cache["k"], cache["v"])
    ctx_xs = None if context is None else [(ck, cv) for ck, cv, _ in context]
    h, kv_ys = jax.lax.scan(body, h, (params_text["layers"], kv_xs, ctx_xs), unroll=unroll)
    h = layers.rms_norm(h, params_text["norm"]["scale"], cfg.rms_norm_eps)
    if return_kv:
        return h, {"k": kv_ys[0], "v": kv_ys[1]}
    new_cache = None
    if cache is not None:
        new_cache = {"k": kv_ys[0], "v": kv_ys[1], "mask": new_mask,
                     "index": index + s if slots is None else index}
    return h, new_cache
