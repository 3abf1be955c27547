"""The embedded demo: a tiny Qwen2.5-VL trained from scratch with ILVR on generated mazes.

    python -m ilvr_jax.demo --workdir runs/demo

Stage 1 (``configs/stage1.py:demo``: momentum teacher, top-k helper patches, CE + latent
alignment) then stage 2 (``configs/stage2.py:demo``: the model's own latents, CE), each
the same program as ``python -m ilvr_jax.main``, each ending with an HF export. Then an
evaluation on held-out mazes (none of them a training map), generating with latents and
checking each answer by walking it on the map: the untrained model, stage 1, stage 2, and
stage 2 with its latents ablated (zeros, noise of the same norm, another maze's latents),
plus a heatmap of the latents over one maze. Runs on 2 CPU cores in a few minutes;
rerunning resumes/skips finished stages.
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
    ap.add_argument("--eval-records", type=int, default=32, help="held-out mazes of the final evaluation")
    ap.add_argument("--eval-max-new-tokens", type=int, default=160, help="generation budget per maze")
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

    report = evaluate_demo(root, c1, s1_dir, s2_dir, n=args.eval_records, max_new_tokens=args.eval_max_new_tokens)
    t3 = time.time()

    def fmt(m, keys):
        return "  ".join(f"{k}={m[k]:.4f}" for k in keys if k in m)

    print("\n==== ILVR demo finished ====")
    print(f"stage 1 ({t1 - t0:.0f} s): {fmt(m1, ('loss', 'ce', 'sim', 'kstar'))}")
    print(f"stage 2 ({t2 - t1:.0f} s): {fmt(m2, ('loss', 'ce'))}")
    for name, d in (("stage 1", s1_dir), ("stage 2", s2_dir)):
        print(f"{name}: checkpoints {os.path.join(d, 'checkpoints')}\n"
              f"         TensorBoard {os.path.join(d, 'tensorboard')}\n"
              f"         HF export   {os.path.join(d, 'export_hf')}")
    print(f"\nevaluation on {report['records']} held-out mazes ({t3 - t2:.0f} s; answers walked on the map):")
    print(report["table"])
    print(f"latent heatmap: {report['heatmap'] or '(no latent was generated)'}")
    print(f"configs: {os.path.join(s1_dir, 'config.json')}, {os.path.join(s2_dir, 'config.json')}")
    print(f"TensorBoard: pip install tensorboard && tensorboard --logdir {root}")
    print(f"total wall time {t3 - t0:.0f} s")
    return 0


ABLATIONS = ("zeros", "noise", "shuffle")


def evaluate_demo(root: str, c1, s1_dir: str, s2_dir: str, *, n: int, max_new_tokens: int) -> dict:
    """Accuracy on held-out mazes of the untrained model, stage 1, stage 2 and stage 2 with
    ablated latents (``ilvr_jax.evaluate``), and a latent heatmap PNG of stage 2."""
    from transformers import AutoTokenizer

    from ilvr_jax.convert import load_training_params
    from ilvr_jax.data import processor as proc
    from ilvr_jax.data.records import read_jsonl
    from ilvr_jax.evaluate import heatmaps
    from ilvr_jax.evaluate.run import evaluate
    from ilvr_jax.train import evaluation, run_model

    eval_dir = os.path.join(root, "eval")
    path = evaluation.heldout_mazes(os.path.join(eval_dir, "data"), n, int(c1.seed) + 1, tuple(c1.data.maze_sizes),
                                    os.path.join(s1_dir, "data", "train.jsonl"))
    records = list(read_jsonl(path))
    tok_dir = os.path.join(s2_dir, run_model.TOKENIZER_DIR)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    image_cfg = proc.ImageProcessorConfig.from_hf(tok_dir)
    # The untrained model: stage 1's initialisation, rebuilt from its config and seed.
    cfg0, untrained, _ = run_model.prepare_model(c1, os.path.join(eval_dir, "untrained"))
    models = [("untrained", cfg0, untrained, ())]
    for name, d, abl in (("stage 1", s1_dir, ()), ("stage 2", s2_dir, ABLATIONS)):
        cfg, params, _ = load_training_params(d)
        models.append((name, cfg, params, abl))
    lines = [f"{'model':<10} {'latents':<9} {'accuracy':>9}  change vs normal [95% CI]"]
    for name, cfg, params, abl in models:
        summary = evaluate(params, cfg, tokenizer, image_cfg, records, "maze", batch_size=8,
                           max_new_tokens=max_new_tokens, ablations=abl, seed=int(c1.seed),
                           latent_size=int(c1.ilvr.latent_size), progress=False,
                           out_dir=os.path.join(eval_dir, name.replace(" ", "")))
        for mode, e in summary["modes"].items():
            d = e.get("vs_normal")
            change = "" if not d or not d["n"] else \
                f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] pts"
            lines.append(f"{name:<10} {mode:<9} {100 * e['accuracy']:>8.1f}%  {change}")
    cfg2, params2 = models[-1][1], models[-1][2]
    pngs = heatmaps.latent_heatmaps(params2, cfg2, tokenizer, image_cfg, records, os.path.join(eval_dir, "heatmaps"),
                                    limit=4, latent_size=int(c1.ilvr.latent_size), max_new_tokens=max_new_tokens)
    return {"records": len(records), "table": "\n".join(lines), "heatmap": pngs[0] if pngs else None}


def _main() -> int:
    from ilvr_jax.train import checkpoints, loop

    try:
        return main()
    except (loop.ConfigError, checkpoints.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_main())
