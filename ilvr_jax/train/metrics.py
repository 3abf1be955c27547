"""Run metrics: analytic FLOPs per step, MFU, and writers (console + TensorBoard).

FLOPs are counted from the config, not from XLA's cost model (which counts a scanned
layer body once and cannot see custom kernels): 2 FLOPs per multiply-add, a backward
pass costs twice its forward.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
import time
import zlib
from typing import Any

import jax
import numpy as np

from ilvr_jax import storage
from ilvr_jax.model.config import ModelConfig

logger = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device, by ``jax.Device.device_kind`` (prefix match).
PEAK_FLOPS = {
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v4": 275e12,
    "TPU v3": 123e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
}


METRICS_FILE = "metrics.jsonl"


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s of ``device`` from the table, or None (CPU, unknown kinds)."""
    kind = (device or jax.devices()[0]).device_kind
    for prefix, flops in PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return flops
    return None


def lm_matmul_params(cfg: ModelConfig) -> int:
    """Multiply-adds per token of the language model's matmuls (incl. lm_head)."""
    t = cfg.text
    hd = t.head_dim
    attn = t.hidden_size * (t.num_attention_heads * hd) * 2 + t.hidden_size * (t.num_key_value_heads * hd) * 2
    mlp = 3 * t.hidden_size * t.intermediate_size
    return t.num_hidden_layers * (attn + mlp) + t.hidden_size * t.vocab_size


def vision_matmul_params(cfg: ModelConfig) -> int:
    """Multiply-adds per patch of the vision tower (merger counted per patch)."""
    v = cfg.vision
    block = 4 * v.hidden_size * v.hidden_size + 3 * v.hidden_size * v.intermediate_size
    merger = (v.merge_unit * v.hidden_size) ** 2 + v.merge_unit * v.hidden_size * v.out_hidden_size
    return v.patch_dim * v.hidden_size + v.depth * block + merger // v.merge_unit


def step_flops(cfg: ModelConfig, *, stage: int, batch: int, seq_len: int, question_patches: int,
               helper_patches: int, vision_trainable: bool = False) -> float:
    """Analytic FLOPs of one optimizer step over a padded global batch.

    Student LM: forward + backward (6 per multiply-add-parameter per token) plus causal
    attention scores (QK^T and PV: 2 * 2 * S^2/2 * H * hd per layer forward, x3 with the
    backward). Stage 1 adds one teacher LM forward (2N + attention) and the teacher's
    vision tower on helper images; question images go through the vision tower once
    (forward only when it is frozen). Vision attention is counted as full within the
    padded patch count (an upper bound for windowed blocks).
    """
    t, v = cfg.text, cfg.vision
    tokens = batch * seq_len
    n_lm = lm_matmul_params(cfg)
    attn_fwd = 2 * 2 * (seq_len * seq_len / 2) * t.num_attention_heads * t.head_dim * t.num_hidden_layers * batch
    student = 6 * n_lm * tokens + 3 * attn_fwd
    n_vis = vision_matmul_params(cfg)

    def vision(patches):
        attn = 2 * 2 * patches * patches * v.hidden_size * v.depth * batch
        return 2 * n_vis * patches * batch + attn

    flops = student + vision(question_patches) * (3 if vision_trainable else 1)
    if stage == 1:
        flops += 2 * n_lm * tokens + attn_fwd + vision(helper_patches)
    return float(flops)


def setup_logging() -> None:
    """Console logging: our ``ilvr_jax`` loggers at INFO, written through tqdm so lines do
    not tear the progress bar; absl (orbax, jax) at WARNING, since orbax's per-save INFO
    lines would drown the metric lines."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    ours = logging.getLogger("ilvr_jax")
    ours.setLevel(logging.INFO)
    ours.propagate = False
    if not any(isinstance(h, _TqdmHandler) for h in ours.handlers):
        h = _TqdmHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        ours.addHandler(h)


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:  # never let logging kill training
            self.handleError(record)


def batch_fingerprint(batch: dict[str, np.ndarray]) -> str:
    """CRC32 (hex) over the token ids, masks, labels and image grids of a host batch: equal
    fingerprints mean the same samples in the same order (to check exact resumption)."""
    crc = 0
    for k in ("input_ids", "attention_mask", "labels", "image_grid_thw", "helper_grid_thw", "latent_starts",
              "sample_mask"):
        if k in batch:
            crc = zlib.crc32(np.ascontiguousarray(batch[k]).tobytes(), crc)
    return f"{crc:08x}"


class MetricWriter:
    """TensorBoard scalars (``workdir/tensorboard``) + a JSONL log (``workdir/metrics.jsonl``),
    local or in cloud storage (``storage.AppendFile``).

    ``resume_step``: the step the run restarts from. Lines of later steps (written by the
    interrupted run after its last checkpoint) are dropped from the JSONL, and TensorBoard
    purges its events past that step, so each step appears once.
    """

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = storage.join(workdir, "tensorboard")
        self.jsonl_path = storage.join(workdir, METRICS_FILE)
        self._tb = None
        self._jsonl = None
        if enabled:
            truncate_jsonl(self.jsonl_path, resume_step)
            self._tb = TensorBoardWriter(self.path, purge_step=resume_step + 1 if resume_step else None)
            self._jsonl = storage.AppendFile(self.jsonl_path)

    def write(self, step: int, scalars: dict[str, float | None], extra: dict[str, Any] | None = None) -> None:
        """``scalars`` go to TensorBoard and the JSONL (None values are skipped);
        ``extra`` (strings etc.) to the JSONL only."""
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items() if v is not None}
        self._tb.write(step, {f"train/{k}": v for k, v in scalars.items()})
        self._jsonl.write(json.dumps({"step": step, **scalars, **(extra or {})}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


class TensorBoardWriter:
    """A synchronous TensorBoard event file writer (``events.out.tfevents.*``), local or in
    cloud storage.

    Each ``write`` is on disk when it returns (tensorboardX's ``SummaryWriter`` queues events
    to a thread whose ``flush`` does not drain the queue, so a ``kill -9`` loses the last
    steps). ``purge_step``: TensorBoard hides the events of earlier files at steps
    >= purge_step (a restart from a checkpoint). Records are framed as TFRecords (length,
    masked CRC32C of the length, payload, masked CRC32C of the payload)."""

    def __init__(self, logdir: str, purge_step: int | None = None):
        import socket

        from tensorboardX.proto import event_pb2

        self._event_pb2 = event_pb2
        storage.makedirs(logdir)
        # pid + ns in the name: the standard name carries only the second, and a quick
        # restart would otherwise reopen (and truncate) the previous run's file.
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{time.time_ns()}"
        self.path = storage.join(logdir, name)
        self._writer = storage.AppendFile(self.path, binary=True)
        self._write(event_pb2.Event(wall_time=time.time(), step=purge_step or 0, file_version="brain.Event:2"))
        if purge_step is not None:
            self._write(event_pb2.Event(wall_time=time.time(), step=purge_step,
                                        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def _write(self, event) -> None:
        from tensorboardX.record_writer import masked_crc32c

        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._writer.write(header + struct.pack("<I", masked_crc32c(header)) + data
                           + struct.pack("<I", masked_crc32c(data)))
        self._writer.flush(fsync=True)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        from tensorboardX.proto import summary_pb2

        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                             for k, v in scalars.items()])
        self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def close(self) -> None:
        self._writer.close()


def truncate_jsonl(path: str, keep_through_step: int) -> None:
    """Rewrites ``path`` keeping the lines with ``step <= keep_through_step`` (and dropping
    a torn last line of a killed run)."""
    if not storage.isfile(path):
        return
    kept = []
    for line in storage.read_text(path).splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(rec.get("step", 0)) <= keep_through_step:
            kept.append(json.dumps(rec) + "\n")
    storage.write_text(path, "".join(kept))


def read_jsonl(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


CONSOLE_ORDER = ("loss", "ce", "sim", "kstar", "grad_norm", "lr", "tokens_per_s", "mfu", "step_time_s")


def format_scalars(scalars: dict[str, float | None]) -> str:
    """``k=v`` pairs, the headline metrics first; None (e.g. MFU on CPU) left out."""
    keys = [k for k in CONSOLE_ORDER if k in scalars] + sorted(k for k in scalars if k not in CONSOLE_ORDER)
    return " ".join(f"{k}={scalars[k]:.5g}" for k in keys if scalars[k] is not None)


class Throughput:
    """Tokens/s and MFU between log points (wall clock, after the step's results are ready).

    ``skip()`` after a step restarts the clock without counting it: the first step of a
    process includes compilation. A window without counted steps reads as None.
    MFU = achieved FLOP/s per device / peak (None where the peak is unknown, e.g. CPU)."""

    def __init__(self, flops_per_step: float, num_devices: int, peak: float | None):
        self.flops_per_step = flops_per_step
        self.num_devices = num_devices
        self.peak = peak
        self._t = time.perf_counter()
        self._steps = 0
        self._tokens = 0.0
        self._flops = 0.0

    def update(self, tokens: float, flops: float | None = None) -> None:
        """One step of ``tokens``; ``flops``: that step's FLOPs (``flops_per_step`` when None,
        e.g. when every batch has the same shape)."""
        self._steps += 1
        self._tokens += tokens
        self._flops += self.flops_per_step if flops is None else flops

    def skip(self) -> None:
        self._t, self._steps, self._tokens, self._flops = time.perf_counter(), 0, 0.0, 0.0

    def read(self) -> dict[str, Any]:
        now = time.perf_counter()
        if self._steps == 0:
            return {"tokens_per_s": None, "step_time_s": None, "tflops_per_device": None, "mfu": None}
        dt = max(now - self._t, 1e-9)
        out = {"tokens_per_s": self._tokens / dt, "step_time_s": dt / self._steps}
        achieved = self._flops / dt / self.num_devices
        out["tflops_per_device"] = achieved / 1e12
        out["mfu"] = achieved / self.peak if self.peak else None
        self._t, self._steps, self._tokens, self._flops = now, 0, 0.0, 0.0
        return out


class KeptStepMetrics:
    """The device metrics of the steps since the last read, fetched together.

    Reading a step's metrics on the host waits for that step to finish, so the loop keeps
    them as device arrays and reads them only where it needs the values (log steps, before a
    checkpoint or an evaluation, at the end); meanwhile the host prepares the next batches
    while the device computes. ``extra`` is host data kept with a step (its FLOPs)."""

    def __init__(self):
        self._kept: list[tuple[int, dict[str, jax.Array], Any]] = []

    def __len__(self) -> int:
        return len(self._kept)

    def add(self, step: int, metrics: dict[str, jax.Array], extra: Any = None) -> None:
        self._kept.append((step, metrics, extra))

    def wait_for_lag(self, steps_ahead: int) -> None:
        """Blocks until at most ``steps_ahead`` of the kept steps can still be unfinished:
        waits for the step ``steps_ahead`` before the newest (steps finish in order), which
        leaves the device that many steps of queued work, and copies nothing."""
        if len(self._kept) > steps_ahead:
            jax.block_until_ready(self._kept[-steps_ahead - 1][1])

    def read(self) -> list[tuple[int, dict[str, float | bool], Any]]:
        """``(step, {name: value}, extra)`` of every kept step, oldest first (``finite`` as a
        bool, the rest as floats), with one ``jax.device_get``; the list is then empty."""
        if not self._kept:
            return []
        values = jax.device_get([m for _, m, _ in self._kept])
        out = [(step, {k: bool(v) if k == "finite" else float(v) for k, v in host.items()}, extra)
               for (step, _, extra), host in zip(self._kept, values)]
        self._kept = []
        return out


def read_tensorboard_scalars(logdir: str) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` from the event files of ``logdir`` (oldest file first, so a
    later file's values win), honouring TensorBoard's purge of steps at and after a
    restart's ``purge_step`` (a ``file_version`` event carrying ``SessionLog.START``).
    Reads the TFRecord framing directly (length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(storage.glob(logdir, "events.out.tfevents.*"),
                       key=lambda p: (storage.getmtime(p), p)):   # oldest run first
        data = storage.read_bytes(path)
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            payload = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            if len(payload) < length:
                break          # torn last record of a killed writer
            ev = event_pb2.Event.FromString(payload)
            if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
                for series in out.values():
                    for s in [s for s in series if s >= ev.step]:
                        del series[s]
            for v in ev.summary.value:
                out.setdefault(v.tag, {})[int(ev.step)] = float(v.simple_value)
    return out
