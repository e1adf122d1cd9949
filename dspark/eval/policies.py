"""Verify policies measured against concurrency: what ``dspark eval`` runs for ``eval.policy_sweep``.

For each batch size (requests in flight) and each policy (``full``, ``threshold``, ``scheduler``,
``scheduler_async``; ``dspark.eval.scheduler``) the same prompts are decoded for real and timed: tau, tokens per
target call (one batched forward), generated tokens per second of wall time (drafting included) and the target's
mean step time. Beside the measured speedup over ``full`` at the same batch size stands the one the simulation
predicts from the ``full`` run's recorded rounds (``scheduler.simulate``, the same planner code, target time only).

The scheduler reads the SPS table of the current device (``eval.sps_table``, else
``<run_dir>/sps/<device>.json``); when there is none it warns once, names the command that measures one, and
plans with a flat table (every draft of positive survival is verified).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path

from dspark.eval.scheduler import SPSTable, device_tag, simulate

_warned_missing: set[str] = set()  # SPS paths already warned about in this process


def default_sps_path(run_dir: str | Path, device) -> Path:
    """Where ``dspark eval`` looks for this device's SPS table when ``eval.sps_table`` is empty."""
    return Path(run_dir) / "sps" / f"{device_tag(device)}.json"


def load_device_sps(sps_table: str, run_dir: str | Path, device, *, max_rows: int, gamma: int) -> SPSTable:
    """The SPS table the scheduler policies plan with: ``sps_table`` or the device's default path, checked to cover
    steps of 1 .. ``max_rows`` rows verifying up to ``gamma`` drafts each. A missing default table gives one
    warning that names the profiling command and returns the flat stand-in; a table measured on another device
    warns too."""
    import json

    path = Path(sps_table) if sps_table else default_sps_path(run_dir, device)
    if not path.is_file():
        if sps_table:
            raise ValueError(f"eval.sps_table={sps_table} does not exist (measure one with tools/profile_sps.py)")
        if str(path) not in _warned_missing:
            _warned_missing.add(str(path))
            warnings.warn(f"no SPS table for device {device_tag(device)} at {path}: the scheduler policies plan with "
                          f"a flat table (every draft of positive survival is verified) until you measure one with "
                          f"`python tools/profile_sps.py -c RECIPE --set run_dir={run_dir} --batch-sizes 1,4,16 "
                          f"--out {path}`",
                          stacklevel=2)
        return SPSTable.flat(max_rows * (gamma + 1))
    table = SPSTable.load(path)
    measured_on = json.loads(path.read_text()).get("device_tag")
    if measured_on is not None and measured_on != device_tag(device) and str(path) not in _warned_missing:
        _warned_missing.add(str(path))
        warnings.warn(f"SPS table {path} was measured on {measured_on}, this run decodes on {device_tag(device)}",
                      stacklevel=2)
    table.check_covers(max_rows, gamma)
    return table


def tokens_digest(tokens: list[list[int]]) -> str:
    """A short digest of every prompt's new tokens, so runs can be compared for the same output (greedy decoding
    under any verify policy must give the target's own tokens)."""
    return hashlib.sha1(repr(tokens).encode()).hexdigest()[:16]


def _row(policy: str, batch_size: int, results: list, wall_s: float, stats) -> dict:
    accepted = [a for r in results for a in r.accepted]
    proposed = [p for r in results for p in r.proposed]
    generated = sum(len(r.tokens) for r in results)
    calls = stats.num_target_calls
    return {
        "policy": policy, "batch_size": batch_size, "num_rounds": len(accepted),
        "tau": sum(a + 1 for a in accepted) / len(accepted) if accepted else math.nan,
        "mean_proposal_len": sum(proposed) / len(proposed) if proposed else math.nan,
        "generated_tokens": generated, "tokens_sha1": tokens_digest([r.tokens for r in results]), "wall_s": wall_s,
        "tokens_per_s": generated / wall_s if wall_s > 0 else math.nan,
        "target_calls": calls, "tokens_per_target_call": generated / calls if calls else math.nan,
        "target_step_s": stats.target_s / calls if calls else math.nan,
        "mean_fed_tokens": stats.fed_tokens / calls if calls else math.nan,
    }


def _simulated(results: list, gamma: int, sps, batch_size: int, padded: bool) -> dict | None:
    """Tokens/s of each simulated policy on the rounds of a ``full`` run drafted to ``gamma`` (None without any)."""
    rounds = [[(a, c) for a, p, c in zip(r.accepted, r.proposed, r.confidences) if p == gamma] for r in results
              if len(r.confidences) == len(r.accepted)]
    if not any(rounds):
        return None
    stats = simulate(rounds, num_drafts=gamma, sps=sps, batch_size=batch_size, padded=padded)
    return {name: s.tokens_per_s for name, s in stats.items()}


_SIMULATED_AS = {"full": "full", "scheduler": "algorithm1", "scheduler_async": "async"}


def policy_sweep(target, drafter, prompts: list[list[int]], *, policies: list[str], batch_sizes: list[int], sps,
                 max_new_tokens: int, temperature: float, seed: int, stop_ids, confidence_threshold: float,
                 progress: bool = False) -> list[dict]:
    """Decode ``prompts`` under every (batch size, policy) and return one row per pair (module docstring): the
    measured numbers, ``speedup`` (tokens/s over ``full`` at that batch size, measured here; ``full`` is run
    first whether listed or not) and ``simulated_speedup`` (None for ``threshold``, which the simulation lacks)."""
    from dspark.eval.specdec import DecodeStats, decode_prompts

    gamma = drafter.block_size
    order = ["full"] + [p for p in policies if p != "full"]
    rows = []
    for batch_size in batch_sizes:
        simulated, full_tps = None, math.nan
        for policy in order:
            stats = DecodeStats()
            results, wall_s = decode_prompts(
                target, drafter, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                stop_ids=stop_ids, progress=progress, batch_size=batch_size, verify_policy=policy, sps=sps,
                confidence_threshold=confidence_threshold if policy == "threshold" else 0.0, stats=stats)
            row = _row(policy, batch_size, results, wall_s, stats)
            if policy == "full":
                full_tps, simulated = row["tokens_per_s"], _simulated(results, gamma, sps, batch_size, stats.padded)
            row["speedup"] = row["tokens_per_s"] / full_tps
            sim_name = _SIMULATED_AS.get(policy)
            row["simulated_speedup"] = (simulated[sim_name] / simulated["full"]
                                        if simulated is not None and sim_name is not None else None)
            if policy in policies:
                rows.append(row)
    return rows


def format_policy_table(rows: list[dict]) -> str:
    """Fixed-width table, one line per (batch size, policy)."""
    header = (f"{'batch':>5}  {'policy':<15}  {'tau':>5}  {'prop':>5}  {'tok/call':>8}  {'tok/s':>8}  {'step ms':>8}"
              f"  {'speedup':>7}  {'sim.':>6}")
    lines = [header, "-" * len(header)]
    for r in rows:
        sim = f"{r['simulated_speedup']:.3f}" if r["simulated_speedup"] is not None else "-"
        lines.append(f"{r['batch_size']:>5d}  {r['policy']:<15}  {r['tau']:>5.2f}  {r['mean_proposal_len']:>5.2f}"
                     f"  {r['tokens_per_target_call']:>8.2f}  {r['tokens_per_s']:>8.1f}"
                     f"  {1000 * r['target_step_s']:>8.1f}  {r['speedup']:>7.3f}  {sim:>6}")
    return "\n".join(lines)
