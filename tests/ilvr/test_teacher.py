"""The teacher EMA: exact formula, fp32 even for a bf16 student, small updates not lost."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ilvr_jax.ilvr import ema_update


def test_ema_update_exact_and_not_lost():
    rng = np.random.default_rng(0)
    d = 0.999
    teacher = {"a": {"kernel": (rng.standard_normal((64, 32)) * 0.02).astype(np.float32)},
               "b": (rng.standard_normal(17) * 0.02).astype(np.float32)}
    # Student drifted by ~10%, stored (and computing) in bf16.
    student = jax.tree.map(lambda x: jnp.asarray(x * 1.1 + 0.002, jnp.bfloat16), teacher)
    eager = ema_update(jax.tree.map(jnp.asarray, teacher), student, decay=d)
    new = jax.jit(ema_update, static_argnames="decay")(jax.tree.map(jnp.asarray, teacher), student, decay=d)
    for path in (("a", "kernel"), ("b",)):
        t, s, n, e = teacher, student, new, eager
        for key in path:
            t, s, n, e = t[key], s[key], n[key], e[key]
        s32 = np.asarray(s.astype(jnp.float32))
        assert n.dtype == jnp.float32
        # optax: step * S + (1 - step) * T, both weights rounded from Python floats to fp32.
        ref = np.float32(1.0 - d) * s32 + np.float32(1.0 - (1.0 - d)) * t
        np.testing.assert_array_equal(np.asarray(e), ref)
        # Under jit XLA may contract a*S + b*T into a fused multiply-add: 1 ulp at most.
        np.testing.assert_array_max_ulp(np.asarray(n), ref, maxulp=1)
        moved = np.asarray(n) - t
        np.testing.assert_allclose(moved, (1 - d) * (s32 - t), rtol=1e-3, atol=1e-8)  # ~2 ulp of T
        assert (moved != 0).mean() > 0.99                    # the 1e-3 step is kept (fp32)
        # In bf16 the same step mostly rounds away: that is why the teacher stays fp32.
        bf = np.asarray((jnp.asarray(t, jnp.bfloat16) * d + s * (1 - d)).astype(jnp.float32))
        assert (bf != np.asarray(jnp.asarray(t, jnp.bfloat16).astype(jnp.float32))).mean() < 0.5


def test_ema_update_has_no_gradient():
    t = {"w": jnp.ones(3)}
    g = jax.grad(lambda s: ema_update(t, s, 0.9)["w"].sum())({"w": jnp.full(3, 2.0)})
    assert float(jnp.abs(g["w"]).max()) == 0.0
