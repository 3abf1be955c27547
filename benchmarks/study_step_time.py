"""Step time of the paper-claims study's ILVR run: stage 1, and stage 2 with the first text
chunk in a window of the sequence vs in the window ``train.stage2_chunk_len='auto'`` picks,
and with the latent steps inlined (``train.stage2_unroll``).

    python benchmarks/study_step_time.py [--study-dir DIR] [--steps 3]

Builds the study's data (``paper_claims.build_data``, reused when DIR already holds it),
the ``ilvr`` method's stage configs, a random-weight model of the study's shape and one
real batch; prints the median of ``--steps`` timed steps per variant (after one untimed
step that compiles).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study-dir", default="/tmp/paper_claims_study")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import jax
    import jax.numpy as jnp
    import numpy as np

    import paper_claims as pc
    from stage_cost import median_step_time
    from ilvr_jax.train import loop
    from ilvr_jax.train import optimizer as opt_lib
    from ilvr_jax.train import step as step_lib

    pc.register_shapes()
    method, budget = pc.all_methods()["ilvr"], pc.Budget()
    paths = pc.build_data(os.path.join(args.study_dir, "data"), budget)
    c1 = pc.stage_config(1, method, budget, 0, paths[method.data], 10)
    c2 = pc.stage_config(2, method, budget, 0, paths[method.data], 10)
    for c in (c1, c2):   # one batch shape that holds every record (the study's buckets vary)
        c.data.buckets = "512"
    c2.train.stage2_unroll = False
    work = tempfile.mkdtemp(prefix="study_step_")
    model_cfg, params, _, pipe = pc.stage_pipeline(c1, work)
    batch = {k: jnp.asarray(v) for k, v in next(iter(pipe.iterator())).items()}
    later = max(it.size.later_chunk_len or 0 for it in pipe.items)
    first = max(it.size.first_chunk_len for it in pipe.items)
    tx, sched = opt_lib.make_optimizer(lr=1e-3, warmup_steps=1, total_steps=100)
    params = jax.tree.map(jnp.asarray, params)
    print(f"batch {tuple(batch['input_ids'].shape)}, segments per row {np.asarray(batch['segment_mask']).sum(1).tolist()}, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    variants = [("stage 1", loop.step_config(c1, model_cfg)),
                ("stage 2, first chunk in the sequence's window", loop.step_config(c2, model_cfg, later)),
                ("stage 2, 'auto' (the data's longest first chunk)", loop.step_config(c2, model_cfg, later, first)),
                ("stage 2, 'auto', loops inlined (stage2_unroll)", dataclasses.replace(
                    loop.step_config(c2, model_cfg, later, first), stage2_unroll=True))]
    for name, scfg in variants:
        state = step_lib.init_train_state(jax.tree.map(jnp.copy, params), tx, scfg, jax.random.PRNGKey(0))
        step = step_lib.compile_train_step(scfg, tx, sched)
        seconds, m = median_step_time(step, state, batch, args.steps)
        windows = f", windows {scfg.stage2_chunk_len}" if scfg.stage == 2 else ""
        print(f"{name:50s}{windows:18s} step median {1e3 * seconds:8.1f} ms  loss {float(m['loss']):.4f}",
              flush=True)


if __name__ == "__main__":
    main()
