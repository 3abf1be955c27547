"""The embedded demo: a tiny Qwen2.5-VL trained from scratch with ILVR on generated mazes.

    python -m ilvr_jax.demo --workdir runs/demo

Stage 1 (``configs/stage1.py:demo``: momentum teacher, top-k helper patches, CE + latent
alignment) then stage 2 (``configs/stage2.py:demo``: the model's own latents, CE), each
the same program as ``python -m ilvr_jax.main``, each ending with an HF export. Runs on
2 CPU cores in a few minutes; rerunning resumes/skips finished stages.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(name: str, preset: str):
    path = os.path.join(CONFIG_DIR, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: config file not found (run the demo from a source checkout)")
    spec = importlib.util.spec_from_file_location(f"ilvr_config_{name[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/demo", help="where both stages write (default runs/demo)")
    ap.add_argument("--stage1-steps", type=int, default=None, help="override the stage-1 step count")
    ap.add_argument("--stage2-steps", type=int, default=None, help="override the stage-2 step count")
    args = ap.parse_args(argv)

    from ilvr_jax.train import loop

    root = os.path.abspath(args.workdir)
    s1_dir, s2_dir = os.path.join(root, "stage1"), os.path.join(root, "stage2")
    t0 = time.time()
    c1 = load_config("stage1.py", "demo")
    if args.stage1_steps:
        c1.train.num_steps = args.stage1_steps
    m1 = loop.train_and_evaluate(c1, s1_dir, print_config=False)
    t1 = time.time()
    c2 = load_config("stage2.py", "demo")
    c2.train.init_from = s1_dir
    if args.stage2_steps:
        c2.train.num_steps = args.stage2_steps
    m2 = loop.train_and_evaluate(c2, s2_dir, print_config=False)
    t2 = time.time()

    def fmt(m, keys):
        return "  ".join(f"{k}={m[k]:.4f}" for k in keys if k in m)

    print("\n==== ILVR demo finished ====")
    print(f"stage 1 ({t1 - t0:.0f} s): {fmt(m1, ('loss', 'ce', 'sim', 'kstar'))}")
    print(f"stage 2 ({t2 - t1:.0f} s): {fmt(m2, ('loss', 'ce'))}")
    for name, d in (("stage 1", s1_dir), ("stage 2", s2_dir)):
        print(f"{name}: checkpoints {os.path.join(d, 'checkpoints')}\n"
              f"         TensorBoard {os.path.join(d, 'tensorboard')}\n"
              f"         HF export   {os.path.join(d, 'export_hf')}")
    print(f"configs: {os.path.join(s1_dir, 'config.json')}, {os.path.join(s2_dir, 'config.json')}")
    print(f"TensorBoard: pip install tensorboard && tensorboard --logdir {root}")
    print(f"total wall time {t2 - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
