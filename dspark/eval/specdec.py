"""Speculative decoding of one drafter against the frozen target (DESIGN section 4, "Decoding and acceptance").

Chain drafting: each round the drafter proposes up to K tokens after the anchor (the last generated token), the
target verifies ``[anchor, d1..dK]`` in one forward, the first tokens that pass the rejection test are kept, and
the target adds one token of its own (the correction at the first rejection, or a bonus when all pass). With
``min(1, p_t/p_d)`` acceptance and residual resampling the output has exactly the target's distribution.

Legend: P prompt tokens, T context positions (before the anchor), L feature layers, H hidden size, V vocab,
K proposed tokens in a round, N tokens fed to the target in one step.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from dspark.eval.metrics import EvalReport, format_table

__all__ = ["GenerationResult", "EvalReport", "speculative_generate", "target_generate", "evaluate",
           "format_table", "prompt_seed", "verify_drafts"]


@dataclass
class GenerationResult:
    """The new tokens of one prompt plus one record per verification round."""

    tokens: list[int]  # new tokens, the first one from the prefill; a stop token ends it (and is kept)
    accepted: list[int] = field(default_factory=list)  # per round: drafted tokens accepted
    proposed: list[int] = field(default_factory=list)  # per round: drafted tokens verified
    confidences: list[list[float]] = field(default_factory=list)  # per round: confidence head output, if any
    wall_s: float = 0.0


def _check_request(prompt_ids, max_new_tokens: int, temperature: float) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: speculative decoding needs at least one prompt token")


def _probs(logits_NV: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits_NV.float() / temperature, dim=-1)


def _sample(probs_V: torch.Tensor, generator: torch.Generator | None) -> int:
    # Sample where the generator lives so a CPU generator also drives a target on GPU.
    device = generator.device if generator is not None else probs_V.device
    return int(torch.multinomial(probs_V.to(device), 1, generator=generator))


def _next_token(logits_V: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature == 0:
        return int(logits_V.argmax())
    return _sample(_probs(logits_V, temperature), generator)


def verify_drafts(logits_NV: torch.Tensor, drafts_K: torch.Tensor, draft_probs_KV: torch.Tensor | None, *,
                  temperature: float, generator: torch.Generator | None = None) -> tuple[int, int]:
    """Rejection-test K drafts against the target's logits over ``[anchor, d1..dK]`` (N = K + 1 rows; row i
    predicts draft i + 1, row K the bonus). ``draft_probs_KV``: the distributions the drafts were drawn from
    (unused at T = 0, where a draft passes iff it is the target's argmax).

    Returns (number of drafts accepted, the target's own next token: the correction or the bonus).
    """
    k = drafts_K.shape[0]
    if temperature == 0:
        target_N = logits_NV.argmax(dim=-1)
        matches_K = drafts_K == target_N[:k]
        num_accepted = int(matches_K.long().cumprod(0).sum())
        return num_accepted, int(target_N[num_accepted])

    p_target_NV = _probs(logits_NV, temperature)
    p_draft_KV = draft_probs_KV.to(p_target_NV)
    rows_K = torch.arange(k, device=p_target_NV.device)
    pt_K = p_target_NV[rows_K, drafts_K]
    pd_K = p_draft_KV[rows_K, drafts_K]
    # u < p_t/p_d written without the division: accepts with probability min(1, p_t/p_d).
    device = generator.device if generator is not None else pt_K.device
    u_K = torch.rand(k, generator=generator, device=device).to(pt_K.device)
    num_accepted = int((u_K * pd_K < pt_K).long().cumprod(0).sum())
    if num_accepted == k:
        return k, _sample(p_target_NV[k], generator)
    residual_V = (p_target_NV[num_accepted] - p_draft_KV[num_accepted]).clamp_min(0)
    if residual_V.sum() <= 0:
        # p_draft == p_target (up to rounding): a rejection has probability ~0, the target itself is exact.
        residual_V = p_target_NV[num_accepted]
    return num_accepted, _sample(residual_V, generator)


def _check_proposal(proposal, vocab_size: int, temperature: float) -> None:
    tokens_K = proposal.tokens_K
    if tokens_K.dim() != 1:
        raise ValueError(f"drafter proposal tokens_K must be 1-D, got shape {tuple(tokens_K.shape)}")
    if temperature > 0 and tuple(proposal.probs_KV.shape) != (tokens_K.shape[0], vocab_size):
        raise ValueError(f"drafter proposal probs_KV has shape {tuple(proposal.probs_KV.shape)}, expected "
                         f"({tokens_K.shape[0]}, {vocab_size}) to match tokens_K and the target vocabulary")


@torch.no_grad()
def speculative_generate(target, drafter, prompt_ids: list[int], *, max_new_tokens: int, temperature: float,
                         generator: torch.Generator | None = None,
                         stop_ids: Iterable[int] = ()) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after ``prompt_ids`` with ``drafter`` proposing and ``target`` verifying.

    The first new token comes from the prefill (it counts as generated and becomes the first anchor). A proposal
    is cut to the remaining budget, so a round that fills the budget ends without a bonus token. A stop token
    ends the sequence and is kept; drafts after it are neither kept nor counted as proposed.
    """
    _check_request(prompt_ids, max_new_tokens, temperature)
    stops = set(stop_ids)
    start = time.perf_counter()
    session = target.decode_session()
    logits_PV, features_PLH = session.extend(torch.tensor(list(prompt_ids), dtype=torch.long))
    vocab_size = logits_PV.shape[-1]
    # Target features of every position fed so far, preallocated so each round's context is a view, not a copy.
    context_TLH = features_PLH.new_empty((len(prompt_ids) + max_new_tokens, *features_PLH.shape[1:]))
    context_TLH[: len(prompt_ids)] = features_PLH
    num_context = len(prompt_ids)
    result = GenerationResult(tokens=[_next_token(logits_PV[-1], temperature, generator)])

    while result.tokens[-1] not in stops and len(result.tokens) < max_new_tokens:
        anchor = result.tokens[-1]
        proposal = drafter.propose(context_TLH[:num_context], anchor, temperature=temperature, generator=generator)
        _check_proposal(proposal, vocab_size, temperature)
        budget = max_new_tokens - len(result.tokens)
        drafts_K = proposal.tokens_K[:budget].to(logits_PV.device, torch.long)
        k = drafts_K.shape[0]
        draft_probs_KV = proposal.probs_KV[:k] if temperature > 0 else None

        logits_NV, features_NLH = session.extend(torch.cat([drafts_K.new_tensor([anchor]), drafts_K]))
        num_accepted, own_token = verify_drafts(logits_NV, drafts_K, draft_probs_KV, temperature=temperature,
                                                generator=generator)

        new = drafts_K[:num_accepted].tolist() + [own_token]
        stop_at = next((j for j, t in enumerate(new) if t in stops), len(new) - 1)
        new = new[: min(stop_at + 1, budget)]
        if len(new) <= num_accepted:
            # Cut inside the accepted drafts (stop token, or all accepted with the budget full): the drafts
            # after the cut were never in play, so the round counts only what was kept.
            num_accepted = k = len(new)
        result.accepted.append(num_accepted)
        result.proposed.append(k)
        if proposal.confidence_K is not None:
            result.confidences.append(proposal.confidence_K[:k].float().tolist())
        result.tokens.extend(new)

        # Keep the anchor and the kept drafts (all but the new anchor, which the target has not seen yet);
        # their features were computed on the right prefix, so they serve as the next round's context.
        num_kept = len(new)
        context_TLH[num_context : num_context + num_kept] = features_NLH[:num_kept]
        num_context += num_kept
        session.truncate(num_context)

    result.wall_s = time.perf_counter() - start
    return result


@torch.no_grad()
def target_generate(target, prompt_ids: list[int], *, max_new_tokens: int, temperature: float,
                    generator: torch.Generator | None = None, stop_ids: Iterable[int] = ()) -> list[int]:
    """Plain autoregressive decoding through the same session API: the reference speculative decoding must match.

    Returns the new tokens (a stop token ends the sequence and is kept).
    """
    _check_request(prompt_ids, max_new_tokens, temperature)
    stops = set(stop_ids)
    session = target.decode_session()
    logits_NV, _ = session.extend(torch.tensor(list(prompt_ids), dtype=torch.long))
    tokens = [_next_token(logits_NV[-1], temperature, generator)]
    while tokens[-1] not in stops and len(tokens) < max_new_tokens:
        logits_NV, _ = session.extend(torch.tensor([tokens[-1]], dtype=torch.long))
        tokens.append(_next_token(logits_NV[-1], temperature, generator))
    return tokens


def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of prompt ``index``: depends on (seed, index) only, never on order or batching."""
    digest = hashlib.sha256(f"dspark-eval:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def evaluate(target, drafter, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, seed: int,
             stop_ids: Iterable[int] = (), progress: bool = False) -> EvalReport:
    """Speculative decoding over ``prompts`` (token id lists) and the acceptance report of ``drafter``.

    Each prompt samples with its own generator seeded by ``prompt_seed(seed, index)``, on the drafter's device.
    """
    from tqdm import tqdm

    if not prompts:
        raise ValueError("evaluate needs at least one prompt")
    stop_ids = list(stop_ids)
    param = next(iter(drafter.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = drafter.training
    drafter.eval()
    accepted: list[int] = []
    proposed: list[int] = []
    generated = 0
    start = time.perf_counter()
    try:
        for index, prompt in enumerate(tqdm(prompts, desc=f"spec-decode T={temperature:g}", disable=not progress,
                                            unit="prompt")):
            generator = torch.Generator(device=device).manual_seed(prompt_seed(seed, index))
            result = speculative_generate(target, drafter, prompt, max_new_tokens=max_new_tokens,
                                          temperature=temperature, generator=generator, stop_ids=stop_ids)
            accepted += result.accepted
            proposed += result.proposed
            generated += len(result.tokens)
    finally:
        drafter.train(was_training)
    return EvalReport.from_rounds(accepted, proposed, generated_tokens=generated, num_prompts=len(prompts),
                                  wall_s=time.perf_counter() - start, temperature=temperature)
