"""Corpus growth from the built-in tiny target: self-written prompts from seed topics and follow-up user turns,
deterministic under a seed and resumable after a crash at any chunk."""

import json

import pytest

from dspark import stages
from dspark.config import TargetConfig, load_config
from dspark.data import grow
from dspark.data.multiturn import followup_request, multi_turn_ids, render_ids, task_seed
from dspark.targets import load_target

TARGET = "builtin:tiny-qwen3"


def _cfg(run_dir, seed=0, **data):
    sets = [f"run_dir={run_dir}", f"target.name_or_path={TARGET}", "data.max_prompts=9", "data.num_eval_prompts=5",
            "data.max_new_tokens=8", "data.regen_batch_size=1", "data.regen_temperature=1.0", f"data.seed={seed}",
            *[f"data.{k}={v}" for k, v in data.items()]]
    return load_config("tiny_llama_dspark", sets)


GROW = {"self_prompts": 6, "followup_turns": 1}


def _files(run_dir):
    data = run_dir / "data"
    return (data / "self_prompts.jsonl").read_bytes(), (data / "train.jsonl").read_bytes()


def _rows(blob):
    return [json.loads(line) for line in blob.splitlines()]


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("grow") / "whole"
    stages.prepare(_cfg(run, **GROW), progress=False)
    yield run
    torch.set_num_threads(before)


def test_self_prompts_and_followups_are_written_by_the_target_and_answered(grown):
    prompts_blob, train_blob = _files(grown)
    questions = _rows(prompts_blob)
    assert [q["id"] for q in questions] == [f"q{k:05d}" for k in range(6)]
    assert [q["topic"] for q in questions] == list(grow.TOPICS[:6])
    rows = _rows(train_blob)
    written = [q["prompt"] for q in questions if q["prompt"]]
    assert len(written) >= 4  # a random tiny model still writes text for most topics
    assert [r["turns"][0] for r in rows[-len(written):]] == written  # appended to the 4 training prompts, answered
    assert len(rows) == 4 + len(written)

    target = load_target(TargetConfig(name_or_path=TARGET, layer_ids=[0]))
    tok = target.tokenizer
    # question 0 is what the target samples for topic 0 under its task seed
    again = target.generate([render_ids(tok, grow.question_request(grow.TOPICS[0]), True)], max_new_tokens=64,
                            temperature=1.0, batch_size=1, seed=None, indices=[task_seed("prompt", 0, 0)])
    assert tok.decode(again[0], skip_special_tokens=True).strip() == questions[0]["prompt"]
    two_turns = [r for r in rows if len(r["turns"]) == 2]
    assert len(two_turns) >= len(rows) // 2
    for row in rows:
        messages = [m for u, a in zip(row["turns"], row["answers"])
                    for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
        ids, mask = multi_turn_ids(tok, messages)
        assert (row["input_ids"], row["loss_mask"]) == (ids[:256], mask[:256])  # every assistant turn masked
    # the follow-up of a conversation is what the target writes after its own first answer
    row = two_turns[0]
    c = int(row["id"][1:])
    history = [{"role": "user", "content": row["turns"][0]}, {"role": "assistant", "content": row["answers"][0]}]
    seed = task_seed("followup", 0, c * 1000 + 1)
    follow = target.generate([render_ids(tok, followup_request(history), True)], max_new_tokens=8,
                             temperature=1.0, batch_size=1, seed=None, indices=[seed])
    assert tok.decode(follow[0], skip_special_tokens=True).strip() == row["turns"][1]


def test_same_seed_same_corpus_other_seed_another(grown, tmp_path, one_thread):
    stages.prepare(_cfg(tmp_path / "again", **GROW), progress=False)
    assert _files(tmp_path / "again") == _files(grown)
    stages.prepare(_cfg(tmp_path / "seed1", seed=1, **GROW), progress=False)
    other, ours = _rows(_files(tmp_path / "seed1")[0]), _rows(_files(grown)[0])
    assert sum(a["prompt"] != b["prompt"] for a, b in zip(other, ours)) >= 4


@pytest.mark.parametrize("crash_at_call", [2, 11])  # inside the self prompts; inside the answers' second chunk
def test_a_crash_mid_run_resumes_to_the_same_bytes(grown, tmp_path, one_thread, monkeypatch, crash_at_call):
    calls = {"n": 0}
    real = grow.LocalGenerate.__call__

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == crash_at_call:
            raise KeyboardInterrupt("killed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(grow.LocalGenerate, "__call__", crashing)
    run = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        stages.prepare(_cfg(run, **GROW), progress=False)
    data = run / "data"
    partial = data / ("self_prompts.jsonl.partial" if crash_at_call == 2 else "train.jsonl.partial")
    assert partial.read_bytes().count(b"\n") > 0  # rows were on disk when it stopped
    assert not (data / "train.jsonl").exists()
    monkeypatch.setattr(grow.LocalGenerate, "__call__", real)
    calls["n"] = 0
    stages.prepare(_cfg(run, **GROW), progress=False)
    assert _files(run) == _files(grown)

