"""The baselines' latent targets against plain NumPy transcriptions of their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilvr_jax import ilvr


def _cands(seed=0, b=2, m=3, l=10, d=4, valid=((10, 7, 3), (2, 0, 10))):
    rng = np.random.default_rng(seed)
    cands = rng.normal(size=(b, m, l, d)).astype(np.float32)
    mask = np.zeros((b, m, l), bool)
    for i in range(b):
        for j in range(m):
            mask[i, j, :valid[i][j]] = True
    seg = np.array([[True, True, True], [True, False, True]])
    return cands, mask, seg


@pytest.mark.parametrize("K", [4, 8])
def test_mean_pooled_targets_match_numpy(K):
    cands, mask, seg = _cands()
    sel = ilvr.mean_pooled_targets(jnp.asarray(cands), jnp.asarray(mask), jnp.asarray(seg), K)
    for b in range(2):
        for m in range(3):
            n = int(mask[b, m].sum())
            want_k = min(n, K) if seg[b, m] else 0
            assert int(sel.kstar[b, m]) == want_k
            want = np.zeros((K, 4), np.float32)
            if seg[b, m] and n >= K:
                for k in range(K):
                    rows = [j for j in range(n) if j * K // n == k]
                    want[k] = cands[b, m, rows].mean(0)
            elif seg[b, m]:
                want[:n] = cands[b, m, :n]
            np.testing.assert_allclose(np.asarray(sel.targets[b, m]), want, rtol=1e-6, atol=1e-6)
            assert (np.asarray(sel.indices[b, m]) >= 0).sum() == want_k


def test_random_helper_patches_is_a_uniform_subset_of_the_teacher_count():
    cands, mask, seg = _cands(l=10)
    K = 4
    kstar = jnp.array([[3, 4, 2], [1, 3, 4]])
    seen = np.zeros(10)
    for s in range(200):
        sel = ilvr.random_helper_patches(jax.random.key(s), jnp.asarray(cands), jnp.asarray(mask),
                                         jnp.asarray(seg), kstar, K)
        ks = np.asarray(sel.kstar)
        np.testing.assert_array_equal(ks, [[3, 4, 2], [1, 0, 4]])   # clipped to valid, 0 when absent
        idx = np.asarray(sel.indices)
        for b in range(2):
            for m in range(3):
                chosen = idx[b, m, :ks[b, m]]
                assert (idx[b, m, ks[b, m]:] == -1).all()
                assert len(set(chosen.tolist())) == len(chosen)          # without replacement
                assert mask[b, m, chosen].all()                          # valid candidates only
                np.testing.assert_array_equal(np.asarray(sel.targets[b, m, :ks[b, m]]), cands[b, m, chosen])
                assert not np.asarray(sel.targets[b, m, ks[b, m]:]).any()
        seen[idx[0, 0, :3]] += 1
    # Every valid candidate of segment (0, 0) is drawn about 3/10 of the time.
    assert seen.min() > 200 * 0.3 * 0.5 and seen.max() < 200 * 0.3 * 1.6
