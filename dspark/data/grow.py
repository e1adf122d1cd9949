"""Growing the training corpus from the target itself: prompts written from seed topics, follow-up user turns.

Both are generation tasks the target runs at the regeneration temperature, each request seeded from
``task_seed(kind, seed, index)`` alone (a hash distinct from the answers' ``prompt_seed``), so the same seed writes
the same prompts and follow-ups whatever the batching, and a resumed run continues exactly where it stopped.

- ``data.self_prompts = N``: the target writes one user question for each of N topics (the built-in ``TOPICS``,
  cycled), kept in ``<run>/data/self_prompts.jsonl`` (resumable, ``dspark.data.output``) and appended to the
  training prompts, which are then answered as usual.
- ``data.followup_turns = K``: after answering a conversation's user turns the target writes the user's next
  message and answers it, K times (``dspark.data.multiturn``: ``followup_request``, ``regenerate_turns``).

A generator is any callable ``gen(requests, seeds) -> [(ids, finish_reason) | failure str]`` where a request is a
list of chat messages: ``LocalGenerate`` runs the in-process target, ``dspark.data.server.ServerGenerate`` posts to
OpenAI-compatible servers; both seed row r with ``seeds[r]`` itself.
"""

from __future__ import annotations

import hashlib

from dspark.data.multiturn import render_ids, task_seed

# Seed topics for self-written prompts: the spread of a general chat corpus (reasoning, code, writing, knowledge).
TOPICS = (
    "basic arithmetic", "fractions and percentages", "probability", "geometry", "algebra word problems",
    "sorting algorithms", "Python lists and dictionaries", "recursion", "SQL queries", "regular expressions",
    "debugging a program", "unit testing", "writing a short poem", "writing a formal email", "summarising a text",
    "the water cycle", "photosynthesis", "the solar system", "electricity", "the human heart",
    "world history", "geography of Europe", "healthy cooking", "personal budgeting", "learning a language",
    "time management", "travel planning", "climate and weather", "how computers store numbers", "chess strategy",
)
SELF_PROMPT_MAX_NEW_TOKENS = 64  # a question, not an essay


def question_request(topic: str) -> list[dict]:
    return [{"role": "user", "content": f"Write one question that a curious user might ask an AI assistant about "
                                        f"{topic}. Reply with the question only."}]


class LocalGenerate:
    """The in-process target as a generator: one batched ``generate`` call per list of requests."""

    def __init__(self, target, *, max_new_tokens: int, temperature: float, batch_size: int):
        self.target, self.max_new_tokens, self.temperature = target, max_new_tokens, temperature
        self.batch_size = batch_size
        self.tokenizer = target.tokenizer

    def __call__(self, requests: list[list[dict]], seeds: list[int], max_new_tokens: int | None = None,
                 prefixes: list[list[int]] | None = None) -> list:

        if not requests:
            return []
        prefixes = prefixes or [render_ids(self.tokenizer, r, generation_prompt=True) for r in requests]
        limit = max_new_tokens or self.max_new_tokens
        # seed None: ``seeds`` seed each row's generator themselves (dspark.targets.sampling.RowSampler)
        answers = self.target.generate(prefixes, max_new_tokens=limit, temperature=self.temperature,
                                       batch_size=self.batch_size, seed=None, indices=list(seeds))
        eos = self.tokenizer.eos_token_id
        return [(list(a), "stop" if a and a[-1] == eos else "length") for a in answers]


def self_prompt_settings(n: int, seed: int, temperature: float, tokenizer_name: str) -> dict:
    return {"kind": "self_prompts", "num": n, "seed": seed, "temperature": temperature, "tokenizer": tokenizer_name,
            "max_new_tokens": SELF_PROMPT_MAX_NEW_TOKENS,
            "topics_sha": hashlib.sha256("\n".join(TOPICS).encode()).hexdigest()[:16]}


def synthesize_prompts(gen, tokenizer, output, n: int, seed: int, chunk: int = 16, progress: bool = False) -> list[str]:
    """The n prompts the target writes for ``TOPICS`` (cycled), appended to ``output`` (a ``ResumableJsonl``) chunk
    by chunk; returns the non-empty ones in order. A rerun keeps the rows already written and continues."""
    from tqdm import tqdm

    if n < 0:
        raise ValueError(f"data.self_prompts must be >= 0, got {n}")
    if not output.complete:
        done = len(output.rows)
        for lo in tqdm(range(done, n, chunk), desc="self prompts", disable=not progress, unit="chunk"):
            ks = list(range(lo, min(lo + chunk, n)))
            topics = [TOPICS[k % len(TOPICS)] for k in ks]
            results = gen([question_request(t) for t in topics], [task_seed("prompt", seed, k) for k in ks],
                          max_new_tokens=SELF_PROMPT_MAX_NEW_TOKENS)
            rows = []
            for k, topic, result in zip(ks, topics, results):
                if isinstance(result, str):
                    raise RuntimeError(f"self prompt {k} ({topic}) failed: {result}")
                text = tokenizer.decode(result[0], skip_special_tokens=True).strip()
                rows.append({"id": f"q{k:05d}", "topic": topic, "prompt": text})
            output.append(rows)
        output.finish()
        rows = output.rows
    else:  # finished by an earlier run: read back what it wrote
        import json

        rows = [json.loads(line) for line in output.path.read_text(encoding="utf-8").splitlines()]
    return [r["prompt"] for r in rows if r["prompt"]]


def add_self_prompts(data, data_dir, gen, tokenizer, train_prompts: list[str], turns, target_name: str,
                     restart: bool, progress: bool):
    """``(prompts, turns)`` with the ``data.self_prompts`` prompts the target writes appended (resumable in
    ``<data_dir>/self_prompts.jsonl``); ``turns`` stays None when there are none."""
    from pathlib import Path

    from dspark.data.output import ResumableJsonl

    settings = self_prompt_settings(data.self_prompts, data.seed, data.regen_temperature, target_name)
    out = ResumableJsonl(Path(data_dir) / "self_prompts.jsonl", settings, restart=restart)
    written = synthesize_prompts(gen, tokenizer, out, data.self_prompts, data.seed, chunk=4 * data.regen_batch_size,
                                 progress=progress)
    return train_prompts + written, None if turns is None else turns + [[p] for p in written]
