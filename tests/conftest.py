"""Shared fixtures: tiny Qwen2.5-VL HF directories built locally (nothing downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The CPU backend only, also in subprocesses (they inherit the environment): with libtpu
# installed (tests/test_aot.py installs it) JAX would otherwise try the TPU first and every
# process would contend for libtpu's lock file.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from ilvr_jax.tiny import TINY_SHAPES, build_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Builds (once per session) and returns a function ``shape -> HF directory``."""
    cache: dict[str, str] = {}

    def get(shape: str = "untied_gqa2", **kw) -> str:
        key = shape + "".join(f"-{k}{v}" for k, v in sorted(kw.items()))
        if key not in cache:
            cache[key] = build_tiny_model_dir(str(tmp_path_factory.mktemp(key)), shape, **kw)
        return cache[key]

    return get


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for the session's own process: many tests compile the
    same tiny programs (the train step, the generation loop) through fresh ``jit`` wrappers,
    which the in-memory cache does not share; on disk they hit (14% off tests/train/test_step.py).
    Set here, not in the environment, so subprocesses do not inherit it: the multi-process
    tests must compile in every process (see tests/train/test_multiprocess.py)."""
    path = tmp_path_factory.getbasetemp() / "jax_compilation_cache_in_process"
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tiny_dirs):
    """The default tiny model directory (untied head, GQA, windowed + full vision blocks)."""
    return tiny_dirs("untied_gqa2")


@pytest.fixture(params=sorted(TINY_SHAPES))
def tiny_shape(request):
    return request.param
