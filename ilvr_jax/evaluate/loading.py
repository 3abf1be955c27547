"""What the evaluation commands read: a model (training run or HF directory) with the
tokenizer and image settings it was trained with, and records through a data adapter.

A model is

* a training workdir of ``python -m ilvr_jax.main`` (its newest checkpoint, or ``step``),
  its ``checkpoints`` directory or one step directory: parameters of the student (or, with
  ``teacher``, the momentum teacher), ``model_config.json``, and the run's ``tokenizer/``
  directory (tokenizer with the latent tokens, ``preprocessor_config.json`` with the pixel
  budgets the run trained with);
* an HF Qwen2.5-VL directory (``config.json``, safetensors, tokenizer and
  ``preprocessor_config.json``), e.g. an export of ``python -m ilvr_jax.convert to-hf``, or
  a stock download. A tokenizer without the latent tokens (a stock download: the baseline
  before training) gets them as stage 1 adds them (``add_latent_tokens``: the table resized
  to the tokenizer, new rows the mean of the old ones), so the model is evaluated as
  training starts from it; its K is then the paper's 8 unless ``--latent-size`` says otherwise.

Weights are read from orbax checkpoints or safetensors only; nothing is unpickled. Paths may
be local or in cloud storage (``ilvr_jax.storage``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ilvr_jax import storage
from ilvr_jax.data import processor as proc
from ilvr_jax.data.records import LocatedRecord, read_jsonl
from ilvr_jax.model.config import LATENT_TOKENS, ModelConfig

logger = logging.getLogger("ilvr_jax")

PREPROCESSOR_FILE = "preprocessor_config.json"
# The scorer of each adapter's data set (the canonical layout says nothing about its answers).
ADAPTER_SCORERS = {"comt": "comt", "vsp": "vsp", "maze": "maze", "zebra": "zebra"}
# K of a model that has never been trained with latents: the paper's (configs/stage1.py's
# ilvr.latent_size). It only matters if such a model emits <|latent_start|>.
STOCK_LATENT_SIZE = 8


@dataclasses.dataclass
class LoadedModel:
    """params (numpy tree), cfg, tokenizer, image_cfg, and where they came from."""

    params: Any
    cfg: ModelConfig
    tokenizer: Any
    image_cfg: proc.ImageProcessorConfig
    source: str
    tokenizer_dir: str
    added_latent_tokens: bool = False   # the directory's tokenizer had none (in memory only)


def load_tokenizer(tok_dir: str):
    """The tokenizer of ``tok_dir`` with a chat template (one line naming the directory otherwise)."""
    from ilvr_jax.checkpoint import tokenizer_files

    return tokenizer_files.load_chat_tokenizer(tok_dir)


def image_config(tok_dir: str) -> proc.ImageProcessorConfig:
    """The image settings of ``tok_dir/preprocessor_config.json`` (required: evaluating at
    other pixel budgets than training silently changes the inputs)."""
    path = storage.join(tok_dir, PREPROCESSOR_FILE)
    if not storage.isfile(path):
        raise FileNotFoundError(f"{path}: missing (the image processor settings the model was trained with)")
    return proc.ImageProcessorConfig.from_hf(path)


def load_model(model: str, *, step: int | None = None, teacher: bool = False) -> LoadedModel:
    """A training run / checkpoint step / HF directory -> :class:`LoadedModel` (see module doc)."""
    from ilvr_jax import convert

    if not storage.exists(model):
        raise FileNotFoundError(f"{model}: does not exist")
    if convert.is_training_checkpoint(model):
        path = model
        if step is not None:
            # The checkpoint layout belongs to training; it is read lazily, for this path only.
            from ilvr_jax.train import checkpoints as ckpt_lib

            path = storage.join(ckpt_lib.checkpoint_dir(ckpt_lib.run_root(model)), str(int(step)))
            if not storage.isdir(path):
                raise FileNotFoundError(f"{path}: no checkpoint for --step {step}")
        cfg, params, tok_dir = convert.load_training_params(path, "teacher" if teacher else "student")
        if tok_dir is None:
            raise FileNotFoundError(f"{model}: the run has no tokenizer/ directory")
    else:
        if teacher:
            raise ValueError(f"{model}: --teacher needs a training checkpoint (an HF directory holds one model)")
        if step is not None:
            raise ValueError(f"{model}: --step needs a training workdir")
        if not storage.isfile(storage.join(model, "config.json")):
            raise FileNotFoundError(f"{model}: neither a training workdir nor an HF directory (no config.json)")
        from ilvr_jax.checkpoint.hf import load_hf_params

        cfg, params = load_hf_params(model)
        tok_dir = model
    tok = load_tokenizer(tok_dir)
    missing = [t for t in LATENT_TOKENS if t not in tok.get_vocab()]
    if missing:
        from ilvr_jax.checkpoint.latent_tokens import add_latent_tokens

        rows = cfg.text.vocab_size
        k = cfg.latent_size if cfg.latent_size is not None else STOCK_LATENT_SIZE
        tok, params, cfg = add_latent_tokens(tok, params, cfg, latent_size=k)
        logger.warning("%s: the tokenizer has no %s (a model not trained with latents): added as stage 1 adds "
                       "them, vocabulary %d -> %d rows, K = %d", model, ", ".join(missing), rows,
                       cfg.text.vocab_size, k)
    return LoadedModel(params, cfg, tok, image_config(tok_dir), storage.abspath(model), tok_dir, bool(missing))


def load_records(data: str, adapter: str, *, work_dir: str | None = None) -> list[LocatedRecord | dict]:
    """Records of ``data`` through ``adapter``. ``canonical`` keeps each record's file and
    line for error messages; the other adapters yield checked records with absolute image
    paths (``zebra`` writes its images under ``work_dir/zebra_images``)."""
    from ilvr_jax.data.adapters import get_adapter

    if not storage.exists(data):
        raise FileNotFoundError(f"{data}: does not exist")
    if adapter == "canonical" and storage.isfile(data):
        return list(read_jsonl(data))
    ad = get_adapter(adapter)
    kw: dict[str, Any] = {}
    if adapter == "zebra":
        if work_dir is None:
            raise ValueError("the zebra adapter needs a directory for the images it extracts")
        kw["out_dir"] = storage.join(work_dir, "zebra_images")
    return list(ad.iter_records(data, **kw))
