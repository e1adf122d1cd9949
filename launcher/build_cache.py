"""DeepSpeed entry script: `deepspeed [--hostfile H | --num_gpus N] launcher/build_cache.py --config R --set k=v
[--rebuild]` (the options of `dspark cache build`).

Every rank hosts the target and captures a disjoint slice of the conversations into its own shards; rank 0
writes the manifest once all are done. It parses, sets up distributed state and calls into the package; no
logic lives here.
"""

import sys


def _options(parser) -> None:
    parser.add_argument("--rebuild", action="store_true",
                        help="Delete an existing cache (e.g. one made from older data) first.")


def _build(cfg, rank: int, world: int, args) -> None:
    from dspark.stages import build_cache

    out = build_cache(cfg, progress=True, rebuild=args.rebuild)
    if rank == 0:
        print(f"cache: {out} (written by {world} process{'es' if world > 1 else ''})")


if __name__ == "__main__":
    from dspark.distributed import launcher_main

    sys.exit(launcher_main(__doc__, _build, add_arguments=_options))
