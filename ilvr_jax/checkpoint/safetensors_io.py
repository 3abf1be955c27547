"""Minimal safetensors reader and streaming writer on plain NumPy.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length ``N``, ``N`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {...}}``, then the raw little-endian tensor bytes, offsets counted from the
end of the header.

Why not ``safetensors.numpy``: it cannot represent bfloat16 (the dtype of released
Qwen2.5-VL weights) without torch, and it loads or builds whole files at once. Here a tensor
is read on demand into one fresh buffer (viewed as ``ml_dtypes.bfloat16`` when needed), and a
file is written tensor by tensor from callbacks, so neither direction needs a second copy
of the model in host memory. Nothing is ever unpickled. Paths may be local or in cloud
storage (``ilvr_jax.storage``): a tensor is a ranged read of its bytes either way.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable, Iterable
from typing import Any

import ml_dtypes
import numpy as np

from ilvr_jax import storage

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES: dict[np.dtype, str] = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def dtype_code(dtype: Any) -> str:
    """The safetensors dtype string (``"BF16"``, ``"F32"``, ...) of a NumPy dtype."""
    dt = np.dtype(dtype)
    if dt not in _CODES:
        raise ValueError(f"dtype {dt} cannot be stored in safetensors")
    return _CODES[dt]


class SafetensorsFile:
    """Header of one ``.safetensors`` file; ``read(name)`` reads one tensor from disk."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not storage.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: safetensors file not found")
        self.file_size = storage.getsize(self.path)
        with storage.open_file(self.path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError(f"{self.path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw_len)
            if n > min(_MAX_HEADER_BYTES, self.file_size - 8):
                raise ValueError(f"{self.path}: invalid safetensors header length {n}")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: safetensors header is not valid JSON ({e})") from e
        self.data_start = 8 + n
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict[str, Any]] = header

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._entry(name)["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._entry(name)["dtype"]
        if code not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        return _DTYPES[code]

    def _entry(self, name: str) -> dict[str, Any]:
        if name not in self.entries:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        return self.entries[name]

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a new NumPy array (native byte order, file dtype)."""
        shape, dtype = self.shape(name), self.dtype(name)
        begin, end = (int(o) for o in self._entry(name)["data_offsets"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes:
            raise ValueError(
                f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {shape} {dtype}"
                f" (expected {nbytes})"
            )
        if self.data_start + end > self.file_size:
            raise ValueError(f"{self.path}: tensor {name!r} runs past the end of the file (truncated?)")
        buf = np.empty(nbytes, np.uint8)
        with storage.open_file(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if hasattr(f, "readinto"):
                got = f.readinto(memoryview(buf))
            else:   # tensorflow's gfile: no readinto
                data = f.read(nbytes)
                got = len(data)
                buf[:got] = np.frombuffer(data, np.uint8)
            if got != nbytes:
                raise ValueError(f"{self.path}: short read of tensor {name!r}")
        arr = buf.view(dtype).reshape(shape)
        if sys.byteorder != "little" and dtype.itemsize > 1:
            arr = arr.byteswap().view(dtype.newbyteorder("<")).astype(dtype)
        return arr


def write_safetensors(
    path: str,
    tensors: Iterable[tuple[str, tuple[int, ...], Any, Callable[[], np.ndarray]]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Writes ``(name, shape, dtype, produce)`` tensors to ``path``; returns the data bytes.

    ``produce()`` is called once per tensor while writing, so only one tensor is
    materialised at a time. The file is written under a temporary name and renamed, so a
    crash never leaves a half-written file under the final name (an object-store path is
    written as one object, which appears only when complete).
    """
    specs = list(tensors)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype, _ in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": dtype_code(dtype),
            "shape": [int(s) for s in shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section starts 8-byte aligned, as the reference writer does
    local = storage.is_local(path)
    tmp = f"{path}.tmp{os.getpid()}" if local else path
    with storage.open_file(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, produce in specs:
            arr = np.asarray(produce())
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(
                    f"{path}: tensor {name!r} is {arr.shape} {arr.dtype}, declared {tuple(shape)} {np.dtype(dtype)}"
                )
            arr = np.ascontiguousarray(arr)
            if sys.byteorder != "little" and arr.dtype.itemsize > 1:
                arr = arr.byteswap()
            f.write(arr.view(np.uint8).reshape(-1).data)
    if local:
        os.replace(tmp, path)
    return offset
