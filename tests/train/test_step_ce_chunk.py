"""The train step with the LM-head cross-entropy in sequence chunks (``ce_chunk``) makes the
same update as with the full [B, S, V] logits (``ce_chunk=0``), in stage 1 and stage 2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ilvr_jax.train import step as step_lib


def _step(setup, tt, batch, **kw):
    # Plain SGD at lr 1: the parameter change is minus the gradient, so equal new params
    # mean equal gradients.
    tx, sched = optax.sgd(1.0), optax.constant_schedule(1.0)
    cfg = tt.step_config(setup, noise_scale=0.0, **kw)
    state, m = step_lib.compile_train_step(cfg, tx, sched)(tt.fresh_state(setup, cfg, tx), batch)
    return tt.to_np(state.params), {k: float(v) for k, v in m.items()}


@pytest.mark.parametrize("stage", [1, 2])
def test_chunked_ce_step_equals_full_logits_step(tiny_setup, tt, stage):
    """Chunks of 100 tokens do not divide the 448-token batch (chunk sizes that divide S or
    exceed it are covered in tests/ilvr/test_losses.py)."""
    batch = jax.tree.map(jnp.asarray, tt.sub_batch(tiny_setup.batch, [0, 3]))
    ref_params, ref_m = _step(tiny_setup, tt, batch, stage=stage, ce_chunk=0)
    moved = tt.max_abs_diff(ref_params, tt.to_np(jax.tree.map(np.asarray, tiny_setup.params)))
    assert moved > 1e-3  # the step does change the parameters
    for chunk in (100,):
        params, m = _step(tiny_setup, tt, batch, stage=stage, ce_chunk=chunk)
        for k in ("loss", "ce", "grad_norm", "target_tokens"):
            np.testing.assert_allclose(m[k], ref_m[k], rtol=2e-6, err_msg=f"{k} at chunk {chunk}")
        diff = tt.max_abs_diff(params, ref_params)
        print(f"stage {stage} chunk {chunk}: loss {m['loss']:.7f} vs {ref_m['loss']:.7f}, "
              f"max |param diff| {diff:.2e} (update size {moved:.2e})")
        assert diff < 1e-6, diff


def test_ce_chunk_must_not_be_negative(tiny_setup, tt):
    with pytest.raises(ValueError, match="ce_chunk must be >= 0"):
        tt.step_config(tiny_setup, ce_chunk=-1)
