"""Chat tokenisation and loss masks.

A training conversation is ``prompt_ids(tokenizer, prompt) + answer_ids``: the prompt prefix is rendered with
the tokenizer's chat template (generation prompt included, so it ends where the assistant starts), and the
answer is the target's own generated ids, appended as they are. Never re-tokenising the decoded answer keeps
the training tokens exactly the tokens the target produced (BPE round trips can merge or split differently).
"""

from __future__ import annotations

# Used when the tokenizer has no chat template (base models, bare tokenizers). The tokenizer adds its usual
# special tokens (e.g. BOS) around it; the answer follows "Assistant:" directly.
FALLBACK_TEMPLATE = "User: {prompt}\nAssistant:"


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a single-turn user ``prompt`` up to the start of the assistant's answer.

    Uses the tokenizer's chat template with ``add_generation_prompt=True``; without a chat template it uses
    ``FALLBACK_TEMPLATE`` tokenised with the tokenizer's default special tokens.
    """
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])
    return list(tokenizer(FALLBACK_TEMPLATE.format(prompt=prompt))["input_ids"])


def conversation_ids(tokenizer, prompt: str, answer_ids: list[int],
                     prefix: list[int] | None = None) -> tuple[list[int], list[int]]:
    """``(input_ids, loss_mask)`` of a prompt followed by the answer ids exactly as generated.

    ``loss_mask`` is 1 on every answer token (the end-of-turn token too, when the answer ends with it, so the
    drafter learns to predict the stop) and 0 on the prompt and template tokens. ``prefix`` = the prompt's
    ``prompt_ids`` when the caller already has them.
    """
    if not all(isinstance(t, int) and t >= 0 for t in answer_ids):
        raise ValueError(f"answer_ids must be a list of non-negative token ids, got {answer_ids!r:.80}")
    prefix = prompt_ids(tokenizer, prompt) if prefix is None else list(prefix)
    return prefix + list(answer_ids), [0] * len(prefix) + [1] * len(answer_ids)
