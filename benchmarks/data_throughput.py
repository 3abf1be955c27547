"""Input-pipeline throughput on the synthetic maze set (samples/s, steady state).

    python benchmarks/data_throughput.py [--records 400] [--workers 0 2]

Generates mazes (3..6 grids) into a temporary directory, builds the grain pipeline with
the demo's batch shapes and times a full pass per worker count: indexing (record sizes,
tokenisation), first batch (worker start-up), then steady-state samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    from ilvr_jax.data import maze
    from ilvr_jax.data.pipeline import DataConfig, DataPipeline
    from ilvr_jax.tiny import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = maze.generate_maze_dataset(os.path.join(tmp, "mazes"), n=args.records, seed=0, sizes=(3, 6))
        gen_s = time.perf_counter() - t0
        tok_dir = os.path.join(tmp, "tok")
        build_tokenizer(tok_dir)
        for wc in args.workers:
            cfg = DataConfig(batch_size=args.batch_size, max_length=1024, max_question_images=1,
                             max_question_patches=512, max_helper_patches=4096, max_segments=16,
                             latent_size=8, min_pixels=4 * 28 * 28, max_pixels=256 * 28 * 28,
                             worker_count=wc, num_epochs=1, drop_policy="skip")
            t0 = time.perf_counter()
            pipe = DataPipeline.from_jsonl(path, tok_dir, cfg)
            t1 = time.perf_counter()
            it = pipe.iterator()
            next(it)
            t2 = time.perf_counter()
            n = 0
            for _ in it:
                n += 1
            t3 = time.perf_counter()
            it.close()
            print(json.dumps({
                "worker_count": wc, "records": pipe.num_records, "dropped": pipe.drops.as_dict(),
                "generate_s": round(gen_s, 2), "index_s": round(t1 - t0, 2),
                "first_batch_s": round(t2 - t1, 2),
                "steady_samples_per_s": round(n * cfg.batch_size / max(t3 - t2, 1e-9), 1),
            }), flush=True)


if __name__ == "__main__":
    main()
