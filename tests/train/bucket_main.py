"""``python bucket_main.py CHECKPOINTS copy LOCAL URI [copy LOCAL URI ...] [export URI LOCAL ...]
-- MAIN_ARGS [-- MAIN_ARGS ...]``: training runs whose paths are on an in-memory ``gs://``
(``tests/fake_bucket.py``, behind etils.epath), so they read and write the bucket through
the same calls they make against Google Cloud Storage.

Before the runs each ``copy`` puts a local directory into the bucket; then each MAIN_ARGS
(``--config=... --workdir=... --config.key=value ...``, as for ``python -m ilvr_jax.main``)
is one ``train_and_evaluate`` in this process (the bucket lives as long as the process, so a
later run resumes from an earlier one's workdir); after them each ``export`` copies a bucket
directory to a local one for the test to read. Orbax writes arrays with tensorstore, whose
GCS driver talks to GCS itself, so a bucket workdir's ``checkpoints/`` stand in under the
local directory CHECKPOINTS; every other file of the workdir is in the bucket.
Exits 0, or 1 with the error on stderr.

A helper of tests/train/test_loop.py, not a test module.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def _parse(argv: list[str]):
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "workdir", flag_values=fv)
    fv(argv)
    return fv.config, fv.workdir


def main() -> None:
    args = sys.argv[1:]
    checkpoints_root, args = args[0], args[1:]
    split = args.index("--")
    actions, runs = args[:split], []
    for token in args[split:]:
        if token == "--":
            runs.append([sys.argv[0]])
        else:
            runs[-1].append(token)
    spec = importlib.util.spec_from_file_location(
        "_fb", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fake_bucket.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    from ilvr_jax import storage
    from ilvr_jax.train import checkpoints as ckpt_lib
    from ilvr_jax.train import loop

    real_checkpoint_dir = ckpt_lib.checkpoint_dir

    def checkpoint_dir(workdir: str) -> str:
        if storage.is_local(workdir):
            return real_checkpoint_dir(workdir)
        return os.path.join(checkpoints_root, workdir.split("://", 1)[1].replace("/", "_"), "checkpoints")

    ckpt_lib.checkpoint_dir = checkpoint_dir
    with module.load().install():
        for i in range(0, len(actions), 3):
            if actions[i] == "copy":
                storage.copy_tree(actions[i + 1], actions[i + 2])
        try:
            for argv in runs:
                config, workdir = _parse(argv)
                loop.train_and_evaluate(config, workdir, print_config=False)
        except Exception as e:  # noqa: BLE001 (reported to the test as one line)
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(1)
        for i in range(0, len(actions), 3):
            if actions[i] == "export":
                storage.copy_tree(actions[i + 1], actions[i + 2])


if __name__ == "__main__":
    main()
