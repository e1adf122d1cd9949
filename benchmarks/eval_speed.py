"""Benchmark: speculative-decoding evaluation speed against plain target decoding, and batched drafter proposals
against row-by-row proposals (or prompts prefilled apart against prefilled beside the decoding rows).

For each target and drafter (untrained, built from the recipe) it decodes the same prompts at each batch size of
``--batches``, once with one ``drafter.propose_batch`` call per step for all rows in flight ("after"), once with
one ``drafter.propose`` call per row ("before", ``batch_proposals=False``) and once with no drafter at all
("target": ``NoDrafts``, plain target decoding through the same batched session), alternating the three
``--repeats`` times and keeping each one's fastest run. It reports verification rounds/s and generated tokens/s,
the after/before and after/target ratios measured in the same run, and whether before and after decoded the same
tokens (they must).

    nice -n 10 python benchmarks/eval_speed.py [--targets tiny,smollm2] [--prompts 4] [--tokens 16] [--threads 1]
        [--batches 1,4,12] [--temperature 1]

``--compare prefill-logits`` makes "before" compute the LM head over every prompt position of a prefill (as before
the batched session's ``last_only``) and "after" over the last one only, and also times the prefill forward of the
batch alone: as one forward both ways, and in the length groups the decoder now prefills in (fastest of 5).
``--compare prefill`` makes "before" prefill each prompt admitted mid-run beside the decoding rows' drafts
(``prefill_apart=False``: every row padded to the prompt's length) and "after" in a forward of its own, and also
times the target alone both ways ("target_before"); at batch 1 both are the same code path (one row, no neighbours),
so only "after" and "target" run there. ``--drafter-dir`` evaluates a trained export (``load_drafter``) instead of
the untrained recipe drafter; ``--prompts-file`` takes prompts from a jsonl file (e.g.
``../shared/eval_datasets/gsm8k.jsonl``) instead of the builtin set.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

# target name -> (builtin target, {drafter: recipe})
TARGETS = {
    "tiny": ("builtin:tiny-llama", {"dspark": "tiny_llama_dspark", "eagle3": "tiny_llama_eagle3"}),
    "smollm2": ("builtin:smollm2", {"dspark": "smollm2_dspark", "eagle3": "smollm2_eagle3"}),
}


def _decode(target, drafter, prompts, *, tokens: int, batch: int, batched: bool, stop_ids, temperature: float,
            prefill_apart: bool = True) -> tuple[float, list]:
    import torch

    from dspark.eval.specdec import prompt_seed, speculative_generate_batch

    generators = [torch.Generator().manual_seed(prompt_seed(0, i)) for i in range(len(prompts))]
    drafter.reset_context_cache()  # every run starts cold
    start = time.perf_counter()
    results = speculative_generate_batch(target, drafter, prompts, max_new_tokens=tokens, temperature=temperature,
                                         generators=generators, batch_size=batch, stop_ids=stop_ids,
                                         batch_proposals=batched, prefill_apart=prefill_apart)
    return time.perf_counter() - start, results


def reference_decode(target, prompts, stop_ids, *, reference_dir: str, drafter_dir: str, temperature: float,
                     max_new_tokens: int) -> tuple[float, list]:
    """The reference implementation's own batch-1 loop (DeepSpec's ``generate_decoding_sample`` with its DSpark
    evaluator's propose/update, every draft verified) over ``prompts``, with the trained export at ``drafter_dir``
    loaded by its ``from_pretrained`` and the same target model: wall seconds and the new tokens of each prompt."""
    import sys
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, reference_dir)
    from deepspec.eval.base_evaluator import generate_decoding_sample
    from deepspec.eval.dspark.evaluator import Qwen3DSparkEvaluator

    evaluator = Qwen3DSparkEvaluator.__new__(Qwen3DSparkEvaluator)  # its __init__ builds models and a recorder
    dtype = target.lm_head_weight.dtype
    evaluator.draft_model = Qwen3DSparkEvaluator.draft_model_cls.from_pretrained(
        drafter_dir, dtype=dtype, attn_implementation="sdpa").eval()
    evaluator.args = SimpleNamespace(temperature=temperature, confidence_threshold=0.0)
    from transformers import DynamicCache

    crop = DynamicCache.crop

    def crop_to(cache, max_length: int) -> None:
        # The reference targets transformers 5.10, whose crop(n) keeps the first n positions; 5.24 takes the
        # (negative) number to drop.
        drop = cache.get_seq_length() - max_length
        if drop > 0:
            crop(cache, -drop)

    tokens = []
    DynamicCache.crop = crop_to
    try:
        start = time.perf_counter()
        for prompt in prompts:
            input_ids = torch.tensor([prompt], dtype=torch.long)
            out = generate_decoding_sample(target_model=target.model, input_ids=input_ids,
                                           max_new_tokens=max_new_tokens,
                                           max_proposal_tokens=evaluator.max_proposal_tokens,
                                           temperature=temperature, stop_token_ids=list(stop_ids),
                                           init_context=evaluator._init_context, propose=evaluator._propose,
                                           update=evaluator._update)
            tokens.append(out.output_ids[0, len(prompt):].tolist())
        wall_s = time.perf_counter() - start
    finally:
        DynamicCache.crop = crop
    return wall_s, tokens


class _AllPrefillLogits:
    """``target`` whose batched session ignores ``last_only``: a prefill gets the logits of every prompt position,
    as before the LM head was limited to the last one (``--compare prefill-logits``'s "before")."""

    def __init__(self, target):
        self.target = target

    def __getattr__(self, name):
        return getattr(self.target, name)

    def batch_decode_session(self):
        session = self.target.batch_decode_session()

        class AllLogits:
            partial_steps = session.partial_steps

            def __getattr__(self, name):
                return getattr(session, name)

            def extend(self, ids, last_only=None):
                return session.extend(ids)

        return AllLogits()


def _prefill_only(target, prompts, batch: int, repeats: int) -> dict:
    """The prefill of ``batch`` prompts alone, three ways, alternating, fastest of ``repeats``: one batched forward
    with the LM head at every position ("before"), the same with it at each prompt's last position only ("after",
    ``last_only``), and that in length groups (``prefill_groups``: one forward per group, the other rows sitting it
    out, as the decoder now prefills). The last-position logits of the three must agree."""
    import torch

    from dspark.eval.specdec import prefill_groups

    feeds = [torch.tensor(p, dtype=torch.long) for p in prompts[:batch]]
    empty = torch.empty(0, dtype=torch.long)
    groups = prefill_groups([x.numel() for x in feeds])

    def one_forward(last_only):
        outputs = target.batch_decode_session(len(feeds)).extend(feeds, last_only=last_only)
        return [logits[-1] for logits, _ in outputs]

    def grouped(_):
        session, last = target.batch_decode_session(len(feeds)), [None] * len(feeds)
        for group in groups:
            outputs = session.extend([feeds[i] if i in group else empty for i in range(len(feeds))],
                                     last_only=[True] * len(feeds))
            for i in group:
                last[i] = outputs[i][0][-1]
        return last

    runs = {"before": (one_forward, None), "after": (one_forward, [True] * len(feeds)), "grouped": (grouped, None)}
    best, last = dict.fromkeys(runs, float("inf")), {}
    for _ in range(repeats):
        for name, (fn, arg) in runs.items():
            start = time.perf_counter()
            last[name] = torch.stack(fn(arg))
            best[name] = min(best[name], time.perf_counter() - start)
    lengths = [x.numel() for x in feeds]
    return {"prefill_before_s": round(best["before"], 3), "prefill_after_s": round(best["after"], 3),
            "prefill_grouped_s": round(best["grouped"], 3),
            "prefill_speedup": round(best["before"] / best["after"], 3),
            "prefill_grouped_vs_after": round(best["after"] / best["grouped"], 3),
            "prefill_positions": sum(lengths), "prefill_padded_positions": max(lengths) * len(lengths),
            "prefill_groups": [[lengths[i] for i in g] for g in groups],
            "prefill_last_logits_equal": all(bool(torch.allclose(last["before"], last[n], atol=1e-4, rtol=1e-4))
                                             for n in ("after", "grouped"))}


def _measure(target, drafter, prompts, args, batch: int, stop_ids) -> dict:
    from dspark.eval.specdec import NoDrafts

    # name -> (drafter, batch_proposals, prefill_apart[, target])
    if args.compare == "drafts":
        runs = {"before": (drafter, False, True), "after": (drafter, True, True),
                "target": (NoDrafts(target), True, True)}
    elif args.compare == "prefill-logits":
        runs = {"before": (drafter, True, True, _AllPrefillLogits(target)), "after": (drafter, True, True),
                "target": (NoDrafts(target), True, True)}
    else:
        no_drafts = NoDrafts(target)
        runs = {"before": (drafter, True, False), "after": (drafter, True, True), "target": (no_drafts, True, True),
                "target_before": (no_drafts, True, False)}
        if batch == 1:  # one row never has neighbours to sit out: before is the after code path
            runs = {name: runs[name] for name in ("after", "target")}
    best = dict.fromkeys(runs, float("inf"))
    records = {}
    for _ in range(args.repeats):
        for name, (who, batched, apart, *host) in runs.items():
            wall_s, results = _decode(host[0] if host else target, who, prompts, tokens=args.tokens, batch=batch,
                                      batched=batched, stop_ids=stop_ids, temperature=args.temperature,
                                      prefill_apart=apart)
            best[name] = min(best[name], wall_s)
            records[name] = [(r.tokens, r.accepted, r.proposed) for r in results]
    row = {}
    if "before" in runs:
        row["same_tokens"] = records["after"] == records["before"]
    for name in runs:
        rounds = sum(len(accepted) for _, accepted, _ in records[name])
        generated = sum(len(tokens) for tokens, _, _ in records[name])
        row[f"{name}_wall_s"] = round(best[name], 3)
        row[f"{name}_rounds_per_s"] = round(rounds / best[name], 2)
        row[f"{name}_tokens_per_s"] = round(generated / best[name], 2)
    if "before" in runs:
        row["speedup_after_vs_before"] = round(row["after_tokens_per_s"] / row["before_tokens_per_s"], 3)
    if "target_before" in runs:
        row["speedup_target_vs_target_before"] = round(row["target_tokens_per_s"] / row["target_before_tokens_per_s"],
                                                       3)
        row["target_before_same_tokens"] = records["target_before"] == records["target"]
    row["speedup_after_vs_target"] = round(row["after_tokens_per_s"] / row["target_tokens_per_s"], 3)
    after = [(tokens, accepted) for tokens, accepted, _ in records["after"]]
    row["tokens_per_round"] = round(sum(len(t) - 1 for t, _ in after) / max(1, sum(len(a) for _, a in after)), 3)
    if args.temperature == 0:
        row["target_same_tokens"] = [t for t, _, _ in records["target"]] == [t for t, _, _ in records["after"]]
    if args.reference_dir and batch == 1:
        wall_s, tokens = reference_decode(target, prompts, stop_ids, reference_dir=args.reference_dir,
                                          drafter_dir=args.drafter_dir, temperature=args.temperature,
                                          max_new_tokens=args.tokens)
        row["reference_wall_s"] = round(wall_s, 3)
        row["reference_tokens_per_s"] = round(sum(len(t) for t in tokens) / wall_s, 2)
        row["reference_same_tokens"] = tokens == [t for t, _, _ in records["after"]]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="tiny,smollm2", help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--drafters", default="dspark,eagle3")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--batches", default="1,4,12", help="comma-separated batch sizes")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine two threads ran ~6x slower, not faster)")
    parser.add_argument("--out", default="benchmarks/results/eval_speed.json")
    parser.add_argument("--compare", choices=["drafts", "prefill", "prefill-logits"], default="drafts",
                        help="what before/after differ in: row-by-row vs batched drafts, prompts prefilled beside "
                             "the decoding rows vs apart, or prefill logits of every prompt position vs the last")
    parser.add_argument("--prefill-only", action="store_true",
                        help="with --compare prefill-logits: time only the prefill forwards, no decoding")
    parser.add_argument("--drafter-dir", default="", help="a trained drafter export (one target, one drafter)")
    parser.add_argument("--prompts-file", default="builtin", help="'builtin' or a jsonl file of prompts")
    parser.add_argument("--reference-dir", default="",
                        help="a checkout of the reference implementation (DeepSpec): also time its own batch-1 loop "
                             "on --drafter-dir at batch 1 (reference_tokens_per_s)")
    args = parser.parse_args()
    unknown = set(args.targets.split(",")) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; expected some of {', '.join(TARGETS)}")
    if args.prefill_only and args.compare != "prefill-logits":
        parser.error("--prefill-only times the prefill forwards of --compare prefill-logits")
    if args.reference_dir and not args.drafter_dir:
        parser.error("--reference-dir runs the reference loop on a trained export: give --drafter-dir")
    if args.drafter_dir and len(args.targets.split(",")) * len(args.drafters.split(",")) != 1:
        parser.error("--drafter-dir evaluates one trained drafter: give one --targets and one --drafters")

    import torch

    from dspark.config import load_config
    from dspark.data.chat import prompt_ids
    from dspark.data.prompts import load_prompts
    from dspark.drafters import build_drafter
    from dspark.export import load_drafter
    from dspark.targets import load_target

    torch.set_num_threads(args.threads)
    results = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "device": "cpu",
               "prompts": args.prompts, "max_new_tokens": args.tokens, "temperature": args.temperature,
               "repeats": args.repeats, "compare": args.compare, "drafter_dir": args.drafter_dir or "untrained",
               "prompts_file": args.prompts_file,
               "note": ("before = one drafter.propose per row in flight (batch_proposals=False), after = one "
                        "propose_batch per step" if args.compare == "drafts" else
                        "before = a prefill computes the logits of every prompt position, after = of its last "
                        "position only (the default)" if args.compare == "prefill-logits" else
                        "before = a prompt admitted mid-run is prefilled beside the decoding rows' drafts "
                        "(prefill_apart=False), after = in a forward of its own (the default); target_before")
                       + ", target = plain target decoding (NoDrafts) at the same batch size; same process, "
                         "alternating runs, fastest of each kept",
               "runs": {}}
    for name in args.targets.split(","):
        builtin, recipes = TARGETS[name]
        target = None
        for algorithm in args.drafters.split(","):
            cfg = load_config(recipes[algorithm], [f"target.name_or_path={builtin}"])
            if target is None:
                start = time.perf_counter()
                target = load_target(cfg.target)
                results[f"{name}_load_s"] = round(time.perf_counter() - start, 1)
            torch.manual_seed(0)
            if args.drafter_dir:
                drafter = load_drafter(args.drafter_dir, verifier=target).eval()
            else:
                drafter = build_drafter(cfg.drafter, target.config, cfg.target.layer_ids, target.embed_weight,
                                        target.lm_head_weight).eval()
            prompts = [prompt_ids(target.tokenizer, p) for p in load_prompts(args.prompts_file, args.prompts)]
            stop_ids = [target.tokenizer.eos_token_id]
            _decode(target, drafter, prompts[:1], tokens=4, batch=1, batched=True, stop_ids=stop_ids,
                    temperature=args.temperature)  # warm-up
            for batch in [int(b) for b in args.batches.split(",")]:
                row = {} if args.prefill_only else _measure(target, drafter, prompts, args, batch, stop_ids)
                row["prompt_lengths"] = [len(p) for p in prompts]
                if args.compare == "prefill-logits":
                    row.update(_prefill_only(target, prompts, batch, repeats=5))
                results["runs"][f"{name}/{algorithm}/batch{batch}"] = row
                print(f"{name}/{algorithm}/batch{batch}", json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
