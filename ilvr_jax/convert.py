"""Checkpoint conversion between HF Qwen2.5-VL directories and orbax.

    python -m ilvr_jax.convert from-hf --hf-dir HF_DIR --out CKPT [--dtype float32|bfloat16]
    python -m ilvr_jax.convert to-hf --checkpoint CKPT --out OUT_DIR [--tokenizer-dir HF_DIR]
                                     [--dtype bfloat16|float32] [--teacher] [--layout ...]

``from-hf`` writes an orbax checkpoint holding the parameter tree and the model config.
``to-hf`` restores such a checkpoint (a parameter tree, or a training state holding
``"student"`` / ``"teacher"`` trees: the student unless ``--teacher``) and writes an HF
directory that ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` loads.
"""

from __future__ import annotations

import argparse
import sys
import time

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
) -> list[str]:
    """orbax checkpoint -> HF directory; returns the shard file names."""
    from ilvr_jax.checkpoint.orbax_io import restore_config, restore_params

    cfg = restore_config(checkpoint)
    tree = restore_params(checkpoint)
    return export_params_to_hf(
        tree, cfg, out, tokenizer_dir, dtype=dtype, which=which, layout=layout, max_shard_bytes=max_shard_bytes
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ilvr_jax.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-hf", help="HF Qwen2.5-VL directory -> orbax checkpoint")
    a.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    a.add_argument("--out", required=True, help="orbax checkpoint directory to create")
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored dtype")
    a.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    b = sub.add_parser("to-hf", help="orbax checkpoint -> HF Qwen2.5-VL directory")
    b.add_argument("--checkpoint", required=True, help="orbax checkpoint directory")
    b.add_argument("--out", required=True, help="HF directory to write")
    b.add_argument("--tokenizer-dir", default=None, help="copy tokenizer/processor files from here")
    b.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: as stored")
    b.add_argument("--teacher", action="store_true", help="export the teacher of a training state")
    b.add_argument("--layout", default=DEFAULT_EXPORT_LAYOUT, choices=sorted(LAYOUTS), help="HF tensor names")
    b.add_argument("--max-shard-gb", type=float, default=4.0, help="largest shard file, GiB")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        # Bad input: one line naming the file / tensor, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    t0 = time.time()
    if args.command == "from-hf":
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
        )
        print(f"wrote {args.out}: {len(shards)} shard(s) ({time.time() - t0:.1f}s)")
        if args.tokenizer_dir is None:
            print("note: no --tokenizer-dir, so no tokenizer/processor files were written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
