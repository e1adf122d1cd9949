"""The pipeline backend on 2 CPU processes (gloo) equals the single-process hf backend on the same checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tiny_families import save_tiny, tiny_config

from dspark.config import TargetConfig
from dspark.targets import load_target
from tests.conftest import free_port, spawn_ranks

FAMILIES = ("llama", "qwen3", "deepseek_v3")
LAYER_IDS = [-1, 0, 2, 3]  # 4 layers over 2 stages: -1 and 0 on stage 0, 2 and 3 (the last) on stage 1
SHARD_BYTES = 120_000  # several shards per tiny model


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    return {f: save_tiny(f, root / f, SHARD_BYTES, num_layers=4) for f in FAMILIES}


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each rank its own batch, of its own shape: rank 0 right-padded, the others without a mask."""
    gen = torch.Generator().manual_seed(rank)
    if rank == 0:
        ids = torch.randint(0, 256, (2, 9), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        return ids, mask
    return torch.randint(0, 256, (3, 6), generator=gen), None


def _worker(rank: int, world: int, port: int, jobs: dict[str, dict], out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results = {}
    for key, job in jobs.items():
        target = load_target(TargetConfig(backend="pipeline", **job))
        feats = target.features(*_batch(rank))
        identity = target.identity().to_dict() if target.tokenizer is not None else None
        results[key] = {"identity": identity, "layers": feats.layers_BTLH, "final": feats.final_BTH,
                        "stage": target.stage, "param_bytes": target.parameter_bytes(),
                        "embed": target.embed_weight.clone(),
                        "lm_head": target.lm_head_weight.clone(),
                        "stage_layer_ids": target.stage_layer_ids}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _spawn(jobs: dict, out_dir: Path, world: int = 2, timeout: float = 240) -> list[dict]:
    """Run ``_worker`` on ``world`` processes and load what each rank saved."""
    return spawn_ranks(_worker, (world, free_port(), jobs, str(out_dir)), world, timeout=timeout,
                       what="pipeline workers", results=out_dir)


def _job(model_dir: Path, stages: int = 0, dtype: str = "float32", layer_ids: list[int] = LAYER_IDS) -> dict:
    return {"name_or_path": str(model_dir), "pipeline_stages": stages, "dtype": dtype, "layer_ids": layer_ids}


def _hf_reference(job: dict):
    from transformers import AutoModelForCausalLM

    from dspark.targets.hf import HFTarget

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[job["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(job["name_or_path"], dtype=dtype)
    return HFTarget(model, None, job["layer_ids"], "reference")


def _check_parity(jobs: dict[str, dict], results: list[dict]) -> None:
    """Each rank's features equal the hf backend's on that rank's batch (fp32: 1e-5; bf16: bitwise ops, 1e-2)."""
    for key, job in jobs.items():
        ref = _hf_reference(job)
        tol = 1e-5 if job["dtype"] == "float32" else 1e-2
        for rank, res in enumerate(results):
            got, want = res[key], ref.features(*_batch(rank))
            # Every rank gets the features of its own batch, whichever stage it is.
            torch.testing.assert_close(got["layers"], want.layers_BTLH, atol=tol, rtol=tol, msg=key)
            torch.testing.assert_close(got["final"], want.final_BTH, atol=tol, rtol=tol, msg=key)
            torch.testing.assert_close(got["embed"], ref.embed_weight, atol=0, rtol=0)
            torch.testing.assert_close(got["lm_head"], ref.lm_head_weight, atol=0, rtol=0)


def _param_bytes(ref) -> tuple[int, int]:
    """(hf's parameter bytes, its untied LM head's bytes: the pipeline leaves the LM head out)."""
    total = sum(p.numel() * p.element_size() for p in ref.model.parameters())
    head = ref.lm_head_weight
    return total, 0 if ref.model.config.tie_word_embeddings else head.numel() * head.element_size()


def test_features_match_hf_backend_on_two_stages(tiny_dirs, tmp_path, one_thread):
    for model_dir in tiny_dirs.values():
        shards = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"].values()
        assert len(set(shards)) >= 3
    jobs = {family: _job(d) for family, d in tiny_dirs.items()}  # 0 stages = the world size, 2
    jobs["llama-bf16"] = _job(tiny_dirs["llama"], dtype="bfloat16")
    jobs["llama-1stage"] = _job(tiny_dirs["llama"], stages=1)  # two replicas of a 1-stage pipeline
    results = _spawn(jobs, tmp_path)
    _check_parity(jobs, results)

    for key, job in jobs.items():
        hf_bytes, lm_head_bytes = _param_bytes(_hf_reference(job))
        per_stage = [r[key]["param_bytes"] for r in results]
        if job["pipeline_stages"] == 1:
            assert per_stage == [hf_bytes - lm_head_bytes] * 2
            continue
        # Memory: the stages split the model (embedding on stage 0, final norm on stage 1, the LM head on
        # neither): together exactly hf's parameters without the LM head, each about half of hf's.
        assert [r[key]["stage"] for r in results] == [0, 1]
        assert sum(per_stage) == hf_bytes - lm_head_bytes
        assert all(0.3 < b / hf_bytes < 0.7 for b in per_stage), (key, per_stage, hf_bytes)


def test_three_stages_and_per_expert_checkpoint(tiny_dirs, tokenizer_dir, tmp_path, one_thread):
    """A middle stage; a DeepSeek-V3 checkpoint in HF's on-disk layout (one tensor per expert), with a tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspark.targets.hf import HFTarget

    hf_layout = tmp_path / "deepseek_v3_hf"
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_config("deepseek_v3", vocab_size=256, num_layers=4))
    model.save_pretrained(hf_layout, max_shard_size="300KB")  # from_config: saved per expert, as on the hub
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(hf_layout)
    names = json.loads((hf_layout / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in names
    # 4 layers over 3 stages: [embedding, 0, 1] [2] [3, norm]; the last stage sends layer 3 and the final state.
    jobs = {"deepseek_v3": _job(hf_layout)}
    results = _spawn(jobs, tmp_path, world=3)
    assert [r["deepseek_v3"]["stage"] for r in results] == [0, 1, 2]
    assert results[0]["deepseek_v3"]["stage_layer_ids"] == [[-1, 0], [2], [3]]
    _check_parity(jobs, results)
    want = HFTarget(model, tokenizer, LAYER_IDS, hf_layout.name).identity().to_dict()
    assert all(r["deepseek_v3"]["identity"] == want for r in results)


def test_refused_before_loading(tiny_dirs, tmp_path):
    llama = str(tiny_dirs["llama"])
    with pytest.raises(ValueError, match="pipeline_stages=8 is more than the 4 decoder layers"):
        load_target(TargetConfig(name_or_path=llama, backend="pipeline", layer_ids=[0], pipeline_stages=8))
    with pytest.raises(ValueError, match="out of range"):
        load_target(TargetConfig(name_or_path=llama, backend="pipeline", layer_ids=[4], pipeline_stages=1))

    from transformers import AutoConfig

    gpt2 = tmp_path / "gpt2"
    AutoConfig.for_model("gpt2", n_layer=2).save_pretrained(gpt2)
    with pytest.raises(ValueError, match="does not support model_type 'gpt2'.*supported: .*qwen3"):
        load_target(TargetConfig(name_or_path=str(gpt2), backend="pipeline", layer_ids=[0]))

    broken = tmp_path / "broken"
    shutil.copytree(llama, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_target(TargetConfig(name_or_path=str(broken), backend="pipeline", layer_ids=[0], pipeline_stages=1))

    # A tensor absent from shards and index alike: named by the header-only check, before any stage loads.
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(llama, partial)
    index_path = partial / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.3.mlp.up_proj.weight"
    file = partial / index["weight_map"].pop(name)
    tensors = load_file(file)
    del tensors[name]
    save_file(tensors, file, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"missing from the checkpoint: {name}"):
        load_target(TargetConfig(name_or_path=str(partial), backend="pipeline", layer_ids=[0], pipeline_stages=1))
