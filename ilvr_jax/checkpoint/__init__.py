"""Weights in and out: HF Qwen2.5-VL directories <-> our parameter tree <-> orbax.

``hf``: the name map and transforms, ``load_hf_params`` / ``save_hf``;
``orbax_io``: ``save_params`` / ``restore_params`` (config saved beside as JSON);
``latent_tokens``: adding the ILVR latent tokens to a tokenizer and the embedding.
"""

from ilvr_jax.checkpoint.hf import (
    LAYOUTS,
    NAME_MAP,
    export_params_to_hf,
    load_hf_params,
    param_shapes,
    save_hf,
    select_model_params,
)

_LAZY = {
    "save_params": "ilvr_jax.checkpoint.orbax_io",
    "restore_params": "ilvr_jax.checkpoint.orbax_io",
    "restore_config": "ilvr_jax.checkpoint.orbax_io",
    "add_latent_tokens": "ilvr_jax.checkpoint.latent_tokens",
}


def __getattr__(name):
    # orbax and tokenizers are imported only when used: loading HF weights needs neither.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = [
    "LAYOUTS",
    "NAME_MAP",
    "export_params_to_hf",
    "load_hf_params",
    "param_shapes",
    "save_hf",
    "select_model_params",
    *_LAZY,
]
