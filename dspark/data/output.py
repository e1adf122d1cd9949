"""Ordered, crash-safe, resumable jsonl output for regeneration.

Rows are appended to ``<path>.partial`` in their final order, each batch of complete lines flushed and fsynced
before the next, so a process killed at any point leaves a file of complete rows plus at most one torn line.
``<path>.state.json`` (written atomically first) records the settings the rows were made with. Opening the
output again with the same settings resumes: the torn tail is cut off, the rows already written are returned
and the caller continues after them. When every row is in, ``finish`` renames the partial file to ``<path>``
(atomic) and marks the state complete, so rerunning a finished job does nothing. A partial file made with other
settings is refused with the setting that differs: silently discarding it or mixing the two is exactly how
resumed regeneration loses or duplicates conversations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STATE_VERSION = 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _differences(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k, '<unset>')!r:.60} -> {new.get(k, '<unset>')!r:.60}" for k in keys
             if old.get(k) != new.get(k)]
    return "; ".join(diffs[:3]) or "none"


class ResumableJsonl:
    """Append-only rows for ``path`` that survive ``kill -9`` and resume; see the module docstring.

    ``settings`` is a JSON-serialisable dict of everything that changes the rows (not batch size or ranks).
    After construction ``rows`` holds the rows already written (empty on a fresh start) and ``complete`` says
    whether ``path`` is already finished with these settings. ``restart=True`` discards a partial file.
    """

    def __init__(self, path: str | os.PathLike, settings: dict, restart: bool = False):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.state_path = self.path.with_name(self.path.name + ".state.json")
        self.settings = json.loads(json.dumps(settings))  # normalised as it will be read back
        self.rows: list[dict] = []
        self._ends: list[int] = []  # byte offset after each row, for truncate
        self._file = None
        self.complete = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = self._read_state()
        same = state is not None and state.get("settings") == self.settings
        if same and state.get("complete") and self.path.is_file() and not self.partial.exists():
            self.complete = True
            return
        if self.partial.exists() and not same and not restart:
            old = state.get("settings", {}) if state else {}
            num = sum(1 for _ in self.partial.open("rb"))
            raise ValueError(
                f"{self.partial} holds {num} rows regenerated with other settings ({_differences(old, self.settings)}"
                f"); rerun with the same settings to finish it, or pass --restart to discard it")
        if same and self.partial.exists() and not restart:
            self.rows = self._read_partial()
        else:
            self.partial.unlink(missing_ok=True)
            _write_atomic(self.state_path, json.dumps({"version": STATE_VERSION, "settings": self.settings,
                                                       "complete": False}, indent=1) + "\n")
        self._file = open(self.partial, "ab")

    def _read_state(self) -> dict | None:
        if not self.state_path.is_file():
            return None
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None  # torn by a crash before its atomic rename cannot happen; a hand-edited file: start over
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.state_path} has state version {state.get('version')!r}, this dspark reads "
                             f"version {STATE_VERSION}: finish it with the dspark that wrote it or delete it")
        return state

    def _read_partial(self) -> list[dict]:
        """Complete rows of the partial file; a torn last line (no newline, or unparsable) is cut off."""
        rows, good = [], 0
        with open(self.partial, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        for line_no, line in enumerate(lines[:-1], start=1):  # the last piece has no newline: torn or empty
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if line_no < len(lines) - 1:
                    raise ValueError(f"{self.partial}:{line_no}: malformed JSON inside the file (not a torn last "
                                     f"line); the partial output is damaged, pass --restart to discard it") from None
                break
            good += len(line) + 1
            self._ends.append(good)
        if good < len(data):
            with open(self.partial, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        return rows

    def truncate(self, num_rows: int) -> None:
        """Keep only the first ``num_rows`` rows (the caller restarts on a batch boundary)."""
        if num_rows >= len(self.rows):
            return
        size = self._ends[num_rows - 1] if num_rows else 0
        self._file.flush()
        os.truncate(self.partial, size)
        os.fsync(self._file.fileno())
        self.rows, self._ends = self.rows[:num_rows], self._ends[:num_rows]

    def append(self, rows: list[dict]) -> None:
        """Append ``rows`` as complete lines and fsync them before returning."""
        if not rows:
            return
        lines = [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows]
        self._file.write(b"".join(lines))
        self._file.flush()
        os.fsync(self._file.fileno())
        end = self._ends[-1] if self._ends else 0
        for line in lines:
            end += len(line)
            self._ends.append(end)
        self.rows.extend(rows)

    def finish(self) -> Path:
        """Move the finished rows to ``path`` (atomic rename) and mark the state complete."""
        self._file.close()
        os.replace(self.partial, self.path)
        _fsync_dir(self.path.parent)
        _write_atomic(self.state_path, json.dumps({"version": STATE_VERSION, "settings": self.settings,
                                                   "complete": True}, indent=1) + "\n")
        return self.path

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
