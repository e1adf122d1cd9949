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


def test_local_parquet_and_a_directory_of_shards_read_like_jsonl(tmp_path):
    """ShareGPT/OpenAI rows in parquet (nested lists of structs, as hub datasets store them) give the jsonl result;
    a directory of shards is read in name order; max_rows stops early."""
    pa = pytest.importorskip("pyarrow")  # in requirements.txt
    import pyarrow.parquet as pq

    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    expected = fetch_prompts(str(src), tmp_path / "from_jsonl", num_eval=1, seed=3)
    # one schema per column family (parquet columns are typed): conversations, messages, turns, prompt
    columns = {key: [r.get(key) for r in ROWS] for key in ("conversations", "messages", "turns", "prompt")}
    columns["answer_metadata"] = [{"tokens": list(range(50))}] * len(ROWS)  # a column fetch-prompts never decodes
    pq.write_table(pa.table(columns), tmp_path / "src.parquet")
    out = fetch_prompts(str(tmp_path / "src.parquet"), tmp_path / "from_parquet", num_eval=1, seed=3)
    assert {k: v for k, v in out.items() if k != "paths"} == {k: v for k, v in expected.items() if k != "paths"}
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "from_parquet" / name).read_text() == (tmp_path / "from_jsonl" / name).read_text()
    shards = tmp_path / "dataset" / "data"
    shards.mkdir(parents=True)
    table = pa.table(columns)
    pq.write_table(table.slice(0, 5), shards / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(5), shards / "train-00001-of-00002.parquet")
    assert fetch_prompts(str(tmp_path / "dataset"), tmp_path / "from_dir", num_eval=1, seed=3)["kept"] == 4
    assert (tmp_path / "from_dir" / "train.jsonl").read_text() == (tmp_path / "from_jsonl" / "train.jsonl").read_text()
    assert fetch_prompts(str(tmp_path / "dataset"), tmp_path / "first6", max_rows=6)["read"] == 6
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match=r"plain\.parquet has none of the columns conversations, messages, turns, "
                                         r"prompt \(it has text\)"):
        fetch_prompts(str(tmp_path / "plain.parquet"), tmp_path / "bad")
