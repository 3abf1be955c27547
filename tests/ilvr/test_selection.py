"""Candidates pooling, the selection scan and the host-side segment checks, against plain
NumPy transcriptions of the method (loops over samples and segments, float32 like the
jitted path so that the ``cumsum >= p`` cutoffs agree)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilvr_jax.ilvr import pool_candidates, segment_text_means, select_helper_patches, validate_segments


# ----------------------------------------------------------------------------- references
def np_pool_image(feats: np.ndarray, L: int) -> np.ndarray:
    """Candidates of one image's merged tokens [P, D]."""
    P = feats.shape[0]
    if P < L:
        return feats.astype(np.float32)
    run = P // L
    out = np.zeros((L, feats.shape[1]), np.float64)
    for j in range(L):
        out[j] = feats[j * run:(j + 1) * run].astype(np.float64).mean(0)
    return out.astype(np.float32)


def np_pool_sample(helper_feats: np.ndarray, thw: np.ndarray, L: int) -> list[np.ndarray]:
    out, off = [], 0
    for t, h, w in thw:
        if t * h * w == 0:
            break
        P = int(t * h * w) // 4
        out.append(np_pool_image(helper_feats[off:off + P], L))
        off += P
    return out


def np_cos(x: np.ndarray, y: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    x = x.astype(np.float32)
    y = y.astype(np.float32)
    nx = np.maximum(np.sqrt((x * x).sum(-1, keepdims=True)), np.float32(eps))
    ny = np.maximum(np.sqrt((y * y).sum(-1, keepdims=True)), np.float32(eps))
    return ((x / nx) * (y / ny)).sum(-1).astype(np.float32)


def np_select_sample(u, t_list, tp_list, cand_list, K, p):
    """One sample, segment by segment, as the method reads (float32 throughout)."""
    zbar = None
    res = []
    for m, cands in enumerate(cand_list):
        parts = [u]
        if tp_list[m]:
            parts.append(t_list[m])
        if zbar is not None:
            parts.append(zbar)
        q = np.mean(np.stack(parts).astype(np.float32), axis=0).astype(np.float32)
        s = np_cos(cands, q[None, :])
        e = np.exp((s - s.max()).astype(np.float32)).astype(np.float32)
        pi = (e / e.sum(dtype=np.float32)).astype(np.float32)
        order = np.argsort(-s, kind="stable")
        cum = np.cumsum(pi[order], dtype=np.float32)
        hits = np.nonzero(cum >= np.float32(p))[0]
        n = int(hits[0]) + 1 if len(hits) else len(pi)
        kstar = min(n, K)
        chosen = order[:kstar]
        z = cands[chosen].astype(np.float32)
        zbar = z.mean(0).astype(np.float32)
        res.append(dict(kstar=kstar, idx=chosen, z=z, q=q, s=s, pi=pi))
    return res


def np_segment_text_sample(H, ids_row, attn_row, astart, ids, K):
    """Text means before each latent segment of one sample (scans for the tokens)."""
    special = {ids.latent_pad, ids.latent_start, ids.latent_end, ids.vision_start, ids.vision_end}
    out = []
    prev = astart
    j = astart
    while j < len(ids_row):
        if ids_row[j] == ids.latent_start and attn_row[j]:
            span = [i for i in range(prev, j) if ids_row[i] not in special and attn_row[i]]
            out.append(H[span].astype(np.float64).mean(0) if span else None)
            e = j + 1
            while ids_row[e] != ids.latent_end:
                e += 1
            prev = e + 1
            j = e + 1
        else:
            j += 1
    return out


# ----------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("thw_rows", [
    [(1, 4, 6)],                          # P = 6  < L = 8: no pooling
    [(1, 4, 8)],                          # P = 8 == L: identity
    [(1, 6, 8), (1, 2, 6), (2, 8, 6)],    # P = 12, 3, 24 (remainder 4, below L, exact 3x)
    [(1, 10, 6), (1, 2, 2)],              # P = 15 (run 1, drop 7), P = 1
])
def test_pool_candidates(thw_rows):
    L, D, M = 8, 5, 3
    rng = np.random.default_rng(1)
    B = 2
    thw = np.zeros((B, M, 3), np.int32)
    thw[0, :len(thw_rows)] = thw_rows
    thw[1, :1] = thw_rows[-1:]
    T = sum(int(np.prod(r)) // 4 for r in thw_rows) + 3
    feats = rng.standard_normal((B, T, D)).astype(np.float32)
    f = jax.jit(pool_candidates, static_argnames=("L", "merge_unit"))
    cands, cmask = f(jnp.asarray(feats), jnp.asarray(thw), L=L)
    assert cands.shape == (B, M, L, D) and cmask.shape == (B, M, L)
    for b in range(B):
        ref = np_pool_sample(feats[b], thw[b], L)
        for m in range(M):
            if m < len(ref):
                n = ref[m].shape[0]
                assert cmask[b, m].sum() == n and bool(cmask[b, m, :n].all())
                np.testing.assert_allclose(np.asarray(cands[b, m, :n]), ref[m], rtol=1e-6, atol=1e-6)
            else:
                assert not bool(cmask[b, m].any())


# ----------------------------------------------------------------------------- selection
def run_select(u, t, tp, cands, cmask, segmask, K, p):
    f = jax.jit(select_helper_patches, static_argnames=("K", "p"))
    return f(jnp.asarray(u), jnp.asarray(t), jnp.asarray(tp), jnp.asarray(cands),
             jnp.asarray(cmask), jnp.asarray(segmask), K=K, p=p)


def check_selection(sel, u, t, tp, cand_lists, K, p):
    """Compare a Selection with the NumPy reference; returns the K* values seen."""
    kstars, max_err = [], 0.0
    for b, clist in enumerate(cand_lists):
        ref = np_select_sample(u[b], t[b], tp[b], clist, K, p)
        M = sel.kstar.shape[1]
        for m in range(M):
            if m >= len(ref):
                assert int(sel.kstar[b, m]) == 0
                assert bool((sel.indices[b, m] == -1).all())
                assert float(jnp.abs(sel.targets[b, m]).max()) == 0.0
                continue
            r = ref[m]
            ks = int(sel.kstar[b, m])
            assert ks == r["kstar"], (b, m, ks, r["kstar"])
            np.testing.assert_array_equal(np.asarray(sel.indices[b, m, :ks]), r["idx"])
            assert bool((sel.indices[b, m, ks:] == -1).all())
            np.testing.assert_allclose(np.asarray(sel.targets[b, m, :ks]), r["z"], rtol=1e-6, atol=1e-6)
            assert float(jnp.abs(sel.targets[b, m, ks:]).max(initial=0.0)) == 0.0
            n = len(r["s"])
            np.testing.assert_allclose(np.asarray(sel.query[b, m]), r["q"], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(np.asarray(sel.scores[b, m, :n]), r["s"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(sel.probs[b, m, :n]), r["pi"], rtol=1e-5, atol=1e-7)
            max_err = max(max_err, float(np.abs(np.asarray(sel.scores[b, m, :n]) - r["s"]).max()))
            kstars.append(ks)
    return kstars, max_err


def random_case(rng, n_cands, K, D=6, L=16, p_t=(True,)):
    """Random u/t/candidates for samples with the given candidate counts per segment."""
    B, M = len(n_cands), max(len(x) for x in n_cands)
    u = rng.standard_normal((B, D)).astype(np.float32)
    t = rng.standard_normal((B, M, D)).astype(np.float32)
    tp = np.zeros((B, M), bool)
    cands = np.zeros((B, M, L, D), np.float32)
    cmask = np.zeros((B, M, L), bool)
    segmask = np.zeros((B, M), bool)
    lists = []
    for b, counts in enumerate(n_cands):
        cl = []
        for m, n in enumerate(counts):
            c = rng.standard_normal((n, D)).astype(np.float32)
            cands[b, m, :n] = c
            cmask[b, m, :n] = True
            segmask[b, m] = True
            tp[b, m] = p_t[(b + m) % len(p_t)]
            cl.append(c)
        lists.append(cl)
    return u, t, tp, cands, cmask, segmask, lists


def test_selection_matches_reference_varied():
    """M = 4 and M = 1 samples in one batch; fewer candidates than L and than K; segments
    without preceding text; a cutoff below K (p = 0.5 with 16 candidates)."""
    rng = np.random.default_rng(2)
    K = 8
    n_cands = [[16, 6, 3, 16], [16], [12, 16, 2], [5]]
    u, t, tp, cands, cmask, segmask, lists = random_case(rng, n_cands, K, p_t=(True, False, True))
    all_k = []
    for p in (0.9, 0.5, 0.3, 1.0):
        sel = run_select(u, t, tp, cands, cmask, segmask, K, p)
        ks, err = check_selection(sel, u, t, tp, lists, K, p)
        all_k += ks
    assert min(all_k) >= 1
    assert any(k == K for k in all_k)           # the top-K cap binds
    assert any(1 < k < K for k in all_k)        # the cumsum cutoff binds below K
    assert 2 in all_k or 3 in all_k             # capped by the few candidates there are


def test_selection_peaked_cutoff():
    """Candidates near the query get most of the mass: K* small; one candidate -> K* = 1."""
    rng = np.random.default_rng(3)
    K, D, L = 8, 6, 16
    u, t, tp, cands, cmask, segmask, lists = random_case(rng, [[16, 1], [4, 16]], K, D=D, L=L)
    sel = run_select(u, t, tp, cands, cmask, segmask, K, 0.2)
    ks, _ = check_selection(sel, u, t, tp, lists, K, 0.2)
    assert ks[1] == 1
    assert max(ks) < K


def test_selection_scan_carries_previous_selection():
    """zbar_{m-1} enters q_m: changing segment 1's candidates changes q_2."""
    rng = np.random.default_rng(4)
    K = 4
    u, t, tp, cands, cmask, segmask, lists = random_case(rng, [[16, 16]], K)
    a = run_select(u, t, tp, cands, cmask, segmask, K, 0.9)
    cands2 = cands.copy()
    cands2[0, 0] = rng.standard_normal(cands2[0, 0].shape)
    b = run_select(u, t, tp, cands2, cmask, segmask, K, 0.9)
    np.testing.assert_array_equal(np.asarray(a.query[0, 0]), np.asarray(b.query[0, 0]))
    assert float(jnp.abs(a.query[0, 1] - b.query[0, 1]).max()) > 1e-3
    zbar = np.asarray(a.targets[0, 0, :int(a.kstar[0, 0])]).mean(0)
    q2 = (u[0] + t[0, 1] + zbar) / 3 if tp[0, 1] else (u[0] + zbar) / 2
    np.testing.assert_allclose(np.asarray(a.query[0, 1]), q2, rtol=1e-6, atol=1e-6)


def test_end_to_end_from_hidden_states(synth):
    """segment_text_means -> pool_candidates -> select, against the NumPy chain built from
    the token sequence (scanning for latent tokens, no layout arrays)."""
    K, M, L, D = 4, 4, 8, 6
    S_ = synth.SampleSpec
    specs = [
        S_(seg_text=(3, 0, 2, 1), helper_thw=((1, 6, 8), (1, 2, 6), (1, 4, 4), (2, 8, 6))),  # 2nd: no text
        S_(seg_text=(0,), helper_thw=((1, 10, 6),), left_pad=3),                               # M = 1
        S_(seg_text=(2, 2), helper_thw=((1, 2, 2), (1, 8, 8))),                               # P = 1 < K
    ]
    batch = synth.build_batch(specs, K, M, seed=5)
    rng = np.random.default_rng(6)
    B, S = batch["input_ids"].shape
    H = rng.standard_normal((B, S, D)).astype(np.float32)
    u = rng.standard_normal((B, D)).astype(np.float32)
    T = max(sum(int(np.prod(r)) // 4 for r in s.helper_thw) for s in specs) + 2
    feats = rng.standard_normal((B, T, D)).astype(np.float32)

    @functools.partial(jax.jit, static_argnames=("K", "L", "p", "ids"))
    def chain(H, u, feats, batch, K, L, p, ids):
        t, tp = segment_text_means(H, batch["input_ids"], batch["attention_mask"], batch["latent_starts"],
                                   batch["segment_mask"], batch["assistant_start"], K, ids)
        c, cm = pool_candidates(feats, batch["helper_grid_thw"], L)
        return t, tp, select_helper_patches(u, t, tp, c, cm, batch["segment_mask"], K, p)

    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    t, tp, sel = chain(jnp.asarray(H), jnp.asarray(u), jnp.asarray(feats), jb, K=K, L=L, p=0.9, ids=synth.IDS)
    t_ref_all, tp_ref_all, cand_lists = [], [], []
    for b in range(B):
        tr = np_segment_text_sample(H[b], batch["input_ids"][b], batch["attention_mask"][b],
                                    int(batch["assistant_start"][b]), synth.IDS, K)
        assert len(tr) == int(batch["segment_mask"][b].sum())
        for m in range(M):
            if m < len(tr) and tr[m] is not None:
                assert bool(tp[b, m])
                np.testing.assert_allclose(np.asarray(t[b, m]), tr[m], rtol=1e-5, atol=1e-6)
            else:
                assert not bool(tp[b, m])
        t_ref_all.append([np.zeros(D, np.float32) if x is None else x.astype(np.float32) for x in tr])
        tp_ref_all.append([x is not None for x in tr])
        cand_lists.append(np_pool_sample(feats[b], batch["helper_grid_thw"][b], L))
    assert not tp_ref_all[0][1] and tp_ref_all[0][0] and tp_ref_all[1][0]
    # The selection reference takes the JAX t (already checked above) so the cutoffs agree.
    t_np = np.asarray(t)
    ks, _ = check_selection(sel, u, t_np, np.asarray(tp), cand_lists, K, 0.9)
    assert 1 in ks  # the P = 1 helper image


# ----------------------------------------------------------------------------- validation
def good_batch(synth, K=4, M=3):
    S_ = synth.SampleSpec
    specs = [S_(seg_text=(2, 1), helper_thw=((1, 4, 4), (1, 2, 2))),
             S_(seg_text=(1, 1, 1), helper_thw=((1, 4, 4), (1, 4, 4), (1, 2, 6)))]
    return synth.build_batch(specs, K, M, seed=7)


def test_validate_segments_accepts_good_batch(synth):
    validate_segments(**good_batch(synth), K=4, ids=synth.IDS, p=0.9)


def test_validate_segments_errors_name_the_sample(synth):
    ids = synth.IDS
    bad = good_batch(synth)
    bad["helper_grid_thw"][1, 2] = 0                                  # 3 segments, 2 images
    with pytest.raises(ValueError, match=r"sample 1: segment count mismatch"):
        validate_segments(**bad, K=4, ids=ids)

    bad = good_batch(synth)
    ls = bad["latent_starts"][1, 1]
    bad["input_ids"][1, ls + 4] = ids.latent_pad                       # 5 pads before the end token
    bad["input_ids"][1, ls + 5] = ids.latent_pad
    with pytest.raises(ValueError, match=r"sample 1: segment 1 .* exactly|sample 1: segment 1 .*4 x"):
        validate_segments(**bad, K=4, ids=ids)

    bad = good_batch(synth, M=3)
    small = {k: (v[:, :2] if k in ("latent_starts", "segment_mask", "helper_grid_thw") else v)
             for k, v in bad.items()}
    with pytest.raises(ValueError, match=r"sample 1: 3 latent segments exceed the maximum M = 2"):
        validate_segments(**small, K=4, ids=ids)

    bad = good_batch(synth)
    bad["latent_starts"][0, 1] += 1                                     # points at a pad
    with pytest.raises(ValueError, match=r"sample 0: segment 1"):
        validate_segments(**bad, K=4, ids=ids)

    with pytest.raises(ValueError, match=r"coverage p"):
        validate_segments(**good_batch(synth), K=4, ids=ids, p=0.0)
    with pytest.raises(ValueError, match=r"coverage p"):
        validate_segments(**good_batch(synth), K=4, ids=ids, p=1.5)
