"""What the decode loop feeds at a latent pad under a latent ablation (the diagnostics of
``ilvr_jax.evaluate.diagnostics``): pure functions of the vector the normal rule would feed
(the previous step's final-norm hidden state, method section 6), applied inside the compiled
loop when ``DecodeConfig.latent_ablation`` names a mode.

* ``zeros``: the zero vector;
* ``pad``: the ``<|latent_pad|>`` token's input embedding;
* ``shuffle``: the latents another row fed in its normal run (row r's j-th pad gets the
  donor's j-th latent, cycling when the donor fed fewer; zeros when it fed none);
* ``noise``: Gaussian noise rescaled to the norm of the vector it replaces (seeded).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NONE = "none"
ABLATIONS = ("zeros", "pad", "shuffle", "noise")


def check_ablation(mode: str) -> str:
    """``mode`` if it is ``"none"`` or one of :data:`ABLATIONS`; else ValueError naming them."""
    if mode != NONE and mode not in ABLATIONS:
        raise ValueError(f"unknown latent ablation {mode!r}; known: {', '.join(ABLATIONS)}")
    return mode


def noise_like(hidden: jax.Array, key: jax.Array) -> jax.Array:
    """Gaussian noise with each row's L2 norm equal to that row of ``hidden`` [B, D]."""
    h = hidden.astype(jnp.float32)
    eps = jax.random.normal(key, h.shape, jnp.float32)
    scale = jnp.linalg.norm(h, axis=-1, keepdims=True) / jnp.maximum(jnp.linalg.norm(eps, axis=-1, keepdims=True),
                                                                       1e-30)
    return (eps * scale).astype(hidden.dtype)


def ablate_fed_latents(mode: str, hidden: jax.Array, *, pad_embedding: jax.Array | None = None,
                       key: jax.Array | None = None, donor_latents: jax.Array | None = None,
                       donor_counts: jax.Array | None = None, latent_index: jax.Array | None = None) -> jax.Array:
    """The vector fed at a latent pad under ablation ``mode`` (static), per row.

    hidden [B, D]: the vector the normal rule would feed (the previous step's final-norm
    hidden state). ``pad``: pad_embedding [D]. ``noise``: key. ``shuffle``: donor_latents
    [B, J, D] (row r: the latents its donor fed, in order), donor_counts [B] (how many of
    them are real) and latent_index [B] (how many latents row r has fed before this one).
    ``none`` returns ``hidden`` unchanged.
    """
    check_ablation(mode)
    if mode == NONE:
        return hidden
    if mode == "zeros":
        return jnp.zeros_like(hidden)
    if mode == "pad":
        if pad_embedding is None:
            raise ValueError("latent ablation 'pad' needs the <|latent_pad|> embedding")
        return jnp.broadcast_to(pad_embedding.astype(hidden.dtype), hidden.shape)
    if mode == "noise":
        if key is None:
            raise ValueError("latent ablation 'noise' needs a PRNG key")
        return noise_like(hidden, key)
    if donor_latents is None or donor_counts is None or latent_index is None:
        raise ValueError("latent ablation 'shuffle' needs donor_latents, donor_counts and latent_index")
    counts = jnp.asarray(donor_counts, jnp.int32)
    j = jnp.where(counts > 0, jnp.asarray(latent_index, jnp.int32) % jnp.maximum(counts, 1), 0)
    vec = jnp.take_along_axis(donor_latents, j[:, None, None], axis=1)[:, 0]
    return jnp.where((counts > 0)[:, None], vec, 0).astype(hidden.dtype)
