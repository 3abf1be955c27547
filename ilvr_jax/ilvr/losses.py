"""Stage-1 losses and the teacher-forcing substitution (ILVR method, sections 4 and 9).

All reductions return sums and counts (or per-sample values) so that the caller decides how
to average over a batch and over gradient-accumulation steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ilvr_jax import sharding
from ilvr_jax.ilvr.selection import cosine_similarity

IGNORE_INDEX = -100


def next_token_ce_per_sample(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sample next-token cross-entropy: (sum [B] fp32, count [B] int32).

    CE_b = sum_{t : labels[b, t+1] != -100} -log softmax(logits[b, t])[labels[b, t+1]]
    (HF shift: logits at t predict the label at t+1; log-softmax in fp32).
    """
    shift_logits = logits[:, :-1].astype(jnp.float32)
    shift_labels = labels[:, 1:]
    valid = shift_labels != IGNORE_INDEX
    logp = jax.nn.log_softmax(shift_logits, axis=-1)
    tgt = jnp.where(valid, shift_labels, 0)
    nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, nll, 0.0)
    return nll.sum(-1), valid.sum(-1).astype(jnp.int32)


def next_token_ce_chunked(hidden: jax.Array, head: jax.Array, labels: jax.Array, *,
                          tied: bool, chunk: int = 1024) -> tuple[jax.Array, jax.Array]:
    """:func:`next_token_ce_per_sample` of ``hidden @ W`` without the [B, S, V] logits.

    hidden [B, S, D] (final-normed, compute dtype); head: ``lm_head.kernel`` [D, V], or the
    token embedding [V, D] when ``tied``; labels [B, S]. Returns (sum [B] fp32, count [B]
    int32), the same numbers as ``next_token_ce_per_sample(lm_logits(hidden), labels)``.

    The sequence is cut into ``chunk``-token pieces (the last one padded with ignored
    targets) and a ``lax.scan`` computes each piece's fp32 logits (the head cast to the
    hidden dtype, fp32 accumulation, as ``lm_logits``), logsumexp and label logit. The body
    is rematerialised, so the backward recomputes a piece's logits instead of keeping all of
    them: at most one [B, chunk, V] block is live, instead of [B, S, V].
    """
    if chunk < 1:
        raise ValueError(f"CE chunk must be >= 1 tokens, got {chunk}")
    b, s, d = hidden.shape
    expected = 1 if tied else 0  # the axis of size D
    if head.ndim != 2 or head.shape[expected] != d:
        layout = "[V, D] (tied embedding)" if tied else "[D, V] (lm_head kernel)"
        raise ValueError(f"LM head of shape {head.shape} is not {layout} for hidden size {d}")
    # Position t predicts labels[t + 1]; the last position predicts nothing.
    targets = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), IGNORE_INDEX, labels.dtype)], axis=1)
    n = -(-s // chunk)
    pad = n * chunk - s
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    h = h.reshape(b, n, chunk, d).swapaxes(0, 1)                 # [n, B, C, D]
    targets = targets.reshape(b, n, chunk).swapaxes(0, 1)        # [n, B, C]

    def piece(w, h_c, t_c):
        w = w.astype(h_c.dtype)
        spec = "bcd,vd->bcv" if tied else "bcd,dv->bcv"
        logits = jnp.einsum(spec, h_c, w, preferred_element_type=jnp.float32).astype(jnp.float32)
        logits = sharding.constrain(logits, ("batch", "seq", "act_vocab"))
        valid = t_c != IGNORE_INDEX
        tgt = jnp.where(valid, t_c, 0)
        # log_softmax's own steps (shift by the stopped max), so the values match it.
        shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
        lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
        nll = lse - jnp.take_along_axis(shifted, tgt[..., None], axis=-1)[..., 0]
        return jnp.where(valid, nll, 0.0)

    piece = jax.checkpoint(piece, prevent_cse=False)

    def body(carry, xs):
        return carry, piece(head, *xs)

    _, nll = jax.lax.scan(body, None, (h, targets))              # [n, B, C]
    nll = nll.swapaxes(0, 1).reshape(b, n * chunk)[:, : s - 1]
    count = (labels[:, 1:] != IGNORE_INDEX).sum(-1).astype(jnp.int32)
    return nll.sum(-1), count


def next_token_ce(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy over the batch: (sum of token NLLs, number of target tokens).

    ``sum / count`` is HF ``CrossEntropyLoss(ignore_index=-100)`` on shifted logits, i.e. the
    token mean over the whole batch. Note on the reference: it runs one sample per
    micro-batch, takes the token mean per sample, and its model's ``forward`` takes no loss
    kwargs, so the trainer divides each micro-batch loss by the accumulation steps: the
    effective loss is the mean over samples of per-sample token means. Use
    ``next_token_ce_per_sample`` to reproduce that with batches > 1.
    """
    s, c = next_token_ce_per_sample(logits, labels)
    return s.sum(), c.sum()


def latent_positions(latent_starts: jax.Array, segment_mask: jax.Array, kstar: jax.Array,
                     K: int) -> tuple[jax.Array, jax.Array]:
    """Pad positions of every segment: (pos [B,M,K] = latent_starts + 1 + k,
    fed [B,M,K] = segment present and k < K*)."""
    k = jnp.arange(K)
    pos = latent_starts[..., None] + 1 + k
    fed = segment_mask[..., None] & (k < kstar[..., None])
    return pos, fed


def teacher_forcing_embeds(embeds: jax.Array, targets: jax.Array, kstar: jax.Array,
                           latent_starts: jax.Array, segment_mask: jax.Array
                           ) -> tuple[jax.Array, jax.Array]:
    """Teacher forcing (method section 4): the input embedding at the first K* pads of
    segment m is replaced by Z_m; the other pads keep their token embedding.

        e'[b, latent_starts[b,m] + 1 + k] = targets[b, m, k]   for k < kstar[b, m]

    embeds [B,S,D], targets [B,M,K,D] (cast to embeds' dtype), kstar [B,M].
    Returns (embeds' [B,S,D], fed_mask [B,S] bool).
    """
    b, s, d = embeds.shape
    K = targets.shape[2]
    pos, fed = latent_positions(latent_starts, segment_mask, kstar, K)
    pos = jnp.where(fed, pos, s).reshape(b, -1)  # s is out of range: dropped
    vals = targets.reshape(b, -1, d).astype(embeds.dtype)
    rows = jnp.arange(b)[:, None]
    out = embeds.at[rows, pos].set(vals, mode="drop")
    fed_mask = jnp.zeros((b, s), bool).at[rows, pos].set(True, mode="drop")
    return out, fed_mask


def alignment_noise(noise_key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """eps ~ N(0, I) in fp32 with the shape of the fed embeddings [B,S,D]; eps[b, p] is
    the noise added to the target at position p."""
    return jax.random.normal(noise_key, shape, jnp.float32)


def latent_alignment_loss(hidden: jax.Array, embeds_fed: jax.Array, fed_mask: jax.Array,
                          noise_key: jax.Array, noise_scale: float = 0.01
                          ) -> tuple[jax.Array, jax.Array]:
    """Next-step latent alignment (method sections 4 and 9).

    For every fed position p (fed_mask[b, p], p >= 1)::

        c_p = cos(h_{p-1}, stopgrad(e_p) + noise_scale * eps_p),  eps = alignment_noise(key, e.shape)
        L_sim[b] = 1 - mean_{p of sample b} c_p

    Cosine in fp32 with torch ``F.cosine_similarity`` semantics (eps = 1e-8 clamps each
    norm). hidden [B,S,D]: student last hidden states (after the final norm);
    embeds_fed [B,S,D]: the input embeddings actually fed. Returns
    (L_sim [B] fp32, pairs [B] int32); a sample without pairs has L_sim = 0, pairs = 0.
    """
    pred = hidden[:, :-1].astype(jnp.float32)
    tgt = jax.lax.stop_gradient(embeds_fed.astype(jnp.float32))
    eps = alignment_noise(noise_key, tgt.shape)
    tgt = (tgt + noise_scale * eps)[:, 1:]
    pair = fed_mask[:, 1:]
    cos = cosine_similarity(pred, tgt)  # [B,S-1]
    n = pair.sum(-1)
    mean_cos = jnp.where(pair, cos, 0.0).sum(-1) / jnp.maximum(n, 1).astype(jnp.float32)
    return jnp.where(n > 0, 1.0 - mean_cos, 0.0), n.astype(jnp.int32)


def mean_over_samples(per_sample: jax.Array, include: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over included samples, number included): the caller divides after summing
    over micro-batches / devices. With ``include`` = real samples this reproduces the
    reference (batch 1, loss / accumulation steps: samples without segments add 0 but still
    count); with ``include`` = samples with pairs it averages only over aligned samples."""
    inc = include.astype(jnp.float32)
    return (per_sample * inc).sum(), inc.sum()
