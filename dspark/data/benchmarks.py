"""Public benchmark prompt sets for ``dspark eval --dataset NAME``, and ``dspark data fetch-benchmarks``.

Each benchmark is a public Hugging Face hub dataset. Fetching converts it once into ``<data_dir>/<name>.jsonl``
with one ``{"turns": [...]}`` row per prompt (the prompt file format of :mod:`dspark.data.prompts`);
evaluation then reads only that file, so it never touches the network. ``data_dir`` defaults to
``$DSPARK_DATA_DIR`` or ``~/.cache/dspark/benchmarks``.

Fetching uses the ``datasets`` library when it is installed; otherwise raw hub files come through
``huggingface_hub`` and dataset splits through the hub's datasets-server JSON API (plain HTTP, no extra
dependency).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dspark.data.prompts import load_prompts

DATA_DIR_ENV = "DSPARK_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/dspark/benchmarks"
# The hub's row API serves any public dataset split as JSON pages of at most 100 rows.
DATASETS_SERVER_ENV = "DSPARK_DATASETS_SERVER"
DEFAULT_DATASETS_SERVER = "https://datasets-server.huggingface.co"
ROWS_PER_PAGE = 100
HTTP_TIMEOUT_S = 20
PROBE_TIMEOUT_S = 5

# Appended to maths problems so that the target writes its usual step-by-step answer (as in DeepSpec's sets).
REASON_STEP_BY_STEP = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark lives on the hub and how one of its rows becomes a list of user turns."""

    repo_id: str
    split: str
    to_turns: Callable[[dict], list[str]]
    subset: str | None = None
    # Raw jsonl files in the dataset repo, read instead of a split (datasets without a standard loader).
    files: tuple[str, ...] = ()


def _maths(row: dict) -> list[str]:
    return [row["problem"] + REASON_STEP_BY_STEP]


def _humaneval(row: dict) -> list[str]:
    return ["Write a solution to the following problem and make sure that it passes the tests:\n"
            f"```python\n{row['prompt']}\n```"]


def _alpaca(row: dict) -> list[str]:
    if row.get("input"):
        return [f"{row['instruction']}\n\nInput:\n{row['input']}"]
    return [row["instruction"]]


def _livecodebench(row: dict) -> list[str]:
    starter = row.get("starter_code") or ""
    layout = "Use the following code structure:" if starter else "Write your code in the following format:"
    return ["You are an expert Python programmer. Write a correct Python program for the problem below; "
            "return only the program.\n\n"
            f"### Question:\n{row['question_content']}\n\n"
            f"### Format: {layout}\n```python\n{starter or '# YOUR CODE HERE'}\n```\n\n"
            "### Answer: (use the provided format with backticks)"]


BENCHMARKS: dict[str, Benchmark] = {
    "gsm8k": Benchmark("openai/gsm8k", "test", lambda r: [r["question"] + REASON_STEP_BY_STEP], subset="main"),
    "math500": Benchmark("HuggingFaceH4/MATH-500", "test", _maths),
    "aime25": Benchmark("MathArena/aime_2025", "train", _maths),
    "humaneval": Benchmark("openai/openai_humaneval", "test", _humaneval),
    "mbpp": Benchmark("google-research-datasets/mbpp", "test", lambda r: [r["prompt"]], subset="sanitized"),
    "livecodebench": Benchmark("livecodebench/code_generation_lite", "test", _livecodebench,
                               files=tuple(f"test{i}.jsonl" for i in ["", 2, 3, 4, 5, 6])),
    # MT-Bench keeps both turns (the file format allows it; evaluation uses the first).
    "mt-bench": Benchmark("HuggingFaceH4/mt_bench_prompts", "train", lambda r: list(r["prompt"])),
    "alpaca": Benchmark("tatsu-lab/alpaca", "train", _alpaca),
    "arena-hard-v2": Benchmark("lmarena-ai/arena-hard-auto", "test", lambda r: [r["prompt"]],
                               files=("data/arena-hard-v2.0/question.jsonl",)),
}


def default_data_dir() -> Path:
    """``$DSPARK_DATA_DIR`` if set, else ``~/.cache/dspark/benchmarks``."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def _check_name(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def parse_names(values: list[str] | tuple[str, ...]) -> list[str]:
    """Split repeated and comma-separated names (``["gsm8k,mbpp", "mt-bench"]``), dropping duplicates."""
    names: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if name and name not in names:
                _check_name(name)
                names.append(name)
    return names


def benchmark_path(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The converted prompt file of benchmark ``name``: ``<data_dir>/<name>.jsonl``."""
    _check_name(name)
    return (Path(data_dir).expanduser() if data_dir else default_data_dir()) / f"{name}.jsonl"


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None, max_prompts: int = 0) -> list[str]:
    """First user turns of benchmark ``name`` (file order; ``max_prompts`` > 0 keeps that many).

    Raises ``ValueError`` for an unknown name (listing the known ones) or a benchmark not fetched yet.
    """
    path = benchmark_path(name, data_dir)
    if not path.is_file():
        raise ValueError(f"benchmark {name!r} not found at {path}: run `dspark data fetch-benchmarks {name}` "
                         f"(needs the Hugging Face hub) or pass --prompts FILE")
    return load_prompts(str(path), max_prompts)


# ---------------------------------------------------------------------------------------------------------
# Fetching


def _offline() -> bool:
    return any(os.environ.get(var, "").upper() in {"1", "ON", "YES", "TRUE"}
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _probe_hub(bench: Benchmark) -> None:
    """One quick request to the hub: without it huggingface_hub retries an unreachable host for ~25 s."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        with urllib.request.urlopen(f"{endpoint.rstrip('/')}/api/datasets/{bench.repo_id}", timeout=PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        pass  # the hub answered; the fetch itself reports what it refuses


def _rows_from_files(bench: Benchmark) -> list[dict]:
    from huggingface_hub import hf_hub_download

    rows = []
    for filename in bench.files:
        local = hf_hub_download(bench.repo_id, filename, repo_type="dataset")
        with open(local, encoding="utf-8") as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def _rows_from_datasets_server(bench: Benchmark) -> list[dict]:
    server = os.environ.get(DATASETS_SERVER_ENV) or DEFAULT_DATASETS_SERVER
    rows: list[dict] = []
    while True:
        query = urllib.parse.urlencode({"dataset": bench.repo_id, "config": bench.subset or "default",
                                        "split": bench.split, "offset": len(rows), "length": ROWS_PER_PAGE})
        with urllib.request.urlopen(f"{server.rstrip('/')}/rows?{query}", timeout=HTTP_TIMEOUT_S) as resp:
            page = json.load(resp)
        rows.extend(item["row"] for item in page["rows"])
        if not page["rows"] or len(rows) >= page["num_rows_total"]:
            return rows


def _fetch_rows(bench: Benchmark) -> list[dict]:
    if bench.files:
        return _rows_from_files(bench)
    try:
        from datasets import load_dataset
    except ImportError:
        return _rows_from_datasets_server(bench)
    return list(load_dataset(bench.repo_id, bench.subset, split=bench.split))


def _is_http_answer(exc: BaseException) -> bool:
    """True when the server answered with an error status (the hub is reachable but refused)."""
    return isinstance(exc, urllib.error.HTTPError) or getattr(exc, "response", None) is not None


def fetch_benchmarks(names: list[str] | None = None, data_dir: str | os.PathLike | None = None,
                     force: bool = False) -> dict[str, Path]:
    """Download benchmarks from the Hugging Face hub and convert them to ``<data_dir>/<name>.jsonl``.

    ``names`` defaults to every known benchmark; files already present are kept unless ``force``. Returns
    ``{name: path}``. Raises ``ValueError`` naming the benchmark when the hub is unreachable (or offline mode
    is set) or refuses the request.
    """
    names = parse_names(names or list(BENCHMARKS))
    paths = {}
    for name in names:
        bench, path = BENCHMARKS[name], benchmark_path(name, data_dir)
        paths[name] = path
        if path.is_file() and not force:
            continue
        where = f"cannot fetch benchmark {name!r} ({bench.repo_id})"
        if _offline():
            raise ValueError(f"{where}: the Hugging Face hub is unreachable (offline mode: HF_HUB_OFFLINE is set)")
        try:
            _probe_hub(bench)
            rows = _fetch_rows(bench)
        except Exception as exc:  # network stacks differ (urllib, httpx, requests); all become one line
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if _is_http_answer(exc):
                raise ValueError(f"{where}: the hub refused the request ({reason})") from None
            raise ValueError(f"{where}: the Hugging Face hub is unreachable ({reason})") from None
        _write_turns(path, [bench.to_turns(row) for row in rows])
    return paths


def _write_turns(path: Path, conversations: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".jsonl.partial")
    with partial.open("w", encoding="utf-8") as f:
        for turns in conversations:
            f.write(json.dumps({"turns": turns}, ensure_ascii=False) + "\n")
    # Rename last so that an interrupted fetch never leaves a truncated file that looks complete.
    partial.replace(path)
