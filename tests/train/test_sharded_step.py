"""The pjit-sharded stage-1 step on 8 fake CPU devices == the single-device step (two
consecutive steps: metrics, parameters, teacher and optimizer state)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ilvr_jax.train import mesh as mesh_lib
from ilvr_jax.train import optimizer as opt_lib
from ilvr_jax.train import step as step_lib


def _setup(tiny_setup, tt):
    cfg = tt.step_config(tiny_setup)
    # Adam's first update is lr * g / (|g| + eps): for gradient entries near eps = 1e-8 the
    # update changes by up to lr * |dg| / eps, so fp32 summation-order noise in g (~1e-8)
    # moves such parameters by ~lr * 1e-2. lr 1e-4 keeps that below the 1e-5 tolerance;
    # the gradients themselves (Adam's moments) are compared far tighter below.
    tx, sched = opt_lib.make_optimizer(lr=1e-4, warmup_steps=0, total_steps=100)
    batch = {k: jnp.asarray(v) for k, v in tiny_setup.batch.items()}
    return cfg, tx, sched, batch


@pytest.fixture(scope="module")
def single_device_result(tiny_setup, tt):
    cfg, tx, sched, batch = _setup(tiny_setup, tt)
    step = step_lib.compile_train_step(cfg, tx, sched)
    state, metrics = step(tt.fresh_state(tiny_setup, cfg, tx), batch)
    state, metrics2 = step(state, batch)
    return tt.to_np(state), [{k: np.asarray(v) for k, v in m.items()} for m in (metrics, metrics2)]


def _is_replicated(sharding) -> bool:
    return all(p is None for p in sharding.spec)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device(tiny_setup, tt, single_device_result, shape):
    assert jax.device_count() == 8
    cfg, tx, sched, batch = _setup(tiny_setup, tt)
    mesh = mesh_lib.make_mesh(shape)
    state = tt.fresh_state(tiny_setup, cfg, tx)
    state_shapes = jax.eval_shape(lambda s: s, state)
    batch_shapes = jax.eval_shape(lambda b: b, batch)
    st_sh = step_lib.state_shardings(mesh, state_shapes, cfg, tx)
    state = jax.device_put(state, st_sh)
    batch = jax.device_put(batch, step_lib.batch_shardings(mesh, batch_shapes))
    step = step_lib.compile_train_step(cfg, tx, sched, mesh, state_shapes, batch_shapes)
    new_state, metrics = step(state, batch)
    # The second step reads the first one's (donated, resharded) output state.
    new_state, metrics2 = step(new_state, batch)

    # Where the state lives: student and teacher leaves alike, parameters sharded over
    # fsdp/tensor when the mesh has such axes, the batch over data x fsdp.
    p_sh = traverse_util.flatten_dict(jax.tree.map(lambda x: x.sharding, new_state.params))
    t_sh = traverse_util.flatten_dict(jax.tree.map(lambda x: x.sharding, new_state.teacher))
    assert set(t_sh) <= set(p_sh) and not any(k[0] == "visual" for k in t_sh)
    for k, s in t_sh.items():
        assert s.is_equivalent_to(p_sh[k], len(s.spec) or 1), k
    n_sharded = sum(not _is_replicated(s) for s in p_sh.values())
    if shape[1] * shape[2] > 1:
        assert n_sharded > 0
        emb = new_state.params["text"]["embed_tokens"]["embedding"]
        assert not _is_replicated(emb.sharding)
        assert emb.addressable_shards[0].data.size < emb.size
    else:
        assert n_sharded == 0  # pure data parallelism replicates the parameters
    assert batch["input_ids"].addressable_shards[0].data.shape[0] == 8 // (shape[0] * shape[1])

    ref_state, ref_metrics = single_device_result
    got = tt.to_np(new_state)
    for got_m, ref_m in zip((metrics, metrics2), ref_metrics):
        for k, v in ref_m.items():
            np.testing.assert_allclose(np.asarray(got_m[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
    errs = {name: tt.max_abs_diff(getattr(ref_state, name), getattr(got, name))
            for name in ("params", "teacher", "opt_state")}
    print(f"mesh {shape}: max |sharded - single| {errs}, loss diff "
          f"{abs(float(metrics2['loss']) - float(ref_metrics[1]['loss'])):.2e}, sharded param leaves {n_sharded}")
    assert max(errs.values()) < 1e-5
    assert errs["opt_state"] < 1e-7
    assert int(got.step) == 2
