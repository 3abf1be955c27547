"""``python -m ilvr_jax.data``: convert, validate, describe and generate ILVR data.

Subcommands::

    convert  --adapter NAME --source PATH --out OUT.jsonl [--image-root DIR] [--image-out DIR]
             [--domains D ...] [--exclude-domains D ...] [--max-records N] [--seed S]
             [--limit N] [--skip-bad] [--no-check-images] [--absolute-paths]
    validate --data FILE.jsonl [--image-root DIR] [--skip-bad] [--verify-images]
    stats    --data FILE.jsonl [--image-root DIR] [--tokenizer DIR] [--json]
    maze     --out DIR --n N --seed S [--min-size 3] [--max-size 6] [--hole-prob 0.25]

``convert`` writes image paths relative to the output file's directory when the images lie
below it (absolute otherwise, or always with ``--absolute-paths``). Exit status: 0 on success,
1 when bad records were found (``validate`` without ``--skip-bad``, or any command that hit a
bad record under the default "error" policy), 2 on bad arguments or missing files.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time

from ilvr_jax.data.adapters import ADAPTER_NAMES, get_adapter, relative_paths
from ilvr_jax.data.records import (
    DropPolicy,
    RecordError,
    num_segments,
    read_jsonl,
    validate_located,
    write_jsonl,
)


def _convert(args: argparse.Namespace) -> int:
    adapter = get_adapter(args.adapter)
    out = os.path.abspath(args.out)
    out_dir = os.path.dirname(out)
    os.makedirs(out_dir, exist_ok=True)
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

    tmp = out + ".tmp"
    try:
        n = write_jsonl(tmp, limited())
        os.replace(tmp, out)
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


def _read_valid(path: str, image_root: str | None, *, check_images: bool = True, verify_images: bool = False,
                policy: DropPolicy):
    if not os.path.isfile(path):
        raise SystemExit(_usage_error(f"data file {path!r} does not exist"))
    for loc in read_jsonl(path, image_root):
        try:
            yield validate_located(loc, check_images=check_images, verify_images=verify_images)
        except RecordError as e:
            policy.handle(e)


def _validate(args: argparse.Namespace) -> int:
    policy = DropPolicy("skip")  # count every bad record, decide the exit status at the end
    policy.log_first = 0
    n_ok = sum(1 for _ in _read_valid(args.data, args.image_root, verify_images=args.verify_images,
                                      policy=policy))
    n_bad = policy.counter.total
    print(f"{args.data}: {n_ok} valid records, {n_bad} bad")
    _print_drops(policy)
    if n_bad and not args.skip_bad:
        return 1
    return 0


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": min(values), "mean": round(sum(values) / len(values), 3), "max": max(values)}


def _stats(args: argparse.Namespace) -> int:
    policy = DropPolicy("skip")
    policy.log_first = 0
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    question_images, helpers, text_steps, tokens = [], [], [], []
    tasks: dict[str, int] = {}
    for rec in _read_valid(args.data, args.image_root, check_images=not args.no_check_images, policy=policy):
        question_images.append(len(rec["image_input"]))
        helpers.append(num_segments(rec))
        text_steps.append(sum(1 for s in rec["sequence_plan"] if s["type"] == "text"))
        task = str(rec.get("task") or "-")
        tasks[task] = tasks.get(task, 0) + 1
        if tokenizer is not None:
            texts = [rec["text_input"], rec["original_final_answer"]]
            texts += [s["content"] for s in rec["sequence_plan"] if s["type"] == "text"]
            tokens.append(sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts))
    stats = {
        "records": len(helpers),
        "question_images": sum(question_images),
        "helper_images": sum(helpers),
        "question_images_per_record": _summary(question_images),
        "segments_per_record": _summary(helpers),
        "text_steps_per_record": _summary(text_steps),
        "tasks": dict(sorted(tasks.items())),
        "dropped": policy.counter.as_dict(),
    }
    if tokenizer is not None:
        stats["text_tokens_per_record"] = _summary(tokens)
        stats["text_tokens"] = sum(tokens)
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0
    print(f"{args.data}")
    print(f"  records: {stats['records']}  (dropped: {policy.counter.total})")
    print(f"  question images: {stats['question_images']}  helper images / segments: {stats['helper_images']}")
    for key in ("question_images_per_record", "segments_per_record", "text_steps_per_record",
                "text_tokens_per_record"):
        if key in stats:
            s = stats[key]
            print(f"  {key.replace('_', ' ')}: min {s['min']}  mean {s['mean']}  max {s['max']}")
    if "text_tokens" in stats:
        print(f"  text tokens: {stats['text_tokens']}")
    print("  tasks: " + ", ".join(f"{k}={v}" for k, v in stats["tasks"].items()))
    _print_drops(policy)
    return 0


def _maze(args: argparse.Namespace) -> int:
    from ilvr_jax.data.maze import generate_maze_dataset

    t0 = time.perf_counter()
    path = generate_maze_dataset(args.out, args.n, args.seed, (args.min_size, args.max_size),
                                 hole_prob=args.hole_prob)
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

    p = sub.add_parser("validate", help="check every record of a canonical JSONL file")
    p.add_argument("--data", required=True)
    p.add_argument("--image-root", help="root of relative image paths (default: the file's folder)")
    p.add_argument("--skip-bad", action="store_true", help="exit 0 even when bad records are found")
    p.add_argument("--verify-images", action="store_true", help="also decode every image fully")
    p.set_defaults(fn=_validate)

    p = sub.add_parser("stats", help="describe a canonical JSONL file")
    p.add_argument("--data", required=True)
    p.add_argument("--image-root")
    p.add_argument("--tokenizer", help="HF tokenizer folder: also count text tokens")
    p.add_argument("--no-check-images", action="store_true")
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
    except (FileNotFoundError, ValueError) as e:
        return _usage_error(str(e))


if __name__ == "__main__":
    sys.exit(main())
