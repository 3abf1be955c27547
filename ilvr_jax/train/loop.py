"""The training program: config -> model, data, mesh, state -> steps, logs, checkpoints.

``train_and_evaluate(config, workdir)`` is what ``python -m ilvr_jax.main`` calls. A
restart with the same workdir resumes from the newest readable checkpoint (state, rng and
data position), so a killed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ilvr_jax import ilvr, storage
from ilvr_jax.checkpoint.latent_tokens import RESIZE_MODES
from ilvr_jax.model import qwen25vl
from ilvr_jax.model.config import ModelConfig
from ilvr_jax.model import layers
from ilvr_jax.model.layers import REMAT_POLICIES
from ilvr_jax.train import checkpoints as ckpt_lib
from ilvr_jax.train import distributed
from ilvr_jax.train import evaluation
from ilvr_jax.train import mesh as mesh_lib
from ilvr_jax.train import metrics as metrics_lib
from ilvr_jax.train import optimizer as opt_lib
from ilvr_jax.train import preemption
from ilvr_jax.train import run_model
from ilvr_jax.train.run_model import MODEL_CONFIG_FILE
from ilvr_jax.train import step as step_lib

logger = logging.getLogger("ilvr_jax")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ADAPTERS = ("canonical", "comt", "vsp", "zebra", "maze")


BEST_METRICS = ("", "loss", "ce", "sim")


class ConfigError(ValueError):
    """A config that cannot run; raised before anything expensive starts."""


class TrainingDiverged(FloatingPointError):
    """The loss or gradient became NaN/inf with ``train.nan_policy='stop'``."""


# ----------------------------------------------------------------------------- validation
def validate_config(c: ml_collections.ConfigDict, workdir: str | None = None) -> None:
    """Every value checked before any model, data or device work starts; all problems are
    reported together in one ``ConfigError``."""
    errs = []

    def need(cond, msg):
        if not cond:
            errs.append(msg)

    need(c.stage in (1, 2), f"stage must be 1 or 2, got {c.stage}")
    need(c.model.init in ("hf", "tiny"), f"model.init must be 'hf' or 'tiny', got {c.model.init!r}")
    need(c.model.compute_dtype in DTYPES, f"model.compute_dtype must be one of {sorted(DTYPES)}")
    need(c.ilvr.teacher_dtype in DTYPES, f"ilvr.teacher_dtype must be one of {sorted(DTYPES)}")
    need(c.model.remat_policy in REMAT_POLICIES,
         f"model.remat_policy {c.model.remat_policy!r} unknown; choose from {sorted(REMAT_POLICIES)}")
    need(c.model.attn_impl in ("auto",) + layers.ATTENTION_IMPLEMENTATIONS,
         f"model.attn_impl must be auto, xla, cudnn, splash or reference, got {c.model.attn_impl!r}")
    need(c.model.vocab_resize in RESIZE_MODES,
         f"model.vocab_resize must be one of {RESIZE_MODES}, got {c.model.vocab_resize!r}")
    need(int(c.model.ce_chunk) >= 0, f"model.ce_chunk must be >= 0 (0 = full logits), got {c.model.ce_chunk}")
    need(int(c.ilvr.latent_size) >= 1, f"ilvr.latent_size (K) must be >= 1, got {c.ilvr.latent_size}")
    need(0.0 < float(c.ilvr.top_p) <= 1.0, f"ilvr.top_p must be in (0, 1], got {c.ilvr.top_p}")
    need(int(c.ilvr.num_candidates) >= 1, f"ilvr.num_candidates (L) must be >= 1, got {c.ilvr.num_candidates}")
    need(0.0 <= float(c.ilvr.ema_decay) <= 1.0, f"ilvr.ema_decay must be in [0, 1], got {c.ilvr.ema_decay}")
    need(float(c.ilvr.noise_scale) >= 0, f"ilvr.noise_scale must be >= 0, got {c.ilvr.noise_scale}")
    need(c.data.adapter in ADAPTERS, f"data.adapter {c.data.adapter!r} unknown; choose from {', '.join(ADAPTERS)}")
    need(int(c.data.batch_size) >= 1, f"data.batch_size must be >= 1, got {c.data.batch_size}")
    need(int(c.optim.grad_accum_steps) >= 1, f"optim.grad_accum_steps must be >= 1")
    need(int(c.data.batch_size) % int(c.optim.grad_accum_steps) == 0,
         f"data.batch_size {c.data.batch_size} must be divisible by optim.grad_accum_steps "
         f"{c.optim.grad_accum_steps}")
    need(float(c.optim.lr) > 0, f"optim.lr must be > 0, got {c.optim.lr}")
    need(c.optim.schedule in ("linear", "constant", "cosine"), f"optim.schedule {c.optim.schedule!r} unknown")
    need(c.train.nan_policy in ("stop", "skip"), f"train.nan_policy must be 'stop' or 'skip'")
    need(c.train.loss_normalization in ("sample", "token"),
         f"train.loss_normalization must be 'sample' or 'token', got {c.train.loss_normalization!r}")
    need(int(c.train.num_steps) > 0 or int(c.train.num_epochs) >= 1,
         "set train.num_steps > 0 or train.num_epochs >= 1")
    need(int(c.train.log_every) >= 1 and int(c.train.checkpoint_every) >= 1,
         "train.log_every and train.checkpoint_every must be >= 1")
    need(c.train.keep_best_metric in BEST_METRICS,
         f"train.keep_best_metric must be one of {BEST_METRICS}, got {c.train.keep_best_metric!r}")
    need(int(c.train.max_steps_ahead) >= 1, f"train.max_steps_ahead must be >= 1, got {c.train.max_steps_ahead}")
    need(int(c.train.keep_checkpoints) >= 0, f"train.keep_checkpoints must be >= 0 (0 = keep all)")
    need(int(c.data.max_length) >= 1, f"data.max_length must be >= 1, got {c.data.max_length}")
    try:
        stage2_windows(c.train.stage2_chunk_len, later_chunk_len=1)
    except ValueError as e:
        need(False, str(e))
    need(len(tuple(c.mesh.shape)) == 3, f"mesh.shape must be (data, fsdp, tensor), got {tuple(c.mesh.shape)}")
    # Paths (local or cloud storage; a bucket path needs its storage package installed).
    def usable(key: str, path: str) -> bool:
        try:
            storage.check_backend(path)
            return True
        except storage.StorageError as e:
            errs.append(f"{key}: {e}")
            return False

    if workdir is not None and usable("--workdir", workdir) and storage.exists(workdir) \
            and not storage.isdir(workdir):
        errs.append(f"--workdir {workdir} exists and is not a directory")
    if c.stage == 2:
        need(bool(c.train.init_from), "stage 2 needs train.init_from: the stage-1 workdir (or one of its "
                                      "checkpoint step directories)")
        if c.train.init_from and usable("train.init_from", c.train.init_from):
            try:
                ckpt_lib.resolve_step_dir(c.train.init_from)
            except FileNotFoundError as e:
                errs.append(f"train.init_from: {e}")
            if not storage.isfile(storage.join(ckpt_lib.run_root(c.train.init_from), MODEL_CONFIG_FILE)):
                errs.append(f"train.init_from: {c.train.init_from} holds no {MODEL_CONFIG_FILE} "
                            "(not a stage-1 workdir)")
    elif c.model.init == "hf":
        if not c.model.hf_dir:
            errs.append("model.hf_dir is required (a Qwen2.5-VL directory, local or gs://) with model.init='hf'")
        elif usable("model.hf_dir", c.model.hf_dir) and not storage.isfile(storage.join(c.model.hf_dir, "config.json")):
            errs.append(f"model.hf_dir: {c.model.hf_dir} has no config.json")
    if c.data.adapter != "maze" or c.data.train_path:
        if not c.data.train_path:
            errs.append(f"data.train_path is required for adapter {c.data.adapter!r}")
        elif usable("data.train_path", c.data.train_path) and not storage.exists(c.data.train_path):
            errs.append(f"data.train_path: {c.data.train_path} does not exist")
    if c.data.image_root and usable("data.image_root", c.data.image_root) and not storage.isdir(c.data.image_root):
        errs.append(f"data.image_root: {c.data.image_root} is not a directory")
    errs += evaluation.config_errors(c)
    if errs:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errs))


def check_mesh(c: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh of ``mesh.shape``; ``ConfigError`` when it does not fit
    the devices or the batch."""
    n = jax.device_count()
    platform = jax.default_backend()
    impl = attention_impl(c, platform)
    if impl == "cudnn" and platform != "gpu":
        raise ConfigError(f"model.attn_impl='cudnn' needs NVIDIA GPUs, this host runs on {platform}; "
                          "set --config.model.attn_impl=auto")
    if impl == "splash" and platform not in ("tpu", "cpu"):   # cpu: the kernel in Pallas interpret mode
        raise ConfigError(f"model.attn_impl='splash' is a TPU kernel, this host runs on {platform}; "
                          "set --config.model.attn_impl=auto")
    shape = [int(s) for s in c.mesh.shape]
    try:
        mesh = mesh_lib.make_mesh(shape)
    except ValueError as e:
        raise ConfigError(f"mesh.shape: {e} ({platform}); set --config.mesh.shape to fit this host, "
                          "e.g. (1, -1, 1) for all its devices") from None
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    per_micro = int(c.data.batch_size) // int(c.optim.grad_accum_steps)
    if per_micro % dp:
        raise ConfigError(f"the micro-batch ({c.data.batch_size} / {c.optim.grad_accum_steps} accumulation "
                          f"steps = {per_micro}) must be divisible by data x fsdp = {dp} ({n} devices)")
    if int(c.train.eval_every) > 0 and int(c.train.eval_batch_size) % dp:
        raise ConfigError(f"train.eval_batch_size {c.train.eval_batch_size} must be divisible by data x fsdp = {dp}")
    if int(c.data.batch_size) % jax.process_count():
        raise ConfigError(f"data.batch_size {c.data.batch_size} must be divisible by the process count "
                          f"{jax.process_count()}")
    return mesh


# ----------------------------------------------------------------------------- data
def prepare_data(c: ml_collections.ConfigDict, workdir: str) -> tuple[str, str | None]:
    """(canonical JSONL path, image root or None). Non-canonical sources are converted
    once into the workdir; the maze adapter without a path generates a data set there."""
    data_dir = storage.join(workdir, "data")
    root = c.data.image_root or None
    if c.data.adapter == "canonical":
        return c.data.train_path, root
    out = storage.join(data_dir, "train.jsonl")
    if storage.isfile(out):   # the barrier of _wait_for still runs: process 0 may have just written it
        _wait_for(out)
        return out, None
    storage.makedirs(data_dir)
    if c.data.adapter == "maze" and not c.data.train_path:
        from ilvr_jax.data import maze

        if jax.process_index() == 0:
            # The generator writes local files; a bucket workdir gets a copy (images keep their
            # paths relative to the JSONL).
            local = data_dir if storage.is_local(data_dir) else tempfile.mkdtemp(prefix="ilvr_maze_")
            maze.generate_maze_dataset(local, n=int(c.data.generate_records), seed=int(c.seed),
                                       sizes=tuple(c.data.maze_sizes), filename="train.jsonl.tmp")
            if local != data_dir:
                storage.copy_tree(local, data_dir)
                shutil.rmtree(local)
            storage.replace(storage.join(data_dir, "train.jsonl.tmp"), out)
        _wait_for(out)
        return out, None
    from ilvr_jax.data.adapters import convert_to_jsonl

    if jax.process_index() == 0:
        convert_to_jsonl(c.data.adapter, c.data.train_path, out, root)
    _wait_for(out)
    return out, None


def _wait_for(path: str, timeout: float = 120.0) -> None:
    """After process 0 wrote ``path`` (the barrier: it failing ends the others too), the
    file must appear on every host; a network filesystem may show it a little later."""
    distributed.barrier("ilvr data")
    t0 = time.time()
    while not storage.exists(path):
        if time.time() - t0 > timeout:
            raise ConfigError(f"{path}: written by process 0 but not visible to process {jax.process_index()} "
                              f"after {timeout:.0f}s; the workdir must be on a filesystem shared by all hosts")
        time.sleep(1.0)


def data_config(c: ml_collections.ConfigDict, stage_batch_per_process: int, image_cfg=None):
    """The pipeline's DataConfig; the pixel budgets are ``image_cfg``'s (the run's resolved
    processor settings, ``run_model.image_config``), else Qwen2.5-VL's defaults with the
    config's overrides (no model directory at hand, e.g. the AOT fit check)."""
    from ilvr_jax.data.pipeline import DataConfig

    image_cfg = image_cfg or run_model.resolve_image_config(c)

    return DataConfig(
        batch_size=stage_batch_per_process,
        max_length=int(c.data.max_length),
        buckets=_parse_buckets(c.data.buckets),
        bucket_patches=_parse_bucket_patches(c.data.bucket_patches),
        max_question_images=int(c.data.max_question_images),
        max_question_patches=int(c.data.max_question_patches),
        max_helper_patches=int(c.data.max_helper_patches),
        max_segments=int(c.data.max_segments),
        latent_size=int(c.ilvr.latent_size),
        answer_format=str(c.data.answer_format) or None,  # "" = the plan alone (reference)
        min_pixels=image_cfg.min_pixels,
        max_pixels=image_cfg.max_pixels,
        seed=int(c.seed),
        shuffle=bool(c.data.shuffle),
        num_epochs=None if int(c.train.num_steps) > 0 else int(c.train.num_epochs),
        drop_remainder=bool(c.data.drop_remainder),
        drop_policy=c.data.drop_policy,
        worker_count=int(c.data.worker_count),
    )


def _parse_shapes(key: str, text: str, item, form: str):
    """A shape-list key: "auto", "" (None: the maxima) or comma-separated items (``item``
    parses one)."""
    text = str(text).strip()
    if text in ("auto", ""):
        return text or None
    try:
        return tuple(item(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"{key} must be 'auto', '' or comma-separated {form}, got {text!r}") from None


def _parse_buckets(text: str):
    """``data.buckets``: "auto", "" (one bucket of max_length) or "512,2048"."""
    return _parse_shapes("data.buckets", text, int, "lengths")


def _parse_bucket_patches(text: str):
    """``data.bucket_patches``: "auto", "" (the max_*_patches) or "Q:H,Q:H"."""
    return _parse_shapes("data.bucket_patches", text, lambda pair: tuple(int(x) for x in pair.split(":")),
                         "question:helper pairs")


# ----------------------------------------------------------------------------- the run
def attention_impl(c: ml_collections.ConfigDict, platform: str) -> str:
    """``model.attn_impl`` resolved for ``platform`` ('auto': splash on TPUs, cuDNN flash
    attention on GPUs in bf16/fp16, XLA otherwise: cuDNN has no fp32 kernel)."""
    return layers.resolve_attention_impl(c.model.attn_impl, platform, c.model.compute_dtype)


STAGE2_WINDOW_ROUND = 16
AOT_LATER_CHUNK = 256   # stage2_chunk_len='auto' without data (the AOT check): later chunks this long


def stage2_windows(text, later_chunk_len: int | None,
                   first_chunk_len: int | None = None) -> tuple[int | None, int | None]:
    """``train.stage2_chunk_len`` -> the recurrence's (first, rest) windows (None = the
    sequence length). "auto": the first chunk in a window of the data's longest first
    chunk (``first_chunk_len``; the sequence length when None), the later ones in the
    data's longest later chunk (``later_chunk_len``), each rounded up to a multiple of 16
    (from the record sizes), so the step costs about one forward and every batch fits.
    "FIRST,REST": given widths, 0 = the sequence length."""
    text = str(text).strip()
    if text == "auto":
        if later_chunk_len is None:
            later_chunk_len = AOT_LATER_CHUNK
        def window(n: int) -> int:
            return -(-max(int(n), 1) // STAGE2_WINDOW_ROUND) * STAGE2_WINDOW_ROUND

        return (None if first_chunk_len is None else window(first_chunk_len)), window(later_chunk_len)
    parts = [p.strip() for p in text.strip("()[]").split(",") if p.strip()]
    try:
        widths = [int(p) for p in parts]
    except ValueError:
        widths = []
    if len(widths) != 2 or min(widths) < 0:
        raise ValueError(f"train.stage2_chunk_len must be 'auto' or 'FIRST,REST' window widths >= 0 "
                         f"(0 = the sequence length), got {text!r}")
    return tuple(w or None for w in widths)


def step_config(c: ml_collections.ConfigDict, model_cfg: ModelConfig,
                later_chunk_len: int | None = None, first_chunk_len: int | None = None
                ) -> step_lib.StepConfig:
    """The compiled step's settings from the config. ``later_chunk_len`` /
    ``first_chunk_len``: the data's longest stage-2 text chunk after the first, and its
    longest first chunk (for ``train.stage2_chunk_len='auto'``)."""
    return step_lib.StepConfig(
        model=model_cfg,
        stage=int(c.stage),
        latent_size=int(c.ilvr.latent_size),
        top_p=float(c.ilvr.top_p),
        num_candidates=int(c.ilvr.num_candidates),
        ema_decay=float(c.ilvr.ema_decay),
        ce_weight=float(c.ilvr.ce_weight),
        sim_weight=float(c.ilvr.sim_weight),
        noise_scale=float(c.ilvr.noise_scale),
        grad_accum_steps=int(c.optim.grad_accum_steps),
        compute_dtype=DTYPES[c.model.compute_dtype],
        teacher_dtype=DTYPES[c.ilvr.teacher_dtype],
        remat_policy=c.model.remat_policy,
        attn_impl=attention_impl(c, jax.default_backend()),
        frozen_patterns=tuple(c.optim.frozen),
        nan_policy=c.train.nan_policy,
        loss_normalization=c.train.loss_normalization,
        stage2_chunk_len=stage2_windows(c.train.stage2_chunk_len, later_chunk_len, first_chunk_len),
        stage2_unroll=bool(c.train.stage2_unroll),
        ce_chunk=int(c.model.ce_chunk),
        target_selection=str(c.ilvr.target_selection),
    )


def _host_batch_checks(batch: dict[str, np.ndarray], scfg: step_lib.StepConfig) -> None:
    """Bad segment layouts fail here, naming the sample, never as a wrong loss in jit.
    Padding samples (``sample_mask`` False) carry no targets and are not checked."""
    ilvr.validate_segments(batch["input_ids"], batch["attention_mask"], batch["latent_starts"],
                           batch["segment_mask"], batch["helper_grid_thw"], batch["assistant_start"],
                           scfg.latent_size, scfg.token_ids, p=scfg.top_p,
                           merge_unit=scfg.model.vision.merge_unit, sample_mask=batch["sample_mask"])
    if scfg.stage == 2:
        from ilvr_jax.ilvr import recurrence

        recurrence.check_chunk_len(batch["latent_starts"], batch["segment_mask"] & batch["sample_mask"][:, None],
                                   scfg.latent_size, batch["input_ids"].shape[1], scfg.stage2_chunk_len,
                                   batch["attention_mask"])


def _to_global(batch: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, print_config: bool = True
                       ) -> dict[str, float]:
    """Runs (or resumes) a training run; returns the last logged metrics (of an earlier start
    when this one had no step left to run). The resolved config is saved as
    ``WORKDIR/config.json`` and, with ``print_config``, printed.

    Raises ``ConfigError`` (before any model, data or device work) for a config that cannot
    run, ``TrainingDiverged`` when the loss turns non-finite under ``nan_policy='stop'``
    (the checkpoints written so far are left as they are)."""
    metrics_lib.setup_logging()
    c = config
    validate_config(c, workdir)
    if c.mesh.distributed:
        try:
            distributed.initialize(c.mesh.coordinator_address, c.mesh.num_processes, c.mesh.process_id,
                                   c.mesh.local_device_ids)
        except distributed.DistributedInitError as e:
            raise ConfigError(f"mesh.distributed=True, but {e}; on a single host set "
                              "--config.mesh.distributed=False") from None
    mesh = check_mesh(c)
    workdir = storage.abspath(workdir)
    storage.makedirs(workdir)
    if jax.process_index() == 0:
        if print_config:
            print("resolved config:\n" + str(c), flush=True)
        storage.write_text(storage.join(workdir, "config.json"), c.to_json_best_effort(indent=2, sort_keys=True))

    try:
        model_cfg, params, tok_dir = run_model.prepare_model(c, workdir)
        # Every process has written the run's model files before process 0 rewrites the
        # processor file with the run's pixel budgets (a late copy would undo it).
        distributed.barrier("ilvr model files")
        image_cfg = run_model.image_config(c, tok_dir)
    except run_model.ModelSetupError as e:
        raise ConfigError(str(e)) from None
    train_path, root = prepare_data(c, workdir)
    from ilvr_jax.data.pipeline import DataPipeline

    per_process = int(c.data.batch_size) // jax.process_count()
    try:
        dcfg = data_config(c, per_process, image_cfg)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    pipe = DataPipeline.from_jsonl(train_path, tok_dir, dcfg, root=root, image_cfg=image_cfg)
    info = pipe.describe()
    logger.info("data: %s", json.dumps(info))
    if pipe.num_records == 0:
        raise ConfigError(f"{train_path}: no usable records (dropped: {info['dropped']})")
    total_steps = int(c.train.num_steps) if int(c.train.num_steps) > 0 else \
        int(c.train.num_epochs) * pipe.plan.batches_per_epoch
    tx, schedule = opt_lib.make_optimizer(lr=float(c.optim.lr), weight_decay=float(c.optim.weight_decay),
                                          warmup_steps=int(c.optim.warmup_steps), total_steps=total_steps,
                                          clip_norm=float(c.optim.clip_norm), schedule=c.optim.schedule)
    firsts = [it.size.first_chunk_len for it in pipe.items]
    scfg = step_config(c, model_cfg, later_chunk_len=max(
        [it.size.later_chunk_len or 0 for it in pipe.items], default=0),
        first_chunk_len=None if not firsts or None in firsts else max(firsts))
    if scfg.stage == 2:
        logger.info("stage-2 text-chunk windows (first, later): %s", scfg.stage2_chunk_len)

    # Abstract state -> shardings; restore or initialise.
    param_shapes = jax.eval_shape(lambda: qwen25vl.init_params(model_cfg, jax.random.PRNGKey(0)))
    abstract = jax.eval_shape(lambda p: step_lib.init_train_state(p, tx, scfg, jax.random.PRNGKey(0)),
                              param_shapes)
    st_sh = step_lib.state_shardings(mesh, abstract, scfg, tx)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, st_sh)
    best_metric = str(c.train.keep_best_metric)
    manager = ckpt_lib.make_manager(workdir, save_every=int(c.train.checkpoint_every),
                                    keep=int(c.train.keep_checkpoints),
                                    async_save=bool(c.train.async_checkpoints), best_metric=best_metric)
    restored = ckpt_lib.restore_latest(manager, abstract)
    if restored is not None:
        start_step, state, data_state = restored
        logger.info("resumed from %s at step %d", manager.directory, start_step)
    else:
        start_step, data_state = 0, None
        if c.stage == 2:
            src = ckpt_lib.resolve_step_dir(c.train.init_from)
            logger.info("stage 2: student parameters from %s", src)
            params = _restore_params(src, abstract.params)
        params = jax.tree.map(lambda x, a: jax.device_put(np.asarray(x, a.dtype), a.sharding), params,
                              abstract.params)
        init = jax.jit(lambda p, r: step_lib.init_train_state(p, tx, scfg, r), out_shardings=st_sh)
        state = init(params, jax.random.PRNGKey(int(c.seed)))
    del params
    try:
        it = distributed.data_iterator(pipe, data_state)   # checkpoints carry every process's position
    except ValueError as e:
        if data_state is None:
            raise
        raise ConfigError(_data_state_mismatch(manager, start_step, c)) from e

    # One compiled program per bucket shape (jit caches them); the shardings depend on ranks only.
    from ilvr_jax.data.pipeline import BATCH_DTYPES

    shapes = pipe.batch_shapes()
    logger.info("batch shapes (one compile each): %s", "; ".join(
        f"S={s['input_ids'][1]} question patches={s['pixel_values'][1]} helper patches={s['helper_pixel_values'][1]}"
        for s in shapes))
    batch_shapes = {k: jax.ShapeDtypeStruct((int(c.data.batch_size),) + tuple(v[1:]), BATCH_DTYPES[k])
                    for k, v in shapes[0].items()}
    b_sh = step_lib.batch_shardings(mesh, batch_shapes)
    train = step_lib.compile_train_step(scfg, tx, schedule, mesh, abstract, batch_shapes)

    vision_trainable = not any(p.startswith("visual") for p in scfg.frozen_patterns)

    def batch_flops(batch: dict[str, np.ndarray]) -> float:
        return metrics_lib.step_flops(
            model_cfg, stage=scfg.stage, batch=int(c.data.batch_size), seq_len=batch["input_ids"].shape[1],
            question_patches=batch["pixel_values"].shape[1], helper_patches=batch["helper_pixel_values"].shape[1],
            vision_trainable=vision_trainable)

    thr = metrics_lib.Throughput(0.0, jax.device_count(), metrics_lib.peak_flops_per_device())
    writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0, resume_step=start_step)
    eval_hook = evaluation.EvalHook(c, workdir, train_path, model_cfg, tok_dir, image_cfg, mesh) \
        if int(c.train.eval_every) > 0 else None
    config_json = json.loads(c.to_json_best_effort())
    last: dict[str, float] = {}
    logger.info("training steps %d..%d (stage %d, %d devices, mesh %s)", start_step, total_steps, scfg.stage,
                jax.device_count(), dict(mesh.shape))
    step = start_step
    best_acc: list[float] = []   # the best-metric values since the last checkpoint
    kept = metrics_lib.KeptStepMetrics()   # device metrics of the steps not read yet

    def read_kept() -> dict[str, float | bool]:
        """Reads the kept steps' metrics (one transfer, waiting for the device) and applies
        the NaN policy to each step in order; returns the newest step's values."""
        newest: dict[str, float | bool] = {}
        for kept_step, mh, flops in kept.read():
            if not mh["finite"]:
                msg = (f"non-finite loss or gradient at step {kept_step} (loss={mh['loss']}, "
                       f"grad_norm={mh['grad_norm']})")
                if scfg.nan_policy == "stop":
                    # Nothing of this step or a later one is saved: every save reads first.
                    raise TrainingDiverged(f"{msg}; training stopped (train.nan_policy='stop'). The last "
                                           f"checkpoint in {manager.directory} is from before this step.")
                logger.warning("%s; the update was skipped (train.nan_policy='skip')", msg)
            if kept_step != start_step + 1:   # this process's first step includes compilation
                thr.update(mh["tokens"], flops)
            if best_metric and mh["finite"]:
                best_acc.append(mh[best_metric])
            newest = mh
        return newest

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=start_step, disable=jax.process_index() != 0,
               dynamic_ncols=True, file=sys.stdout, desc=f"stage {scfg.stage}")
    with preemption.catch_stop_signals() as stop_request:
        try:
            while step < total_steps:
                if distributed.agreed_stop_signal(stop_request) is not None:   # all processes stop at one step
                    read_kept()
                    _stop_with_checkpoint(stop_request, manager, step, start_step, state, it, config_json)
                try:
                    host_batch = next(it)
                except StopIteration:
                    logger.info("data exhausted at step %d", step)
                    read_kept()
                    if step > start_step and manager.latest_step() != step:
                        ckpt_lib.save(manager, step, state, it.get_state(), config_json, force=True)
                    break
                _host_batch_checks(host_batch, scfg)
                state, m = train(state, _to_global(host_batch, b_sh))
                step += 1
                bar.update(1)
                kept.add(step, m, batch_flops(host_batch))
                # Without a bound the host runs ahead as far as the data allows (measured: 30 steps
                # after 150 on the demo), and a SIGTERM waits for all of them before the save.
                kept.wait_for_lag(int(c.train.max_steps_ahead))
                log_due = step % int(c.train.log_every) == 0 or step == total_steps
                eval_due = eval_hook is not None and eval_hook.due(step, total_steps)
                save_due = step == total_steps or manager.should_save(step)
                # The host waits for the device only here; the first step is read at once so
                # that the throughput clock starts after it (it includes compilation).
                if log_due or eval_due or save_due or step == start_step + 1:
                    mh = read_kept()
                    if step == start_step + 1:
                        thr.skip()
                if log_due:
                    scalars = {k: v for k, v in mh.items() if k != "finite"}
                    scalars.update(thr.read())   # tokens_per_s, step_time_s, tflops_per_device, mfu (None: unknown)
                    writer.write(step, scalars, extra={"batch_fingerprint": distributed.batch_fingerprint(host_batch),
                                                       "finite": mh["finite"]})
                    last = {k: v for k, v in scalars.items() if v is not None}
                    bar.set_postfix({k: f"{scalars[k]:.4g}" for k in ("loss", "ce", "sim", "kstar") if k in scalars})
                    logger.info("step %d: %s", step, metrics_lib.format_scalars(scalars))
                if eval_due:
                    writer.write(step, eval_hook(step, state.params))
                    thr.skip()           # the evaluation's time is not a training step's
                # Ranks checkpoints for train.keep_best_metric: the mean since the previous one.
                ckpt_metrics = {best_metric: float(np.mean(best_acc))} if best_metric and best_acc else None
                # The data position is read (a gather across processes) only for a save.
                if save_due and ckpt_lib.save(manager, step, state, it.get_state(), config_json,
                                              force=step == total_steps, metrics=ckpt_metrics):
                    best_acc = []
        finally:
            bar.close()
            manager.wait_until_finished()
            writer.close()
    if c.train.export_at_end:
        host_params = distributed.fetch_to_host(state.params)   # every process: params may span processes
        if jax.process_index() == 0:
            from ilvr_jax.checkpoint.hf import export_params_to_hf

            out = storage.join(workdir, "export_hf")
            source = run_model.source_config(workdir)
            export_params_to_hf(host_params, model_cfg, out, tok_dir,
                                dtype=run_model.source_dtype(source), source_config=source)
            logger.info("exported the student to %s", out)
        del host_params
        distributed.barrier("ilvr export")   # no process exits while process 0 still writes
    logger.info("done at step %d: checkpoints in %s, TensorBoard logs in %s", step, manager.directory,
                writer.path)
    if not last:   # nothing ran in this start: the last metrics logged before it
        path = storage.join(workdir, metrics_lib.METRICS_FILE)
        logged = metrics_lib.read_jsonl(path) if storage.isfile(path) else []
        last = {k: v for k, v in (logged[-1] if logged else {}).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    return last


def _stop_with_checkpoint(request: preemption.StopRequest, manager, step: int, start_step: int, state, it,
                          config_json) -> None:
    """Saves the state at ``step`` (data position included) and raises ``Stopped``."""
    if step > start_step and manager.latest_step() != step:
        ckpt_lib.save(manager, step, state, it.get_state(), config_json, force=True)
        manager.wait_until_finished()
        saved = f"checkpoint of step {step} saved in {manager.directory}"
    elif manager.latest_step() is not None:
        saved = f"the newest checkpoint is step {manager.latest_step()} in {manager.directory}"
    else:
        saved = "no step had run, nothing to save"
    raise preemption.Stopped(f"stopped by {request.name} at step {step}: {saved}; rerun the same command to resume",
                             request.signal)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _data_state_mismatch(manager, step: int, c: ml_collections.ConfigDict) -> str:
    """Why the checkpoint's data position does not fit this run: the data keys (and the others
    the batches depend on) that differ from the config saved with the checkpoint."""
    saved = ckpt_lib.restore_json_item(storage.join(str(manager.directory), str(step)), ckpt_lib.CONFIG)
    old, new = _flatten(saved), _flatten(json.loads(c.to_json_best_effort()))
    relevant = [k for k in sorted(set(old) | set(new)) if k.startswith("data.") or k in (
        "seed", "ilvr.latent_size", "train.num_epochs", "optim.grad_accum_steps")]
    absent = "(absent)"
    changed = [f"{k} {old.get(k, absent)!r} -> {new.get(k, absent)!r}" for k in relevant
               if old.get(k, absent) != new.get(k, absent)]
    where = f"the checkpoint of step {step} in {manager.directory}"
    if changed:
        return (f"{where} was written with other data settings: {'; '.join(changed)}. Resume with the old "
                "values, or start a new --workdir")
    return (f"{where} was written for other data: the records or their images changed, or the process count "
            "did; resume with the same data, or start a new --workdir")


def _restore_params(step_dir: str, abstract_params: Any) -> Any:
    restored = ckpt_lib.restore_state_item(step_dir, only=("params",))
    params = restored["params"]
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    want = jax.tree.map(lambda a: tuple(a.shape), abstract_params)
    if got != want:
        raise ConfigError(f"{step_dir}: the stage-1 parameters do not match this model config")
    return params
