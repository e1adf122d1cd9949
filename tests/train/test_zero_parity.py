"""ZeRO 0, 1, 2 and 3 (and 3 with the optimizer offloaded) train the same drafter to the same losses and weights:
2 gloo processes, same data and seed.

Both ranks train every variant one after the other in one process group (one spawn, one import of torch and
DeepSpeed), each stage into its own run directory; losses are read back from ``metrics.jsonl``.
``zero_runs_dir`` is shared with ``tests/test_convert_to_hf.py`` (it reuses finished runs of the session).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

STAGES = (0, 1, 2, 3)
# Run name -> (ZeRO stage, optimizer offloaded to CPU); zero3_offload uses ds_configs/zero3_offload.json.
RUNS = {**{f"zero{s}": (s, False) for s in STAGES}, "zero3_offload": (3, True)}
STEPS = 5  # one epoch of the tiny cache: 20 conversations / (2 ranks x micro batch 2)
WORLD = 2
TIMEOUT_S = 300  # a failure on one rank hangs the other in a collective: never wait longer than this


def _overrides(run_dir: Path, target_dir: Path, stage: int, offload: bool) -> list[str]:
    return [f"run_dir={run_dir}", f"target.name_or_path={target_dir}", f"train.zero_stage={stage}",
            f"train.offload_optimizer={str(offload).lower()}", f"train.max_steps={STEPS}", "train.micro_batch_size=2",
            "train.num_threads=1", "train.lr=3e-3"]


def _worker(rank: int, port: int, cache_dir: str, root: str, target_dir: str) -> None:
    """One rank: train every stage in turn (each stage is a separate engine over a fresh drafter)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    from dspark.config import load_config
    from dspark.train.trainer import train

    for name, (stage, offload) in RUNS.items():
        cfg = load_config("tiny_llama_dspark", _overrides(Path(root) / name, Path(target_dir), stage, offload))
        train(cfg, cache_dir=Path(cache_dir), progress=False)


def build_tiny_cache(run_dir: Path, target_dir: Path) -> Path:
    """Prepare + cache the tiny llama recipe (20 training conversations) into ``run_dir/cache``."""
    from dspark.config import load_config
    from dspark.stages import build_cache, prepare
    from dspark.targets import load_target

    # Short answers (16 tokens) keep the regeneration and the training cheap; 5 blocks of 4 still fit.
    cfg = load_config("tiny_llama_dspark", [f"run_dir={run_dir}", f"target.name_or_path={target_dir}",
                                            "data.max_new_tokens=16"])
    target = load_target(cfg.target)
    prepare(cfg, target=target, progress=False)
    return build_cache(cfg, target=target, progress=False)


def zero_runs_dir(tmp_path_factory, target_dir: Path) -> Path:
    """``<basetemp>/zero_runs/<name>`` for every name in ``RUNS``: the 2-process runs, made once per session."""
    from conftest import free_port, spawn_ranks

    root = tmp_path_factory.getbasetemp() / "zero_runs"
    done = root / "done.json"
    if done.is_file():
        return root
    cache_dir = build_tiny_cache(root / "prep", target_dir)
    spawn_ranks(_worker, (free_port(), str(cache_dir), str(root), str(target_dir)), WORLD, timeout=TIMEOUT_S,
                what="2-process ZeRO runs")
    done.write_text(json.dumps({"runs": list(RUNS), "steps": STEPS}))
    return root


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, tiny_llama_dir) -> Path:
    return zero_runs_dir(tmp_path_factory, tiny_llama_dir)


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss/total"] for r in rows]


def test_zero_stages_train_to_the_same_losses(zero_runs):
    losses = {name: _losses(zero_runs / name) for name in RUNS}
    assert losses["zero0"][-1] < losses["zero0"][0]  # it does learn (lr 3e-3): equal losses mean equal updates
    for name in RUNS:
        # Same maths, different reduction order (flat partitions, reduce-scatter): fp32 rounding only.
        torch.testing.assert_close(torch.tensor(losses[name]), torch.tensor(losses["zero0"]), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n} vs zero0 losses: {m}")


def test_zero_stages_end_with_the_same_weights(zero_runs):
    from safetensors.torch import load_file

    weights = {name: load_file(zero_runs / name / "drafter" / "model.safetensors") for name in RUNS}
    ref = weights["zero0"]
    for name in RUNS:
        assert weights[name].keys() == ref.keys()
        for key, ref_tensor in ref.items():
            # ZeRO-3 gathers its partitions for the final export: the full tensors, not the rank's shard.
            assert weights[name][key].shape == ref_tensor.shape, (name, key)
            # Adam steps by m / sqrt(v): where a gradient entry is ~0 (Markov rows of unseen tokens) the sign of
            # its fp32 rounding decides the step, so a handful of entries differ by up to ~1e-5 (lr 3e-3) while
            # everything else agrees to 1e-6.
            diff = (weights[name][key] - ref_tensor).abs()
            assert diff.max() < 1e-4, (name, key, diff.max())
            assert (diff > 1e-6).float().mean() < 1e-4, (name, key, int((diff > 1e-6).sum()), diff.numel())
    for name, (stage, _) in RUNS.items():
        tag = zero_runs / name / "checkpoints" / f"step{STEPS}"
        assert (tag / "dspark_complete.json").is_file()
        # ZeRO 1-3 shard the optimizer state: one file per rank; ZeRO 0 keeps it whole in the model file.
        assert len(list(tag.glob("*optim_states.pt"))) == (WORLD if stage else 0), sorted(os.listdir(tag))
