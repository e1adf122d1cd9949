"""Per-prompt seeded sampling (rank/batch split invariance) and ordered, crash-safe, resumable regeneration."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import DIST_ENV, REPO

from dspark.config import TargetConfig
from dspark.data import regenerate as regen
from dspark.data.output import ResumableJsonl
from dspark.data.prompts import load_prompts
from dspark.targets import load_target

MAX_NEW = 10
SETTINGS = {"temperature": 1.0, "seed": 5}


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[0]))


@pytest.fixture(scope="module")
def prompts():
    return load_prompts("builtin")[::9][:14]


def _kwargs(**extra):
    return {"max_new_tokens": MAX_NEW, "temperature": 1.0, "seed": 5, "max_seq_len": 256, **extra}


def test_sampled_answers_do_not_depend_on_batch_size_or_group_split(target, prompts, one_thread):
    one = regen.regenerate(target, prompts, batch_size=4, **_kwargs())
    assert regen.regenerate(target, prompts, batch_size=1, **_kwargs()) == one
    halves = [regen.regenerate(target, prompts, batch_size=3, group=(g, 2), **_kwargs()) for g in range(2)]
    assert sorted(halves[0] + halves[1], key=lambda r: r["id"]) == one
    # the seed matters and T > 0 really samples: another seed changes most answers
    other = regen.regenerate(target, prompts, batch_size=4, **_kwargs(seed=6))
    assert sum(a["input_ids"] != b["input_ids"] for a, b in zip(one, other)) > len(one) // 2


def _resumable(target, prompts, path, batch_size=2, temperature=0.0):
    out = ResumableJsonl(path, SETTINGS)
    regen.regenerate_resumable(target, prompts, out, batch_size=batch_size, **_kwargs(temperature=temperature))
    out.finish()
    return path.read_bytes()


def test_resume_after_a_cut_at_any_byte_is_byte_identical(target, prompts, tmp_path, one_thread):
    whole = _resumable(target, prompts, tmp_path / "whole.jsonl")
    rows = [json.loads(line) for line in whole.splitlines()]
    assert [r["id"] for r in rows] == [f"p{i:05d}" for i in range(len(prompts))]
    line_ends = [i + 1 for i, b in enumerate(whole) if b == ord("\n")]
    chunk = regen.CHUNK_BATCHES * 2  # prompts per written chunk at batch 2, one group
    # a torn first line, a whole first chunk, a torn line inside the second chunk, all but the last byte
    for cut in (5, line_ends[chunk - 1], line_ends[chunk + 2] - 7, len(whole) - 1):
        path = tmp_path / f"cut{cut}.jsonl"
        ResumableJsonl(path, SETTINGS).close()  # writes the state file, as the killed run did
        path.with_name(path.name + ".partial").write_bytes(whole[:cut])
        assert _resumable(target, prompts, path) == whole, cut
        assert not path.with_name(path.name + ".partial").exists()
    again = ResumableJsonl(tmp_path / "whole.jsonl", SETTINGS)
    assert again.complete  # rerunning a finished job does nothing


def test_several_sampled_answers_per_prompt_resume_byte_identical(target, prompts, tmp_path, one_thread):
    def run(path, cut=None):
        out = ResumableJsonl(path, SETTINGS)
        if cut is not None:
            out.close()
            out.partial.write_bytes(cut)
            out = ResumableJsonl(path, SETTINGS)
        regen.regenerate_resumable(target, prompts[:5], out, batch_size=2, samples_per_prompt=3, **_kwargs())
        out.finish()
        return path.read_bytes()

    whole = run(tmp_path / "whole.jsonl")
    rows = [json.loads(line) for line in whole.splitlines()]
    assert [r["id"] for r in rows[:4]] == ["p00000-s0", "p00000-s1", "p00000-s2", "p00001-s0"]
    assert len(rows) == 15 and len({tuple(r["input_ids"]) for r in rows}) > 10  # different samples
    assert run(tmp_path / "cut.jsonl", cut=whole[: len(whole) * 2 // 3]) == whole
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 1, and 1 at temperature 0"):
        regen.regenerate_resumable(target, prompts, ResumableJsonl(tmp_path / "g.jsonl", SETTINGS), batch_size=2,
                                   samples_per_prompt=2, **_kwargs(temperature=0.0))


def test_partial_output_from_other_settings_is_refused(tmp_path):
    path = tmp_path / "train.jsonl"
    out = ResumableJsonl(path, {"temperature": 0.0, "seed": 1})
    out.append([{"id": "p00000"}])
    out.close()
    with pytest.raises(ValueError, match=r"holds 1 rows regenerated with other settings \(temperature: 0\.0 -> 1\.0\)"):
        ResumableJsonl(path, {"temperature": 1.0, "seed": 1})
    assert ResumableJsonl(path, {"temperature": 1.0, "seed": 1}, restart=True).rows == []
    # a damaged line in the middle (not a torn tail) is an error, never silently dropped
    path2 = tmp_path / "t2.jsonl"
    ResumableJsonl(path2, SETTINGS).close()
    path2.with_name(path2.name + ".partial").write_text('{"id": "p00000"}\n{"id": oops\n{"id": "p00002"}\n')
    with pytest.raises(ValueError, match=r"t2\.jsonl\.partial:2: malformed JSON inside the file"):
        ResumableJsonl(path2, SETTINGS)


def _prepare_cmd(run_dir, target_dir, *sets):
    args = [sys.executable, "-m", "dspark.cli", "prepare", "-c", "tiny_llama_dspark", "--set", f"run_dir={run_dir}",
            "--set", f"target.name_or_path={target_dir}", "--set", "data.regen_batch_size=1",
            "--set", "data.max_new_tokens=24", *[a for s in sets for a in ("--set", s)]]
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return args, env


def test_kill_9_during_prepare_then_rerun_is_byte_identical(tmp_path, tiny_llama_dir):
    """The real `dspark prepare` process is killed once rows are on disk; the same command finishes the job."""
    args, env = _prepare_cmd(tmp_path / "whole", tiny_llama_dir)
    subprocess.run(args, env=env, cwd=REPO, check=True, capture_output=True, timeout=300)
    whole = (tmp_path / "whole" / "data" / "train.jsonl").read_bytes()

    args, env = _prepare_cmd(tmp_path / "killed", tiny_llama_dir)
    partial = tmp_path / "killed" / "data" / "train.jsonl.partial"
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (partial.is_file() and partial.read_bytes().count(b"\n") >= 1) and proc.poll() is None:
        assert time.monotonic() < deadline, "prepare wrote no row in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    written = partial.read_bytes().count(b"\n") if partial.is_file() else None
    assert written is not None and 0 < written < whole.count(b"\n"), "the kill did not land mid-run"
    proc = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "killed" / "data" / "train.jsonl").read_bytes() == whole
