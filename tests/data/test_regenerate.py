import json
import math

import pytest
import torch

from dspark.config import TargetConfig
from dspark.data.chat import prompt_ids
from dspark.data.prompts import load_prompts
from dspark.data.regenerate import read_conversations, regenerate, write_jsonl
from dspark.targets import load_target

MAX_NEW = 12


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    """The tiny llama with its matrices redrawn at unit gain (this instance only).

    At the default init (std 0.02) the tied embedding dominates the residual stream and greedy decoding just
    repeats the last prompt token, which would let a padding bug pass unnoticed; unit-gain layers make the
    answers depend on the whole context.
    """
    target = load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[0]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in target.model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.copy_(torch.randn(param.shape, generator=g) / math.sqrt(param.shape[1]))
    return target


@pytest.fixture(scope="module")
def prompts():
    return load_prompts("builtin")[::15]  # 11 prompts across categories, of different lengths


def _reference_answer(target, ids):
    """Plain transformers greedy generation of one prompt, no batching or padding."""
    eos = target.tokenizer.eos_token_id
    out = target.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=eos, eos_token_id=eos)
    new = out[0, len(ids):].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


def test_greedy_regeneration_matches_unbatched_generate(target, prompts):
    rows = regenerate(target, prompts, max_new_tokens=MAX_NEW, temperature=0.0, batch_size=4, seed=0,
                      max_seq_len=512)
    assert len({len(prompt_ids(target.tokenizer, p)) for p in prompts}) > 3  # batches really are padded
    assert [r["id"] for r in rows] == [f"p{i:05d}" for i in range(len(prompts))]
    for row, prompt in zip(rows, prompts):
        prefix = prompt_ids(target.tokenizer, prompt)
        answer = _reference_answer(target, prefix)
        assert row["prompt"] == prompt
        assert row["input_ids"] == prefix + answer
        assert row["loss_mask"] == [0] * len(prefix) + [1] * len(answer)
        assert row["answer"] == target.tokenizer.decode(answer, skip_special_tokens=True)
    assert len({tuple(r["input_ids"][-MAX_NEW:]) for r in rows}) > len(rows) // 2  # answers differ by prompt


def test_truncation_skipping_and_seeded_sampling(target, prompts):
    lengths = [len(prompt_ids(target.tokenizer, p)) for p in prompts]
    max_seq_len = sorted(lengths)[len(lengths) // 2] + 3
    with pytest.warns(UserWarning, match=r"skipped \d+ of 11 prompts"):
        rows = regenerate(target, prompts, max_new_tokens=MAX_NEW, temperature=1.0, batch_size=3, seed=7,
                          max_seq_len=max_seq_len)
    kept = [i for i, n in enumerate(lengths) if n < max_seq_len]
    assert [r["id"] for r in rows] == [f"p{i:05d}" for i in kept]
    for row, i in zip(rows, kept):
        assert len(row["input_ids"]) == len(row["loss_mask"]) == min(max_seq_len, lengths[i] + MAX_NEW)
        assert row["input_ids"][: lengths[i]] == prompt_ids(target.tokenizer, prompts[i])
        assert sum(row["loss_mask"]) == len(row["input_ids"]) - lengths[i] > 0
    with pytest.warns(UserWarning):
        again = regenerate(target, prompts, max_new_tokens=MAX_NEW, temperature=1.0, batch_size=3, seed=7,
                           max_seq_len=max_seq_len)
    assert again == rows
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        regenerate(target, prompts, max_new_tokens=4, temperature=-1.0, batch_size=2, seed=0, max_seq_len=64)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        regenerate(target, prompts, max_new_tokens=4, temperature=0.0, batch_size=0, seed=0, max_seq_len=64)


def test_write_and_read_round_trip(tmp_path):
    rows = [{"id": "p00000", "prompt": "héllo", "input_ids": [1, 2, 3], "loss_mask": [0, 1, 1], "answer": "x"},
            {"id": "p00001", "prompt": "b", "input_ids": [4], "loss_mask": [1], "answer": ""}]
    path = tmp_path / "out" / "conversations.jsonl"
    path.parent.mkdir()
    path.write_text("old contents\n")
    write_jsonl(path, rows)
    assert read_conversations(path) == rows
    assert [p.name for p in path.parent.iterdir()] == ["conversations.jsonl"]  # no temp file left behind


def _row(**overrides):
    row = {"id": "p00000", "prompt": "a", "input_ids": [1, 2], "loss_mask": [0, 1], "answer": "b"}
    row.update(overrides)
    return json.dumps(row)


@pytest.mark.parametrize("lines, message", [
    ([_row(), "{not json"], r"c\.jsonl:2: malformed JSON"),
    ([_row(), "", json.dumps({"id": "p1", "prompt": "a"})], r"c\.jsonl:3: missing key\(s\) input_ids, loss_mask"),
    ([_row(loss_mask=[0, 1, 1])], r"c\.jsonl:1: input_ids has 2 tokens but loss_mask has 3"),
    ([_row(input_ids=[1, "2"])], r"c\.jsonl:1: input_ids must be a list of non-negative ints"),
    ([_row(loss_mask=[0, 2])], r"c\.jsonl:1: loss_mask must be a list of 0/1"),
    (["[1, 2]"], r"c\.jsonl:1: expected a JSON object"),
    ([], r"c\.jsonl is empty"),
])
def test_read_errors_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ValueError, match=message):
        read_conversations(path)


def test_read_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"conversations file .*none\.jsonl does not exist"):
        read_conversations(tmp_path / "none.jsonl")
