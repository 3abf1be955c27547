"""User summary u (attention pooling and its fallback) and segment text means against plain
NumPy transcriptions of the method (per sample, on the unpadded token sequence)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ilvr_jax.ilvr import grouped_mean_weights, image_rows, segment_text_means, user_summary

D, HQ, HKV = 16, 4, 2
HD = D // HQ


def np_grouped_means(x: np.ndarray, k: int) -> np.ndarray:
    """k grouped means of one image's tokens [P, D] (P >= k: truncate + k runs;
    P < k: rows tiled cyclically to k)."""
    P = x.shape[0]
    if P >= k:
        run = P // k
        return np.stack([x[g * run:(g + 1) * run].mean(0) for g in range(k)])
    reps = math.ceil(k / P)
    return np.concatenate([x] * reps, axis=0)[:k]


def np_user_summary(H, ids_row, astart, Wq, bq, Wk, bk, tok_emb, q_images, special, image_id):
    """One sample, unpadded. q_images: list of [P_i, D] question-image features."""
    prompt = [i for i in range(astart) if ids_row[i] not in special and ids_row[i] != image_id]
    image = [i for i in range(astart) if ids_row[i] == image_id]
    H = H.astype(np.float64)
    if prompt and image:
        q = (H[prompt] @ Wq + bq).reshape(len(prompt), HQ, HD)
        k = (H[image] @ Wk + bk).reshape(len(image), HKV, HD)
        w = np.zeros(len(image))
        for h in range(HQ):
            kv = h // (HQ // HKV)
            for i in range(len(prompt)):
                logits = np.array([q[i, h] @ k[j, kv] for j in range(len(image))]) / math.sqrt(HD)
                e = np.exp(logits - logits.max())
                w += e / e.sum()
        w /= HQ * len(prompt)
        w = w / (w.sum() + 1e-9)
        r_img = (w[:, None] * H[image]).sum(0)
        r_txt = H[prompt].mean(0)
        return (r_img + r_txt) / 2, "main"
    rows = [i for i in range(astart) if ids_row[i] not in special]
    if not rows:
        rows = list(range(max(1, astart)))
    parts = [tok_emb[rows].astype(np.float64).mean(0)]
    if q_images:
        groups = np.concatenate([np_grouped_means(x.astype(np.float64), 8) for x in q_images])
        parts.append(groups.mean(0))
    return np.mean(parts, axis=0), "fallback"


def make_inputs(synth, specs, seed):
    K, M = 2, 2
    batch = synth.build_batch(specs, K, M, seed=seed)
    rng = np.random.default_rng(seed + 100)
    B, S = batch["input_ids"].shape
    H = rng.standard_normal((B, S, D)).astype(np.float32)
    emb = rng.standard_normal((B, S, D)).astype(np.float32)
    q_proj = {"kernel": (rng.standard_normal((D, HQ * HD)) / 2).astype(np.float32),
              "bias": rng.standard_normal(HQ * HD).astype(np.float32)}
    k_proj = {"kernel": (rng.standard_normal((D, HKV * HD)) / 2).astype(np.float32),
              "bias": rng.standard_normal(HKV * HD).astype(np.float32)}
    T = max(sum(s.q_images) for s in specs) + 3
    qf = np.zeros((B, T, D), np.float32)
    qidx = np.zeros((B, T), np.int32)
    qmask = np.zeros((B, T), bool)
    per_sample = []
    for b, s in enumerate(specs):
        off, imgs = 0, []
        for i, n in enumerate(s.q_images):
            x = rng.standard_normal((n, D)).astype(np.float32)
            qf[b, off:off + n] = x
            qidx[b, off:off + n] = i
            qmask[b, off:off + n] = True
            imgs.append(x)
            off += n
        per_sample.append(imgs)
    return batch, H, emb, q_proj, k_proj, qf, qidx, qmask, per_sample


@functools.partial(jax.jit, static_argnames=("ids", "query_chunk"))
def jit_user_summary(H, batch, q_proj, k_proj, emb, qf, qidx, qmask, ids, query_chunk):
    return user_summary(H, batch["input_ids"], batch["attention_mask"], batch["assistant_start"],
                        q_proj, k_proj, num_heads=HQ, num_kv_heads=HKV, ids=ids, token_embeds=emb,
                        question_feats=qf, question_image_index=qidx, question_feat_mask=qmask,
                        query_chunk=query_chunk)


def test_user_summary_matches_reference(synth):
    S_ = synth.SampleSpec
    specs = [
        S_(q_images=(4, 6)),                         # attention path, two images
        S_(q_images=(3,), left_pad=4),               # attention path, left padding
        S_(q_images=()),                             # no question image: fallback, text only
        S_(q_images=(3, 8, 13, 16), bare_user=True),  # no prompt text: fallback + grouped means
        S_(q_images=(20,), bare_user=True, left_pad=2),
    ]
    batch, H, emb, q_proj, k_proj, qf, qidx, qmask, imgs = make_inputs(synth, specs, seed=11)
    ids = synth.IDS
    special = set(ids.structural)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    args = [jnp.asarray(a) for a in (H, emb, qf, qidx, qmask)]
    kinds = []
    for chunk in (8, 256):  # several query chunks (with a padded tail) and a single one
        u = jit_user_summary(args[0], jb, jax.tree.map(jnp.asarray, q_proj), jax.tree.map(jnp.asarray, k_proj),
                             args[1], args[2], args[3], args[4], ids=ids, query_chunk=chunk)
        assert u.shape == (len(specs), D)
        max_err = 0.0
        for b in range(len(specs)):
            real = batch["attention_mask"][b] > 0
            off = int(np.argmax(real))
            sl = slice(off, off + int(real.sum()))
            ref, kind = np_user_summary(H[b, sl], batch["input_ids"][b, sl], int(batch["assistant_start"][b]) - off,
                                        q_proj["kernel"].astype(np.float64), q_proj["bias"].astype(np.float64),
                                        k_proj["kernel"].astype(np.float64), k_proj["bias"].astype(np.float64),
                                        emb[b, sl], imgs[b], special, ids.image)
            kinds.append(kind)
            np.testing.assert_allclose(np.asarray(u[b]), ref, rtol=2e-5, atol=2e-6)
            max_err = max(max_err, float(np.abs(np.asarray(u[b]) - ref).max()))
    assert kinds[:5] == ["main", "main", "fallback", "fallback", "fallback"]


def test_grouped_mean_weights_tiling_and_truncation():
    """Weights reproduce the grouped means: P = 3 (tiled 3,3,2 times), P = 13 (last 5 dropped)."""
    idx = np.array([[0, 0, 0, 1] + [1] * 12 + [0, 0]], np.int32)
    valid = np.array([[True] * 16 + [False, False]])
    w = np.asarray(jax.jit(grouped_mean_weights, static_argnames="num_groups")(
        jnp.asarray(idx), jnp.asarray(valid), num_groups=8))
    np.testing.assert_allclose(w[0, :3], np.array([3, 3, 2]) / 8 / 2, rtol=1e-7)
    np.testing.assert_allclose(w[0, 3:11], np.full(8, 1 / 8 / 2), rtol=1e-7)
    np.testing.assert_array_equal(w[0, 11:], 0.0)


def test_segment_text_means_spans(synth):
    """First span starts at the assistant's <|im_start|>; later spans after <|latent_end|>."""
    K, M = 3, 3
    specs = [synth.SampleSpec(seg_text=(2, 0, 3), helper_thw=((1, 2, 2),) * 3)]
    batch = synth.build_batch(specs, K, M, seed=3)
    S = batch["input_ids"].shape[1]
    H = np.eye(S, dtype=np.float32)[None]  # H_j = e_j: the mean shows which positions count
    f = jax.jit(segment_text_means, static_argnames=("K", "ids"))
    t, tp = f(jnp.asarray(H), *(jnp.asarray(batch[k]) for k in (
        "input_ids", "attention_mask", "latent_starts", "segment_mask", "assistant_start")), K=K, ids=synth.IDS)
    a = int(batch["assistant_start"][0])
    ls = batch["latent_starts"][0]
    expect0 = np.zeros(S)
    expect0[a:ls[0]] = 1 / (ls[0] - a)      # <|im_start|> assistant \n + 2 text tokens
    np.testing.assert_allclose(np.asarray(t[0, 0]), expect0, atol=1e-7)
    assert ls[0] - a == 5
    assert not bool(tp[0, 1]) and float(jnp.abs(t[0, 1]).max()) == 0.0
    expect2 = np.zeros(S)
    expect2[ls[1] + K + 2:ls[2]] = 1 / 3
    np.testing.assert_allclose(np.asarray(t[0, 2]), expect2, atol=1e-7)


def test_image_rows_from_grid(synth):
    """Row -> image mapping from grid_thw equals the layout built by hand above."""
    specs = [synth.SampleSpec(q_images=(3, 8, 13, 16), bare_user=True), synth.SampleSpec(q_images=(4,)),
             synth.SampleSpec(q_images=())]
    _, _, _, _, _, qf, qidx, qmask, _ = make_inputs(synth, specs, seed=1)
    thw = np.zeros((3, 4, 3), np.int32)
    for b, s in enumerate(specs):
        for i, n in enumerate(s.q_images):
            thw[b, i] = (1, 2, 2 * n)   # t*h*w/4 = n merged tokens
    idx, valid = jax.jit(image_rows, static_argnums=1)(jnp.asarray(thw), qf.shape[1])
    np.testing.assert_array_equal(np.asarray(valid), qmask)
    np.testing.assert_array_equal(np.where(qmask, np.asarray(idx), 0), qidx)
