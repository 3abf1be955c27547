"""A ``gs://`` bucket in memory for the tests: etils.epath's fsspec backend is pointed at an
fsspec memory filesystem for ``gs://`` paths, so code reaching cloud storage through
``ilvr_jax.storage`` (epath) runs the same calls it makes against Google Cloud Storage, with
no network and no gcsfs.

Load with :func:`load` (test modules are imported with ``--import-mode=importlib``); the
``install`` context manager patches and, on exit, restores and empties the bucket.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys


def load():
    name = "ilvr_fake_bucket"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.abspath(__file__))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _memory_gcs():
    from fsspec.implementations.memory import MemoryFileSystem

    class MemoryGCS(MemoryFileSystem):
        """Keys are the paths without ``gs://`` (``/bucket/dir/file``), as gcsfs strips them."""

        protocol = ("gs", "gcs")
        store: dict = {}
        pseudo_dirs = [""]
        cachable = False

        @classmethod
        def _strip_protocol(cls, path):
            path = os.fspath(path)
            if path.startswith(("gs://", "gcs://")):
                path = path.split("://", 1)[1]
            return "/" + path.strip("/")

    return MemoryGCS()


@contextlib.contextmanager
def install():
    """Within the block ``gs://`` paths live in memory (the filesystem object is yielded)."""
    from etils.epath import backend, gpath

    from ilvr_jax import storage

    fs = _memory_gcs()
    real_fs = backend._FileSystemSpecBackend.fs
    real_tf = gpath._is_tf_installed
    real_installed = storage._installed

    def fs_for(self, path):
        return fs if os.fspath(path).startswith("gs://") else real_fs(self, path)

    backend._FileSystemSpecBackend.fs = fs_for
    gpath._is_tf_installed = lambda: False
    storage._installed = lambda package: package == "gcsfs" or real_installed(package)
    try:
        yield fs
    finally:
        backend._FileSystemSpecBackend.fs = real_fs
        gpath._is_tf_installed = real_tf
        storage._installed = real_installed
        fs.store.clear()
        fs.pseudo_dirs[:] = [""]
