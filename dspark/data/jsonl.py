"""One JSONL row as a JSON object, with errors that name the file and line."""

from __future__ import annotations

import json


def parse_object(line: str, where: str, what: str = "a JSON object") -> dict:
    """Parse ``line`` (from ``where`` = "file:line") and require a JSON object; ``what`` describes it in errors."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: malformed JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected {what}, got {type(row).__name__}")
    return row
