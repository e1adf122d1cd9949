"""The megatron backend (tensor parallel over 2 gloo processes) against the single-process hf backend.

Workers write their results to disk; the parent compares them with the hf backend on the same multi-shard
checkpoint. Every spawn has a deadline: a failure on one rank would otherwise hang the other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, spawn_ranks
from tiny_families import save_tiny

from dspark.config import TargetConfig
from dspark.targets import load_target

LAYER_IDS = [-1, 0, 1, 2]  # 2: the last layer of the 3-layer families (before the final norm)
SHARD_BYTES = 64 << 10  # the embedding gets a shard of its own, each layer spreads over a few
PROMPTS = [[5, 17, 301, 9, 44], [12, 7, 7, 1002, 3, 88, 45, 6, 230]]


def _batches() -> list[torch.Tensor]:
    """Different batches per rank (different shapes): the group must gather and hand rows back."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 2000, (2, 12), generator=g), torch.randint(0, 2000, (1, 9), generator=g)]


def _worker(rank: int, world: int, port: int, model_dirs: dict[str, str], out_dir: str, tp: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    # Plain gloo (dspark.distributed would go through DeepSpeed, seconds slower to start); the backend
    # finds the process group already initialised.
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for family, model_dir in model_dirs.items():
        target = load_target(TargetConfig(name_or_path=model_dir, layer_ids=LAYER_IDS, backend="megatron",
                                           tensor_parallel=tp))
        ids_BT = _batches()[rank % len(_batches())]
        feats = target.features(ids_BT)
        seq = _batches()[0][0]  # decoding runs in lockstep: the same sequence on every rank
        session = target.decode_session()
        logits_a, f_a = session.extend(seq[:5])
        session.extend(seq[5:9] + 1)  # a wrong continuation, rolled back
        session.truncate(5)
        logits_b, f_b = session.extend(seq[5:])
        greedy = target.generate(PROMPTS, max_new_tokens=8, temperature=0.0, batch_size=2, seed=0)
        sampled = target.generate(PROMPTS, max_new_tokens=8, temperature=1.0, batch_size=2, seed=3)
        torch.save({"ids": ids_BT, "layers": feats.layers_BTLH, "final": feats.final_BTH,
                    "decode_logits": torch.cat([logits_a, logits_b]), "decode_feats": torch.cat([f_a, f_b]),
                    "greedy": greedy, "sampled": sampled, "param_bytes": target.parameter_bytes(),
                    "embed": target.embed_weight, "lm_head": target.lm_head_weight,
                    "identity": target.identity().to_dict()},
                   Path(out_dir) / f"{family}-rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("megatron")
    # llama gets one vocab row more than the tokenizer: an odd vocabulary that TP=2 must pad (and a tied head).
    odd_vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    return {"llama": save_tiny("llama", root / "llama", SHARD_BYTES, tokenizer_dir=tokenizer_dir, vocab_size=odd_vocab),
            "qwen3": save_tiny("qwen3", root / "qwen3", SHARD_BYTES, tokenizer_dir=tokenizer_dir),
            "deepseek_v3": save_tiny("deepseek_v3", root / "deepseek_v3", SHARD_BYTES, tokenizer_dir=tokenizer_dir),
            "deepseek_v4": save_tiny("deepseek_v4", root / "deepseek_v4", SHARD_BYTES, tokenizer_dir=tokenizer_dir),
            "qwen3_moe": save_tiny_qwen3_moe(root / "qwen3_moe", tokenizer_dir)}


def save_tiny_qwen3_moe(out: Path, tokenizer_dir: Path) -> Path:
    """A tiny Qwen3-MoE (4 experts, top 2, layer 0 dense): the generic path with nothing DeepSeek-specific."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dspark.targets.weights import save_sharded, unique_state_dict

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = AutoConfig.for_model(
        "qwen3_moe", vocab_size=len(tok), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
        num_experts_per_tok=2, mlp_only_layers=[0], max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    cfg.save_pretrained(out)
    save_sharded(unique_state_dict(model), out, SHARD_BYTES)
    tok.save_pretrained(out)
    return out


def split_experts(fused_dir: Path, out_dir: Path) -> Path:
    """The same checkpoint in DeepSeek's per-expert layout (``experts.{e}.gate_proj.weight`` ...)."""
    import shutil

    from dspark.targets.weights import WeightIndex, save_sharded

    index = WeightIndex(fused_dir)
    tensors = {}
    for name in index.names():
        tensor = index.load(name)
        prefix, last = name.rsplit(".", 1)
        if last == "gate_up_proj":
            for e, w in enumerate(tensor):
                gate, up = w.chunk(2)
                tensors[f"{prefix}.{e}.gate_proj.weight"], tensors[f"{prefix}.{e}.up_proj.weight"] = gate, up
        elif last == "down_proj" and tensor.dim() == 3:
            tensors.update({f"{prefix}.{e}.down_proj.weight": w for e, w in enumerate(tensor)})
        else:
            tensors[name] = tensor
    out_dir.mkdir()
    for f in fused_dir.iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, out_dir / f.name)
    save_sharded(tensors, out_dir, SHARD_BYTES)
    return out_dir


@pytest.fixture(scope="module")
def tp_results(sharded_dirs, tmp_path_factory) -> Path:
    """One 2-rank TP=2 run over all families (one spawn: process start-up dominates on a busy machine)."""
    out = tmp_path_factory.mktemp("megatron-out")
    dirs = {f: str(d) for f, d in sharded_dirs.items()}
    dirs["deepseek_v3_per_expert"] = str(split_experts(sharded_dirs["deepseek_v3"], out / "per_expert"))
    spawn_ranks(_worker, (2, free_port(), dirs, str(out), 2), 2, timeout=300.0, what="megatron workers")
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3", "deepseek_v3", "deepseek_v4", "qwen3_moe"])
def test_tensor_parallel_matches_hf(family, sharded_dirs, tp_results, one_thread):
    model_dir = sharded_dirs[family]
    assert len(list(model_dir.glob("model-*.safetensors"))) > 4
    results = [torch.load(tp_results / f"{family}-rank{r}.pt") for r in range(2)]

    hf = load_target(TargetConfig(name_or_path=str(model_dir), layer_ids=LAYER_IDS))
    seq_ref = hf.features(_batches()[0][:1])
    for res in results:
        ref = hf.features(res["ids"])
        torch.testing.assert_close(res["layers"], ref.layers_BTLH, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["final"], ref.final_BTH, atol=1e-5, rtol=1e-5)
        full_logits = hf.model.lm_head(seq_ref.final_BTH[0]).float()
        torch.testing.assert_close(res["decode_logits"], full_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["decode_feats"], seq_ref.layers_BTLH[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res["embed"], hf.embed_weight, atol=0, rtol=0)
        torch.testing.assert_close(res["lm_head"], hf.lm_head_weight, atol=0, rtol=0)
        assert res["identity"] == hf.identity().to_dict()  # a cache built by either backend serves the other

    # Greedy decoding is token-for-token the hf backend's; sampling agrees across the TP ranks.
    ref_greedy = hf.generate(PROMPTS, max_new_tokens=8, temperature=0.0, batch_size=2, seed=0)
    assert results[0]["greedy"] == results[1]["greedy"] == ref_greedy
    assert results[0]["sampled"] == results[1]["sampled"] != results[0]["greedy"]
    assert all(len(s) == 8 or s[-1] == hf.tokenizer.eos_token_id for s in results[0]["sampled"])

    if family == "deepseek_v3":  # DeepSeek's per-expert checkpoint layout loads to the same model
        per_expert = [torch.load(tp_results / f"deepseek_v3_per_expert-rank{r}.pt") for r in range(2)]
        for res, ref in zip(per_expert, results):
            torch.testing.assert_close(res["layers"], ref["layers"], atol=0, rtol=0)
            assert res["greedy"] == ref["greedy"]

    # Each rank holds about half of the parameters (norms are replicated; a tied head is one tensor).
    hf_bytes = sum(p.numel() * p.element_size() for p in hf.model.parameters())
    for res in results:
        assert 0.45 * hf_bytes < res["param_bytes"] < 0.55 * hf_bytes, (res["param_bytes"], hf_bytes)


def test_bad_inputs_fail_before_loading(sharded_dirs, tmp_path):
    llama = str(sharded_dirs["llama"])
    with pytest.raises(ValueError, match="tensor_parallel=3 does not divide llama num_attention_heads=4"):
        load_target(TargetConfig(name_or_path=llama, layer_ids=[0], backend="megatron", tensor_parallel=3))
    with pytest.raises(ValueError, match="target.tensor_parallel must be >= 1, got 0"):
        load_target(TargetConfig(name_or_path=llama, layer_ids=[0], backend="megatron", tensor_parallel=0))
    v4 = str(sharded_dirs["deepseek_v4"])  # heads split, but the output projection's 2 groups cannot split 4 ways
    with pytest.raises(ValueError, match="tensor_parallel=4 does not divide deepseek_v4 o_groups=2"):
        load_target(TargetConfig(name_or_path=v4, layer_ids=[0], backend="megatron", tensor_parallel=4))
    with pytest.raises(ValueError, match=r"target.layer_ids \[3\] out of range"):
        load_target(TargetConfig(name_or_path=llama, layer_ids=[3], backend="megatron"))

    unknown = save_tiny("qwen3", tmp_path / "gpt2", SHARD_BYTES)
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="target.backend=megatron does not support model_type .gpt2."):
        load_target(TargetConfig(name_or_path=str(unknown), layer_ids=[0], backend="megatron"))

    broken = save_tiny("qwen3", tmp_path / "broken", SHARD_BYTES)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_target(TargetConfig(name_or_path=str(broken), layer_ids=[0], backend="megatron"))


def test_every_megatron_family_has_a_split_plan():
    """families.py (what the backend accepts) and parallelize.TP_PLANS (how it splits them) name the same families."""
    from dspark.targets.families import supported_families
    from dspark.targets.megatron.parallelize import TP_PLANS

    assert supported_families("megatron") == sorted(TP_PLANS)
