"""SIGTERM (what a TPU VM or a Slurm job gets before preemption) and SIGINT (Ctrl-C) end a
run at the next step boundary with a checkpoint at the current step, data position
included, instead of losing everything since the last periodic checkpoint.

The handler only records the signal; the training loop polls :attr:`StopRequest.signal`
after each step, saves, and raises :class:`Stopped`, which ``main`` reports in one line. A
second signal while the checkpoint is being written falls back to the default action, so a
run can always be killed at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """The run stopped on a signal after saving a checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class StopRequest:
    """The first SIGTERM / SIGINT received while :func:`catch_stop_signals` is active."""

    def __init__(self) -> None:
        self.signal: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signum
        else:  # a second signal: no more waiting for the checkpoint
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)


@contextlib.contextmanager
def catch_stop_signals() -> Iterator[StopRequest]:
    """Installs the handlers for the duration of the block (main thread only; elsewhere the
    signals keep their default action and the request never fires)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._handle) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
