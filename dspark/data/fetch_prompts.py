"""``dspark data fetch-prompts``: a training prompt corpus from a Hugging Face dataset or a local file.

Sources: a dataset id on the hub (default ``mlabonne/open-perfectblend``, the reference's Open-PerfectBlend:
``conversations`` of ``{"from": "human"|"gpt", "value": ...}``), read page by page through the datasets server
(no ``datasets`` package needed), or a local ``.jsonl`` / ``.parquet`` file or a directory of them (a downloaded
dataset's shards; parquet is read with ``pyarrow``, streamed, only the prompt columns). Rows may hold
``conversations`` (ShareGPT: from/value), ``messages`` (OpenAI: role/content), ``turns`` (user turns) or
``prompt``. Roles are normalised (human/user -> user; gpt/assistant/model/chatgpt/bard/bing -> assistant; system
dropped: the target answers with its own template). A conversation is kept when its first turn is the user's,
no turn is empty and roles alternate; the answers are dropped (``prepare`` regenerates them) and the user turns
are written as ``{"turns": [...]}`` rows. Exact duplicates (same user turns) are dropped, then a seeded split
holds ``num_eval`` conversations out. Offline, a dataset id fails at once with one line.
"""

from __future__ import annotations

import json
import os
import random
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

from dspark.data.benchmarks import (
    DATASETS_SERVER_ENV,
    DEFAULT_DATASETS_SERVER,
    HTTP_TIMEOUT_S,
    ROWS_PER_PAGE,
    _offline,
)
from dspark.data.jsonl import parse_object

DEFAULT_DATASET = "mlabonne/open-perfectblend"
USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "model", "chatgpt", "bard", "bing"}


def normalise(row: dict) -> tuple[list[str] | None, str]:
    """(user turns, "") of a valid row, or (None, reason) for one to skip."""
    if "conversations" in row or "messages" in row:
        turns = row.get("conversations", row.get("messages"))
        if not isinstance(turns, list):
            return None, "conversation is not a list"
        roles, texts = [], []
        for turn in turns:
            if not isinstance(turn, dict):
                return None, "turn is not an object"
            role = str(turn.get("from", turn.get("role", ""))).lower()
            text = turn.get("value", turn.get("content"))
            if role == "system":
                continue
            if role not in USER_ROLES | ASSISTANT_ROLES:
                return None, f"unknown role {role!r}"
            if not isinstance(text, str) or not text.strip():
                return None, "empty turn"
            roles.append("user" if role in USER_ROLES else "assistant")
            texts.append(text)
        if not roles or roles[0] != "user":
            return None, "first turn is not the user's"
        if any(a == b for a, b in zip(roles, roles[1:])):
            return None, "roles do not alternate"
        return [t for r, t in zip(roles, texts) if r == "user"], ""
    if "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            return None, "empty turn"
        return list(turns), ""
    if isinstance(row.get("prompt"), str):
        return ([row["prompt"]], "") if row["prompt"].strip() else (None, "empty turn")
    return None, "no conversations, messages, turns or prompt"


PROMPT_COLUMNS = ("conversations", "messages", "turns", "prompt")


def _read_parquet(path: Path, max_rows: int) -> list[dict]:
    """Rows of a parquet file (pyarrow), streamed batch by batch: only the prompt columns are decoded (a corpus
    file often carries large answer or metadata columns) and reading stops at ``max_rows``."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path} needs pyarrow (pip install pyarrow), or convert it to .jsonl") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's ArrowInvalid & co: not a parquet file, truncated footer
        raise ValueError(f"{path} is not a readable parquet file ({str(exc).splitlines()[0]:.120})") from None
    columns = [c for c in PROMPT_COLUMNS if c in parquet.schema_arrow.names]
    if not columns:
        raise ValueError(f"{path} has none of the columns {', '.join(PROMPT_COLUMNS)} (it has "
                         f"{', '.join(parquet.schema_arrow.names[:8]) or 'none'})")
    rows: list[dict] = []
    for batch in parquet.iter_batches(batch_size=1024, columns=columns):
        # a typed table fills the columns a row does not use with nulls: drop them, as a jsonl row omits them
        rows.extend({k: v for k, v in row.items() if v is not None} for row in batch.to_pylist())
        if max_rows and len(rows) >= max_rows:
            break
    return rows[:max_rows] if max_rows else rows


def _read_local(path: Path, max_rows: int = 0) -> list[dict]:
    if path.is_dir():  # a downloaded dataset: its parquet (or jsonl) shards in name order
        shards = sorted(path.rglob("*.parquet")) or sorted(path.rglob("*.jsonl"))
        if not shards:
            raise ValueError(f"prompt source {path} is a directory without .parquet or .jsonl files")
        rows: list[dict] = []
        for shard in shards:
            rows.extend(_read_local(shard, max_rows - len(rows) if max_rows else 0))
            if max_rows and len(rows) >= max_rows:
                break
        return rows
    if path.suffix == ".parquet":
        return _read_parquet(path, max_rows)
    if path.suffix != ".jsonl":
        raise ValueError(f"prompt source {path} must be a .jsonl or .parquet file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                rows.append(parse_object(line, f"{path}:{line_no}"))
    return rows


def _read_hub(name: str, split: str, max_rows: int) -> list[dict]:
    where = f"cannot fetch prompts {name!r}"
    if _offline():
        raise ValueError(f"{where}: the Hugging Face hub is unreachable (offline mode: HF_HUB_OFFLINE is set)")
    server = os.environ.get(DATASETS_SERVER_ENV) or DEFAULT_DATASETS_SERVER
    rows: list[dict] = []
    try:
        while not max_rows or len(rows) < max_rows:
            query = urllib.parse.urlencode({"dataset": name, "config": "default", "split": split,
                                            "offset": len(rows), "length": ROWS_PER_PAGE})
            with urllib.request.urlopen(f"{server.rstrip('/')}/rows?{query}", timeout=HTTP_TIMEOUT_S) as resp:
                page = json.load(resp)
            rows.extend(item["row"] for item in page["rows"])
            if not page["rows"] or len(rows) >= page["num_rows_total"]:
                break
    except Exception as exc:  # urllib errors, timeouts, bad pages: one line
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{where}: the Hugging Face datasets server is unreachable or refused ({reason})") from None
    return rows[:max_rows] if max_rows else rows


def fetch_prompts(source: str = DEFAULT_DATASET, out_dir: str | os.PathLike = "data/prompts", *, num_eval: int = 0,
                  seed: int = 0, max_rows: int = 0, split: str = "train") -> dict:
    """Read ``source``, clean it and write ``<out_dir>/train.jsonl`` (+ ``eval.jsonl`` when ``num_eval`` > 0).

    Returns the counts: rows read, kept, skipped per reason, duplicates, train and eval sizes, and the paths.
    """
    path = Path(source).expanduser()
    local = path.suffix in (".jsonl", ".parquet") or path.exists()
    if local and not path.exists():
        raise ValueError(f"prompt source {source} not found (expected a .jsonl/.parquet file, a directory of them, "
                         f"or a dataset id)")
    rows = _read_local(path, max_rows) if local else _read_hub(source, split, max_rows)
    if max_rows:
        rows = rows[:max_rows]
    skipped: Counter = Counter()
    seen, conversations = set(), []
    for row in rows:
        turns, reason = normalise(row)
        if turns is None:
            skipped[reason] += 1
            continue
        key = tuple(t.strip() for t in turns)
        if key in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(key)
        conversations.append(turns)
    if num_eval < 0 or num_eval >= max(len(conversations), 1):
        raise ValueError(f"num_eval={num_eval} must be >= 0 and leave training prompts out of "
                         f"{len(conversations)} valid conversations")
    held = set(random.Random(seed).sample(range(len(conversations)), num_eval))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl"}
    _write(paths["train"], [c for i, c in enumerate(conversations) if i not in held])
    if num_eval:
        paths["eval"] = out / "eval.jsonl"
        _write(paths["eval"], [c for i, c in enumerate(conversations) if i in held])
    return {"read": len(rows), "kept": len(conversations), "skipped": dict(skipped),
            "train": len(conversations) - num_eval, "eval": num_eval, "paths": {k: str(v) for k, v in paths.items()}}


def _write(path: Path, conversations: list[list[str]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for turns in conversations:
            f.write(json.dumps({"turns": turns}, ensure_ascii=False) + "\n")
    tmp.replace(path)  # an interrupted fetch never leaves a truncated file that looks complete
