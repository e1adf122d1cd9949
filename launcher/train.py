"""DeepSpeed entry script: `deepspeed [--hostfile H | --num_gpus N] launcher/train.py --config R --set k=v`.

It parses, sets up distributed state and calls into the package; no logic lives here.
"""

import argparse
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="smollm2_dspark", help="recipe file or shipped recipe name")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from dspark.config import ConfigError, load_config
    from dspark.distributed import init_distributed
    from dspark.train.trainer import train

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rank, _ = init_distributed()
    result = train(cfg, progress=True)
    if rank == 0:
        print(f"trained {result.steps} steps, final loss {result.final_loss:.4f}; drafter: {result.drafter_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
