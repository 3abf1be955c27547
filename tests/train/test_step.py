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


# ----------------------------------------------------------------------------- EMA, frozen, teacher
def test_ema_update_and_frozen_vision(tiny_setup, tt):
    """After a step: teacher == d * teacher_old + (1 - d) * student_new (trainable leaves,
    fp32); the frozen vision tower stays bit-identical over several steps and has no
    teacher copy."""
    d = 0.9
    cfg = tt.step_config(tiny_setup, ema_decay=d)
    tx, sched = opt_lib.make_optimizer(lr=1e-3, warmup_steps=0, total_steps=100)
    step = step_lib.compile_train_step(cfg, tx, sched)
    batch = _device(tt.sub_batch(tiny_setup.batch, range(4)))
    state = tt.fresh_state(tiny_setup, cfg, tx)
    assert "visual" not in state.teacher
    old = tt.to_np(state)
    state, metrics = step(state, batch)
    new = tt.to_np(state)
    assert bool(metrics["finite"])
    trainable_new, _ = opt_lib.split_frozen(new.params, cfg.frozen_patterns)
    expect = jax.tree.map(lambda t, s: d * t.astype(np.float64) + (1 - d) * s.astype(np.float64),
                          old.teacher, trainable_new)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), new.teacher, old.teacher)
    assert max(jax.tree.leaves(moved)) > 1e-5  # the teacher did move
    assert tt.max_abs_diff(new.teacher, expect) < 1e-7
    for leaf in jax.tree.leaves(new.teacher):
        assert leaf.dtype == np.float32
    for _ in range(2):
        state, metrics = step(state, batch)
    last = tt.to_np(state)
    assert int(last.step) == 3
    for a, b in zip(jax.tree.leaves(old.params["visual"]), jax.tree.leaves(last.params["visual"])):
        np.testing.assert_array_equal(a, b)
    # Trainable student leaves did change.
    assert not np.array_equal(old.params["text"]["norm"]["scale"], last.params["text"]["norm"]["scale"])


def test_teacher_receives_no_gradient(tiny_setup, tt):
    """The step's loss is differentiable in the student only: its gradient w.r.t. the
    teacher is exactly zero, while its gradient w.r.t. the student is not. The vision tower
    is trainable here, so the targets (the teacher's helper-image features, fed into the
    student) are a differentiable function of the teacher's vision leaves: only the
    stop-gradient keeps them from receiving gradients."""
    cfg = tt.step_config(tiny_setup, noise_scale=0.0, frozen_patterns=())
    tx, sched = _sgd()
    batch = _device(tt.sub_batch(tiny_setup.batch, range(2)))
    state = tt.fresh_state(tiny_setup, cfg, tx)
    # A teacher different from the student, so the targets depend on it non-trivially.
    teacher = jax.tree.map(lambda x: x * 1.05, state.teacher)

    def loss_of(teacher, params):
        s = state.replace(teacher=teacher, params=params)
        return step_lib.train_step(s, batch, cfg, tx, sched)[1]["loss"]

    g_teacher, g_student = jax.jit(jax.grad(loss_of, argnums=(0, 1)))(teacher, state.params)
    assert "visual" in g_teacher
    for leaf in jax.tree.leaves(g_teacher):
        assert not np.asarray(leaf).any()
    assert any(np.asarray(leaf).any() for leaf in jax.tree.leaves(g_student["text"]))


def test_teacher_stays_fp32_with_bf16_compute(tiny_setup, tt):
    """bf16 compute, fp32 teacher: an EMA update of 1e-3 x (S - T) lands in the teacher
    (a bf16 teacher would round most of it away)."""
    d = 0.999
    cfg = tt.step_config(tiny_setup, compute_dtype=jnp.bfloat16, ema_decay=d)
    tx, sched = opt_lib.make_optimizer(lr=1e-4, warmup_steps=0, total_steps=100)
    # Even from bf16 student parameters the teacher starts in fp32.
    bf16_state = step_lib.init_train_state(jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16),
                                                        tiny_setup.params), tx, cfg, jax.random.PRNGKey(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16_state.teacher))

    state = tt.fresh_state(tiny_setup, cfg, tx)
    rng = np.random.default_rng(0)
    # Teacher 10% away from the student: the EMA step is ~1e-4 relative to the weights.
    teacher = jax.tree.map(lambda x: np.asarray(x) * (1 + 0.1 * rng.standard_normal(x.shape)).astype(np.float32),
                           tt.to_np(state.teacher))
    state = state.replace(teacher=_device(teacher))
    step = step_lib.compile_train_step(cfg, tx, sched)
    state, metrics = step(state, _device(tt.sub_batch(tiny_setup.batch, range(2))))
    assert bool(metrics["finite"])
    new = tt.to_np(state)
    trainable_new, _ = opt_lib.split_frozen(new.params, cfg.frozen_patterns)
    changed, bf16_changed, total = 0, 0, 0
    for t_old, t_new, s_new in zip(jax.tree.leaves(teacher), jax.tree.leaves(new.teacher),
                                   jax.tree.leaves(trainable_new)):
        assert t_new.dtype == np.float32
        expect = d * t_old.astype(np.float64) + (1 - d) * s_new.astype(np.float64)
        np.testing.assert_allclose(t_new, expect, rtol=2e-7, atol=1e-9)
        differs = s_new != t_old
        changed += int((t_new != t_old)[differs].sum())
        total += int(differs.sum())
        # What a bf16 teacher would have kept of the same update.
        t_bf = jnp.asarray(t_old, jnp.bfloat16)
        upd = np.asarray(optax.incremental_update(jnp.asarray(s_new, jnp.bfloat16), t_bf, 1 - d))
        bf16_changed += int((upd != np.asarray(t_bf))[differs].sum())
    assert changed > 0.99 * total
    assert bf16_changed < 0.5 * total  # the test is sensitive to the precision


# ----------------------------------------------------------------------------- learning
def test_overfits_a_handful_of_samples(tiny_setup, tt):
    """Stage 1 on 8 maze samples, lr 1e-3: CE and the alignment loss fall clearly within
    40 steps (measured: CE 6.23 -> 3.00, L_sim 0.88 -> 0.41, i.e. both about -52%;
    asserted: both below 70% of the first step's value)."""
    cfg = tt.step_config(tiny_setup)
    tx, sched = opt_lib.make_optimizer(lr=1e-3, warmup_steps=5, total_steps=1000)
    step = step_lib.compile_train_step(cfg, tx, sched)
    batch = _device(tiny_setup.batch)
    state = tt.fresh_state(tiny_setup, cfg, tx)
    history = []
    for _ in range(40):
        state, m = step(state, batch)
        history.append((float(m["ce"]), float(m["sim"]), float(m["kstar"])))
    ce0, sim0, _ = history[0]
    ce1, sim1, _ = history[-1]
    print(f"overfit: CE {ce0:.3f} -> {ce1:.3f}, L_sim {sim0:.3f} -> {sim1:.3f}, K* mean {history[-1][2]:.2f}")
    assert np.isfinite(history).all()
    assert ce1 < 0.7 * ce0
    assert sim1 < 0.7 * sim0


# ----------------------------------------------------------------------------- batch semantics
def _mixed_rows(batch, n=4):
    """n rows with as many different segment counts as the batch offers (first seen first)."""
    counts = batch["segment_mask"].sum(1)
    rows = [int(np.flatnonzero(counts == c)[0]) for c in sorted(set(counts.tolist()))]
    rows += [r for r in range(len(counts)) if r not in rows][: n - len(rows)]
    return sorted(rows[:n])


def test_batch_equals_mean_of_single_samples(tiny_setup, tt):
    """A batch of 4 samples with different segment counts == each sample alone
    (loss_normalization "sample", no noise): the batch loss is the mean of the single
    losses, per-sample CE and L_sim agree, and the step's gradient (SGD at lr 1: the
    parameter change) is the mean of the single-sample gradients."""
    cfg = tt.step_config(tiny_setup, noise_scale=0.0, loss_normalization="sample")
    tx, sched = _sgd()
    rows = _mixed_rows(tiny_setup.batch)
    batch4 = tt.sub_batch(tiny_setup.batch, rows)
    assert len(set(batch4["segment_mask"].sum(1).tolist())) >= 3
    step = step_lib.compile_train_step(cfg, tx, sched)
    p0 = tiny_setup.params

    state, m4 = step(tt.fresh_state(tiny_setup, cfg, tx), _device(batch4))
    g4 = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), p0, tt.to_np(state.params))
    singles = []
    for i in range(4):
        state, m1 = step(tt.fresh_state(tiny_setup, cfg, tx), _device(tt.sub_batch(batch4, [i])))
        g1 = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), p0,
                          tt.to_np(state.params))
        singles.append((m1, g1))
    mean = lambda xs: sum(xs) / len(xs)
    for key in ("loss", "ce", "sim"):
        np.testing.assert_allclose(float(m4[key]), mean([float(m[key]) for m, _ in singles]), rtol=1e-5)
    g_mean = jax.tree.map(lambda *gs: mean(gs), *[g for _, g in singles])
    g_err = tt.max_abs_diff(g4, g_mean)
    g_scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g4))
    print(f"batch vs singles: loss {float(m4['loss']):.6f} vs {mean([float(m['loss']) for m, _ in singles]):.6f}, "
          f"max |grad diff| {g_err:.2e} (max |grad| {g_scale:.2e})")
    assert g_err < 1e-5 * max(g_scale, 1.0)

    # Per-sample CE and L_sim straight from the stage-1 pieces.
    @jax.jit
    def per_sample(params, batch):
        pos, _ = rope.mrope_position_ids(batch["input_ids"], batch["attention_mask"],
                                         batch["image_grid_thw"], cfg.model)
        qf = vision.vision_forward(params["visual"], cfg.model.vision, batch["pixel_values"],
                                   batch["image_grid_thw"])
        sel = step_lib.teacher_targets(params, cfg, batch, qf, pos)
        ce_sum, ce_cnt, sim, pairs = step_lib.student_stage1(params, cfg, batch, qf, pos, sel,
                                                             jax.random.PRNGKey(0))
        return ce_sum / ce_cnt, sim, pairs, sel.kstar

    params = _device(p0)
    ce4, sim4, pairs4, k4 = jax.device_get(per_sample(params, _device(batch4)))
    for i in range(4):
        ce1, sim1, pairs1, k1 = jax.device_get(per_sample(params, _device(tt.sub_batch(batch4, [i]))))
        np.testing.assert_allclose(ce4[i], ce1[0], rtol=1e-5)
        np.testing.assert_allclose(sim4[i], sim1[0], rtol=1e-5, atol=1e-6)
        assert pairs4[i] == pairs1[0] == k4[i].sum()
        np.testing.assert_array_equal(k4[i], k1[0])


def test_gradient_accumulation_matches_one_big_step(tiny_setup, tt):
    """grad_accum_steps=2 on a batch of 4 == grad_accum_steps=1 (AdamW + clipping, no
    noise): same metrics and same new parameters, teacher and optimizer state."""
    tx, sched = opt_lib.make_optimizer(lr=1e-3, warmup_steps=0, total_steps=100)
    batch4 = _device(tt.sub_batch(tiny_setup.batch, _mixed_rows(tiny_setup.batch)))
    out = {}
    for n in (1, 2):
        cfg = tt.step_config(tiny_setup, noise_scale=0.0, grad_accum_steps=n)
        step = step_lib.compile_train_step(cfg, tx, sched)
        state, m = step(tt.fresh_state(tiny_setup, cfg, tx), batch4)
        out[n] = (tt.to_np(state), {k: float(v) for k, v in m.items()})
    (s1, m1), (s2, m2) = out[1], out[2]
    for k in m1:
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    errs = {name: tt.max_abs_diff(getattr(s1, name), getattr(s2, name)) for name in ("params", "teacher", "opt_state")}
    print(f"accumulation 2 vs 1: max |diff| {errs}")
    assert max(errs.values()) < 1e-5


# ----------------------------------------------------------------------------- non-finite losses
def test_nan_policy(tiny_setup, tt):
    """A batch with a NaN question image gives a NaN loss: "skip" keeps parameters, teacher
    and optimizer state (the step counter advances) and the next good batch trains;
    "stop" reports finite=False."""
    tx, sched = opt_lib.make_optimizer(lr=1e-3, warmup_steps=0, total_steps=100)
    good = tt.sub_batch(tiny_setup.batch, range(2))
    bad = dict(good)
    bad["pixel_values"] = good["pixel_values"].copy()
    bad["pixel_values"][0, 0, 0] = np.nan

    cfg = tt.step_config(tiny_setup, nan_policy="skip")
    step = step_lib.compile_train_step(cfg, tx, sched)
    state = tt.fresh_state(tiny_setup, cfg, tx)
    old = tt.to_np(state)
    state, m = step(state, _device(bad))
    assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
    new = tt.to_np(state)
    assert int(new.step) == 1
    for name in ("params", "teacher", "opt_state"):
        for a, b in zip(jax.tree.leaves(getattr(old, name)), jax.tree.leaves(getattr(new, name))):
            np.testing.assert_array_equal(a, b)
    state, m = step(state, _device(good))
    assert bool(m["finite"])
    # The skipped step did not advance the optimizer: this update used the schedule's first lr.
    np.testing.assert_allclose(float(m["lr"]), float(sched(0)), rtol=1e-7)
    assert float(sched(0)) != float(sched(1))
    after = tt.to_np(state)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after.params))
    assert not np.array_equal(after.params["text"]["norm"]["scale"], old.params["text"]["norm"]["scale"])

    cfg = tt.step_config(tiny_setup, nan_policy="stop")
    step = step_lib.compile_train_step(cfg, tx, sched)
    _, m = step(tt.fresh_state(tiny_setup, cfg, tx), _device(bad))
    assert not bool(m["finite"])


# ----------------------------------------------------------------------------- bad input
def _corrupt(batch, **changes):
    out = {k: np.array(v, copy=True) for k, v in batch.items()}
    out.update(changes)
    return out


def test_bad_batches_fail_on_the_host_naming_the_sample(tiny_setup, tt):
    """The loop's per-batch check (``_host_batch_checks`` -> ``ilvr.validate_segments``)
    rejects malformed segment layouts before any compilation, naming the sample."""
    from ilvr_jax.train.loop import _host_batch_checks

    cfg = tt.step_config(tiny_setup)
    tok = cfg.token_ids
    nb = tiny_setup.batch
    K = cfg.latent_size
    _host_batch_checks(nb, cfg)  # the real batch passes

    counts = nb["segment_mask"].sum(1)
    two = int(np.flatnonzero(counts >= 2)[0])
    three = int(np.flatnonzero(counts >= 3)[0])

    # Helper-image count != segment count: one helper image of sample `two` missing.
    thw = nb["helper_grid_thw"].copy()
    thw[two, 1] = 0
    with pytest.raises(ValueError, match=rf"sample {two}: .*segment count mismatch.*1 helper images"):
        _host_batch_checks(_corrupt(nb, helper_grid_thw=thw), cfg)

    # A segment longer than K: one extra <|latent_pad|> inserted into segment 0 of sample `two`.
    ids = nb["input_ids"].copy()
    attn = nb["attention_mask"].copy()
    ls = int(nb["latent_starts"][two, 0])
    ids[two] = np.insert(ids[two], ls + 1, tok.latent_pad)[:-1]
    attn[two] = np.insert(attn[two], ls + 1, 1)[:-1]
    starts = nb["latent_starts"].copy()
    starts[two, 1:] += (nb["segment_mask"][two, 1:]).astype(starts.dtype)
    with pytest.raises(ValueError, match=rf"sample {two}: segment 0 .*found {K + 1} pads"):
        _host_batch_checks(_corrupt(nb, input_ids=ids, attention_mask=attn, latent_starts=starts), cfg)

    # M > M_max: a batch with fewer segment slots than sample `three` has segments.
    m = int(counts[three]) - 1
    small = _corrupt(nb, latent_starts=nb["latent_starts"][:, :m], segment_mask=nb["segment_mask"][:, :m],
                     helper_grid_thw=nb["helper_grid_thw"][:, :m])
    bad_rows = np.flatnonzero(counts > m)
    with pytest.raises(ValueError, match=rf"sample {bad_rows[0]}: {counts[bad_rows[0]]} latent segments "
                                         rf"exceed the maximum M = {m}"):
        _host_batch_checks(small, cfg)

    # K* = 0: a helper image without a single merged token (a 1x1x2 patch grid) has no
    # candidate, so no target could be selected.
    thw = nb["helper_grid_thw"].copy()
    thw[three, 2] = (1, 1, 2)
    with pytest.raises(ValueError, match=rf"sample {three}: helper image 2 has no merged tokens"):
        _host_batch_checks(_corrupt(nb, helper_grid_thw=thw), cfg)

    # A padding sample (sample_mask False) is not checked, whatever it holds; the bad one
    # is still named by its own index.
    pad_mask = nb["sample_mask"].copy()
    pad_mask[three] = False
    _host_batch_checks(_corrupt(nb, helper_grid_thw=thw, sample_mask=pad_mask), cfg)
    thw[two, 1] = 0
    with pytest.raises(ValueError, match=rf"sample {two}: .*segment count mismatch"):
        _host_batch_checks(_corrupt(nb, helper_grid_thw=thw, sample_mask=pad_mask), cfg)


@pytest.mark.parametrize("norm", ["sample", "token"])
def test_padding_samples_add_nothing(tiny_setup, tt, norm):
    """A short last batch: rows with sample_mask False (here: copies of real samples, the
    hardest case) change neither the loss nor the gradient, under both loss
    normalisations; "token" takes CE = sum of token NLLs / target tokens of the batch,
    "sample" the mean over real samples of their token means."""
    cfg = tt.step_config(tiny_setup, noise_scale=0.0, loss_normalization=norm)
    tx, sched = _sgd()
    rows = _mixed_rows(tiny_setup.batch)
    real = tt.sub_batch(tiny_setup.batch, rows[:2])
    padded = tt.sub_batch(tiny_setup.batch, rows)
    padded["sample_mask"] = np.array([True, True, False, False])
    p0 = tiny_setup.params
    out = {}
    for name, b in (("real", real), ("padded", padded)):
        step = step_lib.compile_train_step(cfg, tx, sched)
        state, m = step(tt.fresh_state(tiny_setup, cfg, tx), _device(b))
        out[name] = ({k: float(v) for k, v in m.items()},
                     jax.tree.map(lambda a, c: np.asarray(a, np.float64) - np.asarray(c, np.float64), p0,
                                  tt.to_np(state.params)))
    (m_r, g_r), (m_p, g_p) = out["real"], out["padded"]
    for k in ("loss", "ce", "sim", "kstar", "tokens", "target_tokens", "grad_norm"):
        np.testing.assert_allclose(m_p[k], m_r[k], rtol=1e-5, err_msg=k)
    assert tt.max_abs_diff(g_p, g_r) < 1e-6

    # Token-mean CE of the real rows, from the per-sample sums.
    @jax.jit
    def ce_sums(params, batch):
        pos, _ = rope.mrope_position_ids(batch["input_ids"], batch["attention_mask"],
                                         batch["image_grid_thw"], cfg.model)
        qf = vision.vision_forward(params["visual"], cfg.model.vision, batch["pixel_values"],
                                   batch["image_grid_thw"])
        sel = step_lib.teacher_targets(params, cfg, batch, qf, pos)
        ce_sum, ce_cnt, _, _ = step_lib.student_stage1(params, cfg, batch, qf, pos, sel, jax.random.PRNGKey(0))
        return ce_sum, ce_cnt

    s, c = jax.device_get(ce_sums(_device(p0), _device(real)))
    assert c[0] != c[1]  # token and sample means differ
    expect = s.sum() / c.sum() if norm == "token" else np.mean(s / c)
    np.testing.assert_allclose(m_r["ce"], expect, rtol=1e-5)
    assert m_r["target_tokens"] == c.sum()


def test_trainable_vision_tower(tiny_setup, tt):
    """With nothing frozen the teacher holds a vision copy, the student's vision tower
    trains, and the EMA covers it too."""
    d = 0.5
    cfg = tt.step_config(tiny_setup, frozen_patterns=(), ema_decay=d)
    tx, sched = opt_lib.make_optimizer(lr=1e-3, warmup_steps=0, total_steps=100)
    state = tt.fresh_state(tiny_setup, cfg, tx)
    assert "visual" in state.teacher
    old = tt.to_np(state)
    state, m = step_lib.compile_train_step(cfg, tx, sched)(state, _device(tt.sub_batch(tiny_setup.batch, range(2))))
    assert bool(m["finite"])
    new = tt.to_np(state)
    assert not np.array_equal(old.params["visual"]["merger"]["fc2"]["kernel"],
                              new.params["visual"]["merger"]["fc2"]["kernel"])
    expect = jax.tree.map(lambda t, s: d * t.astype(np.float64) + (1 - d) * s.astype(np.float64),
                          old.teacher, new.params)
    assert tt.max_abs_diff(new.teacher, expect) < 1e-7


@pytest.mark.parametrize("mode", ["random", "mean_pool"])
def test_baseline_target_selections_train_their_targets(tiny_setup, tt, mode):
    """The selection ablation and the Mirage-style targets go through the same step: the
    targets the step trains on are the baseline's (checked through K*: the teacher's count
    for "random", min(K, candidates) for "mean_pool"), and the loss is finite."""
    import dataclasses

    base = tt.step_config(tiny_setup)
    cfg = dataclasses.replace(base, target_selection=mode)
    params = _device(tiny_setup.params)
    batch = _device(tiny_setup.batch)

    def kstar_of(c):
        pos, _ = rope.mrope_position_ids(batch["input_ids"], batch["attention_mask"],
                                         batch["image_grid_thw"], c.model)
        qf = vision.vision_forward(params["visual"], c.model.vision, batch["pixel_values"],
                                   batch["image_grid_thw"])
        return np.asarray(step_lib.teacher_targets(params, c, batch, qf, pos, jax.random.key(0)).kstar)

    seg = np.asarray(tiny_setup.batch["segment_mask"]).astype(bool)
    teacher_k, mode_k = kstar_of(base), kstar_of(cfg)
    if mode == "random":
        np.testing.assert_array_equal(mode_k, teacher_k)
    else:
        counts = np.asarray(ilvr.helper_token_counts(batch["helper_grid_thw"], cfg.model.vision.merge_unit))
        np.testing.assert_array_equal(mode_k, np.where(seg, np.minimum(np.minimum(counts, cfg.num_candidates),
                                                                       cfg.latent_size), 0))
    tx, sched = _sgd()
    step = step_lib.compile_train_step(cfg, tx, sched)
    state, m = step(tt.fresh_state(tiny_setup, cfg, tx), batch)
    assert bool(m["finite"]) and float(m["sim"]) > 0


@pytest.mark.parametrize("stage", [1, 2])
def test_public_stage_losses_are_what_the_step_minimises(tiny_setup, tt, stage):
    """``stage1_loss`` / ``stage2_loss`` evaluated alone (no update) give the step's loss,
    and their gradient is the step's update under plain SGD at lr 1."""
    from ilvr_jax.ilvr import recurrence

    b = tiny_setup.batch
    starts, ends = recurrence.chunk_bounds(jnp.asarray(b["latent_starts"]), jnp.asarray(b["segment_mask"]),
                                           tt.K, b["input_ids"].shape[1], jnp.asarray(b["attention_mask"]))
    later = int((np.asarray(ends) - np.asarray(starts))[:, 1:].max())
    cfg = tt.step_config(tiny_setup, stage=stage, stage2_chunk_len=(None, later))
    tx, sched = _sgd()
    state = tt.fresh_state(tiny_setup, cfg, tx)
    params = _device(tiny_setup.params)
    batch = _device(tiny_setup.batch)
    key = jax.random.split(jax.random.split(state.rng)[1], 1)[0]   # the step's micro-batch key

    def loss(p):
        if stage == 1:
            return step_lib.stage1_loss(p, params, cfg, batch, key)[0]
        return step_lib.stage2_loss(p, cfg, batch)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    new_state, m = step_lib.compile_train_step(cfg, tx, sched)(state, batch)
    assert abs(float(value) - float(m["loss"])) <= 1e-6 * abs(float(value))
    trainable, _ = opt_lib.split_frozen(grads, cfg.frozen_patterns)
    new_tr, _ = opt_lib.split_frozen(jax.device_get(new_state.params), cfg.frozen_patterns)
    old_tr, _ = opt_lib.split_frozen(tiny_setup.params, cfg.frozen_patterns)
    step_grad = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), old_tr, new_tr)
    assert tt.max_abs_diff(step_grad, jax.device_get(trainable)) <= 1e-6 * max(
        float(np.max(np.abs(x))) for x in jax.tree.leaves(step_grad))


def test_stage2_unroll_is_read_from_the_config_and_reaches_the_recurrence(tiny_setup, tt):
    """``train.stage2_unroll`` reaches the step and inlines the recurrence's loops (its
    numbers: ``tests/ilvr/test_recurrence.py``); lowered only, nothing compiles."""
    from ilvr_jax.demo import load_config
    from ilvr_jax.train import loop

    c = load_config("stage2.py", "demo")
    assert loop.step_config(c, tiny_setup.model_cfg).stage2_unroll is False
    c.train.stage2_unroll = True
    assert loop.step_config(c, tiny_setup.model_cfg).stage2_unroll is True
    params, batch = _device(tiny_setup.params), _device(tiny_setup.batch)

    def loops(unroll):
        cfg = tt.step_config(tiny_setup, stage=2, stage2_unroll=unroll)
        return jax.jit(lambda p: step_lib.stage2_loss(p, cfg, batch)[0]).lower(params).as_text().count(
            "stablehlo.while")

    assert loops(True) < loops(False)
