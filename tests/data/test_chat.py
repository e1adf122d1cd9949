import pytest

from dspark.data.chat import FALLBACK_TEMPLATE, conversation_ids, prompt_ids


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_prompt_ids_follow_the_chat_template(tokenizer):
    ids = prompt_ids(tokenizer, "What is 2 + 2?")
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's template adds its default system turn


def test_loss_mask_covers_exactly_the_answer(tokenizer):
    prompt, answer = "What is 2 + 2?", "The answer is 4."
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids, loss_mask = conversation_ids(tokenizer, prompt, answer_ids)
    prefix = prompt_ids(tokenizer, prompt)
    assert input_ids[: len(prefix)] == prefix
    assert loss_mask == [0] * len(prefix) + [1] * len(answer_ids)
    assert [t for t, m in zip(input_ids, loss_mask) if m] == answer_ids  # end-of-turn token included
    # The same conversation rendered by the template in one piece: ours is its prefix (only the template's
    # trailing newline after <|im_end|> is missing, and it is never supervised).
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        tokenize=True, return_dict=True,
    )["input_ids"]
    assert full[: len(input_ids)] == input_ids
    assert tokenizer.decode(full[len(input_ids):]) == "\n"


def test_answer_ids_are_kept_verbatim(tokenizer):
    # A non-canonical split of "hello" (one token per character) must not be re-merged.
    answer_ids = [tokenizer.convert_tokens_to_ids(c) for c in "hello"]
    assert answer_ids != tokenizer("hello", add_special_tokens=False)["input_ids"]
    input_ids, loss_mask = conversation_ids(tokenizer, "Say hello", answer_ids)
    assert input_ids[-5:] == answer_ids and sum(loss_mask) == 5
    with pytest.raises(ValueError, match="answer_ids must be a list of non-negative token ids"):
        conversation_ids(tokenizer, "Say hello", [1, -3])


def test_fallback_without_chat_template(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None
    ids = prompt_ids(tok, "Name a color.")
    assert ids == tok(FALLBACK_TEMPLATE.format(prompt="Name a color."))["input_ids"]
    assert tok.decode(ids).endswith("User: Name a color.\nAssistant:")
    input_ids, loss_mask = conversation_ids(tok, "Name a color.", [42, 43])
    assert input_ids == ids + [42, 43] and loss_mask == [0] * len(ids) + [1, 1]
