"""``python -m ilvr_jax.data``: convert, validate, describe and generate ILVR data.

Subcommands::

    convert  --adapter NAME --source PATH --out OUT.jsonl [--image-root DIR] [--image-out DIR]
             [--domains D ...] [--exclude-domains D ...] [--max-records N] [--seed S]
             [--limit N] [--skip-bad] [--no-check-images] [--absolute-paths]
    validate --data FILE.jsonl [CHECKS] [--skip-bad] [--no-decode-images]
    stats    --data FILE.jsonl [CHECKS] [--decode-images] [--json]
    CHECKS:  [--image-root DIR] [--tokenizer DIR] [--latent-size K] [--answer-format F]
             [--min-pixels N] [--max-pixels N] [--max-length N] [--max-question-images N]
             [--max-question-patches N] [--max-segments N] [--max-helper-patches N]
    maze     --out DIR --n N --seed S [--min-size 3] [--max-size 6] [--hole-prob 0.25]

``validate`` and ``stats`` run the training pipeline's own record checks (``checks.py``), with
the token checks when given ``--tokenizer`` and each fit limit that is given; ``validate``
decodes every image (as building a batch does) and prints every bad record on its own line,
then the count per reason. ``stats`` reports full sequence lengths and patch counts per record
(min, mean, p50, p90, p99, max) and suggests max_length, patch budgets and buckets.

``convert`` writes image paths relative to the output file's directory when the images lie
below it (absolute otherwise, or always with ``--absolute-paths``). Exit status: 0 on success,
1 when bad records were found (``validate`` without ``--skip-bad``, or any command that hit a
bad record under the default "error" policy) or the file holds no records, 2 on bad arguments
or missing files. Every path may be local or in cloud storage (``gs://...``, through
``ilvr_jax.storage``).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from ilvr_jax import storage
from ilvr_jax.data.adapters import ADAPTER_NAMES, get_adapter, relative_paths
from ilvr_jax.data.buckets import AUTO, PATCH_ROUND, round_patches
from ilvr_jax.data.buckets import resolve as resolve_buckets
from ilvr_jax.data.checks import RecordChecker, RecordLimits
from ilvr_jax.data.processor import ImageProcessorConfig
from ilvr_jax.data.records import DropPolicy, RecordError, num_segments, read_jsonl, write_jsonl
from ilvr_jax.data.segments import SequenceFormat


def _convert(args: argparse.Namespace) -> int:
    adapter = get_adapter(args.adapter)
    out = storage.abspath(args.out)
    out_dir = storage.dirname(out)
    storage.makedirs(out_dir)
    policy = DropPolicy("skip" if args.skip_bad else "error")
    options = {
        "image_root": args.image_root,
        "out_dir": args.image_out or (out_dir if args.adapter == "zebra" else None),
        "domains": args.domains,
        "exclude_domains": args.exclude_domains,
        "max_records": args.max_records,
        "seed": args.seed,
    }
    accepted = inspect.signature(adapter.iter_records).parameters
    given = {k: v for k, v in options.items() if v is not None}
    unsupported = sorted(k for k in given if k not in accepted)
    if unsupported:
        flags = ", ".join("--" + k.replace("_", "-") for k in unsupported)
        raise SystemExit(_usage_error(f"{flags} does not apply to adapter {args.adapter!r}"))
    kwargs = dict(given, policy=policy)
    if "check_images" in accepted:
        kwargs["check_images"] = not args.no_check_images

    t0 = time.perf_counter()
    records = adapter.iter_records(args.source, **kwargs)

    def limited():
        for n, rec in enumerate(records):
            if args.limit is not None and n >= args.limit:
                return
            yield rec if args.absolute_paths else relative_paths(rec, out_dir)

    # The output appears whole or not at all: locally through a temporary file beside it and
    # a rename; a bucket object is uploaded whole from a local temporary file once every
    # record is written (a failed conversion leaves nothing in the bucket).
    if storage.is_local(out):
        tmp = out + ".tmp"
    else:
        fd, tmp = tempfile.mkstemp(prefix="ilvr_convert_", suffix=".jsonl")
        os.close(fd)
    try:
        n = write_jsonl(tmp, limited())
        if storage.is_local(out):
            os.replace(tmp, out)
        else:
            storage.copy_file(tmp, out)
    finally:
        if os.path.exists(tmp):  # a failed conversion leaves no partial output
            os.remove(tmp)
    dt = time.perf_counter() - t0
    print(f"wrote {n} records to {out} ({dt:.1f} s); {policy.counter.summary()}")
    _print_drops(policy)
    return 0


def _print_drops(policy: DropPolicy) -> None:
    for reason, count in policy.counter.as_dict().items():
        print(f"  {reason}: {count}  (first: {policy.counter.first_message[reason]})")


def _add_check_args(p: argparse.ArgumentParser) -> None:
    """The settings of the record checks (``checks.py``), as the training pipeline applies them."""
    p.add_argument("--data", required=True)
    p.add_argument("--image-root", help="root of relative image paths (default: the file's folder)")
    p.add_argument("--tokenizer", help="HF tokenizer folder with the latent tokens: also run the token checks "
                   "and measure full sequence lengths, as training does")
    p.add_argument("--latent-size", type=int, default=8, help="K latent pads per segment (default 8)")
    p.add_argument("--answer-format", help="text appended after the plan ({answer}); default: none")
    defaults = ImageProcessorConfig()
    p.add_argument("--min-pixels", type=int, default=defaults.min_pixels)
    p.add_argument("--max-pixels", type=int, default=defaults.max_pixels)
    p.add_argument("--no-check-images", action="store_true", help="do not open every image at the start")
    limits = p.add_argument_group("fit limits (each checked only when given; training: data.max_*)")
    for name in ("max_length", "max_question_images", "max_question_patches", "max_segments", "max_helper_patches"):
        limits.add_argument("--" + name.replace("_", "-"), type=int)


def _check_records(args: argparse.Namespace, *, decode_images: bool):
    """Runs ``RecordChecker`` on every record: (n_records, [(loc, record, size)], [RecordError])."""
    if not storage.isfile(args.data):
        raise SystemExit(_usage_error(f"data file {args.data!r} does not exist"))
    tokenizer = _tokenizer(args.tokenizer) if args.tokenizer else None
    checker = RecordChecker(
        tokenizer,
        ImageProcessorConfig(min_pixels=args.min_pixels, max_pixels=args.max_pixels),
        SequenceFormat(latent_size=args.latent_size, answer_format=args.answer_format),
        RecordLimits(max_length=args.max_length, max_question_images=args.max_question_images,
                     max_question_patches=args.max_question_patches, max_segments=args.max_segments,
                     max_helper_patches=args.max_helper_patches),
        check_images=not args.no_check_images, verify_images=decode_images,
    )
    good, bad, n = [], [], 0
    for loc in read_jsonl(args.data, args.image_root):
        n += 1
        try:
            rec, size = checker.check(loc)
        except RecordError as e:
            bad.append(e)
            continue
        good.append((loc, rec, size))
    return n, good, bad


def _tokenizer(tok_dir: str):
    """The HF tokenizer of ``tok_dir`` (a bucket directory through a local copy of its files)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(storage.local_copy(tok_dir))


def _reason_counts(bad: list[RecordError]) -> dict[str, int]:
    return dict(sorted(collections.Counter(e.reason for e in bad).items()))


def _validate(args: argparse.Namespace) -> int:
    n, good, bad = _check_records(args, decode_images=not args.no_decode_images)
    for e in bad:  # every bad record, one line each
        print(e)
    print(f"{args.data}: {len(good)} valid records, {len(bad)} bad")
    for reason, count in _reason_counts(bad).items():
        print(f"  {reason}: {count}")
    if not args.tokenizer:
        print("  (no --tokenizer: token checks and sequence lengths were not checked)")
    if n == 0:
        print(f"error: {args.data} holds no records", file=sys.stderr)
        return 1
    if not good or (bad and not args.skip_bad):
        return 1
    return 0


def _summary(values: list[float]) -> dict[str, float]:
    """min, mean, p50, p90, p99 (values that occur: the nearest at or above), max."""
    if not values:
        return {"min": 0, "mean": 0.0, "p50": 0, "p90": 0, "p99": 0, "max": 0}
    a = np.asarray(values)
    pct = {f"p{q}": a.dtype.type(np.percentile(a, q, method="higher")).item() for q in (50, 90, 99)}
    return {"min": a.min().item(), "mean": round(float(a.mean()), 3), **pct, "max": a.max().item()}


def _suggest(sizes: list, with_lengths: bool) -> dict:
    """Shapes that hold every record with the least padding: the maxima rounded up, and the
    automatic buckets of the training pipeline (``buckets.py``) for them."""
    if not sizes:
        return {}
    q = round_patches(max(s.question_patches for s in sizes), sys.maxsize)
    h = round_patches(max(s.helper_patches for s in sizes), sys.maxsize)
    # At least one image and segment row: zero-sized batch arrays would only trouble the model.
    out = {"max_question_images": max(1, max(s.num_question_images for s in sizes)),
           "max_segments": max(1, max(s.num_segments for s in sizes)), "max_question_patches": q,
           "max_helper_patches": h}
    if with_lengths:
        max_length = -(-max(s.seq_len for s in sizes) // PATCH_ROUND) * PATCH_ROUND
        buckets, _ = resolve_buckets(sizes, max_length, q, h, AUTO, AUTO)
        out.update(max_length=max_length, buckets=[b.length for b in buckets],
                   bucket_patches=[[b.question_patches, b.helper_patches] for b in buckets])
    return out


def _stats(args: argparse.Namespace) -> int:
    n, good, bad = _check_records(args, decode_images=args.decode_images)
    recs = [rec for _, rec, _ in good]
    sizes = [size for _, _, size in good]
    helpers = [num_segments(r) for r in recs]
    tasks: dict[str, int] = {}
    for r in recs:
        task = str(r.get("task") or "-")
        tasks[task] = tasks.get(task, 0) + 1
    stats = {
        "records": len(recs),
        "question_images": sum(len(r["image_input"]) for r in recs),
        "helper_images": sum(helpers),
        "question_images_per_record": _summary([len(r["image_input"]) for r in recs]),
        "segments_per_record": _summary(helpers),
        "text_steps_per_record": _summary([sum(1 for s in r["sequence_plan"] if s["type"] == "text") for r in recs]),
        "question_patches_per_record": _summary([s.question_patches for s in sizes]),
        "helper_patches_per_record": _summary([s.helper_patches for s in sizes]),
        "tasks": dict(sorted(tasks.items())),
        "dropped": _reason_counts(bad),
    }
    if args.tokenizer:
        tok = _tokenizer(args.tokenizer)
        tokens = [sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in
                      [r["text_input"], r["original_final_answer"]]
                      + [s["content"] for s in r["sequence_plan"] if s["type"] == "text"]) for r in recs]
        stats["text_tokens_per_record"] = _summary(tokens)
        stats["text_tokens"] = sum(tokens)
        # The full sequence: chat template, image pads, latent segments (what max_length limits).
        stats["sequence_length_per_record"] = _summary([s.seq_len for s in sizes])
    stats["suggested"] = _suggest(sizes, with_lengths=bool(args.tokenizer))
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0 if n else 1
    print(f"{args.data}")
    print(f"  records: {stats['records']}  (dropped: {len(bad)})")
    print(f"  question images: {stats['question_images']}  helper images / segments: {stats['helper_images']}")
    for key in ("question_images_per_record", "segments_per_record", "text_steps_per_record",
                "text_tokens_per_record", "sequence_length_per_record", "question_patches_per_record",
                "helper_patches_per_record"):
        if key in stats:
            s = stats[key]
            print(f"  {key.replace('_', ' ')}: " + "  ".join(f"{k} {v}" for k, v in s.items()))
    if "text_tokens" in stats:
        print(f"  text tokens: {stats['text_tokens']}")
    print("  tasks: " + ", ".join(f"{k}={v}" for k, v in stats["tasks"].items()))
    for reason, count in stats["dropped"].items():
        print(f"  dropped {reason}: {count}")
    if stats["suggested"]:
        print("  suggested data config: " + ", ".join(f"{k}={v}" for k, v in stats["suggested"].items()))
    if not args.tokenizer:
        print("  (no --tokenizer: no sequence lengths, no suggested max_length or buckets)")
    return 0 if n else 1


def _maze(args: argparse.Namespace) -> int:
    from ilvr_jax.data.maze import generate_maze_dataset

    t0 = time.perf_counter()
    # The generator writes local files; a bucket gets a copy, the JSONL after its images.
    local = args.out if storage.is_local(args.out) else tempfile.mkdtemp(prefix="ilvr_maze_")
    path = generate_maze_dataset(local, args.n, args.seed, (args.min_size, args.max_size),
                                 hole_prob=args.hole_prob)
    if local != args.out:
        storage.makedirs(args.out)
        name = os.path.basename(path)
        for entry in sorted(os.listdir(local), key=lambda e: e == name):
            src, dst = os.path.join(local, entry), storage.join(args.out, entry)
            if os.path.isdir(src):
                storage.copy_tree(src, dst)
            else:
                storage.copy_file(src, dst)
        shutil.rmtree(local)
        path = storage.join(args.out, name)
    dt = time.perf_counter() - t0
    print(f"wrote {args.n} maze records to {path} ({dt:.1f} s, {args.n / max(dt, 1e-9):.1f} records/s)")
    return 0


def _usage_error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ilvr_jax.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a data set to canonical JSONL")
    p.add_argument("--adapter", required=True, help=f"one of: {', '.join(ADAPTER_NAMES)}")
    p.add_argument("--source", required=True, help="input file or folder")
    p.add_argument("--out", required=True, help="output JSONL path")
    p.add_argument("--image-root", help="root of relative image paths in the source (default: its folder)")
    p.add_argument("--image-out", help="zebra: folder for extracted images (default: the output's folder)")
    p.add_argument("--domains", nargs="+", help="zebra: keep only these domains")
    p.add_argument("--exclude-domains", nargs="+", help="zebra: drop these domains")
    p.add_argument("--max-records", type=int, help="zebra: deterministic sample of this many rows")
    p.add_argument("--seed", type=int, help="zebra: sampling seed (default 0)")
    p.add_argument("--limit", type=int, help="stop after this many records (any adapter)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of failing")
    p.add_argument("--no-check-images", action="store_true", help="do not open every image")
    p.add_argument("--absolute-paths", action="store_true", help="write absolute image paths")
    p.set_defaults(fn=_convert)

    p = sub.add_parser("validate", help="run the training pipeline's record checks on every record")
    _add_check_args(p)
    p.add_argument("--skip-bad", action="store_true",
                   help="exit 0 when bad records are found but some are good (training with drop_policy skip)")
    p.add_argument("--no-decode-images", action="store_true",
                   help="do not decode every image in full (truncated files then fail only in training)")
    p.set_defaults(fn=_validate)

    p = sub.add_parser("stats", help="describe a canonical JSONL file and suggest batch shapes")
    _add_check_args(p)
    p.add_argument("--decode-images", action="store_true", help="also decode every image in full")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(fn=_stats)

    p = sub.add_parser("maze", help="generate a synthetic FrozenLake maze data set")
    p.add_argument("--out", required=True, help="output folder (data.jsonl + images/)")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--min-size", type=int, default=3)
    p.add_argument("--max-size", type=int, default=6)
    p.add_argument("--hole-prob", type=float, default=0.25)
    p.set_defaults(fn=_maze)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except RecordError as e:
        print(f"error: bad record: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, storage.StorageError) as e:
        return _usage_error(str(e))


if __name__ == "__main__":
    sys.exit(main())
