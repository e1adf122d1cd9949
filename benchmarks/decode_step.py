"""Benchmark: one batched verification step of ``HFBatchDecodeSession`` against a plain Hugging Face forward of the
same shapes, so the cost of rows decoded at their own lengths (the 4-D mask, per-row positions, moving each row's
new cache columns after the step) shows as a ratio.

For each (rows, tokens per row) of the grid both run after a context of ``--context-len`` tokens per row and roll
back after each step: the session through ``extend`` + ``truncate``; the plain forward on a ``DynamicCache`` of the
same context length for every row (no mask, shared positions: the cheapest a step of that shape can be), plus the
LM head over every new position, as the session computes it. Alternating, fastest of ``--repeats`` each.

    OMP_NUM_THREADS=1 python benchmarks/decode_step.py --target builtin:smollm2 --rows 1,4,16 \\
        --tokens-per-row 1,2,4,8 --out benchmarks/results/decode_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _fastest(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="builtin:smollm2")
    parser.add_argument("--config", "-c", default="smollm2_dspark", help="recipe whose target section to use")
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--tokens-per-row", default="1,2,4,8")
    parser.add_argument("--context-len", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/decode_step.json")
    args = parser.parse_args()

    import torch
    from transformers import DynamicCache

    from dspark.config import load_config
    from dspark.targets import load_target

    torch.set_num_threads(args.threads)
    target = load_target(load_config(args.config, [f"target.name_or_path={args.target}"]).target)
    model, vocab = target.model, target.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    with torch.no_grad():
        for rows in [int(r) for r in args.rows.split(",")]:
            context_RT = torch.randint(vocab, (rows, args.context_len), generator=gen)
            session = target.batch_decode_session(rows)
            session.extend(list(context_RT), last_only=[True] * rows)
            cache = DynamicCache(config=model.config)
            model.model(input_ids=context_RT, past_key_values=cache, use_cache=True)
            for per_row in [int(t) for t in args.tokens_per_row.split(",")]:
                new_RN = torch.randint(vocab, (rows, per_row), generator=gen)

                def session_step():
                    session.extend(list(new_RN))
                    session.truncate([args.context_len] * rows)

                def plain_step():
                    out = model.model(input_ids=new_RN, past_key_values=cache, use_cache=True,
                                      output_hidden_states=True)
                    model.lm_head(out.last_hidden_state).float()
                    cache.crop(-per_row)

                session_step(), plain_step()  # warm-up
                best = {"session": float("inf"), "plain": float("inf")}
                for _ in range(args.repeats):  # alternating, fastest of each
                    best["session"] = min(best["session"], _fastest(session_step, 1))
                    best["plain"] = min(best["plain"], _fastest(plain_step, 1))
                row = {"rows": rows, "tokens_per_row": per_row, "session_ms": round(1000 * best["session"], 1),
                       "plain_forward_ms": round(1000 * best["plain"], 1),
                       "session_vs_plain": round(best["session"] / best["plain"], 3)}
                rows_out.append(row)
                print(json.dumps(row), flush=True)
    result = {"command": "python " + " ".join(sys.argv), "target": args.target, "context_len": args.context_len,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "repeats": args.repeats, "steps": rows_out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
