"""DeepSpeed entry script: `deepspeed [--hostfile H | --num_gpus N] launcher/calibrate.py --config R --set k=v
[--drafter DIR] [--dataset NAME ...] [--prompts FILE] [--scheduler-sps FILE]` (the options of `dspark calibrate`).

Sequential Temperature Scaling with a target hosted across the ranks: decoding is split over the target's decode
groups and rank 0 writes calibration.json. It parses, sets up distributed state and calls into the package; no
logic lives here.
"""

import sys


def _options(parser) -> None:
    parser.add_argument("--drafter", dest="drafter_dir", default=None, metavar="DIR",
                        help="drafter directory to calibrate (default: <run_dir>/drafter)")
    parser.add_argument("--dataset", dest="datasets", action="append", default=[], metavar="NAME[,NAME...]",
                        help="fetched benchmark(s) to calibrate on instead of the held-out prompts")
    parser.add_argument("--prompts", dest="prompts_file", default=None, metavar="FILE",
                        help='jsonl of {"turns": [...]} or {"prompt": ...} rows')
    parser.add_argument("--scheduler-sps", dest="scheduler_sps", default=None, metavar="FILE",
                        help="SPS table (tools/profile_sps.py) to replay the held-out rounds through the scheduler")


def _calibrate(cfg, rank: int, world: int, args) -> None:
    from dspark.stages import calibrate

    out = calibrate(cfg, drafter_dir=args.drafter_dir, datasets=args.datasets or None,
                    prompts_file=args.prompts_file, scheduler_sps=args.scheduler_sps)
    if rank == 0:
        print(f"calibration: {out['calibration_json']} (decoded by {world} process{'es' if world > 1 else ''})")


if __name__ == "__main__":
    from dspark.distributed import launcher_main

    sys.exit(launcher_main(__doc__, _calibrate, add_arguments=_options))
