"""`dspark data fetch-prompts` on local files: role normalisation, validation, de-duplication, seeded split."""

import json

import pytest
from conftest import run_cli

from dspark.data.fetch_prompts import fetch_prompts
from dspark.data.prompts import load_prompts

ROWS = [
    {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "q1"},
                       {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q1b"},
                       {"from": "gpt", "value": "a"}]},
    {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
    {"conversations": [{"from": "gpt", "value": "assistant first"}, {"from": "human", "value": "q"}]},
    {"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "a"}]},
    {"conversations": [{"from": "human", "value": "q3"}, {"from": "human", "value": "again"}]},
    {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "other answer"}]},
    {"turns": ["q4", "q4b"]},
    {"prompt": "q5"},
]


def test_local_jsonl_is_normalised_validated_deduplicated_and_split(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = fetch_prompts(str(src), tmp_path / "out", num_eval=1, seed=3)
    assert out["read"] == 8 and out["kept"] == 4
    assert out["skipped"] == {"first turn is not the user's": 1, "empty turn": 1, "roles do not alternate": 1,
                              "duplicate": 1}
    train = [json.loads(line)["turns"] for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line)["turns"] for line in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
    assert sorted(train + held) == sorted([["q1", "q1b"], ["q2"], ["q4", "q4b"], ["q5"]])
    assert len(held) == 1
    assert load_prompts(str(tmp_path / "out" / "train.jsonl")) == [t[0] for t in train]  # prepare reads it
    again = fetch_prompts(str(src), tmp_path / "again", num_eval=1, seed=3)  # the split is seeded
    assert (tmp_path / "again" / "eval.jsonl").read_text() == (tmp_path / "out" / "eval.jsonl").read_text()
    assert again["train"] == 3


def test_malformed_line_names_file_and_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        fetch_prompts(str(src), tmp_path / "out")


def test_offline_dataset_id_fails_at_once_with_one_line(tmp_path):
    proc = run_cli(["data", "fetch-prompts", "--out-dir", str(tmp_path)], timeout=60)  # run_cli sets offline mode
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "Error: cannot fetch prompts 'mlabonne/open-perfectblend': the Hugging Face hub is unreachable "
        "(offline mode: HF_HUB_OFFLINE is set)"]
