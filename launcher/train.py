"""DeepSpeed entry script: `deepspeed [--hostfile H | --num_gpus N] launcher/train.py --config R --set k=v`.

It parses, sets up distributed state and calls into the package; no logic lives here.
"""

import sys


def _train(cfg, rank: int, world: int, args) -> None:
    from dspark import stages

    result = stages.train(cfg, progress=True)  # the `dspark train` stage, on every rank
    if rank == 0:
        print(f"trained {result.steps} steps, final loss {result.final_loss:.4f}; drafter: {result.drafter_dir}")


if __name__ == "__main__":
    from dspark.distributed import launcher_main

    sys.exit(launcher_main(__doc__, _train))
