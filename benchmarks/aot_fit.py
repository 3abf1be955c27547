"""Per-chip memory of the 7B train step for every TPU preset x stage, compiled ahead of time
with libtpu on this host (``python -m ilvr_jax.aot``, one subprocess per row, run one after
another: each compile holds a few GiB of host memory).

    python benchmarks/aot_fit.py [--only v5p_8] [--cases 0,2] [--out runs/aot_fit.jsonl]

Prints the exact command and a markdown table row (peak per chip, HBM, verdict, compile
time) for each case; ``--out`` appends the full JSON reports.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (preset, stage, extra overrides): the presets' own shapes, and stage 1 at the paper's length.
CASES = (
    ("v5p_8", 1, ()),
    ("v5p_8", 2, ()),
    ("v5e_16", 1, ()),
    ("v5e_16", 2, ()),
    ("v5e_32", 1, ()),
    ("v5e_32", 2, ()),
    ("v5p_8_32k", 1, ()),
)


def command(preset: str, stage: int, extra: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "ilvr_jax.aot", f"--config=configs/stage{stage}.py:{preset}", *extra, "--json"]


def gib(x) -> str:
    return "?" if x is None else f"{x / 2**30:.1f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run the cases of this preset only")
    ap.add_argument("--cases", default="", help="comma-separated indices into CASES (default: all)")
    ap.add_argument("--out", default="", help="append each JSON report to this file")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per compile")
    args = ap.parse_args(argv)
    print("| preset | stage | max_length | mesh | peak GiB/chip | estimate GiB | HBM GiB | verdict | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    picked = {int(i) for i in args.cases.split(",")} if args.cases else set(range(len(CASES)))
    for i, (preset, stage, extra) in enumerate(CASES):
        if i not in picked or (args.only and preset != args.only):
            continue
        cmd = command(preset, stage, extra)
        shown = " ".join(["python"] + [shlex.quote(a) for a in cmd[1:]])
        t0 = time.time()
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
        if p.returncode not in (0, 1) or not p.stdout.strip():
            print(f"<!-- {shown}: exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]} -->", flush=True)
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"command": shown, **r}) + "\n")
        length = next((a.split("=", 1)[1] for a in extra if "max_length" in a), "preset")
        peak = r.get("peak_bytes") or r.get("needed_bytes")
        mark = "" if r.get("peak_bytes") else " needed (temporaries + inputs)"
        print(f"<!-- {shown} -->")
        print(f"| {preset} | {stage} | {length} | {tuple(r['mesh'])} | {gib(peak)}{mark} | "
              f"{gib(r.get('estimated_peak_bytes'))} | {gib(r['hbm_bytes'])} | {r['verdict']} | "
              f"{r.get('compile_s', round(time.time() - t0))} |", flush=True)


if __name__ == "__main__":
    main()
