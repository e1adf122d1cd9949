"""Measure the target verifier's steps per second (SPS) at several batch sizes: the table the prefix scheduler reads
(``dspark.eval.scheduler.SPSTable``, ``dspark calibrate --scheduler-sps``).

A step is one batched verification forward: B rows of t new tokens each (t = gamma + 1 is an anchor plus a full
draft) after a KV context of ``--context-len`` random tokens per row, then the rows roll back to the context, as
speculative decoding does. The table holds one curve per row count B: tokens per row t -> steps/s. A step's cost
depends on its rows as well as its tokens (on CPU, 16 rows x 1 token cost more than 4 rows x 4), so the scheduler
reads the curves of the row counts around its step's and interpolates (``SPSTable``), refusing anything outside.
Measure row 1 and the largest batch you serve, with t from 1 to gamma + 1: the default t is 1, 2, 3, 4, the powers
of two up to gamma + 1 and gamma + 1 itself, since the scheduler mostly chooses short prefixes.

    python tools/profile_sps.py -c smollm2_dspark --batch-sizes 1,2,4,8 --context-len 512 --out sps.json

Output: {"version": 2, "sps_by_rows": {rows: {tokens_per_row: steps_per_s}}, "sps": {batch_tokens: steps_per_s}
(the means over row counts, for plots), "points": [...each measurement...], "target", "backend", "device", "gamma",
"context_len", "iters"}. Needs a backend with batched decoding (``hf``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"{flag}: expected positive integers, got {text!r}")
    return values


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def default_tokens_per_row(gamma: int) -> list[int]:
    """1, 2, 3, 4, the powers of two up to ``gamma + 1``, and ``gamma + 1``: dense where the scheduler mostly
    chooses (short prefixes), every length up to a block of 4."""
    return sorted({t for t in (1, 2, 3, 4) if t <= gamma + 1} | {2 ** i for i in range(8) if 2 ** i <= gamma + 1}
                  | {gamma + 1})


def measure(target, rows: int, tokens_per_row: int, context_len: int, *, warmup: int, iters: int, seed: int) -> float:
    """Steps/s of ``rows`` x ``tokens_per_row`` verification forwards after ``context_len`` context tokens per row."""
    import torch

    vocab = target.embed_weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    session = target.batch_decode_session()
    session.add_rows(rows)
    session.extend([torch.randint(vocab, (context_len,), generator=gen) for _ in range(rows)])
    feeds = [[torch.randint(vocab, (tokens_per_row,), generator=gen) for _ in range(rows)] for _ in range(4)]
    device = target.embed_weight.device
    for i in range(warmup + iters):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        session.extend(feeds[i % len(feeds)])
        session.truncate([context_len] * rows)
    _sync(device)
    return iters / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", default="smollm2_dspark", help="Recipe naming the target (dspark recipes).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--batch-sizes", default="1,2,4,8", help="Rows per step (comma-separated).")
    parser.add_argument("--gamma", type=int, default=None, help="Draft length (default: drafter.block_size).")
    parser.add_argument("--tokens-per-row", default=None,
                        help="New tokens per row per step (comma-separated; default: 1, 2, 3, 4, the powers of two "
                             "up to gamma+1, and gamma+1).")
    parser.add_argument("--context-len", type=int, default=512, help="KV context tokens per row.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="Where to write the JSON table.")
    args = parser.parse_args(argv)

    from dspark import distributed as dist_utils
    from dspark.config import load_config
    from dspark.eval.scheduler import SPSTable, device_tag
    from dspark.targets import load_target

    cfg = load_config(args.config, args.overrides)
    gamma = args.gamma if args.gamma is not None else cfg.drafter.block_size
    if gamma < 1 or args.context_len < 1 or args.iters < 1 or args.warmup < 0:
        raise SystemExit(f"need gamma >= 1, --context-len >= 1, --iters >= 1, --warmup >= 0; got {gamma}, "
                         f"{args.context_len}, {args.iters}, {args.warmup}")
    rows_list = _ints(args.batch_sizes, "--batch-sizes")
    per_row = (_ints(args.tokens_per_row, "--tokens-per-row") if args.tokens_per_row else
               default_tokens_per_row(gamma))
    target = load_target(cfg.target, device=dist_utils.local_device())
    if not hasattr(target, "batch_decode_session"):
        raise SystemExit(f"target backend {cfg.target.backend!r} has no batched decoding; profile with backend hf")

    points = []
    for rows in rows_list:
        for t in per_row:
            sps = measure(target, rows, t, args.context_len, warmup=args.warmup, iters=args.iters, seed=args.seed)
            points.append({"rows": rows, "tokens_per_row": t, "batch_tokens": rows * t, "steps_per_s": sps})
            print(f"rows {rows:>4}  tokens/row {t:>3}  batch tokens {rows * t:>6}  {sps:10.2f} steps/s", flush=True)
    by_rows: dict[int, dict[int, float]] = {}
    for p in points:
        by_rows.setdefault(p["rows"], {})[p["tokens_per_row"]] = p["steps_per_s"]
    view = SPSTable.per_rows(by_rows)
    table = {
        "version": 2,
        "sps_by_rows": {str(r): {str(t): sps for t, sps in sorted(curve.items())}
                        for r, curve in sorted(by_rows.items())},
        "sps": {str(t): sps for t, sps in zip(view.tokens, view.sps)},
        "points": points,
        "target": cfg.target.name_or_path,
        "backend": cfg.target.backend,
        "device": str(target.embed_weight.device),
        "device_tag": device_tag(target.embed_weight.device),  # `dspark eval` looks for <run_dir>/sps/<tag>.json
        "gamma": gamma,
        "context_len": args.context_len,
        "iters": args.iters,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
