"""Train ILVR: ``python -m ilvr_jax.main --config configs/stage1.py[:preset] --workdir DIR
[--config.key=value ...]``. Restarting with the same workdir resumes from its latest
checkpoint. Unknown ``--config.*`` keys are rejected (the config is locked)."""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (file.py or file.py:preset).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and exports go.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_CONFIG, EXIT_DIVERGED = 2, 3


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from ilvr_jax.train import checkpoints, loop

    try:
        loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (loop.ConfigError, checkpoints.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except loop.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)


if __name__ == "__main__":
    app.run(main)
