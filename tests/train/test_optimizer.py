"""The optimizer against torch / HF: learning-rate schedules, AdamW with masked weight decay
after global-norm clipping, and the frozen split (no state for frozen parameters)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import traverse_util

from ilvr_jax.train import optimizer as opt_lib
from ilvr_jax.train import step as step_lib

HF_SCHEDULES = {
    "linear": transformers.get_linear_schedule_with_warmup,
    "constant": lambda opt, w, t: transformers.get_constant_schedule_with_warmup(opt, w),
    "cosine": transformers.get_cosine_schedule_with_warmup,
}


def _torch_lrs(kind, lr, warmup, total, n):
    """The lr torch's optimizer uses at each of n optimizer steps under HF's scheduler."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    sched = HF_SCHEDULES[kind](opt, warmup, total)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(1)
        opt.step()
        sched.step()
    return np.array(out)


@pytest.mark.parametrize("kind,warmup,total", [
    ("linear", 10, 50), ("linear", 0, 20), ("linear", 3, 4), ("linear", 10, 6),
    ("constant", 4, 20), ("cosine", 5, 30),
])
def test_schedule_matches_hf(kind, warmup, total):
    lr = 1e-3
    # Past total_steps HF's cosine rises again (it is periodic); compare the run's steps only.
    n = total if kind == "cosine" else total + 5
    _, sched = opt_lib.make_optimizer(lr=lr, warmup_steps=warmup, total_steps=total, schedule=kind)
    ours = np.array([float(sched(i)) for i in range(n)])
    np.testing.assert_allclose(ours, _torch_lrs(kind, lr, warmup, total, n), rtol=1e-6, atol=1e-10)  # fp32 schedule


def _tree(rng):
    return {
        "dense": {"kernel": rng.standard_normal((3, 4)), "bias": rng.standard_normal(4)},
        "embed": {"embedding": rng.standard_normal((5, 3))},
        "norm": {"scale": 1.0 + 0.1 * rng.standard_normal(3)},
    }


def test_adamw_matches_torch():
    """Several steps of make_optimizer == torch: clip_grad_norm_(1.0), then AdamW with weight
    decay on kernels/embeddings only, lr from get_linear_schedule_with_warmup. The gradient
    norms straddle the clipping threshold."""
    lr, wd, warmup, total, steps = 1e-2, 0.1, 2, 8, 6
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x.astype(np.float32), _tree(rng))
    grad_scales = [3.0, 0.05, 2.0, 0.3, 1.0, 5.0]
    grads = [jax.tree.map(lambda x: (s * x).astype(np.float32), _tree(rng)) for s in grad_scales]

    tx, _ = opt_lib.make_optimizer(lr=lr, weight_decay=wd, warmup_steps=warmup, total_steps=total, clip_norm=1.0)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    update = jax.jit(tx.update)
    for g in grads:
        u, state = update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, u)

    flat = traverse_util.flatten_dict(params)
    tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in flat.items()}
    decay = [v for k, v in tparams.items() if k[-1] in ("kernel", "embedding")]
    no_decay = [v for k, v in tparams.items() if k[-1] not in ("kernel", "embedding")]
    assert len(decay) == 2 and len(no_decay) == 2
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8)
    sched = transformers.get_linear_schedule_with_warmup(opt, warmup, total)
    norms = []
    for g in grads:
        for k, v in traverse_util.flatten_dict(g).items():
            tparams[k].grad = torch.tensor(v)
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(tparams.values()), 1.0)))
        opt.step()
        sched.step()
        opt.zero_grad()
    assert min(norms) < 1.0 < max(norms)
    got = traverse_util.flatten_dict(jax.tree.map(np.asarray, p))
    for k, v in tparams.items():
        np.testing.assert_allclose(got[k], v.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=str(k))
    # Weight decay really acted on the kernels only: without it the kernels differ.
    tx0, _ = opt_lib.make_optimizer(lr=lr, weight_decay=0.0, warmup_steps=warmup, total_steps=total, clip_norm=1.0)
    p0 = jax.tree.map(jnp.asarray, params)
    s0 = tx0.init(p0)
    for g in grads:
        u, s0 = tx0.update(jax.tree.map(jnp.asarray, g), s0, p0)
        p0 = optax.apply_updates(p0, u)
    assert not np.allclose(p0["dense"]["kernel"], p["dense"]["kernel"], atol=1e-6)
    np.testing.assert_allclose(p0["dense"]["bias"], p["dense"]["bias"], atol=1e-7)
    np.testing.assert_allclose(p0["norm"]["scale"], p["norm"]["scale"], atol=1e-7)


def test_frozen_params_have_no_optimizer_state(tiny_setup, tt):
    """With the vision tower frozen, the optimizer state holds exactly two moments per
    trainable leaf and nothing for ``visual/...``; the teacher has no vision copy."""
    cfg = tt.step_config(tiny_setup)
    tx, _ = opt_lib.make_optimizer()
    shapes = jax.eval_shape(lambda p: step_lib.init_train_state(p, tx, cfg, jax.random.PRNGKey(0)),
                            jax.tree.map(jnp.asarray, tiny_setup.params))
    trainable, frozen = opt_lib.split_frozen(shapes.params, cfg.frozen_patterns)
    assert set(frozen) == {"visual"} and "visual" not in trainable
    n_frozen = len(jax.tree.leaves(frozen))
    n_trainable = len(jax.tree.leaves(trainable))
    assert n_frozen > 0 and n_trainable > 0
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(shapes.opt_state)[0]]
    assert not any("visual" in s for s in paths)
    big = [x for x in jax.tree.leaves(shapes.opt_state) if x.ndim > 0]
    assert len(big) == 2 * n_trainable  # mu and nu
    assert "visual" not in shapes.teacher
    # merge_params inverts split_frozen.
    merged = opt_lib.merge_params(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(shapes.params)
