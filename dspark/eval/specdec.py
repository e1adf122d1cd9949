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
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from dspark.drafters.base import Drafter, Proposal
from dspark.eval.metrics import EvalReport, format_table

__all__ = ["DecodeStats", "EvalReport", "GenerationResult", "NoDrafts", "confident_length", "decode_prompts",
           "evaluate", "format_table", "prompt_seed", "speculative_generate", "speculative_generate_batch",
           "target_generate", "verify_drafts"]


@dataclass
class GenerationResult:
    """The new tokens of one prompt plus one record per verification round."""

    tokens: list[int]  # new tokens, the first one from the prefill; a stop token ends it (and is kept)
    accepted: list[int] = field(default_factory=list)  # per round: drafted tokens accepted
    proposed: list[int] = field(default_factory=list)  # per round: drafted tokens verified
    confidences: list[list[float]] = field(default_factory=list)  # per round: confidence head output, if any
    wall_s: float = 0.0


@dataclass
class DecodeStats:
    """What the target cost during one decoding run (this process): batched forwards, their wall time (waiting
    for the device), and the tokens they were fed."""

    num_target_calls: int = 0
    target_s: float = 0.0
    fed_tokens: int = 0
    padded: bool = False  # the verifier ran every row at the longest feed's length (the batched session)

    def add(self, seconds: float, fed_tokens: int) -> None:
        self.num_target_calls += 1
        self.target_s += seconds
        self.fed_tokens += fed_tokens


def _make_planner(verify_policy: str, sps, confidence_threshold: float, padded: bool = False):
    """The per-step planner of ``verify_policy`` (None for full and threshold: per-row cuts need no planner);
    ``padded``: the verifier runs every row at the longest feed's length (``VerifyPlanner``)."""
    from dspark.eval.scheduler import VERIFY_POLICIES, VerifyPlanner

    if verify_policy not in VERIFY_POLICIES:
        raise ValueError(f"verify_policy {verify_policy!r} is not one of {', '.join(VERIFY_POLICIES)}")
    if verify_policy == "threshold" and not confidence_threshold > 0:
        raise ValueError("verify_policy threshold needs confidence_threshold > 0 (eval.confidence_threshold)")
    return VerifyPlanner(verify_policy, sps=sps, padded=padded) if verify_policy.startswith("scheduler") else None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # timing a step must wait for its kernels
        torch.cuda.synchronize(device)


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


def _check_proposal(proposal, vocab_size: int | None, temperature: float) -> None:
    tokens_K = proposal.tokens_K
    if tokens_K.dim() != 1:
        raise ValueError(f"drafter proposal tokens_K must be 1-D, got shape {tuple(tokens_K.shape)}")
    if temperature > 0 and tuple(proposal.probs_KV.shape) != (tokens_K.shape[0], vocab_size):
        raise ValueError(f"drafter proposal probs_KV has shape {tuple(proposal.probs_KV.shape)}, expected "
                         f"({tokens_K.shape[0]}, {vocab_size}) to match tokens_K and the target vocabulary")


class _SequentialSessions:
    """The batch-session API (``add_rows``, ``select``, ``extend``, ``truncate``) over one ``decode_session()`` per
    row: for a single sequence, and for backends without a batched decoder (one forward per row)."""

    # A row fed nothing sits the step out, as in the batched session, so both group rows into the same steps (a
    # scheduled verify policy plans each step over its rows).
    partial_steps = True
    pads_rows = False  # one forward per row: a row costs its own feed

    def __init__(self, target):
        self.target = target
        self.sessions = []

    def add_rows(self, num: int) -> None:
        self.sessions += [self.target.decode_session() for _ in range(num)]

    def select(self, rows: list[int]) -> None:
        self.sessions = [self.sessions[r] for r in rows]

    def extend(self, ids: list[torch.Tensor], last_only: list[bool] | None = None
               ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """As ``HFBatchDecodeSession.extend`` (``last_only`` rows get their last position's logits alone)."""
        outputs = [session.extend(x) if x.numel() else None for session, x in zip(self.sessions, ids)]
        return [(out[0][-1:], out[1]) if out is not None and last else out
                for out, last in zip(outputs, last_only or [False] * len(ids))]

    def truncate(self, lengths: list[int]) -> None:
        for session, length in zip(self.sessions, lengths):
            session.truncate(length)


def prefill_groups(lengths: list[int], waste_ratio: float = 0.25, waste_min: int = 64) -> list[list[int]]:
    """Indices of prompts of ``lengths`` grouped for batched prefills: by increasing length, a group grows while
    padding its prompts to its longest wastes at most ``waste_ratio`` of its real positions plus ``waste_min``
    (short prompts are not worth a forward of their own)."""
    groups: list[list[int]] = []
    group: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        real = sum(lengths[j] for j in group) + lengths[i]
        if group and lengths[i] * (len(group) + 1) - real > waste_ratio * real + waste_min:
            groups.append(group)
            group = []
        group.append(i)
    return groups + [group] if group else groups


def confident_length(confidence_K: torch.Tensor | None, threshold: float) -> int | None:
    """How many leading drafts to verify under a static confidence threshold: drafting stops at the first slot
    whose cumulative confidence product ``prod_{i<=k} c_i`` (the survival estimate a_k of the paper's scheduler)
    falls below ``threshold``. None = no cut (threshold 0, or a drafter without confidences)."""
    if threshold <= 0 or confidence_K is None:
        return None
    below_K = torch.cumprod(confidence_K.detach().float().cpu(), dim=0) < threshold
    return int(below_K.long().argmax()) if bool(below_K.any()) else int(below_K.numel())


@dataclass
class _Row:
    """One prompt being decoded: its generator, its target features so far and its pending round."""

    prompt: list[int]
    generator: torch.Generator | None
    start: float
    result: GenerationResult | None = None  # None until the prefill has run
    context_TLH: torch.Tensor | None = None
    context_ids_T: torch.Tensor | None = None  # token ids of the same positions (for ``needs_context_ids``)
    num_context: int = 0  # positions the target has seen (= the row's cache length between steps)
    drafts_K: torch.Tensor | None = None
    draft_probs_KV: torch.Tensor | None = None
    confidence_K: torch.Tensor | None = None
    budget: int = 0

    def done(self, max_new_tokens: int, stops: set[int]) -> bool:
        tokens = self.result.tokens if self.result is not None else None
        return tokens is not None and (tokens[-1] in stops or len(tokens) >= max_new_tokens)


class _Decoder:
    """Speculative decoding of many prompts with at most ``batch_size`` in flight: one batched target forward
    per step verifies every row's drafts (or prefills a row just admitted); a finished row leaves and the next
    prompt takes its place. Each row samples only from its own generator, in the same order as when decoded
    alone, so the tokens do not depend on the batch size or on which rows share a step, unless a ``planner``
    (``dspark.eval.scheduler.VerifyPlanner``) chooses each row's verified prefix from all the rows' confidences:
    then the output distribution is still exactly the target's, but a row's draws depend on its neighbours."""

    def __init__(self, target, drafter, *, max_new_tokens: int, temperature: float, stop_ids: Iterable[int],
                 confidence_threshold: float, session, batch_proposals: bool = True, planner=None,
                 stats: DecodeStats | None = None, prefill_apart: bool = True):
        self.target, self.drafter, self.session = target, drafter, session
        self.batch_proposals, self.prefill_apart = batch_proposals, prefill_apart
        self.planner = planner
        self.stats = stats if stats is not None else DecodeStats()
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.stops = set(stop_ids)
        self.confidence_threshold = confidence_threshold
        self.vocab_size: int | None = None
        self.warned_no_confidence = False

    def run(self, prompts: list[list[int]], generators: list, batch_size: int, on_done=None
            ) -> list[GenerationResult]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for prompt in prompts:
            _check_request(prompt, self.max_new_tokens, self.temperature)
        results: list[GenerationResult | None] = [None] * len(prompts)
        waiting = list(range(len(prompts)))[::-1]  # popped from the end: prompts are admitted in order
        rows: list[tuple[int, _Row]] = []
        while waiting or rows:
            admitted = []
            while waiting and len(rows) + len(admitted) < batch_size:
                index = waiting.pop()
                admitted.append((index, _Row(list(prompts[index]), generators[index], time.perf_counter())))
            if admitted:
                self.session.add_rows(len(admitted))
                rows += admitted
                if self.prefill_apart and self.session.partial_steps:
                    # Prefill the admitted prompts in forwards of their own (the decoding rows sit them out: fed
                    # beside them, a prompt would pad every row's feed to its length), grouped by length so that
                    # no group pads its short prompts far past their end.
                    empty = torch.empty(0, dtype=torch.long)
                    for group in prefill_groups([len(row.prompt) for _, row in admitted]):
                        members = {id(admitted[i][1]) for i in group}
                        rows = self._step(rows, [torch.tensor(row.prompt, dtype=torch.long) if id(row) in members
                                                 else empty for _, row in rows], results, on_done)
                    continue  # a row that finished at its first token frees its slot for the next prompt
            rows = self._step(rows, self._feeds([row for _, row in rows]), results, on_done)
        return results  # type: ignore[return-value]

    def _step(self, rows: list[tuple[int, _Row]], feeds: list[torch.Tensor], results: list, on_done
              ) -> list[tuple[int, _Row]]:
        """One batched target forward over ``feeds`` (an empty feed: the row sits the step out), then every fed
        row takes its output; returns the rows still decoding (the finished ones go to ``results``)."""
        step_start = time.perf_counter()
        # A row being prefilled needs the logits of its prompt's last position only.
        outputs = self.session.extend(feeds, last_only=[row.result is None for _, row in rows])
        _synchronize(next(out for out in outputs if out is not None)[0].device)
        self.stats.add(time.perf_counter() - step_start, sum(x.numel() for x in feeds))
        for (_, row), output in zip(rows, outputs):
            if output is not None:
                self._absorb(row, *output)
        self.session.truncate([row.num_context for _, row in rows])
        keep = [i for i, (_, row) in enumerate(rows) if not row.done(self.max_new_tokens, self.stops)]
        if len(keep) < len(rows):
            kept = set(keep)
            for index, row in (rows[i] for i in range(len(rows)) if i not in kept):
                row.result.wall_s = time.perf_counter() - row.start
                results[index] = row.result
                if on_done is not None:
                    on_done()
            self.session.select(keep)
            rows = [rows[i] for i in keep]
        return rows

    def _feeds(self, rows: list[_Row]) -> list[torch.Tensor]:
        """The tokens every row feeds this step: its prompt, or the anchor and the drafts of a new proposal. The
        rows past their prefill draft together, in one ``propose_batch`` call."""
        drafting = [row for row in rows if row.result is not None]
        if drafting:
            contexts = [row.context_TLH[: row.num_context] for row in drafting]
            anchors = [row.result.tokens[-1] for row in drafting]
            generators = [row.generator for row in drafting]
            # A drafter that embeds context tokens (Eagle3) says so with ``needs_context_ids``.
            ids = ([row.context_ids_T[: row.num_context] for row in drafting]
                   if self.drafter.needs_context_ids else None)
            if self.batch_proposals:
                extra = {"context_ids": ids} if ids is not None else {}
                stop = self._drafting_stop(drafting)
                if stop is not None:
                    extra["stop_drafting"] = stop
                proposals = self.drafter.propose_batch(contexts, anchors, temperature=self.temperature,
                                                       generators=generators, **extra)
            else:
                proposals = [self.drafter.propose(contexts[b], anchors[b], temperature=self.temperature,
                                                  generator=generators[b],
                                                  **({"context_ids_T": ids[b]} if ids is not None else {}))
                             for b in range(len(drafting))]
            if len(proposals) != len(drafting):
                raise ValueError(f"drafter {type(self.drafter).__name__} returned {len(proposals)} proposals for "
                                 f"{len(drafting)} rows; expected one per row")
            for row, proposal in zip(drafting, proposals):
                self._take_proposal(row, proposal)
            if self.planner is not None:
                self._plan(drafting)
        return [torch.tensor(row.prompt, dtype=torch.long) if row.result is None
                else torch.cat([torch.tensor([row.result.tokens[-1]]), row.drafts_K.cpu()]) for row in rows]

    def _drafting_stop(self, rows: list[_Row]):
        """The ``stop_drafting`` callback for this step's proposal (``Drafter.cuts_drafting``), or None: drafting
        stops at the first slot from which no row could verify a draft, given what this step will cut anyway
        (each row's budget, the confidence threshold, the scheduler's plan). Stopping changes only what is drafted,
        never which prefixes are verified: at T = 0 the output is the full proposal's, token for token; at T > 0 each
        row draws less from its generator, so its tokens differ but not their distribution (the decision reads
        only confidences, which depend on the drafts before the slot)."""
        scheduled = self.planner is not None and self.planner.policy == "scheduler"
        if not (self.drafter.cuts_drafting and (scheduled or self.confidence_threshold > 0)):
            return None
        budgets = [self.max_new_tokens - len(row.result.tokens) for row in rows]

        def stop(confidences: list[list[float]]) -> bool:
            slot = len(confidences[0])
            known = []
            for conf, budget in zip(confidences, budgets):
                n = min(budget, slot)
                cut = confident_length(torch.tensor(conf[:n]), self.confidence_threshold)
                known.append(conf[: n if cut is None else min(n, cut)])
            if all(len(conf) < slot for conf in known):
                return True  # every row stops before this slot (its budget, or the threshold)
            return scheduled and not self.planner.may_verify_from(known, slot)

        return stop

    def _take_proposal(self, row: _Row, proposal) -> None:
        """Cut ``proposal`` to the row's budget (and the confidence threshold) and keep it for verification."""
        _check_proposal(proposal, self.vocab_size, self.temperature)
        row.budget = self.max_new_tokens - len(row.result.tokens)
        k = min(row.budget, proposal.tokens_K.shape[0])
        cut = confident_length(proposal.confidence_K, self.confidence_threshold)
        if cut is not None:
            k = min(k, cut)
        elif self.confidence_threshold > 0 and not self.warned_no_confidence:
            warnings.warn(f"eval.confidence_threshold={self.confidence_threshold:g} is ignored: drafter "
                          f"{type(self.drafter).__name__} reports no confidences", stacklevel=3)
            self.warned_no_confidence = True
        row.drafts_K = proposal.tokens_K[:k].long()
        row.draft_probs_KV = proposal.probs_KV[:k] if self.temperature > 0 else None
        row.confidence_K = proposal.confidence_K

    def _plan(self, rows: list[_Row]) -> None:
        """Cut every drafting row to the prefix the planner gives it this step (the target verifies the ragged
        prefixes in one forward). Each row's confidences are cut to its budget first, so the planner sees only
        drafts that could be verified."""
        if any(row.confidence_K is None for row in rows):
            if not self.warned_no_confidence:
                warnings.warn(f"verify policy {self.planner.policy} verifies every draft: drafter "
                              f"{type(self.drafter).__name__} reports no confidences", stacklevel=3)
                self.warned_no_confidence = True
            return
        confidences = [row.confidence_K[: row.drafts_K.shape[0]].detach().float().cpu().tolist() for row in rows]
        for row, k in zip(rows, self.planner.plan(confidences).prefix_R):
            row.drafts_K = row.drafts_K[:k]
            if row.draft_probs_KV is not None:
                row.draft_probs_KV = row.draft_probs_KV[:k]

    def _absorb(self, row: _Row, logits_NV: torch.Tensor, features_NLH: torch.Tensor) -> None:
        """Take the target's output for row's feed: start the row after its prefill, else verify its drafts."""
        if row.result is None:
            self.vocab_size = logits_NV.shape[-1]
            # Target features of every position fed so far, preallocated so each round's context is a view.
            num = len(row.prompt)
            row.context_TLH = features_NLH.new_empty((num + self.max_new_tokens, *features_NLH.shape[1:]))
            row.context_TLH[:num] = features_NLH
            row.context_ids_T = torch.zeros(num + self.max_new_tokens, dtype=torch.long)
            row.context_ids_T[:num] = torch.tensor(row.prompt, dtype=torch.long)
            row.num_context = num
            row.result = GenerationResult(tokens=[_next_token(logits_NV[-1], self.temperature, row.generator)])
            return
        result, budget = row.result, row.budget
        drafts_K = row.drafts_K.to(logits_NV.device)
        k = drafts_K.shape[0]
        num_accepted, own_token = verify_drafts(logits_NV, drafts_K, row.draft_probs_KV,
                                                temperature=self.temperature, generator=row.generator)
        new = drafts_K[:num_accepted].tolist() + [own_token]
        stop_at = next((j for j, t in enumerate(new) if t in self.stops), len(new) - 1)
        new = new[: min(stop_at + 1, budget)]
        if len(new) <= num_accepted:
            # Cut inside the accepted drafts (stop token, or all accepted with the budget full): the drafts
            # after the cut were never in play, so the round counts only what was kept.
            num_accepted = k = len(new)
        result.accepted.append(num_accepted)
        result.proposed.append(k)
        if row.confidence_K is not None:
            result.confidences.append(row.confidence_K[:k].float().tolist())
        result.tokens.extend(new)
        # Keep the anchor and the kept drafts (all but the new anchor, which the target has not seen yet);
        # their features were computed on the right prefix, so they serve as the next round's context.
        num_kept = len(new)
        row.context_TLH[row.num_context : row.num_context + num_kept] = features_NLH[:num_kept]
        kept_ids = result.tokens[-num_kept - 1 : -1]  # the anchor and the kept drafts
        row.context_ids_T[row.num_context : row.num_context + num_kept] = torch.tensor(kept_ids)
        row.num_context += num_kept


@torch.no_grad()
def speculative_generate(target, drafter, prompt_ids: list[int], *, max_new_tokens: int, temperature: float,
                         generator: torch.Generator | None = None, stop_ids: Iterable[int] = (),
                         confidence_threshold: float = 0.0) -> GenerationResult:
    """Generate up to ``max_new_tokens`` after ``prompt_ids`` with ``drafter`` proposing and ``target`` verifying.

    The first new token comes from the prefill (it counts as generated and becomes the first anchor). A proposal
    is cut to the remaining budget (and, with ``confidence_threshold`` > 0, where ``confident_length`` says), so
    a round that fills the budget ends without a bonus token. A stop token ends the sequence and is kept; drafts
    after it are neither kept nor counted as proposed.
    """
    _check_request(prompt_ids, max_new_tokens, temperature)
    decoder = _Decoder(target, drafter, max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=stop_ids,
                       confidence_threshold=confidence_threshold, session=_SequentialSessions(target))
    return decoder.run([prompt_ids], [generator], batch_size=1)[0]


@torch.no_grad()
def speculative_generate_batch(target, drafter, prompts: list[list[int]], *, max_new_tokens: int,
                               temperature: float, generators: list[torch.Generator | None], batch_size: int,
                               stop_ids: Iterable[int] = (), confidence_threshold: float = 0.0,
                               on_done=None, batch_proposals: bool = True, verify_policy: str = "full", sps=None,
                               stats: DecodeStats | None = None, prefill_apart: bool = True
                               ) -> list[GenerationResult]:
    """``speculative_generate`` of every prompt (``generators[i]`` drives prompt i), ``batch_size`` at a time in
    one batched target forward per step (continuous batching: a finished prompt's slot goes to the next one).

    With ``batch_size`` > 1 uses ``target.batch_decode_session()`` when the backend has one, else (and for
    batch size 1) one decode session per prompt. The tokens of a prompt are those ``speculative_generate`` gives
    it with the same generator, whatever the batch size (up to float rounding of the batched forward, which can
    flip a draw only on a near tie). ``on_done()`` is called as each prompt finishes. The rows in flight draft
    together (``drafter.propose_batch``); ``batch_proposals=False`` calls ``drafter.propose`` row by row instead
    (the same tokens; kept to measure what batching the drafter buys). Prompts admitted together are prefilled in
    forwards of their own, the other rows sitting them out, grouped by length (``prefill_groups``) so that short
    prompts are not padded far past their end; ``prefill_apart=False`` feeds a prompt admitted while other rows
    decode beside their drafts instead, padding every row to the prompt's length, and the first prompts in one
    forward (the same tokens up to float rounding; kept to measure what prefilling apart buys).

    ``verify_policy`` (``dspark.eval.scheduler.VERIFY_POLICIES``) chooses how many drafts each row verifies:
    ``full`` (all, cut by ``confidence_threshold`` when > 0), ``threshold`` (the same, the threshold required), or
    ``scheduler`` / ``scheduler_async`` (the paper's Algorithm 1 over the rows of each step, steps/s from the
    ``sps`` table; ``SPSTable``). The batched session runs every row at the longest feed's length, so there
    ``scheduler`` plans one common prefix per step (``schedule_common_prefix``), priced at what the verifier is fed.
    ``stats`` (a ``DecodeStats``) collects the target's forwards and their time.
    """
    if len(generators) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(generators)} generators")
    _make_planner(verify_policy, sps, confidence_threshold)  # a bad policy fails before any session is made
    from dspark.targets.hf import BatchDecodeUnsupported

    make = getattr(target, "batch_decode_session", None)
    session = None
    if make is not None and batch_size > 1:
        try:
            session = make()
        except BatchDecodeUnsupported as exc:  # e.g. DeepSeek-V4's sliding-window and compressor caches
            warnings.warn(f"{exc}; decoding with one session per prompt instead (the same tokens, one target "
                          f"forward per row)", stacklevel=1)  # callers sit behind torch.no_grad wrappers
    if session is None:
        session = _SequentialSessions(target)
    planner = _make_planner(verify_policy, sps, confidence_threshold, padded=session.pads_rows)
    if stats is not None:
        stats.padded = session.pads_rows
    decoder = _Decoder(target, drafter, max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=stop_ids,
                       confidence_threshold=confidence_threshold, session=session, batch_proposals=batch_proposals,
                       planner=planner, stats=stats, prefill_apart=prefill_apart)
    return decoder.run(prompts, generators, batch_size, on_done=on_done)


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


class NoDrafts(Drafter):
    """A drafter that proposes nothing: speculative decoding with it is plain target decoding through the same
    (batched) decode session, each round one target token. The baseline a drafter's tokens/s is compared with at
    the same batch size. The empty parameter only says which device the target's logits are on."""

    algorithm = "none"
    block_size = 0

    def __init__(self, target):
        super().__init__()
        weight_VH = target.lm_head_weight
        self.vocab_size = weight_VH.shape[0]
        self.anchor = torch.nn.Parameter(weight_VH.new_empty(0), requires_grad=False)

    def forward_loss(self, batch, generator=None):
        raise ValueError("NoDrafts is the plain-decoding baseline; it has nothing to train")

    def propose(self, context_TLH, anchor_id: int, *, temperature: float, generator=None, **_):
        return Proposal(tokens_K=torch.empty(0, dtype=torch.long),
                        probs_KV=torch.empty((0, self.vocab_size), dtype=torch.float32))

    def propose_batch(self, contexts, anchor_ids, *, temperature: float, generators, **_):
        return [self.propose(c, a, temperature=temperature) for c, a in zip(contexts, anchor_ids)]


def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of prompt ``index``: depends on (seed, index) only, never on order or batching."""
    digest = hashlib.sha256(f"dspark-eval:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def decode_prompts(target, drafter, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, seed: int,
                   stop_ids: Iterable[int] = (), progress: bool = False, batch_size: int = 1,
                   confidence_threshold: float = 0.0, group: tuple[int, int] | None = None,
                   verify_policy: str = "full", sps=None, stats: DecodeStats | None = None
                   ) -> tuple[list[GenerationResult], float]:
    """Speculative decoding of every prompt: the results in prompt order and the wall time of the slowest rank.

    Each prompt samples with its own generator seeded by ``prompt_seed(seed, index)``, on the drafter's device,
    so the results do not depend on ``batch_size`` (prompts decoded together, see ``speculative_generate_batch``).
    With ``confidence_threshold`` > 0 proposals stop where the cumulative confidence product falls below it
    (``confident_length``). ``verify_policy``, ``sps`` and ``stats``: see ``speculative_generate_batch``.

    In a process group, ``group`` = (index, count) (default: ``target.decode_group()``) splits the prompts over
    the groups of ranks that decode together: this rank decodes the prompts ``i`` with ``i % count == index``,
    then every rank gathers all results, so each returns the results of all prompts, equal to one process's
    (the seeds depend on prompt indices only); copies from members of one group must agree token for token. With
    one group (zero3, a single TP group or pipeline) every rank decodes every prompt and nothing is gathered;
    ``group=(0, 1)`` also lets one rank decode alone (as the trainer's periodic eval does on rank 0).
    """
    from tqdm import tqdm

    if not prompts:
        raise ValueError("speculative decoding needs at least one prompt")
    if group is None:
        group = target.decode_group() if hasattr(target, "decode_group") else (0, 1)
    index, count = group
    mine = list(range(index, len(prompts), count))
    param = next(iter(drafter.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    generators = [torch.Generator(device=device).manual_seed(prompt_seed(seed, i)) for i in mine]
    was_training = drafter.training
    drafter.eval()
    start = time.perf_counter()
    bar = tqdm(total=len(mine), desc=f"spec-decode T={temperature:g}", disable=not progress, unit="prompt")
    try:
        results = speculative_generate_batch(target, drafter, [prompts[i] for i in mine],
                                             max_new_tokens=max_new_tokens, temperature=temperature,
                                             generators=generators, batch_size=batch_size, stop_ids=list(stop_ids),
                                             confidence_threshold=confidence_threshold, on_done=bar.update,
                                             verify_policy=verify_policy, sps=sps, stats=stats)
    finally:
        bar.close()
        drafter.train(was_training)
    wall_s = time.perf_counter() - start
    if count > 1:
        return _gather_results(dict(zip(mine, results)), wall_s, len(prompts))
    return results, wall_s


def evaluate(target, drafter, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, seed: int,
             stop_ids: Iterable[int] = (), progress: bool = False, batch_size: int = 1,
             confidence_threshold: float = 0.0, group: tuple[int, int] | None = None, verify_policy: str = "full",
             sps=None) -> EvalReport:
    """Speculative decoding over ``prompts`` (token id lists) and the acceptance report of ``drafter``; the
    arguments are ``decode_prompts``'s (the report is the same whatever the batch size or number of ranks)."""
    if not prompts:
        raise ValueError("evaluate needs at least one prompt")
    results, wall_s = decode_prompts(target, drafter, prompts, max_new_tokens=max_new_tokens,
                                     temperature=temperature, seed=seed, stop_ids=stop_ids, progress=progress,
                                     batch_size=batch_size, confidence_threshold=confidence_threshold, group=group,
                                     verify_policy=verify_policy, sps=sps)
    accepted = [a for r in results for a in r.accepted]
    proposed = [p for r in results for p in r.proposed]
    with_confidence = all(len(r.confidences) == len(r.accepted) for r in results) and any(r.accepted for r in results)
    confidences = [c for r in results for c in r.confidences] if with_confidence else None
    return EvalReport.from_rounds(accepted, proposed, generated_tokens=sum(len(r.tokens) for r in results),
                                  num_prompts=len(prompts), wall_s=wall_s, temperature=temperature,
                                  confidences=confidences, confidence_threshold=confidence_threshold)


def _gather_results(mine: dict[int, GenerationResult], wall_s: float, num_prompts: int
                    ) -> tuple[list[GenerationResult], float]:
    """Every rank's results, by prompt index, on every rank; the slowest rank's wall time. Ranks of one decode
    group hold copies of the same results: a copy that differs means the group fell out of lockstep."""
    from dspark import distributed

    merged: dict[int, GenerationResult] = {}
    slowest = wall_s
    for rank, (theirs, their_wall_s) in enumerate(distributed.all_gather_objects((mine, wall_s))):
        slowest = max(slowest, their_wall_s)
        for i, result in theirs.items():
            seen = merged.setdefault(i, result)
            if (seen.tokens, seen.accepted, seen.proposed) != (result.tokens, result.accepted, result.proposed):
                raise RuntimeError(f"prompt {i}: rank {rank} decoded different tokens than another rank of its "
                                   f"decode group; the group fell out of lockstep")
    missing = sorted(set(range(num_prompts)) - set(merged))
    if missing:
        raise RuntimeError(f"no rank decoded prompts {missing[:8]}: the decode groups do not cover the prompts")
    return [merged[i] for i in range(num_prompts)], slowest
