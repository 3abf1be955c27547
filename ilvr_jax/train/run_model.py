"""The model side of a run's workdir: what training reads, and what stage 2, export and
evaluation read back, so they all see exactly what training used::

    WORKDIR/model_config.json    architecture + latent token ids and K (ModelConfig.to_hf_dict)
    WORKDIR/source_config.json   the source directory's config.json, verbatim (the export keeps
                                 its fields: max_position_embeddings, vision_token_id, dtype, ...)
    WORKDIR/tokenizer/           the tokenizer WITH the latent tokens, its chat template, and
                                 preprocessor_config.json with the pixel budgets this run trains
                                 with; generation_config.json when the source has one

A stock download has no latent tokens: they are added once here (``add_latent_tokens``),
whatever the source holds (a directory that already carries them, e.g. an earlier export,
keeps its ids), and the embedding table is resized to match. The workdir and the source
directory may be in cloud storage (``ilvr_jax.storage``); transformers reads and writes local
files, so tokenizers pass through local copies.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from typing import Any

import jax
import ml_collections
import numpy as np

from ilvr_jax import storage
from ilvr_jax.checkpoint import tokenizer_files
from ilvr_jax.data import processor as proc
from ilvr_jax.jsonfile import read_json, write_json
from ilvr_jax.model import qwen25vl
from ilvr_jax.model.config import LATENT_TOKENS, ModelConfig

logger = logging.getLogger("ilvr_jax")

MODEL_CONFIG_FILE = "model_config.json"
SOURCE_CONFIG_FILE = "source_config.json"
TOKENIZER_DIR = "tokenizer"
PREPROCESSOR_FILE = "preprocessor_config.json"
# Files of a model directory that travel with the tokenizer but are not written by
# ``tokenizer.save_pretrained`` (copying the tokenizer's own files would overwrite the
# latent tokens added to it).
PROCESSOR_FILES = (PREPROCESSOR_FILE, "video_preprocessor_config.json", "processor_config.json",
                   "chat_template.json", "chat_template.jinja", "generation_config.json")


class ModelSetupError(ValueError):
    """The source model directory cannot be used (one line, naming the file)."""


def source_config(root: str) -> dict[str, Any] | None:
    """The source model's config.json kept in a run's workdir (None for a tiny model)."""
    path = storage.join(root, SOURCE_CONFIG_FILE)
    return read_json(path) if storage.isfile(path) else None


def source_dtype(source: dict[str, Any] | None) -> str | None:
    """The dtype the source model was stored in ("bfloat16" for a hub download), or None."""
    if not source:
        return None
    dt = source.get("torch_dtype") or source.get("dtype") or (source.get("text_config") or {}).get("dtype")
    return dt if dt in ("float32", "bfloat16") else None


def load_source_tokenizer(src_dir: str):
    """The tokenizer of a model directory, with its chat template (from the processor files
    when the tokenizer config carries none)."""
    return tokenizer_files.load_chat_tokenizer(src_dir, error=ModelSetupError)


def prepare_model(c: ml_collections.ConfigDict, workdir: str) -> tuple[ModelConfig, Any, str]:
    """(model config, initial params or None for stage 2, tokenizer dir with latent tokens).

    Stage 1 reads ``model.hf_dir`` (or builds the tiny model), adds the latent tokens once and
    writes the files of the module docstring; stage 2 copies them from ``train.init_from``."""
    from ilvr_jax.train import checkpoints as ckpt_lib

    tok_dir = storage.join(workdir, TOKENIZER_DIR)
    cfg_path = storage.join(workdir, MODEL_CONFIG_FILE)
    K = int(c.ilvr.latent_size)
    if c.stage == 2:
        src = ckpt_lib.run_root(c.train.init_from)
        src_cfg = storage.join(src, MODEL_CONFIG_FILE)
        cfg = ModelConfig.from_hf(src_cfg if storage.is_local(src_cfg) else read_json(src_cfg))
        if cfg.latent_size not in (None, K):
            logger.warning("stage 1 used latent_size %s, this run uses %d", cfg.latent_size, K)
        cfg = cfg.replace(latent_size=K)
        if storage.abspath(src) != storage.abspath(workdir):
            if not storage.isdir(storage.join(src, TOKENIZER_DIR)):
                raise ModelSetupError(f"{storage.join(src, TOKENIZER_DIR)}: missing (expected the stage-1 "
                                      "run's tokenizer)")
            storage.copy_tree(storage.join(src, TOKENIZER_DIR), tok_dir)
            if storage.isfile(storage.join(src, SOURCE_CONFIG_FILE)):
                storage.copy_file(storage.join(src, SOURCE_CONFIG_FILE), storage.join(workdir, SOURCE_CONFIG_FILE))
        write_json(cfg_path, cfg.to_hf_dict())
        return cfg, None, tok_dir
    from ilvr_jax.checkpoint.latent_tokens import add_latent_tokens

    # Every process of a run writes these files, and they may share the workdir: each builds
    # the directory privately and copies it in file by file, each file whole, so no process
    # reads a file another is halfway through writing.
    storage.makedirs(tok_dir)
    staging = tempfile.TemporaryDirectory(prefix="ilvr_tokenizer_")
    local = staging.name
    if c.model.init == "tiny":
        from ilvr_jax import tiny

        tok = tiny.build_tokenizer()
        cfg = ModelConfig.from_hf(tiny.hf_config(tok, c.model.tiny_shape, latent_size=K))
        params = jax.jit(qwen25vl.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(int(c.seed)))
        params = jax.tree.map(np.asarray, params)
    else:
        from ilvr_jax.checkpoint.hf import copy_tokenizer_files, load_hf_params

        tok = load_source_tokenizer(c.model.hf_dir)
        cfg, params = load_hf_params(c.model.hf_dir)
        copy_tokenizer_files(c.model.hf_dir, local, PROCESSOR_FILES)
        storage.copy_file(storage.join(c.model.hf_dir, "config.json"), storage.join(workdir, SOURCE_CONFIG_FILE))
    had = [t for t in LATENT_TOKENS if t in tok.get_vocab()]
    tok, params, cfg = add_latent_tokens(tok, params, cfg, latent_size=K, resize=c.model.vocab_resize)
    # The tokenizer's own files are written after the processor files, so they carry the latent tokens.
    with staging:
        tok.save_pretrained(local)
        tokenizer_files.write_hub_tokenizer_config(local)
        storage.copy_tree(local, tok_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in LATENT_TOKENS}
    logger.info("latent tokens %s (%s), vocabulary %d rows", ids,
                "already in the source tokenizer" if len(had) == 3 else "added to the tokenizer",
                cfg.text.vocab_size)
    write_json(cfg_path, cfg.to_hf_dict())
    return cfg, params, tok_dir


def resolve_image_config(c: ml_collections.ConfigDict, source: dict[str, Any] | None = None,
                         where: str = "Qwen2.5-VL's defaults") -> proc.ImageProcessorConfig:
    """``source`` (a ``preprocessor_config.json`` dict; Qwen2.5-VL's defaults when empty) with
    ``data.min_pixels`` / ``data.max_pixels`` overriding its pixel budgets when > 0."""
    base = proc.ImageProcessorConfig.from_hf(source) if source else proc.ImageProcessorConfig()
    budgets = {"min_pixels": int(c.data.min_pixels), "max_pixels": int(c.data.max_pixels)}
    cfg = dataclasses.replace(base, **{k: v for k, v in budgets.items() if v > 0})
    if cfg.min_pixels > cfg.max_pixels:
        raise ModelSetupError(f"image pixel budget: min_pixels {cfg.min_pixels} > max_pixels {cfg.max_pixels} "
                              f"(data.min_pixels / data.max_pixels, or {where})")
    return cfg


def image_config(c: ml_collections.ConfigDict, tok_dir: str) -> proc.ImageProcessorConfig:
    """The image processor settings this run trains with: the model's own
    ``preprocessor_config.json`` (Qwen2.5-VL's defaults without one) resolved by
    :func:`resolve_image_config`. Written back into the run's tokenizer dir, so the export's
    processor resizes images as training did."""
    path = storage.join(tok_dir, PREPROCESSOR_FILE)
    source = read_json(path) if storage.isfile(path) else {}
    cfg = resolve_image_config(c, source, path)
    if jax.process_index() == 0:
        write_json(path, preprocessor_dict(cfg, source))
    return cfg


def preprocessor_dict(cfg: proc.ImageProcessorConfig, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """``preprocessor_config.json`` for ``cfg``, keeping the other fields of ``source``. The
    budgets are written both as top-level ``min_pixels`` / ``max_pixels`` (transformers 4.5x
    and the hub's files) and as ``size`` (transformers 5), with the same values, so every
    version resizes alike."""
    d = dict(source or {})
    d.setdefault("image_processor_type", "Qwen2VLImageProcessor")
    d.setdefault("processor_class", "Qwen2_5_VLProcessor")
    d.update({
        "min_pixels": cfg.min_pixels,
        "max_pixels": cfg.max_pixels,
        "size": {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels},
        "patch_size": cfg.patch_size,
        "temporal_patch_size": cfg.temporal_patch_size,
        "merge_size": cfg.merge_size,
        "image_mean": list(cfg.image_mean),
        "image_std": list(cfg.image_std),
        "rescale_factor": cfg.rescale_factor,
    })
    return d
