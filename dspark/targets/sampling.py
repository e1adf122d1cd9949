"""Per-prompt seeded sampling for ``TargetBackend.generate``.

Regeneration splits the prompts over generate groups and batches them by length, so the batch a prompt lands in
depends on the number of ranks and on ``batch_size``. Drawing every row of a batch from one generator seeded per
batch ties a prompt's answer to that accident. Here each prompt owns a generator seeded from ``(seed, index)``
alone (``index`` = the prompt's position in the full prompt list), so its draws are the same whichever batch,
rank or group decodes it: 1, 2 or N groups write the same conversations at T > 0.
"""

from __future__ import annotations

import hashlib

import torch


def prompt_seed(seed: int, index: int) -> int:
    """A 63-bit seed for prompt ``index`` under run ``seed``; hashed so neighbouring (seed, index) pairs do not
    give correlated generator streams."""
    digest = hashlib.sha256(f"dspark-sample:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class RowSampler:
    """One generator per batch row, each seeded from (seed, that row's prompt index), or by ``indices`` itself
    when ``seed`` is None.

    ``sample(logits_BV, temperature)`` draws row b from ``softmax(logits_BV[b] / temperature)`` in fp32 with row
    b's own generator (argmax at temperature 0). Every row draws once per call, so row b's k-th token uses the
    k-th draw of its own stream whatever the other rows are doing.
    """

    def __init__(self, seed: int | None, indices: list[int]):
        # seed None: ``indices`` are the generators' seeds themselves (``dspark serve`` passes each request's seed,
        # which server regeneration sets to ``prompt_seed(seed, index)``: the same draws as in-process)
        self.seeds = list(indices) if seed is None else [prompt_seed(seed, i) for i in indices]
        self.generators: list[torch.Generator] | None = None

    def sample(self, logits_BV: torch.Tensor, temperature: float) -> torch.Tensor:
        if temperature <= 0:
            return logits_BV.argmax(-1)
        if logits_BV.shape[0] != len(self.seeds):
            raise ValueError(f"RowSampler holds {len(self.seeds)} rows, got logits for {logits_BV.shape[0]}")
        if self.generators is None:  # created where the logits live, on first use
            self.generators = [torch.Generator(device=logits_BV.device).manual_seed(s) for s in self.seeds]
        probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
        return torch.cat([torch.multinomial(probs_BV[b], 1, generator=g) for b, g in enumerate(self.generators)])


def row_sampling_processor(sampler: RowSampler, temperature: float):
    """A transformers ``LogitsProcessor`` that samples with ``sampler`` and leaves only the drawn token finite.

    Used with ``do_sample=False``: greedy decoding of that one-hot score picks the drawn token, so HF's
    ``generate`` keeps its padding, cache and stopping logic while the draw itself is per prompt.
    """
    from transformers import LogitsProcessor

    class _RowSampling(LogitsProcessor):
        def __call__(self, input_ids, scores):
            next_B = sampler.sample(scores, temperature)
            out = torch.full_like(scores, float("-inf"))
            return out.scatter_(1, next_B.view(-1, 1), 0.0)

    return _RowSampling()


def batch_indices(indices: list[int] | None, num_prompts: int) -> list[int]:
    """The prompt index of each of ``num_prompts`` prompts: ``indices`` checked, or 0..n-1 when None."""
    if indices is None:
        return list(range(num_prompts))
    if len(indices) != num_prompts:
        raise ValueError(f"generate got {len(indices)} indices for {num_prompts} prompts")
    return list(indices)
