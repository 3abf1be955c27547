"""JSON files read and written whole: a write goes to a temporary file that replaces the
target in one rename, so a killed process never leaves half a file."""

from __future__ import annotations

import json
import os
from typing import Any


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, obj: Any, *, sort_keys: bool = True) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=sort_keys, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
