"""Multi-turn conversations: turn-by-turn regeneration and loss masks on every assistant turn.

A conversation of user turns u1..un is regenerated turn by turn: the target answers u1, then u2 after
[u1, a1] (its own regenerated a1), and so on, so every assistant turn answers the regenerated history. The
training row is the tokenizer's own chat template rendering of the whole conversation; the loss mask covers
each assistant turn as the template renders it (its content and end-of-turn tokens, not the header that
``add_generation_prompt`` adds). Turn k's span is found by rendering the conversation up to u_k with the
generation prompt (where the answer starts) and up to a_k (where it ends); both must be prefixes of the full
rendering, which holds for templates that never re-render earlier turns (ChatML/SmolLM2, Qwen3 without
reasoning content in the history, Llama 3). A template that does is refused with the turn where it happened.
Later turns' answers are text decoded from the generated ids and re-tokenised with the conversation, unlike
single-turn rows, whose answer ids are kept exactly as generated.
"""

from __future__ import annotations

from dspark.data.chat import FALLBACK_TEMPLATE


def render_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        if len(messages) == 1 and generation_prompt:
            return list(tokenizer(FALLBACK_TEMPLATE.format(prompt=messages[0]["content"]))["input_ids"])
        raise ValueError("multi-turn conversations need a tokenizer with a chat template")
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                            return_dict=True)
    return list(encoded["input_ids"])


def multi_turn_ids(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """``(input_ids, loss_mask)`` of an alternating user/assistant conversation ending with an assistant turn;
    mask 1 on every assistant turn's tokens as the template renders them."""
    full = render_ids(tokenizer, messages, generation_prompt=False)
    mask = [0] * len(full)
    for k in range(1, len(messages), 2):
        start = render_ids(tokenizer, messages[:k], generation_prompt=True)
        end = render_ids(tokenizer, messages[: k + 1], generation_prompt=False)
        if full[: len(start)] != start or full[: len(end)] != end or len(end) < len(start):
            raise ValueError(f"the chat template renders earlier turns differently once assistant turn "
                             f"{k // 2 + 1} follows, so its loss mask cannot be located; multi-turn needs a "
                             f"template whose rendering of a conversation prefix is a prefix of the whole")
        for t in range(len(start), len(end)):
            mask[t] = 1
    return full, mask


def regenerate_turns(target, conversations: list[list[str]], units: list[int], *, max_new_tokens: int,
                     temperature: float, batch_size: int, seed: int, max_seq_len: int) -> list[dict]:
    """Rows for the conversations at ``units`` (indices into ``conversations``), every user turn answered in turn.

    Turn t of conversation c samples from (seed, c * 1000 + t) (``generate``'s per-prompt seeding), so answers
    do not depend on batching. A conversation stops at the first turn whose rendered history reaches
    ``max_seq_len``; the row is cut at ``max_seq_len`` tokens.
    """
    tokenizer = target.tokenizer
    messages = {c: [] for c in units}
    live = list(units)
    for turn in range(max(len(conversations[c]) for c in units)):
        asking, prefixes = [], []
        for c in live:
            if turn >= len(conversations[c]):
                continue
            prefix = render_ids(tokenizer, messages[c] + [{"role": "user", "content": conversations[c][turn]}],
                                generation_prompt=True)
            if len(prefix) >= max_seq_len:
                continue
            asking.append(c)
            prefixes.append(prefix)
        if not asking:
            break
        answers = target.generate(prefixes, max_new_tokens=max_new_tokens, temperature=temperature,
                                  batch_size=batch_size, seed=seed, indices=[c * 1000 + turn for c in asking])
        for c, answer in zip(asking, answers):
            text = tokenizer.decode(answer, skip_special_tokens=True)
            messages[c] += [{"role": "user", "content": conversations[c][turn]}, {"role": "assistant", "content": text}]
        live = asking
    rows = []
    for c in units:
        if not messages[c]:
            continue  # even the first turn's prompt fills max_seq_len
        ids, mask = multi_turn_ids(tokenizer, messages[c])
        rows.append({"id": f"p{c:05d}", "turns": [m["content"] for m in messages[c] if m["role"] == "user"],
                     "input_ids": ids[:max_seq_len], "loss_mask": mask[:max_seq_len],
                     "answers": [m["content"] for m in messages[c] if m["role"] == "assistant"]})
    return rows
