"""Does a config's train step fit in device memory? Compiled ahead of time, from any host.

    python -m ilvr_jax.aot --config configs/stage1.py:v5p_8 [--topology v5p-8] [--json] \
        [--config.key=value ...]

The real ``train_step`` is lowered with abstract inputs (``jax.ShapeDtypeStruct`` carrying
their shardings, so nothing of the 7B is ever allocated on this host) and compiled by libtpu
for a TPU topology: student fp32 params, AdamW moments of the trainable leaves, the fp32
momentum teacher (stage 1) and one global batch of the config's largest shapes
(``data.batch_size`` x ``data.max_length``, the ``data.max_*_patches`` budgets, K, M).
The report gives the compiler's per-chip memory (arguments, outputs, temporaries, generated
code, peak) against the chip's HBM, the state's bytes per chip against state / (data x
fsdp x tensor), the large state leaves left fully replicated (a silent-replication guard),
the analytic FLOPs of one step (``metrics.step_flops``) and one verdict line.

Topology: ``--topology`` (``v5p-8``, ``v5e-16``, ``v5litepod-16``, ``v6e-8``, ``v4-8`` or a
libtpu name such as ``v5p:2x2x1``), by default the preset's (``v5p_8`` -> ``v5p:2x2x1``,
``v5e_16`` -> ``v5e:4x4``). GPUs (``h100-8``, ``a100-8``, ``h200-8``; the ``gpu_8`` preset)
get the same report from the analytic model of :func:`memory_model.analytic_memory` (there is no AOT
compiler for them on a CPU host). Needs libtpu for TPUs (``pip install "jax[tpu]==$(python
-c 'import jax; print(jax.__version__)')"``).

The model: ``model.hf_dir`` / ``train.init_from`` when given (only config.json /
model_config.json and the tokenizer are read); otherwise the tiny model for
``model.init='tiny'``, else Qwen2.5-VL-7B (the ``ModelConfig`` defaults) with the three
latent tokens, vocabulary 151668 (``model.vocab_resize='exact'``; 152064 with 'grow_only').

Exit status: 0 fits; 1 does not fit (the compiler ran out of HBM, or the estimate exceeds
it); 2 bad flags or config (one ``error:`` line).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

# Before jax loads: compile for TPUs without claiming this host's accelerators (the CPU
# backend runs the tracing), next to other processes that hold libtpu, and without the
# cloud metadata lookups libtpu makes off a TPU VM.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

from absl import app, flags  # noqa: E402

from ilvr_jax import main as main_cli  # noqa: E402  (--config, its parsing and error lines)
from ilvr_jax import memory_model  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("topology", None, "TPU topology (v5p-8, v5e-16, v5p:2x2x1, ...) or GPUs (h100-8); "
                    "default: the preset's")
flags.DEFINE_bool("json", False, "print the report as one JSON object")
flags.DEFINE_string("compiler_log", None, "when the step does not fit: write the compiler's whole out-of-memory "
                    "message (its largest allocations, with shapes and the ops that made them) to this file")
flags.DEFINE_bool("generate", False, "check the evaluation's generation (prefill + the compiled decode loop "
                  "of train.eval_batch_size rows, data.max_length prompt tokens, train.eval_max_new_tokens new "
                  "ones) instead of the train step")

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_CONFIG = 0, 1, 2
GiB = 2**30
LARGE_LEAF_BYTES = 2**20

# Usable HBM per device as libtpu reports it ("exceeds available HBM (...)"); the compiler's
# own figure is probed and preferred, this table is the fallback. v4 devices are TensorCores.
TPU_HBM_GIB = {"TPU v5 lite": 15.75, "TPU v5": 95.74, "TPU v6 lite": 31.25, "TPU v4": 15.25}
# GPUs: memory per device (nvidia-smi's total) for the analytic report.
GPU_HBM_GIB = {"h100": 79.6, "a100": 79.2, "h200": 139.8}
# v5e / v6e slices (chips -> 2-D layout); v5p / v4 (TensorCores = 2 x chips -> 3-D layout).
_FLAT_SLICES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_CUBE_SLICES = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8",
                512: "4x8x8", 1024: "8x8x8"}


class ConfigError(ValueError):
    """A flag or config value the check cannot run with (exit 2, one line)."""


# ----------------------------------------------------------------------------- targets
def resolve_target(name: str) -> tuple[str, str, int]:
    """``(kind, name, devices)``: kind "tpu" with a libtpu topology name (devices unknown
    until loaded: 0), or "gpu" with the GPU kind and count."""
    n = name.strip().lower()
    m = re.fullmatch(r"(h100|a100|h200|gpu)[-_:x]?(\d+)", n)
    if m:
        return "gpu", "h100" if m.group(1) == "gpu" else m.group(1), int(m.group(2))
    if re.fullmatch(r"v\d+[a-z]*:\d+(x\d+){1,2}", n):
        return "tpu", n, 0
    m = re.fullmatch(r"(v5p|v5e|v5litepod|v6e|v4)[-_](\d+)", n)
    if m:
        gen, count = m.group(1), int(m.group(2))
        gen = "v5e" if gen == "v5litepod" else gen
        table = _CUBE_SLICES if gen in ("v5p", "v4") else _FLAT_SLICES
        if count in table:
            return "tpu", f"{gen}:{table[count]}", 0
        raise ConfigError(f"--topology {name}: no {gen} slice of {count} "
                          f"{'TensorCores' if table is _CUBE_SLICES else 'chips'}; known: "
                          + ", ".join(f"{gen}-{k}" for k in table))
    raise ConfigError(f"--topology {name!r} unknown: use v5p-8, v5e-16 (v5litepod-16), v6e-8, v4-8, "
                      "a libtpu name like v5p:2x2x1, or h100-8 / a100-8 / h200-8")


def preset_target(config_arg: str | None) -> str | None:
    """The topology a preset is named for: ``v5p_8`` (and ``v5p_8_32k``) -> ``v5p-8``, ``gpu_8`` -> ``h100-8``."""
    preset = config_arg.split(":", 1)[1] if config_arg and ":" in config_arg else ""
    m = re.fullmatch(r"(v\d+[a-z]*|gpu)_(\d+)(?:_\w+)?", preset)   # v5p_8, v5p_8_32k, gpu_8
    if not m:
        return None
    return f"h100-{m.group(2)}" if m.group(1) == "gpu" else f"{m.group(1)}-{m.group(2)}"


def load_topology(name: str):
    """libtpu's description of topology ``name`` (its devices carry coordinates). Slices
    smaller than one host need their own host bounds. libtpu's start-up warnings about the
    missing TPU VM environment are dropped."""
    import importlib.util

    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"--topology {name}: libtpu is not installed; pip install \"jax[tpu]==$(python -c "
                          "'import jax; print(jax.__version__)')\"")
    dims = [int(d) for d in name.split(":", 1)[1].split("x")]
    with _captured_stderr():
        try:
            return topologies.get_topology_desc(topology_name=name, platform="tpu")
        except Exception as e:  # noqa: BLE001 (libtpu raises JaxRuntimeError)
            first = (str(e).strip() or type(e).__name__).splitlines()[0]
        if "not divisible" in first:
            try:
                return topologies.get_topology_desc(topology_name=name, platform="tpu",
                                                    chips_per_host_bounds=tuple(dims + [1] * (3 - len(dims))))
            except Exception:  # noqa: BLE001 (the first error says more)
                pass
    raise ConfigError(f"--topology {name}: {first}")


class _captured_stderr:
    """Redirects file descriptor 2 (C++ logging included) into a temporary file."""

    def __enter__(self):
        self._file = tempfile.TemporaryFile(mode="w+")
        sys.stderr.flush()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        return False



# ----------------------------------------------------------------------------- the run's pieces
def validate(c) -> None:
    """``loop.validate_config`` on the values that matter here: the check reads no data and
    no weights, so the path checks are neutralised on a copy."""
    import ml_collections

    from ilvr_jax.train import loop

    if c.stage not in (1, 2):
        raise ConfigError(f"invalid config: stage must be 1 or 2, got {c.stage}")
    probe = ml_collections.ConfigDict(c.to_dict())
    probe.stage, probe.model.init = 1, "tiny"
    # The attention implementation is the target's (attention_impl), not this host's.
    probe.model.attn_impl = "xla"
    probe.data.adapter, probe.data.train_path, probe.data.image_root = "maze", "", ""
    try:
        loop.validate_config(probe)
    except loop.ConfigError as e:
        raise ConfigError(" ".join(str(e).split("\n"))) from None


def attention_impl(c, platform: str) -> str:
    """``model.attn_impl`` for the TARGET's platform ("tpu" / "gpu"), not this host's:
    "auto" is splash on TPUs and cuDNN on GPUs (XLA for an fp32 compute dtype); a kernel the
    target lacks is a config error."""
    from ilvr_jax.model import layers

    try:
        impl = layers.resolve_attention_impl(c.model.attn_impl, platform, c.model.compute_dtype)
    except ValueError as e:
        raise ConfigError(f"model.attn_impl: {e}") from None
    if impl == "cudnn" and platform != "gpu":
        raise ConfigError(f"model.attn_impl='cudnn' needs NVIDIA GPUs, the target is a {platform.upper()}; "
                          "use 'auto' or 'splash'")
    if impl == "splash" and platform != "tpu":
        raise ConfigError(f"model.attn_impl='splash' is a TPU kernel, the target is a {platform.upper()}; "
                          "use 'auto' or 'cudnn'")
    return impl


def with_attention_impl(c, impl: str):
    """A copy of ``c`` whose ``model.attn_impl`` is the resolved ``impl``."""
    c = c.copy_and_resolve_references()
    c.model.attn_impl = impl
    return c


def model_config(c):
    """The ModelConfig a run of ``c`` would train, with the latent tokens in."""
    from ilvr_jax.model.config import ModelConfig
    from ilvr_jax.train import checkpoints as ckpt_lib
    from ilvr_jax.train.run_model import MODEL_CONFIG_FILE

    K = int(c.ilvr.latent_size)
    if c.stage == 2 and c.train.init_from:
        from ilvr_jax import storage
        from ilvr_jax.jsonfile import read_json

        path = storage.join(ckpt_lib.run_root(c.train.init_from), MODEL_CONFIG_FILE)
        if not storage.isfile(path):
            raise ConfigError(f"train.init_from: {path} does not exist (not a stage-1 workdir)")
        return ModelConfig.from_hf(path if storage.is_local(path) else read_json(path)).replace(latent_size=K)
    if c.model.init == "tiny":
        from ilvr_jax import tiny

        tok = tiny.build_tokenizer()
        return _with_latent_tokens(ModelConfig.from_hf(tiny.hf_config(tok, c.model.tiny_shape, latent_size=K)),
                                   tok, c)
    if c.model.hf_dir:
        from ilvr_jax.train import run_model

        try:
            from ilvr_jax.checkpoint.hf import read_model_config

            cfg = read_model_config(c.model.hf_dir)   # a local or a gs:// directory
            tok = run_model.load_source_tokenizer(c.model.hf_dir)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.hf_dir: {e}") from None
        return _with_latent_tokens(cfg, tok, c)
    # Qwen2.5-VL-7B: the dataclass defaults; the tokenizer's 151665 tokens + 3 latent tokens.
    cfg = ModelConfig()
    vocab = 151668 if c.model.vocab_resize == "exact" else max(151668, cfg.text.vocab_size)
    import dataclasses

    return cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=vocab), latent_pad_token_id=151665,
                       latent_start_token_id=151666, latent_end_token_id=151667, latent_size=K)


def _with_latent_tokens(cfg, tok, c):
    """``cfg`` after ``add_latent_tokens`` (its resize rule), traced on abstract params."""
    import jax

    from ilvr_jax.checkpoint.latent_tokens import add_latent_tokens
    from ilvr_jax.model import qwen25vl

    out = {}

    def resized(params):
        _, params, out["cfg"] = add_latent_tokens(tok, params, cfg, latent_size=int(c.ilvr.latent_size),
                                                  resize=c.model.vocab_resize)
        return params

    jax.eval_shape(resized, jax.eval_shape(lambda: qwen25vl.init_params(cfg, jax.random.PRNGKey(0))))
    return out["cfg"]


def abstract_inputs(c, cfg, mesh):
    """(step config, tx, schedule, abstract state, abstract batch), every leaf a
    ``ShapeDtypeStruct`` with the sharding the training loop gives it."""
    import jax

    from ilvr_jax.data.buckets import Bucket
    from ilvr_jax.data.pipeline import BATCH_DTYPES, batch_shapes
    from ilvr_jax.model import qwen25vl
    from ilvr_jax.train import loop
    from ilvr_jax.train import optimizer as opt_lib
    from ilvr_jax.train import step as step_lib

    steps = int(c.train.num_steps) if int(c.train.num_steps) > 0 else 1000
    tx, schedule = opt_lib.make_optimizer(lr=float(c.optim.lr), weight_decay=float(c.optim.weight_decay),
                                          warmup_steps=int(c.optim.warmup_steps), total_steps=steps,
                                          clip_norm=float(c.optim.clip_norm), schedule=c.optim.schedule)
    scfg = loop.step_config(c, cfg)
    params = jax.eval_shape(lambda: qwen25vl.init_params(cfg, jax.random.PRNGKey(0)))
    state = jax.eval_shape(lambda p: step_lib.init_train_state(p, tx, scfg, jax.random.PRNGKey(0)), params)
    st_sh = step_lib.state_shardings(mesh, state, scfg, tx)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, st_sh)
    try:
        dcfg = loop.data_config(c, int(c.data.batch_size))
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    bucket = Bucket(int(c.data.max_length), int(c.data.max_question_patches), int(c.data.max_helper_patches))
    shapes = batch_shapes(dcfg, bucket, cfg.vision.patch_dim)
    batch = {k: jax.ShapeDtypeStruct(v, BATCH_DTYPES[k]) for k, v in shapes.items()}
    b_sh = step_lib.batch_shardings(mesh, batch)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_sh[k]) for k, v in batch.items()}
    return scfg, tx, schedule, state, batch


def resolve_mesh_shape(c, devices: int) -> tuple[int, int, int]:
    """``mesh.shape`` with its -1 filled for ``devices``; the micro-batch must divide over
    data x fsdp (what ``loop.check_mesh`` demands on the real hardware)."""
    shape = [int(s) for s in c.mesh.shape]
    if -1 in shape:
        rest = 1
        for s in shape:
            rest *= s if s != -1 else 1
        if rest <= 0 or devices % rest:
            raise ConfigError(f"mesh.shape {tuple(shape)} does not divide {devices} devices")
        shape[shape.index(-1)] = devices // rest
    if shape[0] * shape[1] * shape[2] != devices:
        raise ConfigError(f"mesh.shape {tuple(shape)} (data, fsdp, tensor) needs {shape[0] * shape[1] * shape[2]} "
                          f"devices, the topology has {devices}; set --config.mesh.shape, e.g. (1, -1, 1)")
    per_micro = int(c.data.batch_size) // int(c.optim.grad_accum_steps)
    if per_micro % (shape[0] * shape[1]):
        raise ConfigError(f"the micro-batch ({c.data.batch_size} / {c.optim.grad_accum_steps} accumulation steps "
                          f"= {per_micro}) must be divisible by data x fsdp = {shape[0] * shape[1]}")
    return tuple(shape)


def _nbytes(a) -> int:
    import numpy as np

    return int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize


def _shard_nbytes(a) -> int:
    import numpy as np

    return int(np.prod(a.sharding.shard_shape(a.shape), dtype=np.int64)) * np.dtype(a.dtype).itemsize


def replicated_large_leaves(tree, threshold: int = LARGE_LEAF_BYTES) -> list[tuple[str, int]]:
    """(path, bytes) of the leaves over ``threshold`` bytes that every device holds whole,
    on a mesh of more than one device."""
    import jax

    out = []
    for path, a in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sh = a.sharding
        if _nbytes(a) > threshold and sh.num_devices > 1 and sh.is_fully_replicated:
            out.append((jax.tree_util.keystr(path, simple=True, separator="/"), _nbytes(a)))
    return sorted(out, key=lambda x: -x[1])


def state_summary(state, batch, mesh_shape) -> dict:
    """Bytes of the state (global, per device, ideal = global / devices) and of the batch."""
    import jax

    leaves = jax.tree.leaves(state)
    total = sum(_nbytes(a) for a in leaves)
    devices = mesh_shape[0] * mesh_shape[1] * mesh_shape[2]
    rep = replicated_large_leaves(state)
    return dict(state_bytes=total, state_bytes_per_device=sum(_shard_nbytes(a) for a in leaves),
                state_bytes_ideal_per_device=total // devices,
                batch_bytes_per_device=sum(_shard_nbytes(a) for a in jax.tree.leaves(batch)),
                replicated_large_leaves=len(rep), replicated_examples=[p for p, _ in rep[:5]])


# ----------------------------------------------------------------------------- TPU: compile
_OOM_RE = re.compile(r"\(([\d.]+)([KMGT]?)\)? exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def probe_hbm_bytes(mesh) -> int | None:
    """The HBM per device the compiler allows, read from the error of a program that needs
    far more (a second's compile); None when the message does not say."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    x = jax.ShapeDtypeStruct((2**40 // 4,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    try:
        jax.jit(lambda a: a * 2.0).lower(x).compile()
    except Exception as e:  # noqa: BLE001
        m = _OOM_RE.search(str(e))
        if m:
            return int(float(m.group(3)) * _UNITS[m.group(4)])
    return None


def _tpu_target(c, topo_name: str):
    """(mesh over the topology's devices, its shape, device kind, HBM bytes per device)."""
    from ilvr_jax.train import mesh as mesh_lib

    devices = list(load_topology(topo_name).devices)
    mesh_shape = resolve_mesh_shape(c, len(devices))
    mesh = mesh_lib.make_mesh(mesh_shape, devices=devices)
    kind = devices[0].device_kind
    return mesh, mesh_shape, kind, probe_hbm_bytes(mesh) or int(TPU_HBM_GIB.get(kind, 0) * GiB) or None


def _compile_and_measure(lowered, report: dict, unused_input_bytes=lambda: 0) -> dict:
    """Compiles ``lowered`` and adds the compiler's per-chip memory and the verdict to
    ``report`` (which holds hbm_bytes and the state and batch bytes per device). When libtpu
    runs out of HBM, the temporaries it names plus the state and batch shards are what it needs."""
    import time

    t0 = time.time()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 (XLA's JaxRuntimeError)
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "exceeds available HBM" not in msg:
            raise
        m = _OOM_RE.search(msg)
        temps = int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None
        report.update(compile_s=round(time.time() - t0, 1), fits=False, oom_message=msg.strip().splitlines()[0],
                      oom_details=msg.strip(),
                      oom_temp_bytes=temps, needed_bytes=None if temps is None else
                      temps + report["state_bytes_per_device"] + report["batch_bytes_per_device"])
        return report
    ma = compiled.memory_analysis()
    report["unused_input_bytes"] = unused_input_bytes()
    mem = dict(argument_bytes=ma.argument_size_in_bytes, output_bytes=ma.output_size_in_bytes,
               alias_bytes=ma.alias_size_in_bytes, temp_bytes=ma.temp_size_in_bytes,
               generated_code_bytes=ma.generated_code_size_in_bytes)
    peak = getattr(ma, "peak_memory_in_bytes", None)
    # Without the compiler's own peak: live inputs + outputs not aliased to them + scratch.
    mem["compiler_peak_bytes"] = int(peak) if peak else (
        mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"] + mem["temp_bytes"]
        + mem["generated_code_bytes"])
    # The loop puts the whole batch on the devices, inputs the step never reads included.
    mem["peak_bytes"] = mem["compiler_peak_bytes"] + report["unused_input_bytes"]
    report.update(mem, compile_s=round(time.time() - t0, 1))
    report["fits"] = report["hbm_bytes"] is None or mem["peak_bytes"] <= report["hbm_bytes"]
    return report


def compile_tpu(c, cfg, topo_name: str) -> dict:
    """Compile the real train step for the topology: the report's numbers."""
    from ilvr_jax.train import step as step_lib

    mesh, mesh_shape, kind, hbm = _tpu_target(c, topo_name)
    scfg, tx, schedule, state, batch = abstract_inputs(c, cfg, mesh)
    report = dict(target=topo_name, device_kind=kind, devices=mesh.size, mesh=mesh_shape,
                  hbm_bytes=hbm, source="compiler", **state_summary(state, batch, mesh_shape))
    report.update(memory_model.analytic_memory(c, cfg, mesh_shape, _trainable_bytes(state, scfg), report))
    train = step_lib.compile_train_step(scfg, tx, schedule, mesh, state, batch)
    lowered = train.lower(state, batch)
    return _compile_and_measure(lowered, report, lambda: _unused_input_bytes(lowered, (state, batch)))


def generation_inputs(c, cfg, mesh):
    """(decode config, abstract params, abstract prompt batch, cache length, decode steps) of the
    evaluation's generation, laid out on ``mesh`` as the evaluation lays them (parameters as in
    training, rows over the batch axes)."""
    import jax
    import jax.numpy as jnp

    from ilvr_jax import sharding
    from ilvr_jax.generate import sampler
    from ilvr_jax.ilvr.latent_decoding import LatentIds
    from ilvr_jax.model import qwen25vl
    from ilvr_jax.train import loop

    params = jax.eval_shape(lambda: qwen25vl.init_params(cfg, jax.random.PRNGKey(0)))
    names = qwen25vl.param_axes(cfg)
    params = jax.tree.map(lambda a, n: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                            sharding=sharding.named_sharding(mesh, n, a.shape)),
                          params, names, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    dtype = loop.DTYPES[c.model.compute_dtype]
    dcfg = sampler.DecodeConfig(
        latent_ids=LatentIds(cfg.latent_pad_token_id, cfg.latent_start_token_id, cfg.latent_end_token_id),
        latent_size=int(c.ilvr.latent_size), pad_id=0, dtype=dtype,
        attn_impl=loop.attention_impl(c, "tpu"))
    b, s = int(c.train.eval_batch_size), int(c.data.max_length)
    pq, n_img = int(c.data.max_question_patches), max(int(c.data.max_question_images), 1)

    def rows(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding.named_sharding(
            mesh, ("batch",) + (None,) * (len(shape) - 1), shape))

    batch = sampler.PromptBatch(rows((b, s), jnp.int32), rows((b, s), jnp.int32),
                                rows((b, pq, cfg.vision.patch_dim), jnp.float32), rows((b, n_img, 3), jnp.int32))
    steps = sampler.bucket(int(c.train.eval_max_new_tokens), 8)
    return dcfg, params, batch, sampler.cache_length(s, steps), steps


def compile_generation_tpu(c, cfg, topo_name: str) -> dict:
    """Compile the evaluation's generation (one program: prefill, then the decode loop on its
    cache) for the topology: per-chip memory as for the train step."""
    import jax
    import jax.numpy as jnp

    from ilvr_jax import sharding
    from ilvr_jax.generate import sampler

    mesh, mesh_shape, kind, hbm = _tpu_target(c, topo_name)
    dcfg, params, batch, cache_len, steps = generation_inputs(c, cfg, mesh)

    def generate(params, batch, budgets, stop_ids, key):
        with sharding.activation_mesh(mesh):
            logits, hidden, cache, deltas = sampler.prefill(params, cfg, dcfg, batch, cache_len)
            out, _ = sampler.decode_loop(params, cfg, dcfg, steps, cache, logits, hidden, deltas,
                                         batch.input_ids[:, -1], budgets, stop_ids, key,
                                         jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))
        return out

    b = batch.input_ids.shape[0]
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    budgets = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharding.named_sharding(mesh, ("batch",), (b,)))
    args = (params, batch, budgets, jax.ShapeDtypeStruct((1,), jnp.int32, sharding=rep),
            jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep))
    report = dict(target=topo_name, device_kind=kind, devices=mesh.size, mesh=mesh_shape, hbm_bytes=hbm,
                  source="compiler", program="generation", rows=b, prompt_tokens=int(c.data.max_length),
                  new_tokens=steps, **state_summary(params, args[1:], mesh_shape))
    return _compile_and_measure(jax.jit(generate).lower(*args), report)


def _unused_input_bytes(lowered, args) -> int:
    """Per-device bytes of the inputs jit dropped from the executable because the step does
    not read them (stage 2's helper images): the compiler does not count them, yet the
    training loop places them on the devices. 0 when jax does not say which it kept."""
    import jax

    kept = getattr(lowered, "_lowering", None)
    kept = getattr(kept, "compile_args", {}).get("kept_var_idx") if kept is not None else None
    if kept is None:
        return 0
    return sum(_shard_nbytes(a) for i, a in enumerate(jax.tree.leaves(args)) if i not in kept)


# ----------------------------------------------------------------------------- GPU: estimate
def _trainable_bytes(state, scfg) -> int:
    import jax

    from ilvr_jax.train import optimizer as opt_lib

    trainable, _ = opt_lib.split_frozen(state.params, scfg.frozen_patterns)
    return sum(_nbytes(x) for x in jax.tree.leaves(trainable))


def estimate_gpu(c, cfg, kind: str, count: int) -> dict:
    from jax.sharding import AbstractMesh

    from ilvr_jax import sharding as sh

    mesh_shape = resolve_mesh_shape(c, count)
    mesh = AbstractMesh(mesh_shape, sh.MESH_AXES)
    scfg, _, _, state, batch = abstract_inputs(c, cfg, mesh)
    info = state_summary(state, batch, mesh_shape)
    report = dict(target=f"{kind}-{count}", device_kind=kind.upper(), devices=count, mesh=mesh_shape,
                  hbm_bytes=int(GPU_HBM_GIB[kind] * GiB), source="analytic", **info)
    report.update(memory_model.analytic_memory(c, cfg, mesh_shape, _trainable_bytes(state, scfg), info))
    report["peak_bytes"] = report["estimated_peak_bytes"]
    report["fits"] = report["peak_bytes"] <= report["hbm_bytes"]
    return report


# ----------------------------------------------------------------------------- report
def suggestions(c, cfg, r: dict) -> list[str]:
    """What to change when it does not fit, from the report's numbers and the config."""
    dp, fsdp, tp = r["mesh"]
    out = []
    hbm = r["hbm_bytes"] or 0
    if r["state_bytes_per_device"] > 0.8 * hbm:
        out.append(f"the state alone is {r['state_bytes_per_device'] / GiB:.1f} GiB per device: shard it over more "
                   "chips (more fsdp in mesh.shape, a larger topology); data parallelism on top of fsdp "
                   "multiplies it")
    if dp > 1:
        out.append(f"mesh.shape has data={dp}: fold it into fsdp, e.g. --config.mesh.shape='(1, {dp * fsdp}, {tp})'")
    micro = int(c.data.batch_size) // int(c.optim.grad_accum_steps) // (dp * fsdp)
    if micro > 1:
        out.append(f"{micro} samples per device per micro-batch: raise optim.grad_accum_steps to "
                   f"{int(c.optim.grad_accum_steps) * micro} (same global batch) or lower data.batch_size")
    from ilvr_jax.train import loop

    if c.stage == 2 and loop.stage2_windows(c.train.stage2_chunk_len, None)[1] is None:
        out.append(f"stage 2 with train.stage2_chunk_len={c.train.stage2_chunk_len!r} runs every later text chunk in "
                   "a window of the whole sequence: 'auto' (or e.g. '0,256') cuts its work and memory to about "
                   "one forward")
    if c.model.remat_policy != "nothing_saveable":
        out.append("--config.model.remat_policy=nothing_saveable keeps one activation per layer")
    S = int(c.data.max_length)
    logits = S * max(micro, 1) * cfg.text.vocab_size * 4 / GiB
    if int(c.model.ce_chunk) == 0:
        out.append(f"fp32 logits are {logits:.1f} GiB per device at {S} tokens: --config.model.ce_chunk=1024 "
                   f"computes the cross-entropy in chunks, or a shorter data.max_length (e.g. {S // 2})")
    else:
        out.append(f"a shorter data.max_length (e.g. {S // 2}) or smaller patch budgets "
                   f"(data.max_question_patches / data.max_helper_patches) cut the activations")
    if c.model.attn_impl not in ("cudnn", "splash"):
        out.append("attention scores grow with max_length^2: --config.model.attn_impl=auto (splash on TPUs, "
                   "cudnn on GPUs)")
    patches = max(int(c.data.max_question_patches), int(c.data.max_helper_patches))
    out.append(f"the vision tower attends over all {patches} patch rows of a sample: lower "
               "data.max_question_patches / data.max_helper_patches (or data.max_pixels)")
    return out


def human_bytes(x: int | None) -> str:
    """GiB to two decimals; MiB / KiB below 0.1 GiB (tiny models)."""
    if x is None:
        return "?"
    if x == 0:
        return "0"
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= 0.1 * size or unit == "KiB":
            return f"{x / size:.2f} {unit}"


def stage2_windows_text(c) -> str:
    """The stage-2 text-chunk windows the check compiles (no data here: 'auto' assumes later
    chunks of ``loop.AOT_LATER_CHUNK`` tokens)."""
    from ilvr_jax.train import loop

    first, rest = loop.stage2_windows(c.train.stage2_chunk_len, None)
    text = f"({first or c.data.max_length}, {rest or c.data.max_length})"
    if str(c.train.stage2_chunk_len).strip() == "auto":
        text += (f" (train.stage2_chunk_len='auto' takes the data's longest later chunk; {loop.AOT_LATER_CHUNK} "
                 "assumed here)")
    return text


def format_report(c, r: dict) -> str:
    g = human_bytes
    dp, fsdp, tp = r["mesh"]
    generation = r.get("program") == "generation"
    head = (f"generation: {r.get('rows')} rows, {r.get('prompt_tokens')} prompt tokens + {r.get('new_tokens')} new, "
            f"patches {c.data.max_question_patches} per row" if generation else
            f"stage {c.stage}, batch {c.data.batch_size} = {c.optim.grad_accum_steps} x "
            f"{int(c.data.batch_size) // int(c.optim.grad_accum_steps)}, max_length {c.data.max_length}, "
            f"patches {c.data.max_question_patches}:{c.data.max_helper_patches}, remat {c.model.remat_policy}"
            + (f", stage-2 windows {stage2_windows_text(c)}" if c.stage == 2 else ""))
    lines = [f"target: {r['target']} ({r['devices']} x {r['device_kind']}), mesh (data, fsdp, tensor) = "
             f"({dp}, {fsdp}, {tp}); attention {r.get('attn_impl', c.model.attn_impl)}; {head}",
             f"state: {g(r['state_bytes'])} in all, {g(r['state_bytes_per_device'])} per device "
             f"(state / devices = {g(r['state_bytes_ideal_per_device'])}); batch {g(r['batch_bytes_per_device'])} "
             f"per device",
             f"fully replicated state leaves > 1 MiB: {r['replicated_large_leaves']}"
             + (f" ({', '.join(r['replicated_examples'])})" if r["replicated_large_leaves"] else "")]
    if r["source"] == "compiler" and "argument_bytes" in r:
        lines.append(f"per chip (compiler): arguments {g(r['argument_bytes'])}, outputs {g(r['output_bytes'])} "
                     f"(aliased {g(r['alias_bytes'])}), temporaries {g(r['temp_bytes'])}, generated code "
                     f"{g(r['generated_code_bytes'])}; peak {g(r['compiler_peak_bytes'])}"
                     + (f" + {g(r['unused_input_bytes'])} of batch inputs the step does not read"
                        if r["unused_input_bytes"] else "")
                     + f" = {g(r['peak_bytes'])} of {g(r['hbm_bytes'])} HBM (compiled in {r['compile_s']} s"
                     + (f"; the analytic estimate says {g(r['estimated_peak_bytes'])})" if not generation else ")"))
    elif r["source"] == "compiler":
        lines.append(f"compiler: {r['oom_message']}" + (
            f" (the analytic estimate says {g(r['estimated_peak_bytes'])})" if not generation else ""))
    else:
        parts = ", ".join(f"{k} {g(v)}" for k, v in r["estimate_parts"].items())
        lines.append(f"per device (analytic estimate, not a compile): {parts}; peak {g(r['peak_bytes'])} of "
                     f"{g(r['hbm_bytes'])} (JAX on GPU preallocates 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION "
                     "is raised, e.g. to 0.95)")
    if not generation:
        lines.append(f"analytic FLOPs per step: {r['flops_per_step']:.3e} ({r['flops_per_step'] / r['devices']:.3e} "
                     f"per device)")
    if r["fits"]:
        free = (r["hbm_bytes"] - r["peak_bytes"]) if r["hbm_bytes"] else None
        lines.append(f"verdict: FITS (peak {g(r['peak_bytes'])} of {g(r['hbm_bytes'])} per device, {g(free)} free)")
    else:
        lines += ["suggestions:"] + [f"  - {s}" for s in r["suggestions"]]
        if r.get("peak_bytes"):
            lines.append(f"verdict: DOES NOT FIT (needs {g(r['peak_bytes'])} of {g(r['hbm_bytes'])} per device)")
        else:   # the compiler stopped at the temporaries: they plus the inputs
            inputs = r["state_bytes_per_device"] + r["batch_bytes_per_device"]
            lines.append(f"verdict: DOES NOT FIT (needs about {g(r.get('needed_bytes'))} of {g(r['hbm_bytes'])} per "
                         f"device: temporaries {g(r.get('oom_temp_bytes'))} + inputs {g(inputs)})")
    return "\n".join(lines)


def fit_check(c, target: str, generate: bool = False) -> dict:
    """The whole check for config ``c`` on ``target`` (a --topology value): the report dict.
    ``generate``: the evaluation's generation instead of the train step (TPU targets)."""
    from ilvr_jax.train import metrics as metrics_lib

    kind, name, count = resolve_target(target)
    impl = attention_impl(c, kind)
    validate(c)
    c = with_attention_impl(c, impl)
    cfg = model_config(c)
    if generate:
        if kind != "tpu":
            raise ConfigError("--generate compiles for TPU topologies only (GPUs have the analytic train-step "
                              "estimate alone)")
        r = compile_generation_tpu(c, cfg, name)
        r.update(stage=int(c.stage), attn_impl=impl, mesh=list(r["mesh"]),
                 verdict="FITS" if r["fits"] else "DOES NOT FIT")
        r["suggestions"] = [] if r["fits"] else [
            "lower train.eval_batch_size, data.max_length or train.eval_max_new_tokens (the KV cache grows with "
            "rows x (prompt + new tokens)), or spread the rows over more chips (data x fsdp)"]
        return r
    r = compile_tpu(c, cfg, name) if kind == "tpu" else estimate_gpu(c, cfg, name, count)
    r["stage"] = int(c.stage)
    r["attn_impl"] = impl
    r["flops_per_step"] = metrics_lib.step_flops(
        cfg, stage=int(c.stage), batch=int(c.data.batch_size), seq_len=int(c.data.max_length),
        question_patches=int(c.data.max_question_patches), helper_patches=int(c.data.max_helper_patches),
        vision_trainable=not any(p.startswith("visual") for p in c.optim.frozen))
    r["mesh"] = list(r["mesh"])
    r["suggestions"] = [] if r["fits"] else suggestions(c, cfg, r)
    r["verdict"] = "FITS" if r["fits"] else "DOES NOT FIT"
    return r


def main(argv):
    import json

    config = main_cli.loaded_config(argv)
    target = FLAGS.topology or preset_target(main_cli._config_arg(sys.argv))
    try:
        if not target:
            raise ConfigError("no --topology and the preset names none: pass e.g. --topology=v5p-8 "
                              "(or v5e-16, v5p:2x2x1, h100-8)")
        report = fit_check(config, target, generate=FLAGS.generate)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    details = report.pop("oom_details", None)
    if FLAGS.compiler_log and details:
        from ilvr_jax import storage

        storage.write_text(FLAGS.compiler_log, details + "\n")
    print(json.dumps(report) if FLAGS.json else format_report(config, report), flush=True)
    if FLAGS.compiler_log and details:
        print(f"the compiler's whole message: {FLAGS.compiler_log}", flush=True)
    sys.exit(EXIT_FITS if report["fits"] else EXIT_DOES_NOT_FIT)


if __name__ == "__main__":
    app.run(main, flags_parser=main_cli.parse_flags)
