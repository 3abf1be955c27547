"""Lifetime of the pipeline's image-decoding worker processes: they die with the process that
started them, so a killed run leaves no workers and no shared memory behind.

grain's ``mp_prefetch`` spawns the workers (``multiprocessing`` "spawn") and passes batches
through POSIX shared memory (``/dev/shm/psm_*``, plus ``/dev/shm/sem.*`` for its queues).
Every segment is registered with ``multiprocessing``'s resource tracker, a helper process
of the main process that unlinks whatever is still registered once every process holding
its pipe (the main process and the workers) has exited. So the shared memory is released
exactly when the workers are gone; a worker that outlives a SIGKILLed main process (grain's
workers are re-parented to init and keep filling their queues) keeps the tracker, the
worker's memory and every queued segment alive forever.

``worker_init`` (grain's ``worker_init_fn``) starts a watchdog thread in each worker that
exits the worker as soon as its parent process is gone (its parent pid changes). Not
``prctl(PR_SET_PDEATHSIG)``: that signal follows the *thread* that forked the worker, and
grain starts its workers from short-lived prefetch threads of the main process, so a
finished thread would kill a worker of a live run.
"""

from __future__ import annotations

import functools
import os
import threading
import time

# How often a worker checks that its parent is alive: the longest a worker outlives it.
PARENT_POLL_S = 0.2
# A worker's exit status when it ends because its parent died.
ORPHAN_EXIT_CODE = 70


def _exit_when_orphaned(parent_pid: int, poll_s: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    # No cleanup on purpose: the parent is gone, nobody reads the queues; the resource tracker
    # unlinks the shared memory once the last worker has exited.
    os._exit(ORPHAN_EXIT_CODE)


def _start_watchdog(parent_pid: int, poll_s: float, worker_index: int = 0, worker_count: int = 1) -> None:
    del worker_index, worker_count  # grain's worker_init_fn signature
    if os.getppid() != parent_pid:  # the parent died before this worker started
        os._exit(ORPHAN_EXIT_CODE)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid, poll_s), daemon=True,
                     name="ilvr-parent-watchdog").start()


def worker_init(parent_pid: int | None = None, poll_s: float = PARENT_POLL_S):
    """grain ``worker_init_fn`` (called with the worker index and count) that ties each worker's
    life to ``parent_pid`` (default: this process, the one that spawns the workers)."""
    return functools.partial(_start_watchdog, os.getpid() if parent_pid is None else int(parent_pid), poll_s)
