"""Stage-1 losses and teacher forcing against torch (cross_entropy, cosine_similarity,
autograd) and plain NumPy loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ilvr_jax.ilvr import (alignment_noise, cosine_similarity, latent_alignment_loss, next_token_ce,
                           next_token_ce_per_sample, teacher_forcing_embeds)


# ----------------------------------------------------------------------------- CE
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_next_token_ce_matches_torch(dtype):
    rng = np.random.default_rng(0)
    B, S, V = 3, 9, 13
    logits = rng.standard_normal((B, S, V)).astype(np.float32) * 3
    logits = np.asarray(jnp.asarray(logits, dtype).astype(jnp.float32))  # what the model outputs
    labels = rng.integers(0, V, (B, S)).astype(np.int32)
    labels[:, :4] = -100
    labels[1, 6] = -100
    labels[2, :] = -100                      # a sample without targets
    s, c = jax.jit(next_token_ce)(jnp.asarray(logits, dtype), jnp.asarray(labels))
    ref = F.cross_entropy(torch.tensor(logits[:, :-1]).reshape(-1, V), torch.tensor(labels[:, 1:]).reshape(-1).long(),
                          ignore_index=-100)
    assert int(c) == int((labels[:, 1:] != -100).sum())
    np.testing.assert_allclose(float(s / c), ref.item(), rtol=1e-6)
    ps, pc = jax.jit(next_token_ce_per_sample)(jnp.asarray(logits, dtype), jnp.asarray(labels))
    for b in range(2):
        rb = F.cross_entropy(torch.tensor(logits[b, :-1]), torch.tensor(labels[b, 1:]).long(), ignore_index=-100)
        np.testing.assert_allclose(float(ps[b] / pc[b]), rb.item(), rtol=1e-6)
    assert int(pc[2]) == 0 and float(ps[2]) == 0.0


# ----------------------------------------------------------------------------- cosine
def test_cosine_similarity_matches_torch_eps_semantics():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    y = rng.standard_normal((6, 5)).astype(np.float32)
    x[1] *= 1e-7        # ||x|| < eps = 1e-8 ... and near it: each norm is clamped on its own
    y[1] *= 1e-7
    x[2] = 0.0          # zero vector -> 0
    x[3] *= 2e-9
    ours = np.asarray(jax.jit(cosine_similarity)(jnp.asarray(x), jnp.asarray(y)))
    ref = F.cosine_similarity(torch.tensor(x), torch.tensor(y), dim=-1).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- teacher forcing
def test_teacher_forcing_positions():
    rng = np.random.default_rng(2)
    B, S, D, M, K = 2, 30, 4, 3, 4
    embeds = rng.standard_normal((B, S, D)).astype(np.float32)
    targets = rng.standard_normal((B, M, K, D)).astype(np.float32)
    latent_starts = np.array([[3, 10, 20], [5, 0, 0]], np.int32)
    segment_mask = np.array([[True, True, True], [True, False, False]])
    kstar = np.array([[4, 2, 1], [3, 0, 0]], np.int32)
    out, fed = jax.jit(teacher_forcing_embeds)(*(jnp.asarray(a) for a in (embeds, targets, kstar,
                                                                           latent_starts, segment_mask)))
    ref = embeds.copy()
    ref_fed = np.zeros((B, S), bool)
    for b in range(B):
        for m in range(M):
            if not segment_mask[b, m]:
                continue
            for k in range(kstar[b, m]):
                ref[b, latent_starts[b, m] + 1 + k] = targets[b, m, k]
                ref_fed[b, latent_starts[b, m] + 1 + k] = True
    np.testing.assert_array_equal(np.asarray(fed), ref_fed)
    np.testing.assert_array_equal(np.asarray(out), ref)
    assert ref_fed.sum() == 4 + 2 + 1 + 3
    out16, _ = teacher_forcing_embeds(jnp.asarray(embeds, jnp.bfloat16), jnp.asarray(targets), jnp.asarray(kstar),
                                      jnp.asarray(latent_starts), jnp.asarray(segment_mask))
    assert out16.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- alignment
def alignment_case(seed=3):
    rng = np.random.default_rng(seed)
    B, S, D = 3, 14, 8
    hidden = rng.standard_normal((B, S, D)).astype(np.float32)
    embeds = rng.standard_normal((B, S, D)).astype(np.float32)
    fed = np.zeros((B, S), bool)
    fed[0, [3, 4, 5, 9]] = True
    fed[1, [7]] = True            # sample 2 has no pairs
    return hidden, embeds, fed


def np_alignment(hidden, embeds, fed, eps, scale=0.01):
    out, n = [], []
    for b in range(hidden.shape[0]):
        cs = []
        for p in range(1, hidden.shape[1]):
            if fed[b, p]:
                h = hidden[b, p - 1].astype(np.float64)
                e = embeds[b, p].astype(np.float64) + scale * eps[b, p].astype(np.float64)
                cs.append(h @ e / (max(np.linalg.norm(h), 1e-8) * max(np.linalg.norm(e), 1e-8)))
        out.append(1 - np.mean(cs) if cs else 0.0)
        n.append(len(cs))
    return np.array(out), np.array(n)


def test_latent_alignment_loss_matches_numpy_and_torch():
    hidden, embeds, fed = alignment_case()
    key = jax.random.key(7)
    loss, n = jax.jit(latent_alignment_loss)(jnp.asarray(hidden), jnp.asarray(embeds), jnp.asarray(fed), key)
    eps = np.asarray(alignment_noise(key, embeds.shape))
    ref, ref_n = np_alignment(hidden, embeds, fed, eps)
    np.testing.assert_array_equal(np.asarray(n), ref_n)
    np.testing.assert_allclose(np.asarray(loss), ref, rtol=1e-6, atol=1e-6)
    assert float(loss[2]) == 0.0

    # The reference's own formulation (batch 1): shifted masks, fp32, F.cosine_similarity.
    # Gradients w.r.t. the hidden states agree too (the target is stop-gradient).
    grad = jax.grad(lambda h: latent_alignment_loss(h, jnp.asarray(embeds), jnp.asarray(fed), key)[0][0])(
        jnp.asarray(hidden))
    pred_h = torch.tensor(hidden[:1], requires_grad=True)
    inp_h = torch.tensor(embeds[:1])
    mask = torch.tensor(fed[:1])[:, 1:]
    pred = pred_h[..., :-1, :][mask].float()
    gt = inp_h[..., 1:, :][mask].detach().float() + 0.01 * torch.tensor(eps[:1, 1:])[mask]
    cos = F.cosine_similarity(gt, pred, dim=-1).mean()
    (1.0 - cos).backward()
    np.testing.assert_allclose(float(loss[0]), (1.0 - cos).item(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad[0]), pred_h.grad[0].numpy(), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(grad[1:]).max()) == 0.0


def test_alignment_noise_changes_target():
    hidden, embeds, fed = alignment_case()
    a = latent_alignment_loss(jnp.asarray(hidden), jnp.asarray(embeds), jnp.asarray(fed), jax.random.key(0))[0]
    b = latent_alignment_loss(jnp.asarray(hidden), jnp.asarray(embeds), jnp.asarray(fed), jax.random.key(1))[0]
    c = latent_alignment_loss(jnp.asarray(hidden), jnp.asarray(embeds), jnp.asarray(fed), jax.random.key(1),
                              noise_scale=0.0)[0]
    assert 0 < abs(float(a[0] - b[0])) < 0.05
    ref, _ = np_alignment(hidden, embeds, fed, np.zeros_like(embeds))
    np.testing.assert_allclose(np.asarray(c), ref, rtol=1e-6, atol=1e-6)


def test_alignment_gradient_finite_with_zero_rows():
    """A zero hidden row outside the pairs (e.g. padding) must not give NaN gradients."""
    hidden, embeds, fed = alignment_case()
    hidden[0, 11] = 0.0
    hidden[1, :] = 0.0
    embeds[0, 12] = 0.0
    g = jax.grad(lambda h: latent_alignment_loss(h, jnp.asarray(embeds), jnp.asarray(fed),
                                                 jax.random.key(0), noise_scale=0.0)[0].sum())(jnp.asarray(hidden))
    assert bool(jnp.isfinite(g).all())
    assert float(jnp.abs(g[0]).max()) > 0


# ----------------------------------------------------------------------------- chunked CE
def _ce_case(tied, dtype, B=3, S=37, D=16, V=50, seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((B, S, D)).astype(np.float32), dtype)
    head_shape = (V, D) if tied else (D, V)
    head = jnp.asarray(rng.standard_normal(head_shape).astype(np.float32) * 0.5)
    labels = rng.integers(0, V, (B, S)).astype(np.int32)
    labels[:, :5] = -100
    labels[0, 20:23] = -100
    labels[1, -1] = -100
    labels[2, :] = -100                      # a sample without targets
    weights = jnp.asarray(rng.uniform(0.5, 2.0, B).astype(np.float32))
    return hidden, head, jnp.asarray(labels), weights


def _full_ce(hidden, head, labels, tied):
    """Today's path: the model's fp32 logits [B, S, V], then the per-sample CE."""
    import types

    from ilvr_jax.model import qwen25vl

    cfg = types.SimpleNamespace(text=types.SimpleNamespace(tie_word_embeddings=tied))
    params = {"text": {"embed_tokens": {"embedding": head}}} if tied else {"lm_head": {"kernel": head}}
    return next_token_ce_per_sample(qwen25vl.lm_logits(params, cfg, hidden), labels)


def _value_and_grads(ce_fn, hidden, head, labels, weights):
    def loss(h, w):
        s, c = ce_fn(h, w, labels)
        return jnp.sum(weights * s), (s, c)

    (_, (s, c)), (gh, gw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(hidden, head)
    return s, c, gh, gw


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 64])  # divides S or not, = S, > S
def test_chunked_ce_equals_full_logits_value_and_grad(tied, dtype, chunk):
    from ilvr_jax.ilvr.losses import next_token_ce_chunked

    hidden, head, labels, weights = _ce_case(tied, dtype)
    ref = _value_and_grads(lambda h, w, l: _full_ce(h, w, l, tied), hidden, head, labels, weights)
    got = _value_and_grads(lambda h, w, l: next_token_ce_chunked(h, w, l, tied=tied, chunk=chunk),
                           hidden, head, labels, weights)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref[1]))
    assert int(got[1][2]) == 0 and float(got[0][2]) == 0.0
    assert got[2].dtype == ref[2].dtype == dtype and got[3].dtype == ref[3].dtype == jnp.float32
    # fp32: the same maths up to summation order. bf16: the per-chunk head gradients are
    # rounded to bf16 before they are summed over chunks (the full path rounds once).
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    for name, g, r in zip(("sum", "count", "d_hidden", "d_head"), got, ref):
        assert _rel(g, r) <= tol, (name, _rel(g, r))


def test_chunked_ce_matches_torch_fp32():
    from ilvr_jax.ilvr.losses import next_token_ce_chunked

    hidden, head, labels, weights = _ce_case(False, jnp.float32, seed=4)
    s, c, gh, gw = _value_and_grads(lambda h, w, l: next_token_ce_chunked(h, w, l, tied=False, chunk=8),
                                    hidden, head, labels, weights)
    th = torch.tensor(np.asarray(hidden), dtype=torch.float64, requires_grad=True)
    tw = torch.tensor(np.asarray(head), dtype=torch.float64, requires_grad=True)
    tl = torch.tensor(np.asarray(labels)).long()
    nll = F.cross_entropy((th @ tw)[:, :-1].transpose(1, 2), tl[:, 1:], ignore_index=-100, reduction="none")
    per_sample = nll.sum(-1)
    (per_sample * torch.tensor(np.asarray(weights), dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(np.asarray(s), per_sample.detach().numpy(), rtol=1e-5, atol=1e-5)
    assert _rel(gh, th.grad.numpy()) < 1e-5 and _rel(gw, tw.grad.numpy()) < 1e-5


def test_chunked_ce_rejects_bad_head():
    from ilvr_jax.ilvr.losses import next_token_ce_chunked

    hidden, head, labels, _ = _ce_case(False, jnp.float32)
    with pytest.raises(ValueError, match=r"not \[V, D\] \(tied embedding\)"):
        next_token_ce_chunked(hidden, head, labels, tied=True)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        next_token_ce_chunked(hidden, head, labels, tied=False, chunk=0)


def test_chunked_ce_compiled_temporaries_below_full_logits():
    """Compiled value-and-grad at S=4096, V=32000, D=256 (nothing is run). Measured on CPU:
    full logits path 2500 MiB of temporaries, 1024-token chunks 286 MiB; the logits alone
    are 500 MiB."""
    from ilvr_jax.ilvr.losses import next_token_ce_chunked

    B, S, D, V = 1, 4096, 256, 32000
    shapes = (jax.ShapeDtypeStruct((B, S, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
              jax.ShapeDtypeStruct((B, S), jnp.int32))

    def temp_bytes(ce_fn):
        def f(h, w, l):
            return jax.value_and_grad(lambda h, w: ce_fn(h, w, l)[0].sum(), argnums=(0, 1))(h, w)

        return jax.jit(f).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = B * S * V * 4
    full = temp_bytes(lambda h, w, l: _full_ce(h, w, l, False))
    chunked = temp_bytes(lambda h, w, l: next_token_ce_chunked(h, w, l, tied=False, chunk=1024))
    assert full >= logits_bytes
    assert chunked < logits_bytes and chunked < full / 4, (chunked, full)
