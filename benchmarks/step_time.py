"""Wall time of the stage-1 train step of the tiny model on CPU: one device vs a mesh
of fake devices (default 8, data parallel (8, 1, 1)).

    python benchmarks/step_time.py [--devices 8] [--mesh 8,1,1] [--steps 10] [--batch 8]

The batch is real: generated mazes through ``DataPipeline`` (as tests/train/conftest.py
builds it). Prints compile time and the median / min step time of each variant.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=8, help="fake CPU devices")
    ap.add_argument("--mesh", default="8,1,1", help="(data, fsdp, tensor) of the sharded variant")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=448)
    args = ap.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from ilvr_jax.train import mesh as mesh_lib
    from ilvr_jax.train import optimizer as opt_lib
    from ilvr_jax.train import step as step_lib
    from tiny_batch import tiny_model_and_batch

    K, L = 4, 8
    work = tempfile.mkdtemp(prefix="step_time_")
    cfg, params, batch = tiny_model_and_batch(work, latent_size=K, batch_size=args.batch, max_length=args.max_length,
                                              mazes=2 * args.batch + 4, sizes=(2, 4), max_helper_patches=256,
                                              max_segments=4)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    scfg = step_lib.StepConfig(model=cfg, stage=1, latent_size=K, num_candidates=L)
    tx, sched = opt_lib.make_optimizer(lr=1e-4, warmup_steps=0, total_steps=1000)

    def fresh():
        return step_lib.init_train_state(jax.tree.map(jnp.asarray, params), tx, scfg, jax.random.PRNGKey(0))

    def run(name, step, state, batch):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, m = step(state, batch)
            jax.block_until_ready((state, m))
            times.append(time.perf_counter() - t0)
        print(f"{name:28s} first call (compile + run) {compile_s:6.2f} s   step median "
              f"{1e3 * float(np.median(times)):8.1f} ms  min {1e3 * min(times):8.1f} ms  "
              f"(loss {float(m['loss']):.4f})", flush=True)

    print(f"tiny untied_gqa2, batch {args.batch} x {batch['input_ids'].shape[1]} tokens, K={K}, L={L}, "
          f"{jax.device_count()} {jax.devices()[0].platform} devices, {os.cpu_count()} host CPUs")
    run("single device", step_lib.compile_train_step(scfg, tx, sched), fresh(), batch)

    shape = tuple(int(s) for s in args.mesh.split(","))
    mesh = mesh_lib.make_mesh(shape)
    state = fresh()
    st_shapes = jax.eval_shape(lambda s: s, state)
    b_shapes = jax.eval_shape(lambda b: b, batch)
    state = jax.device_put(state, step_lib.state_shardings(mesh, st_shapes, scfg, tx))
    sbatch = jax.device_put(batch, step_lib.batch_shardings(mesh, b_shapes))
    run(f"mesh {shape}", step_lib.compile_train_step(scfg, tx, sched, mesh, st_shapes, b_shapes), state, sbatch)


if __name__ == "__main__":
    sys.exit(main())
