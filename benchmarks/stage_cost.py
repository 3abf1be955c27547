"""Stage 2 vs stage 1 on the same batch: step time and compiled memory of the tiny model on CPU.

    python benchmarks/stage_cost.py [--batch 8] [--steps 10] [--latent-size 8] [--segments 3]

The batch is real (generated mazes through ``DataPipeline``, ``--segments`` latent segments
of K = ``--latent-size`` each). Stage 2 runs with every text chunk in a window of the whole
sequence (``train.stage2_chunk_len='0,0'``), with the first chunk's window the whole
sequence and the later ones tight, and with both tight (the batch's longest first chunk
and longest later chunk, see ``ilvr.recurrence.chunk_bounds``; what
``train.stage2_chunk_len='auto'`` picks from the data, up to its rounding to 16). For each variant: the median
step time, its ratio to stage 1, and the temporaries of the compiled step
(``memory_analysis``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time



def median_step_time(step, state, batch, steps: int):
    """Median wall seconds of ``steps`` train steps after one untimed step (compilation),
    each waited for in full (state and metrics); returns it with the last step's metrics."""
    import jax
    import numpy as np

    state, m = step(state, batch)
    jax.block_until_ready((state, m))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), m

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--latent-size", type=int, default=8)
    ap.add_argument("--segments", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from ilvr_jax.ilvr import recurrence
    from ilvr_jax.train import optimizer as opt_lib
    from tiny_batch import tiny_model_and_batch
    from ilvr_jax.train import step as step_lib

    K, L, M = args.latent_size, 8, args.segments
    work = tempfile.mkdtemp(prefix="stage_cost_")
    cfg, params, host = tiny_model_and_batch(work, latent_size=K, batch_size=args.batch, max_length=args.max_length,
                                             mazes=4 * args.batch, sizes=(3, 4), max_helper_patches=64 * M,
                                             max_segments=M)
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    s = host["input_ids"].shape[1]
    starts, ends = recurrence.chunk_bounds(batch["latent_starts"], batch["segment_mask"], K, s,
                                           batch["attention_mask"])
    lengths = np.asarray(ends - starts)
    tight = (int(lengths[:, 0].max()), int(max(lengths[:, 1:].max(), 1)))
    segs = np.asarray(host["segment_mask"]).sum(1)
    tx, sched = opt_lib.make_optimizer(lr=1e-4, warmup_steps=0, total_steps=1000)

    def measure(scfg):
        state = step_lib.init_train_state(jax.tree.map(jnp.asarray, params), tx, scfg, jax.random.PRNGKey(0))
        step = step_lib.compile_train_step(scfg, tx, sched)
        mem = step.lower(state, batch).compile().memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
        seconds, m = median_step_time(step, state, batch, args.steps)
        return seconds, temp, float(m["loss"])

    print(f"tiny untied_gqa2, batch {args.batch} x {s} tokens, K={K}, segments per row {segs.tolist()}, "
          f"tight windows {tight}, {os.cpu_count()} host CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    base = step_lib.StepConfig(model=cfg, stage=1, latent_size=K, num_candidates=L)
    variants = [("stage 1", base),
                ("stage 2, default windows", step_lib.StepConfig(model=cfg, stage=2, latent_size=K,
                                                                 num_candidates=L)),
                (f"stage 2, windows {(s, tight[1])}", step_lib.StepConfig(
                    model=cfg, stage=2, latent_size=K, num_candidates=L, stage2_chunk_len=(None, tight[1]))),
                (f"stage 2, windows {tight}", step_lib.StepConfig(model=cfg, stage=2, latent_size=K,
                                                                  num_candidates=L, stage2_chunk_len=tight))]
    t1 = None
    for name, scfg in variants:
        t, temp, loss = measure(scfg)
        t1 = t1 or t
        mib = f"{temp / 2**20:8.1f} MiB" if temp is not None else "n/a"
        print(f"{name:34s} step median {1e3 * t:8.1f} ms  ({t / t1:4.2f}x stage 1)  temporaries {mib}  "
              f"loss {loss:.4f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
