"""Server regeneration against a real `dspark serve` process on 127.0.0.1 (an OpenAI-compatible HTTP endpoint)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
from conftest import DIST_ENV, REPO

from dspark import stages
from dspark.config import load_config
from dspark.data.server import ServerOptions, post_with_retries, request_body


def _env():
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _start_server(target_dir, *extra):
    proc = subprocess.Popen([sys.executable, "-m", "dspark.cli", "serve", "-c", "tiny_llama_dspark", "--set",
                             f"target.name_or_path={target_dir}", "--port", "0", *extra],
                            env=_env(), cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        if match := re.search(r"serving .* on (http://\S+)", line):
            # keep draining stderr so that a chatty server never blocks on a full pipe
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, match.group(1)
        assert time.monotonic() < deadline, "dspark serve did not start"
    raise AssertionError(f"dspark serve exited with {proc.wait()}")


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    proc, url = _start_server(tiny_llama_dir)
    yield url
    proc.kill()
    proc.wait(10)


def _cfg(run_dir, target_dir, **data):
    sets = [f"run_dir={run_dir}", f"target.name_or_path={target_dir}", "data.max_prompts=14",
            "data.max_new_tokens=16", *[f"data.{k}={v}" for k, v in data.items()]]
    return load_config("tiny_llama_dspark", sets)


def _rows(run_dir, name="train.jsonl"):
    return [json.loads(line) for line in (run_dir / "data" / name).read_text().splitlines()]


def test_server_regeneration_equals_in_process_at_t0_and_t1(server, tiny_llama_dir, tmp_path, one_thread, capsys):
    """The served target answers exactly what in-process regeneration writes: the prompt ids are the chat
    template's, the answer ids come back as token ids, and each request carries prompt i's in-process seed."""
    for temperature, samples in ((0.0, 1), (1.0, 2)):  # at T=1 two sampled answers per prompt
        local, remote = tmp_path / f"local{temperature}", tmp_path / f"remote{temperature}"
        sampling = {"regen_temperature": temperature, "samples_per_prompt": samples}
        stages.prepare(_cfg(local, tiny_llama_dir, **sampling), progress=False)
        stages.prepare(_cfg(remote, tiny_llama_dir, servers=f"[{server}]", server_max_in_flight=3, **sampling),
                         progress=False)
        ours = (remote / "data" / "train.jsonl").read_bytes()
        assert ours == (local / "data" / "train.jsonl").read_bytes(), temperature
        assert (remote / "data" / "train.errors.jsonl").read_text() == ""
    assert "20 conversations in" in capsys.readouterr().out  # 14 prompts, 4 held out, 2 answers each
    rows = _rows(remote)
    assert [r["id"] for r in rows[:3]] == ["p00000-s0", "p00000-s1", "p00001-s0"]
    assert sum(a["input_ids"] != b["input_ids"] for a, b in zip(rows[::2], rows[1::2])) > 5  # really resampled


def test_retries_on_503_and_permanent_failures_go_to_the_error_file(tiny_llama_dir, tmp_path, server, one_thread,
                                                                     capsys):
    proc, flaky = _start_server(tiny_llama_dir, "--fail-first", "4")
    try:
        stages.prepare(_cfg(tmp_path / "retried", tiny_llama_dir, servers=f"[{flaky}]", server_max_in_flight=2),
                         progress=False)  # 4 x 503 then success: retried with backoff, nothing lost
        stages.prepare(_cfg(tmp_path / "clean", tiny_llama_dir, servers=f"[{server}]"), progress=False)
        assert _rows(tmp_path / "retried") == _rows(tmp_path / "clean")
    finally:
        proc.kill()
        proc.wait(10)
    proc, flaky = _start_server(tiny_llama_dir, "--fail-first", "3")
    try:
        run = tmp_path / "no_retries"
        stages.prepare(_cfg(run, tiny_llama_dir, servers=f"[{flaky}]", server_max_in_flight=1,
                              server_max_retries=0), progress=False)
    finally:
        proc.kill()
        proc.wait(10)
    errors = _rows(run, "train.errors.jsonl")
    assert [e["id"] for e in errors] == ["p00000", "p00001", "p00002"]
    assert all(e["reason"].startswith("gave up after 1 attempts; last: HTTP 503") for e in errors)
    assert [r["id"] for r in _rows(run)] == [f"p{i:05d}" for i in range(3, 10)]
    assert "3 failed or dropped" in capsys.readouterr().out


def test_bad_requests_are_not_retried_and_length_policy(server, tiny_llama_dir, tmp_path, one_thread):
    opts = ServerOptions(urls=[server], top_k=5, max_retries=3, backoff_s=5.0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"HTTP 400: .*top_k=5 is not supported"):
        post_with_retries(requests.Session(), f"{server}/v1/chat/completions",
                          request_body(opts, "m", [{"role": "user", "content": "hi"}], 1), opts,
                          threading.Event())
    assert time.monotonic() - start < 5.0  # no backoff wait: a 400 fails at once
    short = {"servers": f"[{server}]", "max_new_tokens": 3, "regen_temperature": 1.0}
    stages.prepare(_cfg(tmp_path / "mark", tiny_llama_dir, length_policy="mark", **short), progress=False)
    marked = _rows(tmp_path / "mark")
    cut = [r["id"] for r in marked if r.get("truncated")]
    assert cut and len(cut) < len(marked) or len(cut) == len(marked) == 10
    stages.prepare(_cfg(tmp_path / "drop", tiny_llama_dir, length_policy="drop", **short), progress=False)
    assert [r["id"] for r in _rows(tmp_path / "drop")] == [r["id"] for r in marked if not r.get("truncated")]
    dropped = _rows(tmp_path / "drop", "train.errors.jsonl")
    assert [e["id"] for e in dropped] == cut and dropped[0]["reason"] == "dropped: finish_reason=length"


def test_unreachable_server_fails_at_once_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dspark.cli", "prepare", "-c", "tiny_llama_dspark", "--set",
                           f"run_dir={tmp_path}", "--server", "http://127.0.0.1:9"],
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "Error: server http://127.0.0.1:9 is not reachable (ConnectionError); start it or fix --server")


def test_kill_9_during_server_prepare_then_rerun_is_byte_identical(server, tiny_llama_dir, tmp_path):
    def command(run_dir):
        return [sys.executable, "-m", "dspark.cli", "prepare", "-c", "tiny_llama_dspark", "--set", f"run_dir={run_dir}",
                "--set", f"target.name_or_path={tiny_llama_dir}", "--set", "data.max_new_tokens=16",
                "--set", "data.regen_temperature=1.0", "--set", "data.server_max_in_flight=1", "--server", server]

    subprocess.run(command(tmp_path / "whole"), env=_env(), cwd=REPO, check=True, capture_output=True, timeout=300)
    whole = (tmp_path / "whole" / "data" / "train.jsonl").read_bytes()
    partial = tmp_path / "killed" / "data" / "train.jsonl.partial"
    proc = subprocess.Popen(command(tmp_path / "killed"), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (partial.is_file() and partial.read_bytes().count(b"\n") >= 2) and proc.poll() is None:
        assert time.monotonic() < deadline, "prepare wrote no row in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    written = partial.read_bytes().count(b"\n")
    assert 0 < written < whole.count(b"\n"), "the kill did not land mid-run"
    subprocess.run(command(tmp_path / "killed"), env=_env(), cwd=REPO, check=True, capture_output=True, timeout=300)
    assert (tmp_path / "killed" / "data" / "train.jsonl").read_bytes() == whole


CONVERSATIONS = [["Hi there", "Add 2 and 3."], ["Name a colour."], ["One", "Two"], ["Tell me a joke.", "Another."],
                 ["What is 7 * 6?"], ["Write a haiku.", "Now in French."], ["Say yes."], ["Count to three."]]


def test_multi_turn_followups_and_self_prompts_through_the_server_equal_in_process_and_resume(
        server, tiny_llama_dir, tmp_path, one_thread, monkeypatch):
    """Every turn goes through /v1/chat/completions with the regenerated history and the in-process seed: the
    server writes the in-process bytes; a crash in the second chunk resumes to the same bytes."""
    from dspark.data import server as server_mod

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": t}) + "\n" for t in CONVERSATIONS))
    grow = {"prompts": str(prompts), "num_eval_prompts": 2, "max_turns": 2, "followup_turns": 1, "self_prompts": 2,
            "max_new_tokens": 6, "regen_temperature": 1.0}
    stages.prepare(_cfg(tmp_path / "local", tiny_llama_dir, **grow), progress=False)
    remote = {**grow, "servers": f"[{server}]", "server_max_in_flight": 1}  # chunks of 4 conversations
    stages.prepare(_cfg(tmp_path / "remote", tiny_llama_dir, **remote), progress=False)
    whole = (tmp_path / "remote" / "data" / "train.jsonl").read_bytes()
    assert whole == (tmp_path / "local" / "data" / "train.jsonl").read_bytes()
    rows = [json.loads(line) for line in whole.splitlines()]
    assert len(rows) == 8 and sum(len(r["turns"]) == 3 for r in rows) >= 2  # 2 given turns + 1 written by the target
    assert [len(r["answers"]) for r in rows] == [len(r["turns"]) for r in rows]

    calls = {"n": 0}
    real = server_mod.ServerGenerate.__call__

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 12:  # self prompts: 1 call; chunk 1: 2 calls per turn for 4 turns; then into chunk 2
            raise KeyboardInterrupt("killed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(server_mod.ServerGenerate, "__call__", crashing)
    with pytest.raises(KeyboardInterrupt):
        stages.prepare(_cfg(tmp_path / "crashed", tiny_llama_dir, **remote), progress=False)
    assert (tmp_path / "crashed" / "data" / "train.jsonl.partial").read_bytes() == b"".join(
        line + b"\n" for line in whole.splitlines()[:4])
    monkeypatch.setattr(server_mod.ServerGenerate, "__call__", real)
    stages.prepare(_cfg(tmp_path / "crashed", tiny_llama_dir, **remote), progress=False)
    assert (tmp_path / "crashed" / "data" / "train.jsonl").read_bytes() == whole
