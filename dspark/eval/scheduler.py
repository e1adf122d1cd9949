"""Hardware-aware prefix scheduling (the DSpark paper's Algorithm 1, DESIGN section 4) and its simulation.

Each decoding step verifies R requests in one target forward. Request r drafted K tokens with confidences
``c_{r,1..K}``; verifying its first j drafts costs j batch tokens beyond its anchor and is expected to yield
``a_{r,j} = prod_{i<=j} c_{r,i}`` of them (prefix survival). The verifier runs SPS(B) steps per second at B batch
tokens (over the step's R rows: on CPU the rows weigh as well as B), so a step's throughput is ``tau* x SPS(B)``
with ``tau*`` the expected tokens it produces (one own token per request plus the surviving drafts).

Algorithm 1 (``schedule_prefixes``): sort every (r, j) by a descending; start at ``B = R``, ``tau* = R``,
``best = R x SPS(R)``; admit in order (``B += 1``, ``tau* += a``) and stop at the first admission that does not
raise ``tau* x SPS(B)`` (that admission is not made). Since a never grows along j, ties broken by smaller j keep
every request's admitted set a prefix. The asynchronous variant (``schedule_capacity``) admits exactly the top
``capacity`` pairs with no early stop, the capacity being what Algorithm 1 admitted on the confidences two steps
earlier (``simulate``): the production form, where the batch must be sized before the current drafts exist.

``simulate`` replays recorded rounds (``GenerationResult`` records of a real evaluation, all drafted to the full K)
under continuous batching of ``batch_size`` requests and compares drafting the full K, Algorithm 1 and the
asynchronous variant. A prefix of length j of a recorded round accepts ``min(j, accepted)`` drafts (plus the
target's own token), as a verification of fewer drafts would have. SPS comes from a measured table
(``tools/profile_sps.py``), per row count R when it was measured so (``SPSTable``), interpolated linearly between
points and never extrapolated.

``VerifyPlanner`` is the per-step decision both the simulation and real decoding (``eval.verify_policy``,
``dspark.eval.specdec``) call, so what is simulated is what runs.

Why the early stop matters (the paper's Appendix A; the example here is constructed from the algorithm). Rejection
sampling stays exact when the decision to verify draft j of a request depends only on what was known before d_j
was drawn. ``a_{r,j}`` depends on ``d_{r,<j}`` only (``c_j`` reads ``h_j`` and the previous token), and with the
early stop the admission of (r, j) depends only on pairs ranked above it, none of which depends on ``d_{r,j}``
((r, j+1) always ranks below (r, j)). Choosing instead the best admission count over the whole ranking
(``early_stop=False``) looks ahead: (r, j) may be admitted only because (r, j+1) pays off, and ``a_{r,j+1}``
depends on ``d_{r,j}``. Example, one request, two drafts over tokens {0, 1}: ``p_target = (0.5, 0.5)``,
``p_draft = (0.8, 0.2)``, ``c_1 = 0.5``, ``c_2 = 1`` if ``d_1 = 0`` else 0, SPS(1, 2, 3) = (1, 0.6, 0.55). Values:
verify none 1.0, one 1.5 x 0.6 = 0.9, two (1.5 + a_2) x 0.55 = 1.1 if ``d_1 = 0`` else 0.825. The early stop
verifies nothing (0.9 <= 1.0) and the first token is the target's own draw: P(0) = 0.5. Looking ahead verifies
both drafts exactly when ``d_1 = 0``: P(0) = 0.8 x min(1, 0.5/0.8) + 0.2 x 0.5 = 0.6, biased
(``tests/eval/test_scheduled_decoding.py`` samples both).
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from dspark.config import VerifyPolicy, choices

SPS_VERSIONS = (1, 2)
VERIFY_POLICIES = choices(VerifyPolicy)


def _interpolate(xs: list[int], ys: list[float], x: float) -> float | None:
    """Linear interpolation of the points ``(xs, ys)`` (``xs`` ascending) at ``x``; None outside ``xs[0]..xs[-1]``."""
    if not xs[0] <= x <= xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + w * (ys[i] - ys[i - 1])
    return ys[0]  # a single point, queried at that point


def _check_points(points: dict, source: str, what: str) -> tuple[list[int], list[float]]:
    if not points:
        raise ValueError(f"{source}: no measured points{what}")
    for key, sps in points.items():
        if not isinstance(key, int) or key < 1 or not (isinstance(sps, (int, float)) and sps > 0):
            raise ValueError(f"{source}: expected positive integer batch tokens -> steps/s > 0{what}, got "
                             f"{key!r}: {sps!r}")
    keys = sorted(points)
    return keys, [float(points[k]) for k in keys]


def _int_keys(mapping, path: Path, what: str) -> dict:
    if not isinstance(mapping, dict):
        raise ValueError(f"SPS table {path}: expected a JSON object of {what}")
    out = {}
    for key, value in mapping.items():
        try:
            out[int(key)] = value
        except ValueError:
            raise ValueError(f"SPS table {path}: key {key!r} is not an integer number of {what}") from None
    return out


class SPSTable:
    """Verifier steps per second of a step of B batch tokens, linear between measured points, an error outside.

    Two shapes. A table by batch tokens (version 1) has one curve ``B -> steps/s`` for any number of rows. A table
    by rows (version 2, what ``tools/profile_sps.py`` writes) has one curve per measured row count R over the tokens
    per row ``B / R``; a step of R rows reads the curves of the measured row counts around R, each at ``B / R``, and
    interpolates between them in R. The second shape exists because a step's cost is not a function of its tokens
    alone: on CPU 16 rows x 1 token cost more than 4 rows x 4 (attention works per row), and a table by tokens
    averages the two, so the scheduler misjudged what a draft costs at 16 rows."""

    def __init__(self, points: dict[int, float], source: str = "SPS table"):
        self.tokens, self.sps = _check_points(points, source, "")
        self.by_rows: dict[int, tuple[list[int], list[float]]] | None = None
        self.source = source

    @classmethod
    def per_rows(cls, by_rows: dict[int, dict[int, float]], source: str = "SPS table") -> SPSTable:
        """A table by rows: ``{rows: {tokens_per_row: steps_per_s}}``."""
        if not by_rows:
            raise ValueError(f"{source}: no measured row counts")
        curves = {}
        for rows, points in by_rows.items():
            if not isinstance(rows, int) or rows < 1:
                raise ValueError(f"{source}: row counts must be positive integers, got {rows!r}")
            curves[rows] = _check_points(points, source, f" (rows {rows}: tokens per row)")
        table = cls.__new__(cls)
        table.by_rows = dict(sorted(curves.items()))
        table.source = source
        # The batch-token view (means over row counts of the same batch tokens), for plots and 1-D readers.
        by_tokens: dict[int, list[float]] = {}
        for rows, (per_row, sps) in table.by_rows.items():
            for t, s in zip(per_row, sps):
                by_tokens.setdefault(rows * t, []).append(s)
        table.tokens = sorted(by_tokens)
        table.sps = [sum(by_tokens[t]) / len(by_tokens[t]) for t in table.tokens]
        return table

    @classmethod
    def load(cls, path: str | Path) -> SPSTable:
        """Read ``{"version": 2, "sps_by_rows": {rows: {tokens_per_row: steps_per_s}}, ...}`` or ``{"version": 1,
        "sps": {batch_tokens: steps_per_s}, ...}`` (as ``profile_sps.py`` writes them, now and before) or a bare
        ``{batch_tokens: steps_per_s}`` mapping."""
        path = Path(path)
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"SPS table {path} does not exist (measure one with tools/profile_sps.py)") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"SPS table {path} is not valid JSON: {exc}") from None
        if isinstance(payload, dict) and "version" in payload:
            version = payload["version"]
            if version not in SPS_VERSIONS:
                raise ValueError(f"SPS table {path}: version {version!r} is not supported; this dspark reads versions "
                                 f"{', '.join(map(str, SPS_VERSIONS))}")
            if version == 2:
                by_rows = _int_keys(payload.get("sps_by_rows"), path, "rows")
                return cls.per_rows({rows: _int_keys(points, path, "tokens per row")
                                     for rows, points in by_rows.items()}, source=f"SPS table {path}")
            payload = payload.get("sps")
        return cls(_int_keys(payload, path, "batch tokens"), source=f"SPS table {path}")

    @classmethod
    def flat(cls, max_tokens: int) -> SPSTable:
        """Steps/s independent of the batch (1.0 from 1 to ``max_tokens``): Algorithm 1 then admits every draft of
        positive survival. The stand-in when no table was measured for this device."""
        return cls({1: 1.0, max(2, max_tokens): 1.0}, source="flat SPS stand-in (no measured table)")

    def check_covers(self, max_rows: int, gamma: int) -> None:
        """Refuse a table that does not cover steps of 1 .. ``max_rows`` rows, each verifying up to ``gamma``
        drafts (before decoding starts)."""
        if self.by_rows is None:
            hi = max_rows * (gamma + 1)
            if self.tokens[0] > 1 or self.tokens[-1] < hi:
                raise ValueError(f"{self.source} covers {self.tokens[0]}..{self.tokens[-1]} batch tokens but decoding "
                                 f"can reach 1..{hi}; profile those sizes (tools/profile_sps.py --batch-sizes)")
            return
        rows = list(self.by_rows)
        if rows[0] > 1 or rows[-1] < max_rows:
            raise ValueError(f"{self.source} covers {rows[0]}..{rows[-1]} rows but decoding can run 1..{max_rows}; "
                             f"profile those row counts (tools/profile_sps.py --batch-sizes)")
        for r, (per_row, _) in self.by_rows.items():
            if per_row[0] > 1 or per_row[-1] < gamma + 1:
                raise ValueError(f"{self.source} covers {per_row[0]}..{per_row[-1]} tokens per row at {r} rows but "
                                 f"decoding can verify 1..{gamma + 1}; profile those (tools/profile_sps.py "
                                 f"--tokens-per-row)")

    def __call__(self, batch_tokens: float, rows: int | None = None) -> float:
        """Steps/s of a step of ``batch_tokens`` over ``rows`` rows (a table by rows needs ``rows``)."""
        if self.by_rows is None:
            sps = _interpolate(self.tokens, self.sps, batch_tokens)
            if sps is None:
                raise ValueError(f"{self.source}: batch of {batch_tokens} tokens is outside the measured range "
                                 f"{self.tokens[0]}..{self.tokens[-1]}; profile the verifier at that size "
                                 f"(tools/profile_sps.py), no extrapolation")
            return sps
        if rows is None:
            raise ValueError(f"{self.source} is measured per row count: give the step's rows")
        measured = list(self.by_rows)
        if not measured[0] <= rows <= measured[-1]:
            raise ValueError(f"{self.source}: a step of {rows} rows is outside the measured row counts "
                             f"{measured[0]}..{measured[-1]}; profile it (tools/profile_sps.py), no extrapolation")
        per_row = batch_tokens / rows
        lo = max(r for r in measured if r <= rows)
        hi = min(r for r in measured if r >= rows)
        at = []
        for r in (lo, hi):
            sps = _interpolate(*self.by_rows[r], per_row)
            if sps is None:
                xs = self.by_rows[r][0]
                raise ValueError(f"{self.source}: {per_row:g} tokens per row is outside the range measured at {r} "
                                 f"rows, {xs[0]}..{xs[-1]}; profile it (tools/profile_sps.py), no extrapolation")
            at.append(sps)
        return at[0] if hi == lo else at[0] + (rows - lo) / (hi - lo) * (at[1] - at[0])


def survival(confidences: list[list[float]]) -> list[list[float]]:
    """``a_{r,j} = prod_{i<=j} c_{r,i}`` per request."""
    out = []
    for r, conf in enumerate(confidences):
        row, a = [], 1.0
        for c in conf:
            if not 0.0 <= c <= 1.0:
                raise ValueError(f"request {r}: confidence {c!r} is not in [0, 1]")
            a *= c
            row.append(a)
        out.append(row)
    return out


def _ranked(a_RJ: list[list[float]]) -> list[tuple[float, int, int]]:
    # (a, j, r) by a descending, then smaller j (keeps prefixes when a_{r,j} = a_{r,j+1}), then r.
    return sorted(((a, j, r) for r, row in enumerate(a_RJ) for j, a in enumerate(row, start=1)),
                  key=lambda x: (-x[0], x[1], x[2]))


@dataclass
class Schedule:
    prefix_R: list[int]  # drafts verified per request
    batch_tokens: int  # B = R + sum(prefix_R); padded (schedule_common_prefix): R x (1 + the longest prefix)
    expected_tokens: float  # tau* = R + sum of admitted a
    refused: float | None = None  # survival a of the pair (padded: best of the slot) the early stop refused; None: none


def schedule_prefixes(confidences: list[list[float]], sps, *, early_stop: bool = True) -> Schedule:
    """Algorithm 1 (module docstring) for one step: ``confidences[r]`` are request r's draft confidences,
    ``sps(B, R)`` the verifier's steps/s at B batch tokens over the step's R requests.

    ``early_stop=False`` admits instead the best number of pairs over the whole ranking (the first maximum of
    ``tau* x SPS(B)``): a higher modelled throughput, but the decision looks at later drafts, which biases the
    output (module docstring). It exists to show that bias; decoding uses the early stop."""
    a_RJ = survival(confidences)
    R = len(a_RJ)
    prefix_R = [0] * R
    B, tau_star = R, float(R)
    best = tau_star * sps(B, R)
    admitted: list[tuple[int, int]] = []
    best_count, best_tau, refused = 0, tau_star, None
    for a, j, r in _ranked(a_RJ):
        value = (tau_star + a) * sps(B + 1, R)
        if value <= best and early_stop:
            refused = a
            break
        B, tau_star = B + 1, tau_star + a
        admitted.append((r, j))
        if value > best:
            best, best_count, best_tau = value, len(admitted), tau_star
    for r, j in admitted[:best_count]:
        prefix_R[r] = j
    return Schedule(prefix_R, R + best_count, best_tau, refused)


def schedule_common_prefix(confidences: list[list[float]], sps) -> Schedule:
    """Algorithm 1 for a verifier that pads every request of a step to the longest feed (``HFBatchDecodeSession``):
    a step costs R x (1 + m) tokens for a longest prefix m whatever the shorter prefixes are, so verifying any draft
    up to m is free and the choice is m alone (each request verifies min(m, its drafts)). m grows slot by slot while
    ``tau*(m) x SPS(R (1 + m))`` grows, ``tau*(m) = R + sum over requests of a_{r,1..m}``, and stops at the first
    slot that does not pay. The early stop keeps it exact as in Algorithm 1: including slot j reads ``a_{r,j}``,
    which depends on the drafts before slot j only, and never a later slot's."""
    a_RJ = survival(confidences)
    R = len(a_RJ)
    tau_star = float(R)
    best = tau_star * sps(R, R)
    m, refused = 0, None
    for j in range(1, max((len(a) for a in a_RJ), default=0) + 1):
        gain = sum(a[j - 1] for a in a_RJ if len(a) >= j)
        value = (tau_star + gain) * sps(R * (1 + j), R)
        if value <= best:
            refused = max(a[j - 1] for a in a_RJ if len(a) >= j)
            break
        m, tau_star, best = j, tau_star + gain, value
    return Schedule([min(m, len(a)) for a in a_RJ], R * (1 + m), tau_star, refused)


def schedule_capacity(confidences: list[list[float]], capacity: int) -> Schedule:
    """The asynchronous form: admit exactly the ``capacity`` (r, j) pairs of highest survival (capped at the drafts
    there are), no early stop."""
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    a_RJ = survival(confidences)
    prefix_R = [0] * len(a_RJ)
    tau_star = float(len(a_RJ))
    for a, j, r in _ranked(a_RJ)[:capacity]:
        prefix_R[r] = j
        tau_star += a
    return Schedule(prefix_R, len(a_RJ) + sum(prefix_R), tau_star)


class VerifyPlanner:
    """How many drafts each request verifies, step by step, under one ``eval.verify_policy``:

    - ``full``: all of them;
    - ``scheduler``: Algorithm 1 (``schedule_prefixes``) over the requests of the step, with ``sps``; for a
      verifier that pads every request to the longest feed (``padded``), its common-prefix form
      (``schedule_common_prefix``), which prices a step at what the verifier is fed;
    - ``scheduler_async``: the top pairs up to a capacity that Algorithm 1 chose on the step ``lag`` steps
      earlier (every draft for the first ``lag`` steps), no early stop: the batch is sized before the drafts exist.

    ``plan(confidences)`` takes each request's confidences cut to the drafts it may verify at most (its budget) and
    is called once per step, in order (the asynchronous form remembers the steps). The ``threshold`` policy is a
    per-request cut (``dspark.eval.specdec.confident_length``) applied before any planner."""

    def __init__(self, policy: str, *, sps=None, lag: int = 2, padded: bool = False):
        if policy not in ("full", "scheduler", "scheduler_async"):
            raise ValueError(f"verify policy {policy!r} is not one of full, scheduler, scheduler_async")
        if policy != "full" and sps is None:
            raise ValueError(f"verify policy {policy} needs an SPS table (tools/profile_sps.py)")
        if lag < 1:
            raise ValueError(f"lag must be >= 1 step, got {lag}")
        self.policy, self.sps, self.lag, self.padded = policy, sps, lag, padded
        self.history: list[int] = []  # drafts Algorithm 1 admitted at each step (scheduler_async)

    def may_verify_from(self, confidences: list[list[float]], slot: int) -> bool:
        """Whether this step could verify a draft at ``slot`` (1-based) or later, knowing each request's
        confidences up to ``slot`` only (a request with fewer has no more drafts). Drafting stops when not
        (``draft_slots``).

        For ``scheduler``, exact: run Algorithm 1 on the known pairs. If it stops at a refused pair P before
        admitting any pair at ``slot``, every pair at ``slot`` ranks after P (one ranked before P would have been
        admitted), and so does every unknown pair (a later slot than P's, and a survival no higher than its
        request's at ``slot``): the ranking of all pairs reaches P in the same state and stops there too. The other
        policies verify any draft."""
        if self.policy != "scheduler":
            return True
        if self.padded:  # the common prefix grows slot by slot: slot is drafted if the known slots reach it
            return max(schedule_common_prefix(confidences, self.sps).prefix_R, default=0) >= slot
        known = schedule_prefixes(confidences, self.sps)
        return known.refused is None or any(j >= slot for j in known.prefix_R)

    def plan(self, confidences: list[list[float]]) -> Schedule:
        R = len(confidences)
        everything = sum(len(c) for c in confidences)
        if self.policy == "full":
            return schedule_capacity(confidences, everything)
        if self.policy == "scheduler" and self.padded:
            return schedule_common_prefix(confidences, self.sps)
        sync = schedule_prefixes(confidences, self.sps)
        if self.policy == "scheduler":
            return sync
        t = len(self.history)
        self.history.append(sync.batch_tokens - R)
        return schedule_capacity(confidences, self.history[t - self.lag] if t >= self.lag else everything)


def device_tag(device) -> str:
    """A file-name-safe name of the accelerator behind ``device`` (its SPS table is per device): ``cpu``, or the
    GPU's product name (``cuda-NVIDIA_H200``)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "cuda-" + re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")
    return device.type


@dataclass(kw_only=True)
class PolicyStats:
    """One scheduling policy over the replayed steps."""

    policy: str
    num_steps: int
    mean_batch_tokens: float
    mean_prefix: float  # drafts verified per request
    expected_tokens_per_step: float  # tau*: the confidences' estimate
    tokens_per_step: float  # realised with the recorded acceptance
    tokens_per_s: float  # realised tokens / sum over steps of 1 / SPS(B_t)

    def to_dict(self) -> dict:
        return asdict(self)


def _replay_steps(prompt_rounds: list[list[tuple[int, list[float]]]], batch_size: int
                  ) -> list[list[tuple[int, list[float]]]]:
    """Continuous batching: up to ``batch_size`` prompts in flight, each contributing its next round per step; a
    prompt that runs out of rounds leaves and the next one joins in the same step."""
    waiting = deque(rounds for rounds in prompt_rounds if rounds)
    active: list[deque] = []
    steps = []
    while waiting or active:
        while waiting and len(active) < batch_size:
            active.append(deque(waiting.popleft()))
        steps.append([stream.popleft() for stream in active])
        active = [stream for stream in active if stream]
    return steps


def simulate(prompt_rounds: list[list[tuple[int, list[float]]]], *, num_drafts: int, sps, batch_size: int,
             lag: int = 2, padded: bool = False) -> dict[str, PolicyStats]:
    """Replay recorded rounds (per prompt: ``(accepted, confidences)`` with ``len(confidences) == num_drafts``)
    under the three policies: "full" (every request verifies all ``num_drafts``), "algorithm1" and "async" (capacity
    from Algorithm 1 on the step ``lag`` steps earlier; the first ``lag`` steps verify everything). ``padded``: the
    verifier runs every request at the longest feed's length, so "algorithm1" is the common-prefix form the decoder
    plans with there (``schedule_common_prefix``) and every step is priced at its padded tokens."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for p, rounds in enumerate(prompt_rounds):
        for accepted, conf in rounds:
            if len(conf) != num_drafts or not 0 <= accepted <= num_drafts:
                raise ValueError(f"prompt {p}: a round with {len(conf)} confidences and {accepted} accepted; "
                                 f"simulate needs rounds drafted fully ({num_drafts} drafts)")
    steps = _replay_steps(prompt_rounds, batch_size)
    if not steps:
        raise ValueError("simulate needs at least one recorded round drafted fully")
    # The planners real decoding uses (``eval.verify_policy``), one per simulated policy.
    planners = {"full": VerifyPlanner("full"), "algorithm1": VerifyPlanner("scheduler", sps=sps, padded=padded),
                "async": VerifyPlanner("scheduler_async", sps=sps, lag=lag)}
    schedules: dict[str, list[Schedule]] = {policy: [] for policy in planners}
    for step in steps:
        conf = [c for _, c in step]
        for policy, planner in planners.items():
            schedules[policy].append(planner.plan(conf))
    out = {}
    for policy, per_step in schedules.items():
        realised = [sum(min(j, acc) + 1 for j, (acc, _) in zip(s.prefix_R, step)) for s, step in zip(per_step, steps)]
        # Padded, a step is fed its rows x (1 + the longest prefix) tokens.
        seconds = sum(1.0 / sps(len(s.prefix_R) * (1 + max(s.prefix_R, default=0)) if padded else s.batch_tokens,
                                len(s.prefix_R)) for s in per_step)
        num_requests = sum(len(s.prefix_R) for s in per_step)
        out[policy] = PolicyStats(
            policy=policy, num_steps=len(per_step),
            mean_batch_tokens=sum(s.batch_tokens for s in per_step) / len(per_step),
            mean_prefix=sum(sum(s.prefix_R) for s in per_step) / num_requests,
            expected_tokens_per_step=sum(s.expected_tokens for s in per_step) / len(per_step),
            tokens_per_step=sum(realised) / len(per_step),
            tokens_per_s=sum(realised) / seconds if seconds > 0 else math.nan,
        )
    return out


def format_simulation(stats: dict[str, PolicyStats]) -> str:
    """Fixed-width table, one row per policy."""
    header = (f"{'policy':<11}  {'steps':>6}  {'batch':>7}  {'prefix':>6}  {'E[tok]/step':>11}  {'tok/step':>8}"
              f"  {'tok/s':>9}")
    lines = [header, "-" * len(header)]
    for s in stats.values():
        lines.append(f"{s.policy:<11}  {s.num_steps:>6d}  {s.mean_batch_tokens:>7.2f}  {s.mean_prefix:>6.2f}"
                     f"  {s.expected_tokens_per_step:>11.3f}  {s.tokens_per_step:>8.3f}  {s.tokens_per_s:>9.1f}")
    return "\n".join(lines)
