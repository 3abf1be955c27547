"""Stage-2 train step: CE only, the model's own latents, no teacher; tight recurrence windows
give the same update as full-length ones; a batch equals its samples one by one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilvr_jax import ilvr
from ilvr_jax.ilvr import recurrence
from ilvr_jax.model import qwen25vl, rope
from ilvr_jax.train import optimizer as opt_lib
from ilvr_jax.train.step import compile_train_step


def _later_window(setup, tt) -> int:
    """The longest text chunk after the first over the fixture's batch (the window the loop's
    stage2_chunk_len='auto' picks from the data): one compiled step serves every sub-batch."""
    b = setup.batch
    starts, ends = recurrence.chunk_bounds(jnp.asarray(b["latent_starts"]), jnp.asarray(b["segment_mask"]),
                                           tt.K, b["input_ids"].shape[1], jnp.asarray(b["attention_mask"]))
    return int((np.asarray(ends) - np.asarray(starts))[:, 1:].max())


def _stage2(setup, tt, **kw):
    kw.setdefault("stage2_chunk_len", (None, _later_window(setup, tt)))
    cfg = tt.step_config(setup, stage=2, **kw)
    tx, sched = opt_lib.make_optimizer(lr=1e-3, warmup_steps=0, total_steps=10)
    return cfg, tx, sched


def _run(setup, tt, batch, **kw):
    cfg, tx, sched = _stage2(setup, tt, **kw)
    state = tt.fresh_state(setup, cfg, tx)
    assert state.teacher is None  # stage 2 has no teacher
    new, m = compile_train_step(cfg, tx, sched)(state, jax.tree.map(jnp.asarray, batch))
    return tt.to_np(new.params), tt.to_np(m)


def test_stage2_loss_is_ce_of_the_recurrent_forward(tiny_setup, tt):
    """The step's loss is the per-sample CE of a forward whose pads are fed the previous
    hidden state, computed here independently with the naive per-latent recompute."""
    setup = tiny_setup
    batch = tt.sub_batch(setup.batch, [0, 1])
    _, m = _run(setup, tt, batch)
    cfg = setup.model_cfg
    params = jax.tree.map(jnp.asarray, setup.params)
    b = jax.tree.map(jnp.asarray, batch)
    feats = qwen25vl.image_features(params, cfg, b["pixel_values"], b["image_grid_thw"])
    embeds = qwen25vl.merge_image_features(qwen25vl.embed_tokens(params, b["input_ids"]), b["input_ids"],
                                           feats, cfg)
    pos, _ = rope.mrope_position_ids(b["input_ids"], b["attention_mask"], b["image_grid_thw"], cfg)
    ls, sm = np.asarray(batch["latent_starts"]), np.asarray(batch["segment_mask"])
    from ilvr_jax.model import text

    e = embeds
    for mi in range(ls.shape[1]):
        for k in range(tt.K):
            h, _ = text.decoder_forward(params["text"], cfg.text, e, pos, b["attention_mask"])
            for r in range(ls.shape[0]):
                if sm[r, mi]:
                    p = int(ls[r, mi]) + 1 + k
                    e = e.at[r, p].set(h[r, p - 1])
    h, _ = text.decoder_forward(params["text"], cfg.text, e, pos, b["attention_mask"])
    ce_sum, ce_cnt = ilvr.next_token_ce_per_sample(qwen25vl.lm_logits(params, cfg, h), b["labels"])
    expected = float(jnp.mean(ce_sum / ce_cnt))
    assert abs(float(m["loss"]) - expected) <= 1e-5 * abs(expected), (float(m["loss"]), expected)
    assert float(m["sim"]) == 0.0 and float(m["kstar"]) == 0.0


def test_stage2_tight_windows_equal_full_windows(tiny_setup, tt):
    setup = tiny_setup
    batch = setup.batch
    s = batch["input_ids"].shape[1]
    starts, ends = recurrence.chunk_bounds(jnp.asarray(batch["latent_starts"]), jnp.asarray(batch["segment_mask"]),
                                           tt.K, s, jnp.asarray(batch["attention_mask"]))
    lengths = np.asarray(ends) - np.asarray(starts)
    first, rest = int(lengths[:, 0].max()), int(lengths[:, 1:].max())
    assert first + rest < s  # the windows really are tighter than the sequence
    p_full, m_full = _run(setup, tt, batch, stage2_chunk_len=None)
    p_tight, m_tight = _run(setup, tt, batch, stage2_chunk_len=(first, rest))
    assert abs(float(m_full["loss"]) - float(m_tight["loss"])) <= 1e-5 * float(m_full["loss"])
    assert tt.max_abs_diff(p_full, p_tight) <= 1e-5


@pytest.mark.slow
def test_stage2_batch_equals_samples_alone(tiny_setup, tt):
    setup = tiny_setup
    rows = [0, 1, 2, 3]
    segs = setup.batch["segment_mask"][rows].sum(-1)
    assert len(set(segs.tolist())) > 1  # different segment counts
    _, m_batch = _run(setup, tt, tt.sub_batch(setup.batch, rows))
    singles = [float(_run(setup, tt, tt.sub_batch(setup.batch, [r]))[1]["loss"]) for r in rows]
    assert abs(float(m_batch["loss"]) - np.mean(singles)) <= 1e-5 * abs(np.mean(singles))


def test_stage2_loss_ignores_ce_weight(tiny_setup, tt):
    """Stage 2 trains on CE alone: ce_weight (stage 1's loss mix) scales neither the loss,
    the gradient nor the update; the logged loss is the logged CE."""
    setup = tiny_setup
    batch = tt.sub_batch(setup.batch, [0, 1])
    p_one, m_one = _run(setup, tt, batch, ce_weight=1.0)
    p_tenth, m_tenth = _run(setup, tt, batch, ce_weight=0.1, sim_weight=0.5)
    assert float(m_tenth["loss"]) == float(m_one["loss"]) == float(m_tenth["ce"])
    assert float(m_tenth["grad_norm"]) == float(m_one["grad_norm"]) > 0.0
    assert tt.max_abs_diff(p_one, p_tenth) == 0.0
