"""Training checkpoints that survive a kill mid-save, and the state needed to resume a run bit-for-bit.

Layout under ``<run_dir>/checkpoints``::

    step{n}/                      DeepSpeed's engine state (module, optimizer, LR schedule) for tag ``step{n}``
    step{n}/dspark_rank{r}.pt     rank r's RNG state (anchor-sampling generator, torch CPU/CUDA RNG)
    step{n}/dspark_complete.json  the commit record: written atomically by rank 0 after every rank has saved

A tag directory without ``dspark_complete.json`` is an interrupted save and is never resumed from. DeepSpeed's
own ``latest`` file is written *before* the save is known complete on every rank, so resume ignores it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dspark import distributed as dist_utils

MARKER = "dspark_complete.json"
_TAG_RE = re.compile(r"^step(\d+)$")


@dataclass
class Position:
    """Where the training loop stands: optimizer steps done, the epoch, and micro batches consumed in it (per rank)."""

    step: int
    epoch: int
    micro_in_epoch: int
    # Samples of each rank's stream consumed in the epoch (batched or skipped as corrupt), in rank order; None
    # (checkpoints before this field) = every rank at micro_in_epoch x micro batch size, true without skips.
    stream_positions: list[int] | None = None


def tag_for(step: int) -> str:
    return f"step{step}"


def _rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"dspark_rank{rank}.pt"


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` so that a reader sees either the old file or the complete new one, never a torn write."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tag_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every ``step{n}`` directory, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _TAG_RE.match(p.name))]
    return sorted(found)


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of the fully written checkpoints (those with the commit record), oldest first."""
    return [(step, d) for step, d in _tag_dirs(Path(ckpt_dir)) if (d / MARKER).is_file()]


def latest_complete(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """The newest fully written checkpoint's directory and commit record, or None when there is none."""
    complete = complete_checkpoints(Path(ckpt_dir))
    if not complete:
        return None
    tag_dir = complete[-1][1]
    return tag_dir, json.loads((tag_dir / MARKER).read_text())


def rng_state(generator: torch.Generator) -> dict:
    """This rank's random state: the anchor-sampling generator and torch's global CPU (and CUDA) RNG."""
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: Path, position: Position, generator: torch.Generator, *, rank: int, world: int,
         keep_last: int, run_info: dict) -> Path:
    """Save the engine and this rank's RNG as tag ``step{n}``, commit it, then prune old checkpoints.

    Collective: every rank must call it at the same step. ``run_info`` (e.g. the drafter config) goes into the
    commit record so that a resume into a different run can be refused.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(position.step)
    tag_dir = ckpt_dir / tag
    marker = tag_dir / MARKER
    if rank == 0 and marker.exists():
        marker.unlink()  # re-saving a tag (e.g. after a crash): it is incomplete until the new commit below
    dist_utils.barrier()
    client_state = {"dspark": {**asdict(position), "world_size": world}}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    # DeepSpeed keeps client_state only in rank 0's file (ZeRO 0) but the anchor generator differs per rank.
    torch.save(rng_state(generator), _rank_file(tag_dir, rank))
    dist_utils.barrier()  # every rank's engine shards and RNG file are on disk
    if rank == 0:
        _write_json_atomic(marker, {"tag": tag, **asdict(position), "world_size": world, **run_info})
        prune(ckpt_dir, keep_last)
    dist_utils.barrier()
    return tag_dir


def prune(ckpt_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and interrupted saves older than the newest
    complete one; returns the deleted directories. Never touches the newest complete checkpoint."""
    complete = complete_checkpoints(Path(ckpt_dir))
    if not complete:
        return []
    keep = {d for _, d in complete[-max(keep_last, 1):]}
    newest = complete[-1][0]
    doomed = [d for step, d in _tag_dirs(Path(ckpt_dir)) if d not in keep
              and ((d / MARKER).is_file() or step < newest)]
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)
    return doomed


def load(engine, ckpt_dir: Path, generator: torch.Generator, *, rank: int, world: int,
         run_info: dict, run_defaults: dict | None = None) -> Position | None:
    """Restore the newest complete checkpoint into ``engine`` and ``generator``; None when there is none.

    Refuses (ValueError) a checkpoint saved with another world size (the data slices and per-rank RNG would
    not line up) or for another run (``run_info`` differs, e.g. another drafter config). A config field the
    checkpoint lacks (written by an older dspark) matches when this run leaves it at its default
    (``run_defaults``, shaped like ``run_info``).
    """
    found = latest_complete(Path(ckpt_dir))
    if found is None:
        return None
    tag_dir, record = found
    if record["world_size"] != world:
        raise ValueError(
            f"checkpoint {tag_dir} was saved with world size {record['world_size']} but this run has world size "
            f"{world}: exact resume needs the same world size (or move {Path(ckpt_dir)} away to start afresh)"
        )
    for key, value in run_info.items():
        saved = _fill_defaults(record.get(key), value, (run_defaults or {}).get(key))
        if saved != value:
            raise ValueError(
                f"checkpoint {tag_dir} was saved with {key}={record.get(key)} but this run has {key}={value}: "
                f"set train.resume=false or move {Path(ckpt_dir)} away to start afresh"
            )
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag_dir.name)
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {tag_dir}")
    restore_rng_state(torch.load(_rank_file(tag_dir, rank), weights_only=True), generator)
    return Position(step=record["step"], epoch=record["epoch"], micro_in_epoch=record["micro_in_epoch"],
                    stream_positions=record.get("stream_positions"))


def _fill_defaults(saved, value, defaults):
    """``saved`` plus, in every nested mapping, the keys ``value`` has and ``saved`` lacks (fields an older dspark
    did not write), taken from ``defaults``."""
    if not (isinstance(saved, dict) and isinstance(value, dict) and isinstance(defaults, dict)):
        return saved
    filled = {k: defaults[k] for k in value.keys() - saved.keys() if k in defaults}
    filled.update({k: _fill_defaults(v, value.get(k), defaults.get(k)) for k, v in saved.items()})
    return filled


class Checkpointer:
    """Decides when a training run saves, and resumes it: every ``train.save_every`` steps before the stop step,
    and once at the end unless that step is already saved. Collective, like ``save``.

    The commit record carries the drafter config, so a resume into a run with another drafter is refused.
    """

    def __init__(self, engine, ckpt_dir: Path, generator: torch.Generator, train_cfg, drafter_cfg, *, rank: int,
                 world: int):
        self.engine, self.ckpt_dir, self.generator = engine, Path(ckpt_dir), generator
        self.save_every, self.keep_last, self.resume_on = train_cfg.save_every, train_cfg.keep_last, train_cfg.resume
        self.rank, self.world = rank, world
        # What a checkpoint must match to be resumed into this run (JSON round trip: the record is JSON).
        self.run_info = {"drafter": json.loads(json.dumps(asdict(drafter_cfg)))}
        self.run_defaults = {"drafter": json.loads(json.dumps(asdict(type(drafter_cfg)())))}
        self.saved_step: int | None = None

    def resume(self) -> Position:
        """The position to start from: the newest complete checkpoint's (``train.resume``), else step 0."""
        position = None
        if self.resume_on:
            position = load(self.engine, self.ckpt_dir, self.generator, rank=self.rank, world=self.world,
                            run_info=self.run_info, run_defaults=self.run_defaults)
        position = position or Position(step=0, epoch=0, micro_in_epoch=0)
        self.saved_step = position.step if position.step else None
        return position

    def after_step(self, position: Position, stream_position: int | None, stop_at: int) -> None:
        """Save at every ``save_every``-th step, except the stop step (``finish`` saves that one)."""
        if self.save_every and position.step % self.save_every == 0 and position.step < stop_at:
            self.save(position, stream_position)

    def finish(self, position: Position, stream_position: int | None) -> None:
        """Save the step the run ends at, unless it already is."""
        if self.saved_step != position.step:
            self.save(position, stream_position)

    def save(self, position: Position, stream_position: int | None) -> None:
        """``stream_position``: samples of this rank's stream consumed in the epoch; skipped samples move ranks'
        streams differently, so every rank's is kept. None before any batch was read."""
        if stream_position is not None:
            position.stream_positions = dist_utils.all_gather_ints(stream_position)
        save(self.engine, self.ckpt_dir, position, self.generator, rank=self.rank, world=self.world,
             keep_last=self.keep_last, run_info=self.run_info)
        self.saved_step = position.step
