"""JSON files read and written whole (local or cloud paths, ``ilvr_jax.storage``): a local
write goes to a temporary file that replaces the target in one rename, so a killed process
never leaves half a file."""

from __future__ import annotations

import json
from typing import Any

from ilvr_jax import storage


def read_json(path: str) -> Any:
    return json.loads(storage.read_text(path))


def write_json(path: str, obj: Any, *, sort_keys: bool = True) -> None:
    storage.write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n")
