"""Rank/world helpers: gloo on CPU, nccl on GPU. Works under ``deepspeed``/``torchrun`` and as a plain process."""

from __future__ import annotations

import os
import socket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size).

    A plain ``python`` process has no RANK/WORLD_SIZE and DeepSpeed would fall into MPI discovery (which needs
    mpi4py), so a single-process world is described through the environment first.
    """
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # object collectives (all_gather_object) run on the current device: make it ours
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (no-op in a single process); returns it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _control_device():
    """Where small control tensors go for the default group's backend: nccl reduces CUDA tensors only."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_ints(values: list[int], op: str = "sum") -> list[int]:
    """Reduce a few integers over ranks (``op``: sum, min or max); unchanged in a single process.

    For decisions every rank must take together (the end of an epoch, a stop), whatever the backend.
    """
    import torch
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"all_reduce_ints: op must be one of {sorted(ops)}, got {op!r}")
    values = [int(v) for v in values]
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    tensor = torch.tensor(values, dtype=torch.int64, device=_control_device())
    dist.all_reduce(tensor, op=ops[op])
    return tensor.tolist()


def all_gather_ints(value: int) -> list[int]:
    """Every rank's ``value``, in rank order (``[value]`` in a single process)."""
    one_hot = [0] * world_size()
    one_hot[rank()] = int(value)
    return all_reduce_ints(one_hot)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def local_device() -> str:
    """The device this process computes on: its own GPU (``LOCAL_RANK``) when there are GPUs, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def shutdown() -> None:
    """Tear the process group down, DeepSpeed's cached subgroups included, so that a later ``init_distributed``
    in this process starts a fresh world (tests run several trainings in one process). A plain
    ``torch.distributed.destroy_process_group`` leaves DeepSpeed holding the dead world group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()


def launcher_parser(description: str, add_arguments=None):
    """The argument parser of a ``launcher/`` script: ``--config R --set k=v --local_rank N`` and its own options."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="smollm2_dspark", help="recipe file or shipped recipe name")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    if add_arguments is not None:
        add_arguments(parser)
    return parser


def launcher_main(description: str, run, add_arguments=None) -> int:
    """The body every DeepSpeed entry script in ``launcher/`` shares: parse ``--config R --set k=v`` (and the
    ``--local_rank`` the deepspeed launcher adds, plus the script's own options from ``add_arguments(parser)``),
    load the config (a config error is one line and exit code 2), set up the process group, then
    ``run(cfg, rank, world, args)``."""
    import sys

    args = launcher_parser(description, add_arguments).parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from dspark.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rank, world = init_distributed()
    run(cfg, rank, world, args)
    return 0
