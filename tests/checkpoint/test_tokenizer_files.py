"""load_chat_tokenizer: the template wherever a directory keeps it, one clear line otherwise."""

from __future__ import annotations

import json
import os

import pytest

from ilvr_jax.checkpoint.tokenizer_files import TOKENIZER_CONFIG, load_chat_tokenizer
from ilvr_jax.tiny import CHAT_TEMPLATE, build_tokenizer


class _SetupError(ValueError):
    pass


def _tokenizer_dir_without_template(path) -> str:
    d = str(path)
    build_tokenizer(d)
    for name in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(d, name)):
            os.remove(os.path.join(d, name))
    cfg_path = os.path.join(d, TOKENIZER_CONFIG)
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.pop("chat_template", None)
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    return d


def test_template_from_the_processor_file_only(tmp_path):
    """The hub's Qwen2.5-VL keeps its template in chat_template.json, not in tokenizer_config."""
    d = _tokenizer_dir_without_template(tmp_path / "tok")
    with open(os.path.join(d, "chat_template.json"), "w", encoding="utf-8") as f:
        json.dump({"chat_template": CHAT_TEMPLATE}, f)
    tok = load_chat_tokenizer(d)
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user" in text


def test_no_template_anywhere_is_one_line_naming_the_directory(tmp_path):
    d = _tokenizer_dir_without_template(tmp_path / "tok")
    with pytest.raises(_SetupError) as e:
        load_chat_tokenizer(d, error=_SetupError)
    msg = str(e.value)
    assert msg.startswith(f"{d}: no chat template") and "\n" not in msg


def test_unreadable_tokenizer_is_one_line_naming_the_directory(tmp_path):
    d = str(tmp_path / "tok")
    build_tokenizer(d)
    with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write("{ not json")
    with pytest.raises(ValueError) as e:
        load_chat_tokenizer(d)
    msg = str(e.value)
    assert msg.startswith(f"{d}: the tokenizer files cannot be loaded") and "\n" not in msg
