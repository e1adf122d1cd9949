"""DeepSpeed entry script: `deepspeed [--hostfile H | --num_gpus N] launcher/eval.py --config R --set k=v
[--drafter NAME=DIR ...] [--dataset NAME ...] [--prompts FILE]` (the options of `dspark eval`).

Speculative decoding against a target hosted across the ranks (megatron, zero3, pipeline) or replicated on each
(hf): the prompts are split over the target's decode groups, the results gathered, and rank 0 writes the report,
plots and TensorBoard scalars. It parses, sets up distributed state and calls into the package; no logic lives
here.
"""

import sys


def _options(parser) -> None:
    parser.add_argument("--drafter", dest="drafters", action="append", default=[], metavar="[NAME=]DIR",
                        help="drafter directory to evaluate (repeatable; default: <run_dir>/drafter and an "
                             "untrained one)")
    parser.add_argument("--dataset", dest="datasets", action="append", default=[], metavar="NAME[,NAME...]",
                        help="fetched benchmark(s) to evaluate on instead of the held-out prompts")
    parser.add_argument("--prompts", dest="prompts_file", default=None, metavar="FILE",
                        help='jsonl of {"turns": [...]} or {"prompt": ...} rows')


def _eval(cfg, rank: int, world: int, args) -> None:
    from dspark.cli import _drafter_specs
    from dspark.stages import evaluate

    drafters = _drafter_specs(tuple(args.drafters))
    evaluate(cfg, drafter_dirs=drafters or None, datasets=args.datasets or None, prompts_file=args.prompts_file,
             progress=True)
    if rank == 0:
        print(f"report: {cfg.run_dir}/eval/report.json (decoded by {world} process{'es' if world > 1 else ''})")


if __name__ == "__main__":
    from dspark.distributed import launcher_main

    sys.exit(launcher_main(__doc__, _eval, add_arguments=_options))
