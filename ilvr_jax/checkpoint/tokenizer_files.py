"""Tokenizer files that every transformers version reads (4.5x and 5.x).

transformers 5's ``save_pretrained`` writes ``tokenizer_config.json`` with
``extra_special_tokens`` as a list and the chat template only as ``chat_template.jinja``;
transformers 4.5x expects a mapping there (``'list' object has no attribute 'keys'``) and
reads the template from ``tokenizer_config.json`` / ``chat_template.json``. The hub's own
files (written by 4.4x) are read by both, so :func:`write_hub_tokenizer_config` rewrites a
saved tokenizer directory into that layout: ``additional_special_tokens``,
``added_tokens_decoder`` (from ``tokenizer.json``), ``chat_template`` in
``tokenizer_config.json`` and in ``chat_template.json``. ``tokenizer.json`` itself (the
fast tokenizer, with every added token) is read alike by all versions and is not touched.
"""

from __future__ import annotations

from typing import Any

from ilvr_jax import storage
from ilvr_jax.jsonfile import read_json, write_json

TOKENIZER_CONFIG = "tokenizer_config.json"
# Keys transformers 5 writes that describe the saving process, not the tokenizer.
_RUNTIME_KEYS = ("backend", "is_local", "local_files_only", "extra_special_tokens")


def _write_hub(path: str, obj: Any) -> None:
    write_json(path, obj, sort_keys=False)   # the hub's files keep their key order


def chat_template(tok_dir: str, config: dict[str, Any] | None = None) -> str | None:
    """The directory's chat template: ``tokenizer_config.json``, ``chat_template.jinja`` or
    ``chat_template.json``, in that order."""
    if config and isinstance(config.get("chat_template"), str):
        return config["chat_template"]
    jinja = storage.join(tok_dir, "chat_template.jinja")
    if storage.isfile(jinja):
        return storage.read_text(jinja)
    js = storage.join(tok_dir, "chat_template.json")
    if storage.isfile(js):
        return read_json(js).get("chat_template")
    return None


def load_chat_tokenizer(tok_dir: str, error: type[Exception] = ValueError):
    """The tokenizer of ``tok_dir`` (a cloud directory through a local copy: transformers reads
    local files only) with its chat template, taken from the template files when the tokenizer
    config carries none. Failures raise ``error`` with one line naming the directory."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(storage.local_copy(tok_dir))
    except Exception as e:  # noqa: BLE001 (transformers raises many kinds; report one line)
        msg = str(e).splitlines()[0] if str(e) else ""
        raise error(f"{tok_dir}: the tokenizer files cannot be loaded ({type(e).__name__}: {msg})") from None
    if not getattr(tok, "chat_template", None):
        tok.chat_template = chat_template(tok_dir)
    if not tok.chat_template:
        raise error(f"{tok_dir}: no chat template (tokenizer_config.json, chat_template.json and "
                    "chat_template.jinja have none); ILVR prompts need Qwen2.5-VL's template")
    return tok


def write_hub_tokenizer_config(tok_dir: str) -> None:
    """Rewrites ``tok_dir/tokenizer_config.json`` (and ``chat_template.json``) in the hub's
    layout; see the module docstring. A directory without ``tokenizer.json`` is left alone."""
    cfg_path = storage.join(tok_dir, TOKENIZER_CONFIG)
    tok_json = storage.join(tok_dir, "tokenizer.json")
    if not (storage.isfile(cfg_path) and storage.isfile(tok_json)):
        return
    cfg = read_json(cfg_path)
    extra = cfg.get("extra_special_tokens")
    additional = list(cfg.get("additional_special_tokens") or [])
    if isinstance(extra, list):
        additional += [t for t in extra if t not in additional]
    elif isinstance(extra, dict):
        # Named extra tokens (transformers 5's mapping form) stay; 4.5x reads the mapping too.
        cfg["extra_special_tokens"] = extra
    out = {k: v for k, v in cfg.items() if k not in _RUNTIME_KEYS or (k == "extra_special_tokens" and isinstance(v, dict))}
    if additional:
        out["additional_special_tokens"] = additional
    added = read_json(tok_json).get("added_tokens") or []
    out["added_tokens_decoder"] = {
        str(t["id"]): {k: t.get(k, False) for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in sorted(added, key=lambda t: t["id"])
    }
    template = chat_template(tok_dir, cfg)
    if template:
        out["chat_template"] = template
        _write_hub(storage.join(tok_dir, "chat_template.json"), {"chat_template": template})
    _write_hub(cfg_path, out)
