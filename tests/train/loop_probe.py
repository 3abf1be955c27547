"""``python loop_probe.py OUT.json --config=... --workdir=... [--config.key=value ...]``:
runs ``python -m ilvr_jax.main`` with the compiled train step wrapped so that every host
read of a step's metrics is recorded (at which step of the loop it happened, and of which
step's metrics), and writes the record, every step's metric values (read here, after the
run) and the warnings the loop logged to OUT.json. Exits as main does.

A helper of tests/train/test_loop.py, not a test module.
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np

OUT = sys.argv.pop(1)
CURRENT_STEP = [0]               # train-step calls so far: a read between calls k and k+1 is "at step k"
READS: list[tuple[int, int, str]] = []   # (loop step when read, step of the metric, metric name)
METRICS: list[dict] = []         # every step's metrics, the real device arrays


class MetricProbe:
    """A step's metric array that records every way of bringing it to the host."""

    def __init__(self, array, step: int, name: str):
        self._array, self._step, self._name = array, step, name

    def _read(self):
        READS.append((CURRENT_STEP[0], self._step, self._name))
        return np.asarray(self._array)

    def copy_to_host_async(self):   # starts a transfer without waiting: not a read
        self._array.copy_to_host_async()

    def __array__(self, dtype=None, copy=None):
        value = self._read()
        return value if dtype is None else value.astype(dtype)

    def __float__(self):
        return float(self._read())

    def __bool__(self):
        return bool(self._read())

    def __int__(self):
        return int(self._read())

    __index__ = __int__

    def item(self):
        return self._read().item()


def _install() -> None:
    from ilvr_jax.train import step as step_lib

    real_compile = step_lib.compile_train_step

    def compile_train_step(*args, **kwargs):
        train = real_compile(*args, **kwargs)

        def probed(state, batch):
            state, metrics = train(state, batch)
            CURRENT_STEP[0] += 1
            METRICS.append(metrics)
            return state, {k: MetricProbe(v, CURRENT_STEP[0], k) for k, v in metrics.items()}

        return probed

    step_lib.compile_train_step = compile_train_step


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main() -> None:
    from absl import app

    _install()
    warnings = _Warnings()
    logging.getLogger("ilvr_jax").addHandler(warnings)
    from ilvr_jax import main as train_main

    code = 0
    try:
        app.run(train_main.main, flags_parser=train_main.parse_flags)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        values = [{k: np.asarray(v).item() for k, v in m.items()} for m in METRICS]
        with open(OUT, "w", encoding="utf-8") as f:
            json.dump({"reads": READS, "steps_run": CURRENT_STEP[0], "values": values,
                       "warnings": warnings.lines}, f)
    sys.exit(code)


if __name__ == "__main__":
    main()
