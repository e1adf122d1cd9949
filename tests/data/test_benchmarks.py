"""Benchmark prompt sets: loading the converted files, errors, fetching (offline, local server), `eval --dataset`."""

from __future__ import annotations

import json
import re
import shutil
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import EVAL_DATASETS, decoded_report, run_cli, timeless

from dspark.data import benchmarks
from dspark.data.benchmarks import (
    BENCHMARKS,
    benchmark_path,
    default_data_dir,
    fetch_benchmarks,
    load_benchmark,
    parse_names,
)

REPO = Path(__file__).resolve().parents[2]
needs_shared = pytest.mark.skipif(not EVAL_DATASETS.is_dir(), reason=f"{EVAL_DATASETS} not present")


def one_line_error(proc) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def first_turns(path: Path) -> list[str]:
    return [json.loads(line)["turns"][0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@needs_shared
@pytest.mark.parametrize("name", ["gsm8k", "humaneval", "mt-bench"])
def test_load_shared_benchmark_first_turns(name):
    expected = first_turns(EVAL_DATASETS / f"{name}.jsonl")
    assert load_benchmark(name, EVAL_DATASETS) == expected
    assert load_benchmark(name, EVAL_DATASETS, max_prompts=3) == expected[:3]


@needs_shared
def test_mt_bench_keeps_its_second_turn_in_the_file():
    rows = [json.loads(line) for line in (EVAL_DATASETS / "mt-bench.jsonl").read_text().splitlines()]
    assert all(len(row["turns"]) == 2 for row in rows)
    # Only the first turn is evaluated: the prompt must not contain the follow-up.
    assert rows[0]["turns"][1] not in load_benchmark("mt-bench", EVAL_DATASETS, 1)[0]


def test_every_benchmark_has_a_hub_source():
    assert list(BENCHMARKS) == ["gsm8k", "math500", "aime25", "humaneval", "mbpp", "livecodebench", "mt-bench",
                                "alpaca", "arena-hard-v2"]
    for bench in BENCHMARKS.values():
        assert "/" in bench.repo_id and bench.split


def test_row_conversion():
    assert BENCHMARKS["gsm8k"].to_turns({"question": "2+2?"})[0].startswith("2+2?\nPlease reason step by step")
    assert BENCHMARKS["mt-bench"].to_turns({"prompt": ["a", "b"]}) == ["a", "b"]
    assert BENCHMARKS["alpaca"].to_turns({"instruction": "Sort", "input": ""}) == ["Sort"]
    assert BENCHMARKS["alpaca"].to_turns({"instruction": "Sort", "input": "3 1"}) == ["Sort\n\nInput:\n3 1"]
    assert "def f():" in BENCHMARKS["humaneval"].to_turns({"prompt": "def f():"})[0]
    assert "### Question:\nAdd" in BENCHMARKS["livecodebench"].to_turns({"question_content": "Add"})[0]


def test_unknown_name_lists_the_valid_ones(tmp_path):
    valid = "gsm8k, math500, aime25, humaneval, mbpp, livecodebench, mt-bench, alpaca, arena-hard-v2"
    with pytest.raises(ValueError, match=rf"^unknown benchmark 'gsm9k'; expected one of: {valid}$"):
        load_benchmark("gsm9k", tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        parse_names(["gsm8k,nope"])


def test_parse_names_repeated_and_comma_separated():
    assert parse_names(["gsm8k, humaneval", "mt-bench", "gsm8k"]) == ["gsm8k", "humaneval", "mt-bench"]


def test_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(ValueError) as info:
        load_benchmark("math500", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "math500.jsonl") in message
    assert "dspark data fetch-benchmarks math500" in message and "--prompts FILE" in message


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DSPARK_DATA_DIR", str(tmp_path))
    assert benchmark_path("gsm8k") == tmp_path / "gsm8k.jsonl"
    monkeypatch.delenv("DSPARK_DATA_DIR")
    assert default_data_dir() == Path("~/.cache/dspark/benchmarks").expanduser()


def test_fetch_offline_fails_fast_naming_the_dataset(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"cannot fetch benchmark 'gsm8k' \(openai/gsm8k\): the Hugging Face hub "
                                         r"is unreachable"):
        fetch_benchmarks(["gsm8k"], tmp_path)
    assert time.perf_counter() - start < 30
    assert not list(tmp_path.iterdir())


def test_fetch_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    # Not in offline mode: the real download path runs against a closed port (no retries for ~25 s).
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("DSPARK_DATASETS_SERVER", "http://127.0.0.1:9")
    for name in ("arena-hard-v2", "math500"):
        start = time.perf_counter()
        with pytest.raises(ValueError, match=rf"cannot fetch benchmark '{name}' .*hub is unreachable"):
            fetch_benchmarks([name], tmp_path)
        assert time.perf_counter() - start < 30


def test_fetch_keeps_an_existing_file_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "gsm8k.jsonl").write_text('{"turns": ["kept"]}\n')
    assert fetch_benchmarks(["gsm8k"], tmp_path) == {"gsm8k": tmp_path / "gsm8k.jsonl"}
    assert load_benchmark("gsm8k", tmp_path) == ["kept"]


class _FakeHub(BaseHTTPRequestHandler):
    """The two hub endpoints the plain-HTTP path uses: the dataset info probe and the paged rows API."""

    rows = [{"question": f"question {i}"} for i in range(5)]
    requests: list[dict] = []

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        if url.path == "/api/datasets/openai/gsm8k":
            body = {"id": "openai/gsm8k"}
        elif url.path == "/rows":
            query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
            self.requests.append(query)
            offset, length = int(query["offset"]), int(query["length"])
            page = self.rows[offset:offset + length]
            body = {"rows": [{"row_idx": offset + i, "row": r} for i, r in enumerate(page)],
                    "num_rows_total": len(self.rows)}
        else:
            self.send_error(404)
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_fetch_over_plain_http_converts_every_page(monkeypatch, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("DSPARK_DATASETS_SERVER", url)
    monkeypatch.setitem(sys.modules, "datasets", None)  # force the path without the `datasets` library
    monkeypatch.setattr(benchmarks, "ROWS_PER_PAGE", 2)
    try:
        paths = fetch_benchmarks(["gsm8k"], tmp_path)
    finally:
        server.shutdown()
    assert [(q["dataset"], q["config"], q["split"], q["offset"]) for q in _FakeHub.requests] == [
        ("openai/gsm8k", "main", "test", str(o)) for o in (0, 2, 4)]
    assert load_benchmark("gsm8k", tmp_path) == [f"question {i}{benchmarks.REASON_STEP_BY_STEP}" for i in range(5)]
    assert paths == {"gsm8k": tmp_path / "gsm8k.jsonl"}
    assert not list(tmp_path.glob("*.partial"))


def test_cli_fetch_offline_is_one_line(tmp_path):
    proc = run_cli(["data", "fetch-benchmarks", "humaneval", "--data-dir", str(tmp_path)], timeout=60)
    assert one_line_error(proc) == (
        "Error: cannot fetch benchmark 'humaneval' (openai/openai_humaneval): the Hugging Face hub is unreachable "
        "(offline mode: HF_HUB_OFFLINE is set)")


@needs_shared
def test_cli_eval_on_a_benchmark(tmp_path, tiny_llama_dir, tiny_demo_run):
    demo_dir, _ = tiny_demo_run
    run_dir = tmp_path / "run"
    for part in ("data", "drafter", "eval"):
        shutil.copytree(demo_dir / part, run_dir / part)
    common = ["-c", "tiny_llama_dspark", "--set", f"run_dir={run_dir}",
              "--set", f"target.name_or_path={tiny_llama_dir}"]
    held_out = json.loads((run_dir / "eval" / "report.json").read_text())

    # Repeated and comma-separated names, duplicates dropped.
    proc = run_cli(["eval", *common, "--dataset", "gsm8k", "--dataset", "humaneval,gsm8k",
                    "--set", f"eval.data_dir={EVAL_DATASETS}", "--set", "eval.num_prompts=2"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "speculative decoding on 2 gsm8k prompts, temperature 1" in proc.stdout
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert list(report) == ["gsm8k/T1", "gsm8k/T0", "humaneval/T1", "humaneval/T0"]
    # The gsm8k rows are the decoding of the benchmark's first 2 prompts by the run's drafter and by the untrained
    # one (the seed's initialisation), not of the held-out prompts.
    import torch

    from dspark.config import load_config
    from dspark.drafters import build_drafter
    from dspark.export import load_drafter
    from dspark.targets import load_target

    cfg = load_config("tiny_llama_dspark", [f"target.name_or_path={tiny_llama_dir}"])
    target = load_target(cfg.target)
    trained = load_drafter(run_dir / "drafter").eval()
    torch.manual_seed(cfg.train.seed)  # after loading: building a module draws from the global RNG
    untrained = build_drafter(cfg.drafter, target.config, cfg.target.layer_ids, target.embed_weight,
                              target.lm_head_weight).eval()
    prompts = load_benchmark("gsm8k", EVAL_DATASETS, 2)
    for name, drafter in (("trained", trained), ("untrained", untrained)):
        for temperature in (1.0, 0.0):
            expected = decoded_report(target, drafter, prompts, temperature=temperature,
                                      max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
            assert timeless(report[f"gsm8k/T{temperature:g}"][name]) == expected, (name, temperature)
    assert report["gsm8k/T0"] != held_out["T0"]  # other prompts, other numbers
    for key in report:
        assert (run_dir / "eval" / f"acceptance_{key.replace('/', '_')}.png").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert {"eval_gsm8k_T1/trained/tau", "eval_gsm8k_T0/untrained/tau",
            "eval_humaneval_T1/trained/tau"} <= set(acc.Tags()["scalars"])

    missing = run_cli(["eval", *common, "--dataset", "math500", "--set", f"eval.data_dir={EVAL_DATASETS}"])
    assert re.search(r"benchmark 'math500' not found.*dspark data fetch-benchmarks math500", one_line_error(missing))
