"""The stage-1 train step on a tiny Qwen2.5-VL and real maze batches.

Checked against plain references written here: the per-segment teacher of the reference
(one teacher forward per segment, selection in NumPy), the EMA formula, single-sample
steps, an un-accumulated step, and the host-side batch checks of the loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ilvr_jax import ilvr
from ilvr_jax.model import qwen25vl, rope, vision
from ilvr_jax.train import optimizer as opt_lib
from ilvr_jax.train import step as step_lib


def _device(tree):
    return jax.tree.map(jnp.asarray, tree)


def _sgd():
    """Plain SGD at lr 1: the parameter change of a step is minus its gradient."""
    return optax.sgd(1.0), optax.constant_schedule(1.0)


# ----------------------------------------------------------------------------- teacher
def _np_segment_text_mean(H, ids_row, attn_row, start, end, tok):
    """Mean of H over [start, end) without latent / vision start-end tokens; None if empty."""
    structural = {tok.latent_pad, tok.latent_start, tok.latent_end, tok.vision_start, tok.vision_end}
    pos = [j for j in range(start, end) if attn_row[j] and int(ids_row[j]) not in structural]
    return H[pos].mean(0) if pos else None


def _np_pool(feats, L):
    """Candidates of one helper image's merged tokens [P, D] (method section 9)."""
    P = feats.shape[0]
    if P < L:
        return feats
    run = P // L
    return feats[: run * L].reshape(L, run, -1).mean(1)


def _np_select(cands, q, K, p):
    """Top-p / top-k selection of one segment in float64: (indices, K*, targets)."""
    c = cands.astype(np.float64)
    q = q.astype(np.float64)
    s = (c / np.maximum(np.linalg.norm(c, axis=-1, keepdims=True), 1e-8)) @ (q / max(np.linalg.norm(q), 1e-8))
    pi = np.exp(s - s.max())
    pi /= pi.sum()
    order = np.argsort(-s, kind="stable")
    csum = np.cumsum(pi[order])
    first = int(np.argmax(csum >= p)) + 1 if (csum >= p).any() else len(order)
    kstar = min(K, first, len(order))
    return order[:kstar], kstar, c[order[:kstar]]


def test_one_teacher_forward_equals_per_segment(tiny_setup, tt):
    """Targets from one teacher forward == the reference's loop: for every segment m a
    fresh teacher forward (vision tower inside the model call), helper image m alone through
    the vision tower, and the selection with the history zbar_{m-1}, in NumPy."""
    cfg = tt.step_config(tiny_setup)
    m_cfg = cfg.model
    tok = cfg.token_ids
    params = _device(tiny_setup.params)
    nb = tiny_setup.batch
    batch = _device(nb)

    @jax.jit
    def one_forward(params, batch):
        pos, _ = rope.mrope_position_ids(batch["input_ids"], batch["attention_mask"],
                                         batch["image_grid_thw"], m_cfg)
        qf = vision.vision_forward(params["visual"], m_cfg.vision, batch["pixel_values"],
                                   batch["image_grid_thw"])
        return step_lib.teacher_targets(params, cfg, batch, qf, pos)

    sel = jax.device_get(one_forward(params, batch))

    @jax.jit
    def teacher_context(params, batch):
        out = qwen25vl.forward(params, m_cfg, batch["input_ids"], batch["attention_mask"],
                               batch["pixel_values"], batch["image_grid_thw"])
        qf = vision.vision_forward(params["visual"], m_cfg.vision, batch["pixel_values"],
                                   batch["image_grid_thw"])
        last = jax.tree.map(lambda x: x[-1], params["text"]["layers"]["self_attn"])
        idx, ok = ilvr.image_rows(batch["image_grid_thw"], qf.shape[1], m_cfg.vision.merge_unit)
        u = ilvr.user_summary(out.hidden, batch["input_ids"], batch["attention_mask"],
                              batch["assistant_start"], last["q_proj"], last["k_proj"],
                              num_heads=m_cfg.text.num_attention_heads,
                              num_kv_heads=m_cfg.text.num_key_value_heads, ids=tok,
                              token_embeds=qwen25vl.embed_tokens(params, batch["input_ids"]),
                              question_feats=qf, question_image_index=idx, question_feat_mask=ok)
        return out.hidden, u

    patch_rows = 64

    @jax.jit
    def one_helper_image(visual, pixels, thw):
        return vision.vision_forward(visual, m_cfg.vision, pixels, thw)

    B, M = nb["segment_mask"].shape
    K, p = cfg.latent_size, cfg.top_p
    zbar = [None] * B
    n_checked, kstars, err = 0, [], 0.0
    for m in range(M):
        H, u = jax.device_get(teacher_context(params, batch))  # the reference re-runs it per segment
        for b in range(B):
            if not nb["segment_mask"][b, m]:
                continue
            thw = nb["helper_grid_thw"][b]
            n_patch = thw.prod(-1)
            off = int(n_patch[:m].sum())
            pix = np.zeros((1, patch_rows, nb["helper_pixel_values"].shape[-1]), np.float32)
            pix[0, : n_patch[m]] = nb["helper_pixel_values"][b, off: off + n_patch[m]]
            feats = np.asarray(one_helper_image(params["visual"], pix, thw[None, m: m + 1]))[0]
            cands = _np_pool(feats[: n_patch[m] // 4], cfg.num_candidates)
            start = int(nb["assistant_start"][b]) if m == 0 else int(nb["latent_starts"][b, m - 1]) + K + 2
            t_m = _np_segment_text_mean(H[b], nb["input_ids"][b], nb["attention_mask"][b], start,
                                        int(nb["latent_starts"][b, m]), tok)
            parts = [u[b]] + ([t_m] if t_m is not None else []) + ([zbar[b]] if zbar[b] is not None else [])
            q = np.mean(np.stack(parts), 0)
            idx, kstar, z = _np_select(cands, q, K, p)
            zbar[b] = z.mean(0)

            assert int(sel.kstar[b, m]) == kstar, (b, m)
            np.testing.assert_array_equal(sel.indices[b, m, :kstar], idx)
            assert (sel.indices[b, m, kstar:] == -1).all()
            np.testing.assert_allclose(sel.targets[b, m, :kstar], z, atol=1e-5, rtol=1e-5)
            assert not sel.targets[b, m, kstar:].any()
            np.testing.assert_allclose(sel.query[b, m], q, atol=1e-5, rtol=1e-5)
            err = max(err, float(np.abs(sel.targets[b, m, :kstar] - z).max()))
            n_checked += 1
            kstars.append(kstar)
    assert n_checked == int(nb["segment_mask"].sum())
    assert not sel.kstar[~nb["segment_mask"]].any()
    # The batch exercises the cutoff (K* < K) and full segments (K* = K).
    assert min(kstars) < K and max(kstars) == K, kstars
    print(f"one forward vs per-segment: {n_checked} segments, K* {kstars}, max |target diff| {err:.2e}")
