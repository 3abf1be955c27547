"""``python bucket_main.py LOCAL_DIR=gs://URI [...] -- MAIN_ARGS``: copies each local directory
into an in-memory ``gs://`` bucket (``tests/fake_bucket.py``, behind etils.epath) and runs
``python -m ilvr_jax.main MAIN_ARGS`` in this process, so the run reads those URIs through
the same calls it makes against Google Cloud Storage. Exits as main does.

A helper of tests/train/test_loop.py, not a test module.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def main() -> None:
    split = sys.argv.index("--")
    copies = [a.split("=", 1) for a in sys.argv[1:split]]
    sys.argv = [sys.argv[0], *sys.argv[split + 1:]]
    spec = importlib.util.spec_from_file_location(
        "_fb", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fake_bucket.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from absl import app

    from ilvr_jax import main as train_main
    from ilvr_jax import storage

    with module.load().install():
        for local, uri in copies:
            storage.copy_tree(local, uri)
        app.run(train_main.main, flags_parser=train_main.parse_flags)


if __name__ == "__main__":
    main()
