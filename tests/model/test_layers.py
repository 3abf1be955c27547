"""The memory-saving attention layouts of ``layers`` against torch's scaled_dot_product_attention
with the dense [N, N] segment mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ilvr_jax.model import layers


def _contiguous_segments(rng, n, max_len, pad_tail):
    """Segment ids of contiguous runs of 1..max_len positions, then ``pad_tail`` singleton
    ids (negative, as padding patches have)."""
    ids, seg = [], 0
    while len(ids) < n - pad_tail:
        ids += [seg] * int(rng.integers(1, max_len + 1))
        seg += 1
    ids = ids[: n - pad_tail] + [-1 - i for i in range(pad_tail)]
    return np.asarray(ids, np.int32)


def _torch_reference(q, k, v, ids):
    """SDPA per sample with the boolean mask ids_i == ids_j (kv heads repeated for GQA)."""
    out = []
    for b in range(q.shape[0]):
        tq, tk, tv = (torch.from_numpy(np.asarray(x[b], np.float64)).transpose(0, 1) for x in (q, k, v))
        rep = tq.shape[0] // tk.shape[0]
        tk, tv = tk.repeat_interleave(rep, 0), tv.repeat_interleave(rep, 0)
        mask = torch.from_numpy(ids[b][:, None] == ids[b][None, :])
        out.append(F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask).transpose(0, 1).numpy())
    return np.stack(out)


def _case(seed, n=45, w=8, hq=4, hkv=2, d=8, B=2):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, n, hq, d)).astype(np.float32)
    k = rng.standard_normal((B, n, hkv, d)).astype(np.float32)
    v = rng.standard_normal((B, n, hkv, d)).astype(np.float32)
    ids = np.stack([_contiguous_segments(rng, n, w, pad_tail=3 * b) for b in range(B)])
    return q, k, v, ids


@pytest.mark.parametrize("impl", [None, "reference"])
@pytest.mark.parametrize("n,w", [(45, 8), (48, 8), (5, 8), (40, 1)])  # N not a multiple of W, one block, W = 1
def test_local_segment_attention_matches_dense_mask(impl, n, w):
    q, k, v, ids = _case(0, n=n, w=w)
    out = jax.jit(layers.local_segment_attention, static_argnums=(4, 5))(q, k, v, jnp.asarray(ids), w, impl)
    np.testing.assert_allclose(np.asarray(out), _torch_reference(q, k, v, ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", [None, "reference"])
@pytest.mark.parametrize("chunk", [1, 7, 16, 45, 100])
def test_query_chunked_attention_matches_dense_mask(impl, chunk):
    q, k, v, ids = _case(1)
    # Segments need not be contiguous here: interleave two ids.
    ids = np.where(np.arange(ids.shape[1]) % 3 == 0, 1000, ids).astype(np.int32)
    out = jax.jit(layers.query_chunked_attention, static_argnums=(4, 5))(q, k, v, jnp.asarray(ids), chunk, impl)
    np.testing.assert_allclose(np.asarray(out), _torch_reference(q, k, v, ids), rtol=1e-5, atol=1e-6)


def test_chunked_layouts_gradients_match_dense_attention():
    q, k, v, ids = _case(2)
    ids_j = jnp.asarray(ids)
    mask = (ids_j[:, :, None] == ids_j[:, None, :])[:, None]
    cot = np.random.default_rng(3).standard_normal(q.shape).astype(np.float32)

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cot), argnums=(0, 1, 2)))(q, k, v)

    ref = grads(lambda q, k, v: layers.attention(q, k, v, mask))
    for fn in (lambda q, k, v: layers.local_segment_attention(q, k, v, ids_j, 8),
               lambda q, k, v: layers.query_chunked_attention(q, k, v, ids_j, 7)):
        for g, r in zip(grads(fn), ref):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)
