import json

import pytest

from dspark.data.prompts import BUILTIN_PROMPTS, load_prompts, split_prompts


def test_builtin_set_is_large_varied_and_clean():
    rows = [json.loads(line) for line in BUILTIN_PROMPTS.read_text().splitlines()]
    prompts = load_prompts("builtin")
    assert prompts == [row["turns"][0] for row in rows]
    assert len(prompts) >= 140
    assert len({row["category"] for row in rows}) >= 4
    assert all(p.strip() == p and p for p in prompts)
    assert len(set(prompts)) == len(prompts)
    assert load_prompts("builtin", max_prompts=5) == prompts[:5]


def test_turns_and_prompt_rows_and_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"turns": ["first", "second turn is ignored"], "category": "x"}\n\n{"prompt": "plain"}\n')
    assert load_prompts(str(path)) == ["first", "plain"]


@pytest.mark.parametrize("content, message", [
    ("", r"holds no prompts"),
    ("\n\n", r"holds no prompts"),
    ('{"prompt": "ok"}\n{"prompt": "broken"\n', r"p\.jsonl:2: malformed JSON"),
    ('{"prompt": "ok"}\n\n{"text": "no prompt here"}\n',
     r"p\.jsonl:3: row has neither 'turns' nor 'prompt' \(keys: text\)"),
    ('{"turns": []}\n', r"p\.jsonl:1: 'turns' must be a non-empty list of strings"),
    ('{"turns": [3]}\n', r"p\.jsonl:1: 'turns' must be a non-empty list of strings"),
    ('{"prompt": 7}\n', r"p\.jsonl:1: 'prompt' must be a string"),
    ('{"prompt": "  "}\n', r"p\.jsonl:1: the prompt is empty"),
    ('["a list"]\n', r"p\.jsonl:1: expected a JSON object"),
])
def test_loader_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_prompts(str(path))


def test_missing_file_and_bad_max_prompts(tmp_path):
    with pytest.raises(ValueError, match=r"prompt file .*nope\.jsonl not found"):
        load_prompts(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="max_prompts must be >= 0"):
        load_prompts("builtin", max_prompts=-1)


def test_split_is_deterministic_disjoint_and_ordered():
    prompts = load_prompts("builtin")
    train, held = split_prompts(prompts, 16, seed=0)
    assert (train, held) == split_prompts(prompts, 16, seed=0)
    assert len(held) == 16 and len(train) == len(prompts) - 16
    assert sorted(train + held) == sorted(prompts)
    # Both parts keep file order.
    assert train == [p for p in prompts if p in set(train)] and held == [p for p in prompts if p in set(held)]
    assert split_prompts(prompts, 16, seed=1)[1] != held
    assert split_prompts(prompts, 0, seed=0) == (prompts, [])
    with pytest.raises(ValueError, match="leaves no training prompts"):
        split_prompts(prompts[:3], 3, seed=0)
    with pytest.raises(ValueError, match="must be >= 0"):
        split_prompts(prompts, -1, seed=0)
