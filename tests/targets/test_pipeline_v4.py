"""DeepSeek-V4 on the pipeline backend (2 gloo processes, 2 stages) equals the single-process hf backend.

The tiny V4 has 4 layers of every attention kind (sliding, compressed-sparse, heavily-compressed, sliding) and
hash-routed MoE layers on both stages (layers 0 and 2), so the token ids, both rotary tables and the sliding-window
mask must reach stage 1. Sequences run past the sliding window (8) and several compression windows (2 and 4).
One spawn runs everything; the parent runs the same calls on the hf backend and compares.

Legend: B batch, T tokens, N new tokens, L feature layers, C mHC streams, H hidden size, V vocab.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tiny_families import save_tiny_with

from dspark.config import TargetConfig
from dspark.targets import load_target
from tests.conftest import free_port, spawn_ranks

LAYER_IDS = [-1, 0, 2, 3]  # 4 layers over 2 stages: -1 and 0 on stage 0, 2 and 3 (the last) on stage 1
MLP_LAYER_TYPES = ["hash_moe", "moe", "hash_moe", "moe"]  # hash routing on both stages
SHARD_BYTES = 120_000  # several shards
VOCAB = 1024  # SmolLM2's tokenizer, the model's vocab cut to its first 1024 ids
SEQ = torch.randint(3, VOCAB, (15,), generator=torch.Generator().manual_seed(0))
PROMPTS = [[5, 17, 301, 9, 44, 2, 80, 81, 82, 83], [12, 7, 7, 1002, 3], [40, 41], [900, 3, 77, 15, 8, 600]]


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each rank its own batch, of its own shape: rank 0 right-padded, rank 1 without a mask."""
    gen = torch.Generator().manual_seed(10 + rank)
    if rank == 0:
        ids = torch.randint(3, VOCAB, (2, 12), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        return ids, mask
    return torch.randint(3, VOCAB, (3, 10), generator=gen), None


def run_calls(target, rank: int) -> dict:
    """The calls compared with hf, in the same order on every rank of the replica."""
    feats = target.features(*_batch(rank))
    session = target.decode_session()
    steps = [session.extend(SEQ[:5]), session.extend(SEQ[5:6]), session.extend(SEQ[6:15])]  # prefill, single, many
    return {"layers": feats.layers_BTLH, "final": feats.final_BTH, "logits": torch.cat([s[0] for s in steps]),
            "feats": torch.cat([s[1] for s in steps]), "length": session.length,
            "greedy": target.generate(PROMPTS, max_new_tokens=5, temperature=0.0, batch_size=2, seed=0)}


def _worker(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    target = load_target(TargetConfig(backend="pipeline", name_or_path=model_dir, pipeline_stages=2,
                                      dtype="float32", layer_ids=LAYER_IDS))
    out = run_calls(target, rank)
    out["sampled"] = target.generate(PROMPTS, max_new_tokens=5, temperature=1.0, batch_size=2, seed=3)
    out.update(stage=target.stage, stage_layer_ids=target.stage_layer_ids, param_bytes=target.parameter_bytes(),
               embed=target.embed_weight.clone(), lm_head=target.lm_head_weight.clone())
    session = target.decode_session()
    session.extend(SEQ[:6])
    session.truncate(6)  # not dropping anything is fine
    session.truncate(4)  # rolls back by snapshot and replay (tests/targets/test_v4_decode_rollback.py checks more)
    out["after_truncate"] = session.extend(SEQ[4:7])[0]
    with pytest.raises(ValueError) as info:
        session.truncate(3)  # before the last extend
    out["truncate_error"] = str(info.value)
    bf16 = load_target(TargetConfig(backend="pipeline", name_or_path=model_dir, pipeline_stages=2,
                                    dtype="bfloat16", layer_ids=LAYER_IDS))
    feats = bf16.features(*_batch(rank))
    out["bf16"] = {"layers": feats.layers_BTLH, "final": feats.final_BTH}
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


def _spawn(model_dir: Path, out_dir: Path, world: int = 2, timeout: float = 180) -> list[dict]:
    """Run ``_worker`` on ``world`` processes and load what each rank saved."""
    return spawn_ranks(_worker, (world, free_port(), str(model_dir), str(out_dir)), world, timeout=timeout,
                       what="pipeline workers", results=out_dir)


@pytest.fixture(scope="module")
def v4_dir(tmp_path_factory, tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("pipeline-v4")
    return save_tiny_with("deepseek_v4", root / "deepseek_v4", SHARD_BYTES, tokenizer_dir=tokenizer_dir,
                          vocab_size=VOCAB, num_layers=4, mlp_layer_types=MLP_LAYER_TYPES)


def test_v4_features_and_decoding_match_hf_on_two_stages(v4_dir, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspark.targets.hf import HFTarget

    shards = json.loads((v4_dir / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) >= 3
    results = _spawn(v4_dir, tmp_path)

    model = AutoModelForCausalLM.from_pretrained(v4_dir, dtype=torch.float32)
    assert model.config.mlp_layer_types == MLP_LAYER_TYPES
    ref = HFTarget(model, AutoTokenizer.from_pretrained(v4_dir), LAYER_IDS, "reference")
    H = model.config.hidden_size
    wants = [run_calls(ref, rank) for rank in range(len(results))]
    for rank, (got, want) in enumerate(zip(results, wants)):
        B, T = _batch(rank)[0].shape
        # Features are the mean of each layer's mHC streams, as on every backend: [B, T, L, H].
        assert want["layers"].shape == (B, T, len(LAYER_IDS), H) and want["final"].shape == (B, T, H)
        assert want["feats"].shape == (15, len(LAYER_IDS), H) and want["logits"].shape == (15, VOCAB)
        for key in ("layers", "final", "logits", "feats"):
            assert got[key].dtype == want[key].dtype
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5, msg=f"rank {rank} {key}")
        assert got["length"] == want["length"] == 15
        assert got["greedy"] == want["greedy"] and all(len(g) >= 1 for g in got["greedy"])
        assert torch.equal(got["embed"], ref.embed_weight) and torch.equal(got["lm_head"], ref.lm_head_weight)
        assert got["stage"] == rank and got["stage_layer_ids"] == [[-1, 0], [2, 3]]
        assert "truncate(3) of a 7-token decode session" in got["truncate_error"]
        assert "deepseek_v4" in got["truncate_error"] and "only that extend's tokens" in got["truncate_error"]
        # Rolled back to 4 tokens, the session goes on as hf's did from there.
        torch.testing.assert_close(got["after_truncate"], wants[0]["logits"][4:7], atol=1e-5, rtol=1e-5)
    assert results[0]["sampled"] == results[1]["sampled"]  # the members of the replica agree

    # bf16: V4 keeps its mHC mixers, norms and stream head in fp32 (as transformers loads it); the same ops, so
    # equal up to a bf16 rounding step where reductions differ.
    ref_bf16 = HFTarget(AutoModelForCausalLM.from_pretrained(v4_dir, dtype=torch.bfloat16), None, LAYER_IDS, "ref")
    for rank, got in enumerate(results):
        want = ref_bf16.features(*_batch(rank))
        for key, value in (("layers", want.layers_BTLH), ("final", want.final_BTH)):
            assert got["bf16"][key].dtype == value.dtype == torch.bfloat16
            torch.testing.assert_close(got["bf16"][key], value, atol=2e-2, rtol=2e-2, msg=f"bf16 rank {rank} {key}")

    # Memory: the stages split the model (hf's parameters less the untied LM head), each holding a real share.
    hf_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head = ref.lm_head_weight
    head_bytes = 0 if model.config.tie_word_embeddings else head.numel() * head.element_size()
    per_stage = [r["param_bytes"] for r in results]
    assert sum(per_stage) == hf_bytes - head_bytes
    assert all(0.25 < b / hf_bytes < 0.75 for b in per_stage), (per_stage, hf_bytes)
