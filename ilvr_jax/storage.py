"""Files on a local disk or in cloud storage (``gs://bucket/...`` on TPU VMs), through
``etils.epath``: the path API orbax and grain use, so the workdir, the model directory and
the data can all live in a bucket.

Paths stay strings. A local path keeps ``os.path`` semantics exactly (relative to the working
directory, atomic writes through a temporary file and a rename); a URI (``scheme://...``) goes
to epath's backend for that scheme (fsspec's gcsfs, or tensorflow's gfile when installed).
"""

from __future__ import annotations

import importlib.util
import io
import os
import posixpath
import shutil
import tempfile
from typing import IO

from etils import epath

# The packages epath can use per scheme (its fsspec backend needs the scheme's fsspec
# filesystem; tensorflow's gfile serves them all).
BACKEND_PACKAGES = {"gs": ("gcsfs", "tensorflow"), "s3": ("s3fs", "tensorflow"), "az": ("adlfs", "tensorflow")}
INSTALL_HINT = {"gs": "pip install gcsfs", "s3": "pip install s3fs", "az": "pip install adlfs"}


class StorageError(OSError):
    """A path that cannot be used (an unknown scheme, no backend installed): one line."""


def scheme(path: str | os.PathLike) -> str | None:
    """``"gs"`` for ``gs://b/x``; None for a local path."""
    text = os.fspath(path)
    return text.split("://", 1)[0] if "://" in text else None


def is_local(path: str | os.PathLike) -> bool:
    return scheme(path) is None


def check_backend(path: str | os.PathLike) -> None:
    """``StorageError`` naming ``path`` when its scheme has no installed backend (a bucket
    path on a host without gcsfs or tensorflow fails here, not deep inside a read)."""
    s = scheme(path)
    if s is None:
        return
    if s not in BACKEND_PACKAGES:
        raise StorageError(f"{os.fspath(path)}: unsupported storage scheme {s}:// (supported: local paths, "
                           + ", ".join(f"{k}://" for k in BACKEND_PACKAGES) + ")")
    if not any(_installed(p) for p in BACKEND_PACKAGES[s]):
        raise StorageError(f"{os.fspath(path)}: {s}:// paths need {' or '.join(BACKEND_PACKAGES[s])}, and neither "
                           f"is installed ({INSTALL_HINT[s]})")


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def epath_of(path: str | os.PathLike) -> epath.Path:
    check_backend(path)
    return epath.Path(path)


# ----------------------------------------------------------------------------- names
def join(root: str | os.PathLike, *parts: str) -> str:
    root = os.fspath(root)
    return os.path.join(root, *parts) if is_local(root) else posixpath.join(root, *parts)


def dirname(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return os.path.dirname(path) if is_local(path) else posixpath.dirname(path.rstrip("/"))


def basename(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return os.path.basename(path) if is_local(path) else posixpath.basename(path.rstrip("/"))


def abspath(path: str | os.PathLike) -> str:
    """``os.path.abspath`` of a local path; a URI is absolute already."""
    path = os.fspath(path)
    return os.path.abspath(path) if is_local(path) else path.rstrip("/")


def isabs(path: str | os.PathLike) -> bool:
    return os.path.isabs(path) if is_local(path) else True


# ----------------------------------------------------------------------------- queries
def exists(path: str | os.PathLike) -> bool:
    return os.path.exists(path) if is_local(path) else epath_of(path).exists()


def isfile(path: str | os.PathLike) -> bool:
    if is_local(path):
        return os.path.isfile(path)
    p = epath_of(path)
    return p.exists() and not p.is_dir()


def isdir(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) if is_local(path) else epath_of(path).is_dir()


def listdir(path: str | os.PathLike) -> list[str]:
    """The names in a directory (unsorted, like ``os.listdir``)."""
    if is_local(path):
        return os.listdir(path)
    return [p.name for p in epath_of(path).iterdir()]


def glob(directory: str | os.PathLike, pattern: str) -> list[str]:
    """Sorted paths in ``directory`` whose names match ``pattern`` (no ``**``)."""
    if is_local(directory):
        import glob as glob_lib

        return sorted(glob_lib.glob(os.path.join(glob_lib.escape(os.fspath(directory)), pattern)))
    return sorted(str(p) for p in epath_of(directory).glob(pattern))


def getsize(path: str | os.PathLike) -> int:
    return os.path.getsize(path) if is_local(path) else int(epath_of(path).stat().length)


def getmtime(path: str | os.PathLike) -> float:
    return os.path.getmtime(path) if is_local(path) else float(epath_of(path).stat().mtime or 0)


# ----------------------------------------------------------------------------- reads and writes
def open_file(path: str | os.PathLike, mode: str = "r") -> IO:
    """``open`` for a local path (UTF-8 in text mode); epath's file object otherwise."""
    if is_local(path):
        return open(path, mode, encoding=None if "b" in mode else "utf-8")
    return epath_of(path).open(mode)


def read_bytes(path: str | os.PathLike) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def path_or_file(path: str | os.PathLike):
    """What readers taking a path or a binary file object (PIL's ``Image.open``) open: the
    local path itself, or the remote file's bytes in memory (seekable, as they expect)."""
    return path if is_local(path) else io.BytesIO(read_bytes(path))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """The whole file at once: locally through a temporary file and a rename (a killed
    process never leaves half a file); an object store writes an object whole anyway."""
    if is_local(path):
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        epath_of(path).write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def makedirs(path: str | os.PathLike) -> None:
    if is_local(path):
        os.makedirs(path, exist_ok=True)
    else:
        epath_of(path).mkdir(parents=True, exist_ok=True)


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``os.replace`` locally. In an object store a rename is a copy and a delete anyway, done
    here directly: epath's rename wants the target's folder to exist, and an empty folder
    does not exist in a bucket."""
    if is_local(src) and is_local(dst):
        os.replace(src, dst)
    elif isdir(src):
        if exists(dst):
            rmtree(dst)
        copy_tree(src, dst)
        rmtree(src)
    else:
        copy_file(src, dst)
        remove(src)


def remove(path: str | os.PathLike) -> None:
    if is_local(path):
        os.remove(path)
    else:
        epath_of(path).unlink()


def rmtree(path: str | os.PathLike) -> None:
    if is_local(path):
        shutil.rmtree(path)
    else:
        epath_of(path).rmtree()


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies one file whole: locally through a temporary file and a rename, so a process
    reading ``dst`` while another copies it (the processes of one run writing the same
    workdir) sees the old file or the new one, never a truncated one."""
    if is_local(src) and is_local(dst):
        tmp = f"{os.fspath(dst)}.tmp{os.getpid()}"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    else:
        write_bytes(dst, read_bytes(src))


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies the files of ``src`` (recursively) into ``dst``, overwriting files there, each
    file whole (see :func:`copy_file`)."""
    makedirs(dst)
    for name in listdir(src):
        s, d = join(src, name), join(dst, name)
        if isdir(s):
            copy_tree(s, d)
        else:
            copy_file(s, d)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_LOCAL_ROOT: list[str] = []


def _local_root() -> str:
    """This process's directory of local copies (removed when it exits)."""
    if not _LOCAL_ROOT:
        import atexit

        _LOCAL_ROOT.append(tempfile.mkdtemp(prefix="ilvr_storage_"))
        atexit.register(shutil.rmtree, _LOCAL_ROOT[0], True)
    return _LOCAL_ROOT[0]


def local_copy(directory: str | os.PathLike, *, skip_suffixes: tuple[str, ...] = WEIGHT_SUFFIXES) -> str:
    """A local directory holding ``directory``'s files, for readers of local files only (HF
    tokenizers and processors): ``directory`` itself when local; otherwise a fresh copy of its
    top-level files except those ending in ``skip_suffixes`` (the weights), under a temporary
    directory of this process."""
    directory = os.fspath(directory)
    if is_local(directory):
        return directory
    out = tempfile.mkdtemp(dir=_local_root())
    for name in listdir(directory):
        src = join(directory, name)
        if not name.endswith(skip_suffixes) and not isdir(src):
            with open(os.path.join(out, name), "wb") as f:
                f.write(read_bytes(src))
    return out


class AppendFile:
    """A file written by appending and flushing (logs). Locally a file opened for appending;
    in an object store, where objects cannot be appended to, the content is kept in memory
    and every ``flush`` rewrites the object whole (log files stay small)."""

    def __init__(self, path: str | os.PathLike, *, binary: bool = False):
        self.path = os.fspath(path)
        self._binary = binary
        if is_local(self.path):
            self._file = open(self.path, "ab" if binary else "a", encoding=None if binary else "utf-8")
            self._buffer = None
        else:
            self._file = None
            self._buffer = io.BytesIO()
            if exists(self.path):
                self._buffer.write(read_bytes(self.path))

    def write(self, data: str | bytes) -> None:
        if self._file is not None:
            self._file.write(data)
        else:
            self._buffer.write(data if isinstance(data, bytes) else data.encode("utf-8"))

    def flush(self, fsync: bool = False) -> None:
        if self._file is not None:
            self._file.flush()
            if fsync:
                os.fsync(self._file.fileno())
        else:
            epath_of(self.path).write_bytes(self._buffer.getvalue())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self._buffer is not None:
            self.flush()
            self._buffer = None
