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

import hashlib

from dspark.data.chat import FALLBACK_TEMPLATE


def task_seed(kind: str, seed: int, index: int) -> int:
    """A 63-bit sampling seed for generation task ``kind`` number ``index`` under run ``seed``."""
    digest = hashlib.sha256(f"dspark-{kind}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def followup_request(messages: list[dict]) -> list[dict]:
    """One user message asking for the user's next turn of ``messages`` (a transcript, so that it works with
    templates that require a conversation to start with the user and alternate)."""
    transcript = "\n\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)
    return [{"role": "user", "content": f"Here is a conversation between a user and an AI assistant.\n\n{transcript}"
                                        f"\n\nWrite the user's next message in this conversation. Reply with the "
                                        f"message only."}]


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


def regenerate_turns(gen, tokenizer, conversations: list[list[str]], units: list[int], *, seed: int,
                     max_seq_len: int, followups: int = 0,
                     length_policy: str = "keep") -> tuple[list[dict], dict[int, str]]:
    """(rows, {conversation: reason}) for the conversations at ``units`` (indices into ``conversations``), every
    user turn answered in turn by ``gen`` (``dspark.data.grow``: the in-process target or servers).

    Turn t of conversation c samples from ``prompt_seed(seed, c * 1000 + t)``, so answers do not depend on
    batching. With ``followups`` = K the target then writes the user's next message K times
    (``followup_request``, seeded by ``task_seed("followup", seed, c * 1000 + t)``) and answers
    it; an empty follow-up ends the conversation. A conversation stops at the first turn whose rendered request
    reaches ``max_seq_len``; the row is cut at ``max_seq_len`` tokens. A conversation whose request failed for good
    (servers), or with ``length_policy="drop"`` an answer cut by ``max_new_tokens``, has no row but a reason.
    """
    from dspark.targets.sampling import prompt_seed

    messages: dict[int, list[dict]] = {c: [] for c in units}
    failed: dict[int, str] = {}
    truncated: set[int] = set()
    live, turn = list(units), 0
    while live:
        users = {c: conversations[c][turn] for c in live if turn < len(conversations[c])}
        writing = [c for c in live if len(conversations[c]) <= turn < len(conversations[c]) + followups]
        requests = [followup_request(messages[c]) for c in writing]
        prefixes = [render_ids(tokenizer, r, generation_prompt=True) for r in requests]
        fits = [k for k, prefix in enumerate(prefixes) if len(prefix) < max_seq_len]
        seeds = [task_seed("followup", seed, writing[k] * 1000 + turn) for k in fits]
        results = gen([requests[k] for k in fits], seeds, prefixes=[prefixes[k] for k in fits])
        for k, result in zip(fits, results):
            if isinstance(result, str):
                failed[writing[k]] = f"follow-up before turn {turn + 1}: {result}"
            elif text := tokenizer.decode(result[0], skip_special_tokens=True).strip():
                users[writing[k]] = text
        asking, requests, prefixes = [], [], []
        for c in live:
            if c not in users or c in failed:
                continue
            request = messages[c] + [{"role": "user", "content": users[c]}]
            prefix = render_ids(tokenizer, request, generation_prompt=True)
            if len(prefix) >= max_seq_len:
                continue
            asking.append(c)
            requests.append(request)
            prefixes.append(prefix)
        results = gen(requests, [prompt_seed(seed, c * 1000 + turn) for c in asking], prefixes=prefixes)
        for c, request, result in zip(asking, requests, results):
            if isinstance(result, str):
                failed[c] = f"turn {turn + 1}: {result}"
                continue
            answer, finish = result
            truncated.update([c] if finish == "length" else [])
            messages[c] = request + [{"role": "assistant",
                                      "content": tokenizer.decode(answer, skip_special_tokens=True)}]
        live = [c for c in asking if c not in failed]
        turn += 1
    if length_policy == "drop":
        failed.update({c: "dropped: finish_reason=length" for c in truncated if c not in failed})
    rows = []
    for c in units:
        if not messages[c] or c in failed:
            continue  # even the first turn's prompt fills max_seq_len, or the caller records the failure
        ids, mask = multi_turn_ids(tokenizer, messages[c])
        rows.append({"id": f"p{c:05d}", "turns": [m["content"] for m in messages[c] if m["role"] == "user"],
                     "input_ids": ids[:max_seq_len], "loss_mask": mask[:max_seq_len],
                     "answers": [m["content"] for m in messages[c] if m["role"] == "assistant"],
                     **({"truncated": True} if length_policy == "mark" and c in truncated else {})})
    return rows, failed
