"""Train ILVR: ``python -m ilvr_jax.main --config configs/stage1.py[:preset] --workdir DIR
[--config.key=value ...]``. Restarting with the same workdir resumes from its latest
checkpoint. Unknown ``--config.*`` keys are rejected (the config is locked).
``--describe`` prints every key of the config with its value and what it means.

Exit status: 0 done; 2 bad flags or config (one ``error:`` line); 3 training diverged;
128 + N stopped by signal N (SIGTERM 143, SIGINT 130) after saving a checkpoint."""

from __future__ import annotations

import difflib
import importlib.util
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (file.py or file.py:preset).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and exports go.")
flags.DEFINE_bool("describe", False, "Print every config key with its value and meaning, then exit.")
flags.mark_flag_as_required("config")

EXIT_CONFIG, EXIT_DIVERGED = 2, 3


def _config_arg(argv: list[str]) -> str | None:
    """The value of ``--config=FILE[:PRESET]`` or ``--config FILE[:PRESET]`` in ``argv``."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _config_module(argv: list[str]):
    """The module of the ``--config`` file named in ``argv`` (None when it cannot be loaded)."""
    arg = _config_arg(argv)
    if arg is None:
        return None
    path = arg.split(":", 1)[0]
    try:
        spec = importlib.util.spec_from_file_location("ilvr_config_for_errors", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception:  # noqa: BLE001 (the flag parser reports a broken file itself)
        return None


def _flat_keys(c, prefix: str = "") -> list[str]:
    import ml_collections

    out = []
    for k, v in c.items():
        out += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else [f"{prefix}{k}"]
    return out


def unknown_key_message(key: str, keys: list[str], docs: dict[str, str] | None = None) -> str:
    """``unknown config key 'K'`` with the likeliest meant keys: close spellings of the whole
    key or of its last part within the same section, and keys whose documentation names the
    words of the unknown one (``learning_rate`` -> ``optim.lr``, "peak learning rate")."""
    section, _, leaf = key.rpartition(".")
    guesses = difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
    same_section = [k for k in keys if k.rpartition(".")[0] == section]
    guesses += [f"{section}.{g}" if section else g for g in difflib.get_close_matches(
        leaf, [k.rpartition(".")[2] for k in same_section], n=3, cutoff=0.6)]
    words = leaf.replace("_", " ").lower()
    guesses += [k for k, doc in (docs or {}).items() if words in doc.lower() and k.startswith(section)]
    guesses = list(dict.fromkeys(g for g in guesses if g in keys))
    msg = f"unknown config key {key!r}"
    if guesses:
        msg += "; did you mean " + " or ".join(repr(g) for g in guesses[:3]) + "?"
    elif same_section:
        msg += f"; the keys under {section!r} are " + ", ".join(k.rpartition(".")[2] for k in same_section)
    return msg + " (--describe lists every key)"


def _unknown_override(argv: list[str]) -> str | None:
    """The error line for the first ``--config.*`` override naming no key of the config."""
    module = _config_module(argv)
    if module is None or not hasattr(module, "get_config"):
        return None
    arg = _config_arg(argv)
    preset = arg.split(":", 1)[1] if ":" in arg else None
    try:
        keys = _flat_keys(module.get_config(preset))
    except Exception:  # noqa: BLE001
        return None
    for a in argv[1:]:
        if a.startswith("--config."):
            key = a.split("=", 1)[0][len("--config."):]
            if key not in keys:
                return unknown_key_message(key, keys, getattr(module, "DOCS", None))
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with bad flags (unknown ``--config.*`` keys, values of the wrong
    type, an unknown preset, a missing flag) reported as one ``error:`` line, exit status 2."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as e:
        # ConfigDict's "no such field" for a locked config: name the key and what was meant.
        msg = _unknown_override(argv)
        if msg is None:
            msg = " ".join(line.strip() for line in str(e).strip("'\"").replace("\\n", "\n").splitlines() if line)
        print(f"error: {msg}", file=sys.stderr)
    except (flags.Error, ValueError, TypeError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # A config file that raised: its exception is the last line of the quoted traceback.
        msg = f"{lines[0]} {lines[-1]}" if len(lines) > 1 and "Traceback" in str(e) else " ".join(lines)
        print(f"error: {msg}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def _describe(config) -> str:
    module = _config_module(sys.argv)
    if module is not None and hasattr(module, "describe"):
        return module.describe(config)
    return "\n".join(f"{k} = {v!r}" for k, v in sorted(config.items()))


def loaded_config(argv):
    """``FLAGS.config`` of a command of this kind (``main``, ``aot``): a config file that
    failed to load is one ``error:`` line (exit 2); with ``--describe`` the keys are printed
    and the command exits 0."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import ml_collections

    config = FLAGS.config
    if not isinstance(config, ml_collections.ConfigDict):
        # config_flags defers a config file that failed to load to its first use.
        try:
            config.stage
        except OSError as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            print(f"error: --config: {lines[-1]}", file=sys.stderr)
            sys.exit(EXIT_CONFIG)
    if FLAGS.describe:
        print(_describe(config))
        sys.exit(0)
    return config


def main(argv):
    config = loaded_config(argv)
    if not FLAGS.workdir:
        print("error: --workdir is required (where checkpoints, logs and exports go)", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    from ilvr_jax.train import checkpoints, loop, preemption

    try:
        loop.train_and_evaluate(config, FLAGS.workdir)
    except (loop.ConfigError, checkpoints.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except loop.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    except preemption.Stopped as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted before the first training step; nothing to save", file=sys.stderr)
        sys.exit(128 + 2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
