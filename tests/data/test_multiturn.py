"""Multi-turn: golden loss masks from the SmolLM2 and Qwen3 chat templates; turn-by-turn regeneration."""

import json

import pytest
from transformers import AutoTokenizer

from dspark.config import TargetConfig
from dspark.data import regenerate as regen
from dspark.data.multiturn import multi_turn_ids
from dspark.data.output import ResumableJsonl
from dspark.targets import load_target

CONVERSATION = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "2 + 3 = 5."}]

# Qwen3's chat template, reduced to what a conversation without tools or reasoning content exercises: an assistant
# turn of the history is rendered as in the full template ("<|im_start|>assistant\n" + content + "<|im_end|>\n").
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def _masked_spans(tok, ids, mask):
    spans, current = [], []
    for t, m in zip(ids + [None], mask + [0]):
        if m:
            current.append(t)
        elif current:
            spans.append(tok.decode(current))
            current = []
    return spans


@pytest.mark.parametrize("template", ["smollm2", "qwen3"])
def test_golden_masks_cover_every_assistant_turn_and_its_end_of_turn(tokenizer_dir, template):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if template == "qwen3":
        tok.chat_template = QWEN3_TEMPLATE
    ids, mask = multi_turn_ids(tok, CONVERSATION)
    text = tok.decode(ids)
    if template == "smollm2":  # its template adds a default system prompt
        assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n")
    assert _masked_spans(tok, ids, mask) == ["Hello! How can I help?<|im_end|>\n", "2 + 3 = 5.<|im_end|>\n"]


def test_a_template_that_rewrites_history_is_refused(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = ("{% for m in messages %}{% if loop.last or m.role == 'user' %}{{ m.role }}: {{ m.content }}\n"
                         "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match=r"renders earlier turns differently once assistant turn 1 follows"):
        multi_turn_ids(tok, CONVERSATION)


def test_turn_by_turn_regeneration_answers_the_regenerated_history(tiny_llama_dir, tmp_path, one_thread):
    target = load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[0]))
    turns = [["Hi there", "Add 2 and 3."], ["Name a colour."], ["One", "Two", "Three"]]
    out = ResumableJsonl(tmp_path / "t.jsonl", {"x": 1})
    regen.regenerate_resumable(target, [t[0] for t in turns], out, max_new_tokens=6, temperature=1.0,
                               batch_size=2, seed=1, max_seq_len=512, turns=turns)
    out.finish()
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [r["turns"] for r in rows] == turns and [len(r["answers"]) for r in rows] == [2, 1, 3]
    tok = target.tokenizer
    for row in rows:
        messages = [m for u, a in zip(row["turns"], row["answers"])
                    for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
        assert (row["input_ids"], row["loss_mask"]) == multi_turn_ids(tok, messages)
        assert sum(row["loss_mask"]) > 0 and len(row["input_ids"]) == len(row["loss_mask"])
    # conversation 0's second answer is what the target samples after its regenerated first answer
    first = rows[0]
    history = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": first["answers"][0]},
               {"role": "user", "content": "Add 2 and 3."}]
    prefix = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=True)
    again = target.generate([list(prefix["input_ids"])], max_new_tokens=6, temperature=1.0, batch_size=1, seed=1,
                            indices=[0 * 1000 + 1])
    assert tok.decode(again[0], skip_special_tokens=True) == first["answers"][1]
