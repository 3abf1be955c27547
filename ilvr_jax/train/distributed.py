"""Multi-process runs: one JAX process per host (TPU pod hosts, GPU cluster nodes), or
several on one machine (CPU tests).

What differs from a single process, and is handled here:

* ``initialize``: ``jax.distributed.initialize`` with the ``mesh.*`` addresses when given,
  else jax's own cluster detection (Cloud TPU, Slurm, Open MPI, Kubernetes); CPU processes
  exchange data through gloo.
* The processes must take the same decisions at the same step, or a collective (a train
  step, an orbax save) waits forever: ``agreed_stop_signal`` turns one process's SIGTERM /
  SIGINT into a stop of all of them at the same step boundary.
* Each process builds only its slice of every global batch, and its data iterator state
  (the record fingerprint of its slice, the records that failed on it) is its own; orbax
  writes JSON items from process 0 alone, so ``DataIterator.get_state`` hands process 0 all
  processes' states, and each process restores its own.
* ``batch_fingerprint`` is taken over the global batch (the processes' slices in order),
  so it equals the fingerprint of a single-process run with the same global batch.
* ``fetch_to_host`` brings arrays that span processes to every host's memory (one leaf at
  a time, so only one leaf is ever replicated on the devices).
* ``broadcast_text`` hands process 0's text (e.g. a file only it reads) to every process.
* ``barrier`` waits on the coordination service (no time limit of the device transport):
  process 0 may convert the data for minutes while the others wait.

The stop agreement runs every step: one gather of an int32, at the point where the loop
already waits for the step's ``finite`` flag, so it adds no stall of its own.

With one process every function is the single-process behaviour, without collectives.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import numpy as np

logger = logging.getLogger("ilvr_jax")

# The arrays ``metrics.batch_fingerprint`` hashes (the pixels are not among them, so only
# these small arrays are gathered across processes).
FINGERPRINT_KEYS = ("input_ids", "attention_mask", "labels", "image_grid_thw", "helper_grid_thw", "latent_starts",
                    "sample_mask")


class DistributedInitError(RuntimeError):
    """``jax.distributed.initialize`` failed (no cluster detected, coordinator unreachable)."""


def init_kwargs(coordinator_address: str = "", num_processes: int = -1, process_id: int = -1,
                local_device_ids: str = "") -> dict[str, Any]:
    """The explicit ``jax.distributed.initialize`` arguments among the ``mesh.*`` values
    ("" and -1 are left to jax's auto-detection; ``local_device_ids`` is comma-separated)."""
    out: dict[str, Any] = {}
    if str(coordinator_address or ""):
        out["coordinator_address"] = str(coordinator_address)
    if int(num_processes) >= 0:
        out["num_processes"] = int(num_processes)
    if int(process_id) >= 0:
        out["process_id"] = int(process_id)
    ids = str(local_device_ids or "").strip()
    if ids:
        try:
            out["local_device_ids"] = [int(x) for x in ids.split(",")]
        except ValueError:
            raise DistributedInitError(f"mesh.local_device_ids must be comma-separated integers, got {ids!r}") from None
    return out


def initialize(coordinator_address: str = "", num_processes: int = -1, process_id: int = -1,
               local_device_ids: str = "") -> None:
    """Connects this process to the others (``mesh.distributed=True``; the arguments as in
    :func:`init_kwargs`). Raises ``DistributedInitError``, one line saying what was tried
    and why it failed."""
    kwargs = init_kwargs(coordinator_address, num_processes, process_id, local_device_ids)
    # CPU devices of different processes need a transport for their collectives (without
    # one, every computation that spans processes fails); GPUs and TPUs ignore the setting.
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not kwargs:
            raise DistributedInitError(f"jax.distributed.initialize() found no multi-host cluster here ({first})"
                                       ) from None
        given = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        raise DistributedInitError(f"jax.distributed.initialize({given}) failed ({first})") from None
    logger.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                jax.local_device_count(), jax.device_count())


_barriers = [0]


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Every process waits here until all have arrived (no-op with one process), e.g. while
    process 0 converts the data. The coordination service's barrier, not a device
    collective: CPU (gloo) collectives give up when a process arrives 30 s after another."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    _barriers[0] += 1   # every process passes the same barriers in the same order
    client = jax_distributed.global_state.client
    if client is None:  # a runtime that is not jax.distributed's (e.g. Pathways)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(f"ilvr_jax/{_barriers[0]}/{name}", int(timeout_s * 1000))


# ----------------------------------------------------------------------------- gathers
def _allgather(x: np.ndarray) -> np.ndarray:
    """The processes' equally shaped ``x`` concatenated along axis 0, in process order."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def _allgather_text(text: str) -> list[str]:
    """Every process's ``text``, in process order (two gathers: lengths, padded bytes)."""
    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    lengths = _allgather(np.array([data.size], np.int32))
    # Padded to a power of two: a few compiled gathers, not one per length.
    padded = np.zeros((max(256, 1 << int(lengths.max() - 1).bit_length()),), np.uint8)
    padded[:data.size] = data
    rows = _allgather(padded).reshape(len(lengths), -1)
    return [bytes(row[:n]).decode("utf-8") for row, n in zip(rows, lengths)]


def broadcast_text(text: str) -> str:
    """Process 0's ``text`` on every process (the others' argument is ignored), e.g. what
    process 0 read from a file the others may not see. A collective with several processes."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    barrier("broadcast")   # process 0 may still be reading: no gloo collective waits for it
    data = np.frombuffer(text.encode("utf-8"), np.uint8) if jax.process_index() == 0 else np.zeros((0,), np.uint8)
    n = int(np.asarray(multihost_utils.broadcast_one_to_all(np.array([data.size], np.int32))).reshape(-1)[0])
    padded = np.zeros((max(256, 1 << max(n - 1, 0).bit_length()),), np.uint8)  # a few compiled shapes
    padded[:data.size] = data
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded))[:n]).decode("utf-8")


def agreed_stop_signal(request) -> int | None:
    """The stop signal any process has received (``preemption.StopRequest``), or None. With
    several processes this is a collective every process must call at the same step: a
    signal that reaches the processes at different steps stops all of them at the first
    boundary where one has it, and the processes without it adopt it, so all save the same
    step and exit alike."""
    local = request.signal
    if jax.process_count() == 1:
        return local
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:  # a runtime that is not jax.distributed's (e.g. Pathways): a device gather
        signals = _allgather(np.array([local or 0], np.int32))
    else:
        signals = _exchange_through_coordinator(client, local or 0)
    agreed = next((int(s) for s in signals if s), None)
    if agreed is not None and request.signal is None:
        request.signal = agreed
    return agreed


_stop_checks = [0]


def _exchange_through_coordinator(client, value: int, timeout_s: float = 24 * 3600.0) -> list[int]:
    """Every process's ``value`` through the coordination service's key-value store: a
    host-to-host exchange that, unlike a device gather, does not wait for the train steps
    already queued on the devices, so the host keeps dispatching ahead of them. Every
    process calls it at the same points in the same order (the call count names the keys)."""
    _stop_checks[0] += 1
    n, pid = jax.process_count(), jax.process_index()
    key = lambda call, q: f"ilvr_jax/stop/{call}/{q}"  # noqa: E731
    client.key_value_set(key(_stop_checks[0], pid), str(int(value)))
    values = [int(client.blocking_key_value_get(key(_stop_checks[0], q), int(timeout_s * 1000))) for q in range(n)]
    # Every process has read the keys of two calls ago: it posted the last call's after reading them.
    if _stop_checks[0] > 2:
        try:
            client.key_value_delete(key(_stop_checks[0] - 2, pid))
        except Exception:  # noqa: BLE001 (a missing key; nothing to clean)
            pass
    return values


def batch_fingerprint(host_batch: dict[str, np.ndarray]) -> str:
    """``metrics.batch_fingerprint`` of the global batch (the processes' host batches in
    process order, as they are laid out in the global arrays). A collective with several
    processes: call it on every process at the same step."""
    from ilvr_jax.train import metrics as metrics_lib

    if jax.process_count() == 1:
        return metrics_lib.batch_fingerprint(host_batch)
    keys = [k for k in FINGERPRINT_KEYS if k in host_batch]
    return metrics_lib.batch_fingerprint({k: _allgather(host_batch[k]) for k in keys})


def fetch_to_host(tree: Any) -> Any:
    """``tree`` with every array as a numpy array holding its whole value, on every
    process. Arrays that span processes are gathered one at a time (a collective: every
    process calls this); the others are copied as ``np.asarray`` does."""
    from jax.experimental import multihost_utils

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)


# ----------------------------------------------------------------------------- data state
PROCESS_STATES = "process_states"


def local_data_state(saved: Any) -> Any:
    """This process's entry of a data state written by ``DataIterator.get_state`` (a
    single-process state is returned as it is). A state of another process count gives a
    state that the pipeline rejects, so the loop reports the changed layout."""
    if not isinstance(saved, dict) or PROCESS_STATES not in saved:
        return saved if jax.process_count() == 1 or saved is None else {"fingerprint": None}
    states = saved[PROCESS_STATES]
    if len(states) != jax.process_count():
        return {"fingerprint": None}
    return states[jax.process_index()]


class DataIterator:
    """A ``BatchIterator`` whose ``get_state`` is the state of every process: with several
    processes ``{"process_states": [state of process 0, 1, ...]}`` (a collective: every
    process calls it at the same step, as the loop's save calls do), with one the iterator's
    own state."""

    def __init__(self, it):
        self._it = it

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def get_state(self) -> Any:
        state = self._it.get_state()
        if jax.process_count() == 1:
            return state
        return {PROCESS_STATES: [json.loads(s) for s in _allgather_text(json.dumps(state, sort_keys=True))]}

    def __getattr__(self, name):
        return getattr(self._it, name)


def data_iterator(pipe, saved_state: Any) -> DataIterator:
    """``pipe.iterator`` positioned at this process's entry of ``saved_state`` (None: the
    start), wrapped so that checkpoints carry every process's state."""
    return DataIterator(pipe.iterator(local_data_state(saved_state) if saved_state is not None else None))
