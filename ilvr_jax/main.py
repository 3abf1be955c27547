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


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with bad flags (unknown ``--config.*`` keys, values of the wrong
    type, an unknown preset, a missing flag) reported as one ``error:`` line, exit status 2."""
    try:
        return FLAGS(argv)
    except AttributeError as e:
        # ConfigDict's "no such field" (with its "did you mean" hint) for a locked config.
        hint = str(e).strip("'\"").replace("\\n", "\n").split("\n")[-1]
        key = next((a.split("=", 1)[0][len("--config."):] for a in argv[1:] if a.startswith("--config.")
                    and a.split("=", 1)[0].rsplit(".", 1)[-1] in str(e)), None)
        print(f"error: unknown config key {key!r}. {hint}" if key else f"error: {hint}", file=sys.stderr)
    except (flags.Error, KeyError, ValueError, TypeError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # A config file that raised: its exception is the last line of the quoted traceback.
        msg = f"{lines[0]} {lines[-1]}" if len(lines) > 1 and "Traceback" in str(e) else " ".join(lines)
        print(f"error: {msg}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import ml_collections

    from ilvr_jax.train import checkpoints, loop

    config = FLAGS.config
    if not isinstance(config, ml_collections.ConfigDict):
        # config_flags defers a config file that failed to load to its first use.
        try:
            config.stage
        except OSError as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            print(f"error: --config: {lines[-1]}", file=sys.stderr)
            sys.exit(EXIT_CONFIG)
    try:
        loop.train_and_evaluate(config, FLAGS.workdir)
    except (loop.ConfigError, checkpoints.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except loop.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
