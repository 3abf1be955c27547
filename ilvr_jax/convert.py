"""Checkpoint conversion between HF Qwen2.5-VL directories and orbax.

    python -m ilvr_jax.convert from-hf --hf-dir HF_DIR --out CKPT [--dtype float32|bfloat16]
    python -m ilvr_jax.convert to-hf --checkpoint CKPT --out OUT_DIR [--tokenizer-dir HF_DIR]
                                     [--dtype bfloat16|float32] [--teacher] [--layout ...] [--overwrite]

``from-hf`` writes an orbax checkpoint holding the parameter tree and the model config: a
model to evaluate or export from JAX without reading safetensors again. Training does not
need it (``model.hf_dir`` reads an HF directory directly).
``to-hf`` writes an HF directory that ``Qwen2_5_VLForConditionalGeneration.from_pretrained``
loads, from either

* a parameter checkpoint of ``from-hf`` (``CKPT/params``, ``CKPT/config``), or
* a training run of ``python -m ilvr_jax.main``: ``--checkpoint WORKDIR`` (its newest
  checkpoint), ``WORKDIR/checkpoints`` or ``WORKDIR/checkpoints/STEP``. The model config
  comes from ``WORKDIR/model_config.json``, the tokenizer from ``WORKDIR/tokenizer`` (unless
  ``--tokenizer-dir``). The student is exported unless ``--teacher``: the momentum
  teacher, whose frozen leaves (e.g. the vision tower) are the student's. The export keeps
  the source model's config.json fields and dtype (a bf16 download exports bf16 unless
  ``--dtype``), and carries the run's processor settings and chat template.

An existing ``--out`` is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ilvr_jax import storage
from ilvr_jax.checkpoint.hf import DEFAULT_EXPORT_LAYOUT, LAYOUTS, export_params_to_hf, load_hf_params


def from_hf(hf_dir: str, out: str, *, dtype: str = "float32", overwrite: bool = False) -> str:
    """HF directory -> orbax checkpoint (parameters + config); returns the checkpoint path."""
    from ilvr_jax.checkpoint.orbax_io import save_params

    cfg, params = load_hf_params(hf_dir, dtype=dtype)
    return save_params(out, params, cfg, overwrite=overwrite)


def to_hf(
    checkpoint: str,
    out: str,
    *,
    tokenizer_dir: str | None = None,
    dtype: str | None = None,
    which: str = "student",
    layout: str = DEFAULT_EXPORT_LAYOUT,
    max_shard_bytes: int = 4 * 1024**3,
    overwrite: bool = False,
) -> list[str]:
    """orbax checkpoint (parameters or a training run) -> HF directory; returns the shard
    file names. ``dtype=None``: the source model's dtype for a training run that started
    from an HF directory, else as stored."""
    if storage.isdir(out) and storage.listdir(out) and not overwrite:
        raise FileExistsError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")
    if is_training_checkpoint(checkpoint):
        from ilvr_jax.train import checkpoints as ckpt_lib
        from ilvr_jax.train import run_model

        cfg, params, run_tokenizer = load_training_params(checkpoint, which)
        source = run_model.source_config(ckpt_lib.run_root(ckpt_lib.resolve_step_dir(checkpoint)))
        return export_params_to_hf(params, cfg, out, tokenizer_dir or run_tokenizer,
                                   dtype=dtype or run_model.source_dtype(source), layout=layout,
                                   max_shard_bytes=max_shard_bytes, source_config=source)
    from ilvr_jax.checkpoint.orbax_io import restore_config, restore_params

    if not storage.exists(checkpoint):
        raise FileNotFoundError(f"{checkpoint}: does not exist")
    cfg = restore_config(checkpoint)
    tree = restore_params(checkpoint)
    return export_params_to_hf(
        tree, cfg, out, tokenizer_dir, dtype=dtype, which=which, layout=layout, max_shard_bytes=max_shard_bytes
    )


def is_training_checkpoint(path: str) -> bool:
    """A training workdir, its ``checkpoints`` directory or one of its step directories."""
    from ilvr_jax.train import checkpoints as ckpt_lib

    path = storage.abspath(path)
    return (storage.isdir(storage.join(path, ckpt_lib.STATE)) or storage.basename(path) == "checkpoints"
            or storage.isdir(storage.join(path, "checkpoints")))


def load_training_params(checkpoint: str, which: str = "student"):
    """(model config, parameter tree of ``which``, the run's tokenizer dir or None) of a
    training checkpoint.

    The saved ``TrainState`` holds ``params`` (the student, full tree) and ``teacher`` (the
    trainable leaves only, fp32). The teacher's full tree takes its frozen leaves from the
    student, the frozen patterns being the run's ``optim.frozen``.
    """
    import jax
    import numpy as np

    from ilvr_jax.model.config import ModelConfig
    from ilvr_jax.train import checkpoints as ckpt_lib
    from ilvr_jax.train import optimizer as opt_lib

    if which not in ("student", "teacher"):
        raise ValueError(f"which={which!r}: expected 'student' or 'teacher'")
    step_dir = ckpt_lib.resolve_step_dir(checkpoint)
    root = ckpt_lib.run_root(step_dir)
    cfg_path = storage.join(root, "model_config.json")
    if not storage.isfile(cfg_path):
        raise FileNotFoundError(f"{root}: no model_config.json (not a training workdir of ilvr_jax.main)")
    cfg = ModelConfig.from_hf(cfg_path)
    state = ckpt_lib.restore_state_item(step_dir, only=("params", "teacher"))
    params = jax.tree.map(np.asarray, state["params"])
    if which == "teacher":
        if state.get("teacher") is None:
            raise ValueError(f"{step_dir}: this training state holds no teacher (a stage-2 run)")
        frozen_patterns = _run_frozen_patterns(step_dir, root)
        _, frozen = opt_lib.split_frozen(params, frozen_patterns)
        teacher = jax.tree.map(np.asarray, state["teacher"])
        params = opt_lib.merge_params(teacher, frozen)
    tok_dir = storage.join(root, "tokenizer")
    return cfg, params, tok_dir if storage.isdir(tok_dir) else None


def _run_frozen_patterns(step_dir: str, root: str) -> tuple[str, ...]:
    """``optim.frozen`` of the run: from the checkpoint's config item, else WORKDIR/config.json."""
    from ilvr_jax.train import checkpoints as ckpt_lib

    try:
        config = ckpt_lib.restore_json_item(step_dir, ckpt_lib.CONFIG)
    except FileNotFoundError:
        path = storage.join(root, "config.json")
        if not storage.isfile(path):
            raise FileNotFoundError(f"{step_dir}: no saved run config (needed for the frozen parameter list)")
        config = json.loads(storage.read_text(path))
    return tuple(config["optim"]["frozen"])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ilvr_jax.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-hf", help="HF Qwen2.5-VL directory -> orbax checkpoint")
    a.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    a.add_argument("--out", required=True, help="orbax checkpoint directory to create")
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored dtype")
    a.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    b = sub.add_parser("to-hf", help="orbax checkpoint -> HF Qwen2.5-VL directory")
    b.add_argument("--checkpoint", required=True,
                   help="parameter checkpoint, or a training WORKDIR / WORKDIR/checkpoints[/STEP]")
    b.add_argument("--out", required=True, help="HF directory to write")
    b.add_argument("--tokenizer-dir", default=None,
                   help="copy tokenizer/processor files from here (training runs: WORKDIR/tokenizer)")
    b.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: the source model's dtype (training runs from an HF directory), else as stored")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    b.add_argument("--teacher", action="store_true", help="export the momentum teacher of a training state")
    b.add_argument("--layout", default=DEFAULT_EXPORT_LAYOUT, choices=sorted(LAYOUTS), help="HF tensor names")
    b.add_argument("--max-shard-gb", type=float, default=4.0, help="largest shard file, GiB")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)   # orbax's INFO/WARNING chatter about item metadata
    try:
        return _run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        # Bad input: one line naming the file / tensor, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    t0 = time.time()
    if args.command == "from-hf":
        if storage.exists(args.out) and not args.overwrite:
            raise FileExistsError(f"{args.out}: already exists (pass --overwrite to replace it)")
        path = from_hf(args.hf_dir, args.out, dtype=args.dtype, overwrite=args.overwrite)
        print(f"wrote {path} ({time.time() - t0:.1f}s)")
    else:
        shards = to_hf(
            args.checkpoint,
            args.out,
            tokenizer_dir=args.tokenizer_dir,
            dtype=args.dtype,
            which="teacher" if args.teacher else "student",
            layout=args.layout,
            max_shard_bytes=int(args.max_shard_gb * 1024**3),
            overwrite=args.overwrite,
        )
        print(f"wrote {args.out}: {len(shards)} shard(s) ({time.time() - t0:.1f}s)")
        if args.tokenizer_dir is None and not is_training_checkpoint(args.checkpoint):
            print("note: no --tokenizer-dir, so no tokenizer/processor files were written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
