"""Train ILVR: ``python -m ilvr_jax.main --config configs/stage1.py[:preset] --workdir DIR
[--config.key=value ...]``. Restarting with the same workdir resumes from its latest
checkpoint."""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (file.py or file.py:preset).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and exports go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from ilvr_jax.train import loop

    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
