"""The whole Qwen2.5-VL: token embedding, vision tower, image-feature merge, M-RoPE
position ids, the decoder, and the LM head; plus prefill / one-step decode with a KV cache.

Data flow of :func:`forward`::

    embeds   = E[input_ids]                      (or the given inputs_embeds)
    features = vision_forward(pixel_values)      [B, P/4, D], per sample
    embeds[b, k-th image token of b] = features[b, k]
    position_ids, rope_deltas = mrope_position_ids(input_ids, attention_mask, image_grid_thw)
    hidden   = decoder(embeds, position_ids, attention_mask)   (final-normed)
    logits   = hidden @ W_lm   (W_lm = E^T when the head is tied), fp32
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ilvr_jax import sharding
from ilvr_jax.model import text as text_lib
from ilvr_jax.model.config import ModelConfig, TextConfig
from ilvr_jax.model.rope import mrope_position_ids

Params = dict[str, Any]


class ModelOutput(NamedTuple):
    """logits [B, S, V] fp32 (None when not requested); hidden [B, S, D] (last layer, after
    the final norm); cache (None without one); position_ids [3, B, S] used;
    rope_deltas [B] int32 (None when position_ids were given)."""

    logits: jax.Array | None
    hidden: jax.Array
    cache: dict | None
    position_ids: jax.Array
    rope_deltas: jax.Array | None


def embed_tokens(params: Params, ids: jax.Array) -> jax.Array:
    """Token embeddings ``E[ids]`` [..., D] (in the embedding's dtype)."""
    return jnp.take(params["text"]["embed_tokens"]["embedding"], ids, axis=0)


def merge_image_features(embeds: jax.Array, input_ids: jax.Array, image_features: jax.Array,
                         cfg: ModelConfig) -> jax.Array:
    """Puts merged vision token k of sample b at the k-th image token of sample b.

    embeds [B, S, D], input_ids [B, S], image_features [B, N, D] (N = P // 4) -> [B, S, D].
    Per sample, this is HF's ``masked_scatter`` of the concatenated image features.
    """
    is_img = input_ids == cfg.image_token_id
    k = jnp.cumsum(is_img.astype(jnp.int32), axis=1) - 1
    k = jnp.clip(k, 0, image_features.shape[1] - 1)
    gathered = jnp.take_along_axis(image_features, k[..., None], axis=1)
    return jnp.where(is_img[..., None], gathered.astype(embeds.dtype), embeds)


def lm_logits(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """fp32 logits ``hidden @ W`` [..., V] with W = lm_head.kernel, or E^T when tied."""
    if cfg.text.tie_word_embeddings:
        w = params["text"]["embed_tokens"]["embedding"].astype(hidden.dtype)
        logits = jnp.einsum("...d,vd->...v", hidden, w, preferred_element_type=jnp.float32)
    else:
        w = params["lm_head"]["kernel"].astype(hidden.dtype)
        logits = jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32)
    if logits.ndim == 3:
        logits = sharding.constrain(logits, ("batch", "seq", "act_vocab"))
    return logits


def image_features(params: Params, cfg: ModelConfig, pixel_values: jax.Array, image_grid_thw: jax.Array,
                   *, dtype=jnp.float32, remat_policy: str = "none", attn_impl: str | None = None) -> jax.Array:
    """Merged vision tokens [B, P // 4, D] of each sample's images (zeros past the real ones)."""
    from ilvr_jax.model.vision import vision_forward

    return vision_forward(params["visual"], cfg.vision, pixel_values, image_grid_thw, dtype=dtype,
                          remat_policy=remat_policy, attn_impl=attn_impl)


def forward(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array | None,
            pixel_values: jax.Array | None = None, image_grid_thw: jax.Array | None = None, *,
            inputs_embeds: jax.Array | None = None, position_ids: jax.Array | None = None,
            cache: dict | None = None, dtype=jnp.float32, remat_policy: str = "none",
            attn_impl: str | None = None, return_logits: bool = True) -> ModelOutput:
    """Qwen2.5-VL forward pass.

    Args:
      input_ids: [B, S] int. Always needed (image-token positions and M-RoPE ids come from it),
        also when ``inputs_embeds`` is given.
      attention_mask: [B, S] (1 = real token) or None.
      pixel_values: [B, P, patch_dim] per-sample patches, or None (no vision tower run).
      image_grid_thw: [B, I, 3] per-sample grids (zero rows = no image). Used for M-RoPE ids
        even when ``pixel_values`` is None (e.g. when image features are already in
        ``inputs_embeds``).
      inputs_embeds: [B, S, D] used instead of ``E[input_ids]``; image features are still
        scattered in when ``pixel_values`` is given.
      position_ids: [3, B, S] explicit M-RoPE ids. Must be given when the cache already
        holds tokens (ids computed from this chunk alone would restart at 0).
      cache: KV cache from :func:`init_cache` (written at its index, returned updated).
      dtype: compute dtype; logits are fp32 either way.
    """
    input_ids = jnp.asarray(input_ids)
    b, s = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((b, s), jnp.int32)
    embeds = embed_tokens(params, input_ids) if inputs_embeds is None else inputs_embeds
    embeds = embeds.astype(dtype)
    if pixel_values is not None:
        if image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        feats = image_features(params, cfg, pixel_values, image_grid_thw, dtype=dtype,
                               remat_policy=remat_policy, attn_impl=attn_impl)
        embeds = merge_image_features(embeds, input_ids, feats, cfg)
    rope_deltas = None
    if position_ids is None:
        position_ids, rope_deltas = mrope_position_ids(input_ids, attention_mask, image_grid_thw, cfg)
    hidden, new_cache = text_lib.decoder_forward(
        params["text"], cfg.text, embeds, position_ids, attention_mask, cache=cache, dtype=dtype,
        remat_policy=remat_policy, attn_impl=attn_impl)
    logits = lm_logits(params, cfg, hidden) if return_logits else None
    return ModelOutput(logits=logits, hidden=hidden, cache=new_cache, position_ids=position_ids,
                       rope_deltas=rope_deltas)


def init_cache(cfg: ModelConfig | TextConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """Empty KV cache: k, v [L, B, max_len, Hkv, hd], mask [B, max_len] bool, index int32."""
    tcfg = cfg.text if isinstance(cfg, ModelConfig) else cfg
    return text_lib.init_cache(tcfg, batch, max_len, dtype)


def prefill(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
            pixel_values: jax.Array | None, image_grid_thw: jax.Array | None, max_len: int, *,
            dtype=jnp.float32, cache_dtype=None, attn_impl: str | None = None):
    """Runs the prompt into a fresh cache of ``max_len`` slots.

    Returns (logits at each row's last real token [B, V] fp32, cache, rope_deltas [B]).
    """
    b, s = input_ids.shape
    cache = init_cache(cfg, b, max_len, cache_dtype or dtype)
    out = forward(params, cfg, input_ids, attention_mask, pixel_values, image_grid_thw, cache=cache,
                  dtype=dtype, attn_impl=attn_impl, return_logits=False)
    valid = jnp.asarray(attention_mask).astype(bool)
    last = jnp.max(jnp.where(valid, jnp.arange(s)[None], 0), axis=1)
    h_last = jnp.take_along_axis(out.hidden, last[:, None, None], axis=1)[:, 0]
    return lm_logits(params, cfg, h_last), out.cache, out.rope_deltas


def decode_step(params: Params, cfg: ModelConfig, tokens: jax.Array, cache: dict, rope_deltas: jax.Array, *,
                dtype=jnp.float32, attn_impl: str | None = None):
    """One generation step for every row.

    tokens: token ids [B, 1] or input embeddings [B, 1, D] (e.g. a fed-back hidden state).
    The new token's M-RoPE id (same on all three axes) is ``(number of valid cache slots) +
    rope_deltas``, as HF's generation computes it from the growing attention mask.
    Returns (logits [B, 1, V] fp32, hidden [B, 1, D] after the final norm, new cache).
    """
    if tokens.ndim == 2:
        embeds = embed_tokens(params, tokens)
    else:
        embeds = tokens
    b = embeds.shape[0]
    pos = jnp.sum(cache["mask"], axis=1, dtype=jnp.int32) + jnp.asarray(rope_deltas, jnp.int32).reshape(b)
    position_ids = jnp.broadcast_to(pos[None, :, None], (3, b, 1))
    hidden, new_cache = text_lib.decoder_forward(params["text"], cfg.text, embeds, position_ids,
                                                 jnp.ones((b, 1), jnp.int32), cache=cache, dtype=dtype,
                                                 attn_impl=attn_impl)
    return lm_logits(params, cfg, hidden), hidden, new_cache


# ----------------------------------------------------------------------------- params
_TRUNC_STD = 0.87962566  # std of a unit normal truncated to [-2, 2]


def _normal(rng, shape, dtype, std=0.02):
    x = jax.random.truncated_normal(rng, -2.0, 2.0, shape, jnp.float32)
    return (x * (std / _TRUNC_STD)).astype(dtype)


def init_text_params(cfg: TextConfig, rng: jax.Array, dtype=jnp.float32) -> Params:
    """Random language-model params: truncated-normal kernels (std 0.02), zero biases, unit norms."""
    d, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    keys = iter(jax.random.split(rng, 8))
    return {
        "embed_tokens": {"embedding": _normal(next(keys), (cfg.vocab_size, d), dtype)},
        "layers": {
            "input_layernorm": {"scale": jnp.ones((n, d), dtype)},
            "post_attention_layernorm": {"scale": jnp.ones((n, d), dtype)},
            "self_attn": {
                "q_proj": {"kernel": _normal(next(keys), (n, d, q), dtype), "bias": jnp.zeros((n, q), dtype)},
                "k_proj": {"kernel": _normal(next(keys), (n, d, kv), dtype), "bias": jnp.zeros((n, kv), dtype)},
                "v_proj": {"kernel": _normal(next(keys), (n, d, kv), dtype), "bias": jnp.zeros((n, kv), dtype)},
                "o_proj": {"kernel": _normal(next(keys), (n, q, d), dtype)},
            },
            "mlp": {
                "gate_proj": {"kernel": _normal(next(keys), (n, d, i), dtype)},
                "up_proj": {"kernel": _normal(next(keys), (n, d, i), dtype)},
                "down_proj": {"kernel": _normal(next(keys), (n, i, d), dtype)},
            },
        },
        "norm": {"scale": jnp.ones((d,), dtype)},
    }


def init_params(cfg: ModelConfig, rng: jax.Array, dtype=jnp.float32) -> Params:
    """Random params of the whole model (the tree of the contract; no lm_head when tied)."""
    from ilvr_jax.model.vision import init_vision_params

    k_vis, k_text, k_head = jax.random.split(rng, 3)
    params = {"visual": init_vision_params(cfg.vision, k_vis, dtype),
              "text": init_text_params(cfg.text, k_text, dtype)}
    if not cfg.text.tie_word_embeddings:
        params["lm_head"] = {"kernel": _normal(k_head, (cfg.text.hidden_size, cfg.text.vocab_size), dtype)}
    return params


def text_param_axes() -> Params:
    """Logical axis names of ``params["text"]``."""
    L = "layers"
    return {
        "embed_tokens": {"embedding": ("vocab", "embed")},
        "layers": {
            "input_layernorm": {"scale": (L, "norm")},
            "post_attention_layernorm": {"scale": (L, "norm")},
            "self_attn": {
                "q_proj": {"kernel": (L, "embed", "qkv"), "bias": (L, "qkv")},
                "k_proj": {"kernel": (L, "embed", "qkv"), "bias": (L, "qkv")},
                "v_proj": {"kernel": (L, "embed", "qkv"), "bias": (L, "qkv")},
                "o_proj": {"kernel": (L, "qkv", "embed")},
            },
            "mlp": {
                "gate_proj": {"kernel": (L, "embed", "mlp")},
                "up_proj": {"kernel": (L, "embed", "mlp")},
                "down_proj": {"kernel": (L, "mlp", "embed")},
            },
        },
        "norm": {"scale": ("norm",)},
    }


def param_axes(cfg: ModelConfig) -> Params:
    """The params tree of ``cfg`` with a tuple of logical axis names at every leaf."""
    from ilvr_jax.model.vision import vision_param_axes

    axes = {"visual": vision_param_axes(cfg.vision), "text": text_param_axes()}
    if not cfg.text.tie_word_embeddings:
        axes["lm_head"] = {"kernel": ("embed", "vocab")}
    return axes
