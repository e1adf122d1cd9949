"""Regenerate answers with the target itself, and read/write the resulting conversations file.

A drafter learns to predict the target's own continuations, so the answers in the training data are the
target's: each prompt is rendered with the chat template, the target generates (``TargetBackend.generate``,
batched with a KV cache), and the generated ids are appended unchanged (see ``dspark.data.chat``).

conversations.jsonl holds one row per prompt:
    {"id": "p00012", "prompt": str, "input_ids": [int], "loss_mask": [0|1], "answer": str}
``id`` is the prompt's index in the list given to ``regenerate``; ``answer`` decodes the kept answer tokens.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

from dspark.data.chat import conversation_ids, prompt_ids
from dspark.data.jsonl import parse_object

REQUIRED_KEYS = ("id", "input_ids", "loss_mask")


def regenerate(target, prompts: list[str], *, max_new_tokens: int, temperature: float, batch_size: int, seed: int,
               max_seq_len: int, progress: bool = False, group: tuple[int, int] = (0, 1)) -> list[dict]:
    """Answer every prompt with ``target`` and return conversation rows (truncated to ``max_seq_len`` tokens).

    ``temperature`` 0 is greedy; at T > 0 prompt i samples from (``seed``, i) alone, so its answer is the same
    whatever ``batch_size`` or ``group``. A prompt whose template alone fills ``max_seq_len`` would leave no answer
    token to train on: it is skipped (not generated) with one warning giving the count. ``group`` = (index, count)
    answers only every count-th kept prompt from ``index`` on (the share of one generate group, see
    ``TargetBackend.generate_group``); row ids are the prompts' indices in ``prompts`` either way.
    """
    _check_settings(max_new_tokens, temperature, batch_size, max_seq_len)
    prefixes, keep = plan(target.tokenizer, prompts, max_seq_len)
    return generate_rows(target, prompts, prefixes, keep[group[0]::group[1]], max_new_tokens=max_new_tokens,
                         temperature=temperature, batch_size=batch_size, seed=seed, max_seq_len=max_seq_len,
                         progress=progress)


def _check_settings(max_new_tokens: int, temperature: float, batch_size: int, max_seq_len: int) -> None:
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size), ("max_seq_len", max_seq_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")


def plan(tokenizer, prompts: list[str], max_seq_len: int) -> tuple[list[list[int]], list[int]]:
    """Chat-formatted prompt ids of every prompt and the indices of those short enough to answer (one warning
    counts the others)."""
    prefixes = [prompt_ids(tokenizer, p) for p in prompts]
    keep = [i for i, prefix in enumerate(prefixes) if len(prefix) < max_seq_len]
    if len(keep) < len(prompts):
        warnings.warn(
            f"skipped {len(prompts) - len(keep)} of {len(prompts)} prompts whose chat-formatted prompt alone has "
            f">= max_seq_len={max_seq_len} tokens",
            stacklevel=3,
        )
    return prefixes, keep


def unit_id(unit: int, samples_per_prompt: int = 1) -> str:
    """Row id of answer unit ``unit``: prompt ``unit // S``, sample ``unit % S`` ("p00012", or "p00012-s1" when
    every prompt has S > 1 answers)."""
    if samples_per_prompt == 1:
        return f"p{unit:05d}"
    return f"p{unit // samples_per_prompt:05d}-s{unit % samples_per_prompt}"


def generate_rows(target, prompts: list[str], prefixes: list[list[int]], indices: list[int], *, max_new_tokens: int,
                  temperature: float, batch_size: int, seed: int, max_seq_len: int,
                  progress: bool = False, samples_per_prompt: int = 1) -> list[dict]:
    """Conversation rows of the answer units at ``indices`` (in that order; unit u answers prompt u // S), each
    sampled from (seed, u): prompt i's k-th answer is the same whatever else is generated."""
    tokenizer = target.tokenizer
    S = samples_per_prompt
    answers = target.generate([prefixes[u // S] for u in indices], max_new_tokens=max_new_tokens,
                              temperature=temperature, batch_size=batch_size, seed=seed, progress=progress,
                              indices=indices)
    return [conversation_row(tokenizer, unit_id(u, S), prompts[u // S], prefixes[u // S], answer, max_seq_len)
            for u, answer in zip(indices, answers)]


def conversation_row(tokenizer, row_id: str, prompt: str, prefix: list[int], answer: list[int],
                     max_seq_len: int) -> dict:
    """One conversations.jsonl row: the prompt ids then the answer ids as generated, cut at ``max_seq_len``."""
    input_ids, loss_mask = conversation_ids(tokenizer, prompt, answer, prefix=prefix)
    input_ids, loss_mask = input_ids[:max_seq_len], loss_mask[:max_seq_len]
    return {
        "id": row_id,
        "prompt": prompt,
        "input_ids": input_ids,
        "loss_mask": loss_mask,
        "answer": tokenizer.decode(input_ids[len(prefix):], skip_special_tokens=True),
    }


# Batches per generate group in one written chunk: enough to keep a pipeline's stages busy, few enough that a
# kill loses little work.
CHUNK_BATCHES = 4


def regenerate_resumable(target, prompts: list[str], output, *, max_new_tokens: int, temperature: float,
                         batch_size: int, seed: int, max_seq_len: int, progress: bool = False,
                         group: tuple[int, int] = (0, 1), gather=None, is_writer: bool = True,
                         samples_per_prompt: int = 1, turns: list[list[str]] | None = None,
                         followups: int = 0) -> None:
    """``regenerate`` into ``output`` (a ``dspark.data.output.ResumableJsonl`` on the writing rank), chunk by chunk.

    The kept prompts are cut into fixed chunks of ``CHUNK_BATCHES * batch_size * group count`` prompts (in prompt
    order); each group answers its share of a chunk, ``gather`` (rows of every rank, merged by id; identity for
    one process) brings them to the writer, which appends the chunk in prompt order and fsyncs. A rerun resumes
    after the last whole chunk written (a torn chunk is cut back to its start, so the batches, and at T = 0 the
    bytes, are those of an uninterrupted run). ``output.rows`` must be the same on every rank (the caller
    broadcasts them). ``samples_per_prompt`` S > 1 writes S sampled answers per prompt (on-policy data; needs
    T > 0), rows ``p<i>-s<k>``, each its own seeded unit. ``turns`` (the user turns of each prompt, first turn =
    ``prompts[i]``) regenerates every turn (``dspark.data.multiturn``), then ``followups`` user turns the target
    writes itself (``dspark.data.grow``).
    """
    from tqdm import tqdm

    _check_settings(max_new_tokens, temperature, batch_size, max_seq_len)
    S = samples_per_prompt
    if S < 1 or (S > 1 and temperature == 0) or (S > 1 and turns is not None):
        raise ValueError(f"samples_per_prompt must be >= 1, and 1 at temperature 0 (greedy answers are identical) "
                         f"or with several turns, got {S} at temperature {temperature:g}")
    prefixes, kept = plan(target.tokenizer, prompts, max_seq_len)
    keep = [i * S + k for i in kept for k in range(S)]  # answer units
    chunk = CHUNK_BATCHES * batch_size * group[1]
    done = [row["id"] for row in output.rows]
    expected = [unit_id(u, S) for u in keep]
    if done != expected[: len(done)]:
        first = next(k for k, (a, b) in enumerate(zip(done + [None], expected + [None])) if a != b)
        raise ValueError(f"{getattr(output, 'partial', 'the partial output')}: row {first + 1} is "
                         f"{done[first] if first < len(done) else 'missing'!r}, expected "
                         f"{expected[first] if first < len(expected) else 'no more rows'!r} for these prompts; "
                         "pass --restart to discard it")
    start = len(done) - len(done) % chunk  # back to the start of a torn chunk
    if is_writer:
        output.truncate(start)
    starts = range(start, len(keep), chunk)
    for lo in tqdm(starts, desc="regenerate", disable=not progress, unit="chunk"):
        share = keep[lo : lo + chunk][group[0] :: group[1]]
        if not share:
            rows = []
        elif turns is not None:
            from dspark.data.grow import LocalGenerate
            from dspark.data.multiturn import regenerate_turns

            gen = LocalGenerate(target, max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size)
            rows, _ = regenerate_turns(gen, target.tokenizer, turns, share, seed=seed, max_seq_len=max_seq_len,
                                       followups=followups)  # in-process: no failures, length_policy "keep"
        else:
            rows = generate_rows(target, prompts, prefixes, share, max_new_tokens=max_new_tokens,
                                 temperature=temperature, batch_size=batch_size, seed=seed, max_seq_len=max_seq_len,
                                 samples_per_prompt=S)
        rows = gather(rows) if gather is not None else rows
        if is_writer:
            order = {unit_id(u, S): k for k, u in enumerate(keep[lo : lo + chunk])}
            output.append(sorted(rows, key=lambda r: order[r["id"]]))


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write ``rows`` as jsonl atomically: a temp file in the same directory, fsync, then rename.

    A crash mid-write leaves either the old file or none, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_conversations(path: str | os.PathLike) -> list[dict]:
    """Read a conversations.jsonl written by ``write_jsonl(regenerate(...))``.

    Raises ``ValueError`` naming the file and line for malformed JSON, missing keys (``id``, ``input_ids``,
    ``loss_mask``) or an ``input_ids``/``loss_mask`` pair of different lengths or types.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"conversations file {path} does not exist (run `dspark prepare` first)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                rows.append(_parse_conversation(line, f"{path}:{line_no}"))
    if not rows:
        raise ValueError(f"conversations file {path} is empty")
    return rows


def _parse_conversation(line: str, where: str) -> dict:
    row = parse_object(line, where)
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)} "
                         f"(a conversation needs {', '.join(REQUIRED_KEYS)})")
    ids, mask = row["input_ids"], row["loss_mask"]
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ValueError(f"{where}: input_ids must be a list of non-negative ints")
    if not isinstance(mask, list) or not all(m in (0, 1) and not isinstance(m, float) for m in mask):
        raise ValueError(f"{where}: loss_mask must be a list of 0/1")
    if len(ids) != len(mask):
        raise ValueError(f"{where}: input_ids has {len(ids)} tokens but loss_mask has {len(mask)}")
    return row
