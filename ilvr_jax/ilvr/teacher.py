"""The momentum teacher's EMA update (ILVR method, section 3)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def ema_update(teacher: Any, student: Any, decay: float = 0.999, dtype=jnp.float32) -> Any:
    """theta_T <- decay * theta_T + (1 - decay) * theta_S, leaf by leaf, in ``dtype``.

    Computed as ``optax.incremental_update(student, teacher, 1 - decay)``, i.e.
    ``(1 - decay) * S + (1 - (1 - decay)) * T``. The teacher is kept in fp32 (default) even
    when the student computes in bf16: an update of 1e-3 x (S - T) mostly rounds away in
    bf16. No gradient flows through either argument.
    """
    t = jax.tree.map(lambda x: jax.lax.stop_gradient(x).astype(dtype), teacher)
    s = jax.tree.map(lambda x: jax.lax.stop_gradient(x).astype(dtype), student)
    return optax.incremental_update(s, t, 1.0 - decay)
