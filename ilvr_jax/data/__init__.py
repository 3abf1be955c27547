"""Input side: canonical records -> token ids, labels, latent segments, patches -> fixed-shape batches.

Modules: ``records`` (the canonical JSONL record, validation, drop policy), ``processor``
(Qwen2.5-VL image preprocessing and chat prompt, HF-identical), ``segments`` (one record ->
one sample), ``checks`` (the record checks shared by the pipeline and ``validate``),
``buckets`` (batch shapes derived from the data), ``pipeline`` (grain pipeline -> contract
batches), ``workers`` (worker processes that die with their parent). The data package never
imports ``ilvr_jax.model``: token ids come from the tokenizer as plain ints.

Typical use::

    from ilvr_jax.data import DataConfig, DataPipeline
    cfg = DataConfig(batch_size=4, buckets="auto", bucket_patches="auto")
    pipe = DataPipeline.from_jsonl("train.jsonl", "path/to/tokenizer_dir", cfg)
    pipe.batch_shapes()               # per bucket: array name -> shape (one compiled step each)
    it = pipe.iterator()              # or pipe.iterator(saved_state)
    batch = next(it)                  # dict of numpy arrays, see pipeline.py
    state = it.get_state()            # JSON-serialisable
"""

from __future__ import annotations

import importlib

# Light names import eagerly; the pipeline (grain) on first use.
from ilvr_jax.data.records import (  # noqa: F401
    DropCounter,
    DropPolicy,
    LocatedRecord,
    RecordError,
    latent_step,
    load_records,
    make_record,
    read_jsonl,
    text_step,
    validate_record,
    write_jsonl,
)

_LAZY = {
    "ImageProcessorConfig": "ilvr_jax.data.processor",
    "preprocess_image": "ilvr_jax.data.processor",
    "preprocess_images": "ilvr_jax.data.processor",
    "build_prompt_ids": "ilvr_jax.data.processor",
    "smart_resize": "ilvr_jax.data.processor",
    "SequenceFormat": "ilvr_jax.data.segments",
    "SpecialIds": "ilvr_jax.data.segments",
    "Sample": "ilvr_jax.data.segments",
    "build_sample": "ilvr_jax.data.segments",
    "tokenize_record": "ilvr_jax.data.segments",
    "RecordChecker": "ilvr_jax.data.checks",
    "RecordLimits": "ilvr_jax.data.checks",
    "Bucket": "ilvr_jax.data.buckets",
    "DataConfig": "ilvr_jax.data.config",
    "DataPipeline": "ilvr_jax.data.pipeline",
    "BatchIterator": "ilvr_jax.data.pipeline",
    "BATCH_KEYS": "ilvr_jax.data.pipeline",
    "BATCH_DTYPES": "ilvr_jax.data.pipeline",
    "make_iterator": "ilvr_jax.data.pipeline",
    "save_state": "ilvr_jax.data.pipeline",
    "load_state": "ilvr_jax.data.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ilvr_jax.data' has no attribute {name!r}")
