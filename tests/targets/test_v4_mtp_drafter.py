"""DeepSeek-V4's mtp.* DSpark draft next to a tiny V4 target: greedy speculative decoding with it equals target
decoding (hf, and zero3 and pipeline on 2 gloo processes), `init_from_target` copies the target's own layers
through the weight loader, and an export attached to the V4 checkpoint (tools/attach_drafter.py: a new index, the
target's shards linked, not copied) loads back as the same draft while the target loads unchanged from that
directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tiny_families import save_tiny_with

from dspark.config import DrafterConfig, DSparkConfig, TargetConfig
from dspark.drafters import build_drafter
from dspark.export import load_drafter
from dspark.targets import load_target
from tests.conftest import free_port, spawn_ranks

LAYER_IDS = [0, 1, 2]
VOCAB = 1024
REPO = Path(__file__).parents[2]
WORLD = 2


@pytest.fixture(scope="module")
def v4_dir(tmp_path_factory, tokenizer_dir) -> Path:
    # Score-routed MoE in every layer (the draft's stages copy those); sliding, CSA and HCA attention kinds.
    return save_tiny_with("deepseek_v4", tmp_path_factory.mktemp("v4-mtp") / "v4", 150_000, tokenizer_dir=tokenizer_dir,
                          vocab_size=VOCAB, num_layers=4, mlp_layer_types=["moe"] * 4)


@pytest.fixture(scope="module")
def hf_v4(v4_dir):
    return load_target(TargetConfig(backend="hf", name_or_path=str(v4_dir), dtype="float32", layer_ids=LAYER_IDS))


def make_drafter(target, seed: int = 0):
    torch.manual_seed(seed)
    cfg = DrafterConfig(algorithm="dspark_v4", num_layers=3, block_size=5, num_anchors=4,
                        dspark=DSparkConfig(markov_rank=16))
    drafter = build_drafter(cfg, target.config, LAYER_IDS, target.embed_weight, target.lm_head_weight)
    with torch.no_grad():
        drafter.markov_head.markov_w2.weight.normal_(std=0.05)
    return drafter.eval()


def greedy_decodes(target, max_new_tokens: int = 24) -> dict:
    """Greedy speculative decoding with the untrained V4 draft (seed 0) and plain target decoding, same prompt."""
    from dspark.eval.specdec import speculative_generate, target_generate

    drafter = make_drafter(target)
    prompt = torch.randint(3, VOCAB, (6,), generator=torch.Generator().manual_seed(0)).tolist()
    result = speculative_generate(target, drafter, prompt, max_new_tokens=max_new_tokens, temperature=0.0)
    return {"tokens": result.tokens, "accepted": result.accepted, "proposed": result.proposed,
            "target": target_generate(target, prompt, max_new_tokens=max_new_tokens, temperature=0.0)}


def test_greedy_speculative_decoding_with_the_v4_draft_equals_target_decoding(hf_v4, one_thread):
    got = greedy_decodes(hf_v4)
    assert got["tokens"] == got["target"] and len(got["tokens"]) == 24
    assert max(got["proposed"]) == 5
    assert any(a < p for a, p in zip(got["accepted"], got["proposed"]))  # rejections: V4's rollback ran


def _backend_worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    out = {}
    for backend, extra in (("zero3", {}), ("pipeline", {"pipeline_stages": 2})):
        target = load_target(TargetConfig(backend=backend, name_or_path=model_dir, dtype="float32",
                                          layer_ids=LAYER_IDS, **extra))
        out[backend] = greedy_decodes(target, max_new_tokens=12)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


def test_greedy_speculative_decoding_with_the_v4_draft_on_zero3_and_pipeline(hf_v4, v4_dir, tmp_path, one_thread):
    """Both ranks of a zero3 replica and both pipeline stages decode the same tokens as hf, round by round (the
    draft sees the parallel backends' features, every mHC stream, through the same rollbacks)."""
    want = greedy_decodes(hf_v4, max_new_tokens=12)
    assert want["tokens"] == want["target"]
    assert any(a < p for a, p in zip(want["accepted"], want["proposed"]))
    results = spawn_ranks(_backend_worker, (free_port(), str(v4_dir), str(tmp_path)), WORLD, timeout=150,
                          what="2-process zero3/pipeline V4 speculative decoding", results=tmp_path)
    for rank, got in enumerate(results):
        for backend in ("zero3", "pipeline"):
            assert got[backend] == want, (backend, rank)


def test_init_from_target_copies_the_targets_layers(hf_v4, v4_dir, one_thread):
    drafter = make_drafter(hf_v4)
    copied = drafter.init_from_target(v4_dir)
    target_state = hf_v4.model.state_dict()
    assert len(copied) == sum(len(s.state_dict()) for s in drafter.stages)
    for s, layer in enumerate(LAYER_IDS):
        for name, tensor in drafter.stages[s].state_dict().items():
            assert torch.equal(tensor, target_state[f"model.layers.{layer}.{name}"]), (s, name)


def test_export_attached_to_the_v4_checkpoint_loads_back(hf_v4, v4_dir, tmp_path, one_thread):
    import subprocess
    import sys

    from dspark.export import export_drafter

    with pytest.raises(ValueError, match="holds no mtp.* tensors"):
        load_drafter(v4_dir)
    drafter = make_drafter(hf_v4)
    export = export_drafter(drafter, tmp_path / "export", "deepseek-v4-mtp")
    out = tmp_path / "attached"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "attach_drafter.py"), str(v4_dir), str(export),
                           str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    files = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert all((out / f).is_symlink() for f in files - {"mtp-dspark.safetensors"})  # target shards: linked
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids_BT": ids, "features_BTLH": torch.randn(1, 20, 3, 64)}
    anchors = torch.tensor([[4, 13]])
    # The attached directory serves the target's own embedding and LM head (fp32 here), not the export's BF16 copies.
    reference = load_drafter(export)
    reference.embed_tokens.weight, reference.lm_head.weight = hf_v4.embed_weight, hf_v4.lm_head_weight
    with torch.no_grad():
        want = reference.teacher_forced_logits(batch, anchors)
        assert torch.equal(load_drafter(out).teacher_forced_logits(batch, anchors), want)
    # The target loads unchanged from the attached directory (the export's BF16 embed/head copies are left out).
    attached = load_target(TargetConfig(backend="hf", name_or_path=str(out), dtype="float32", layer_ids=LAYER_IDS))
    want_state, got_state = hf_v4.model.state_dict(), attached.model.state_dict()
    assert got_state.keys() == want_state.keys()
    assert [n for n in want_state if not torch.equal(got_state[n], want_state[n])] == []
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "attach_drafter.py"), str(v4_dir), str(v4_dir),
                           str(tmp_path / "bad")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "is not a deepseek-v4-mtp export" in proc.stderr


def test_demo_trains_and_exports_the_v4_draft_end_to_end(tmp_path, tokenizer_dir):
    """`dspark demo -c tiny_deepseek_v4_dspark` on a tiny V4: features (the mean of the mHC streams) into the cache, the
    draft initialised from the target's layers and trained in DeepSpeed, evaluated by speculative decoding, and
    exported in DeepSeek's mtp.* layout (which loads back)."""
    from conftest import run_cli

    target_dir = save_tiny_with("deepseek_v4", tmp_path / "v4", 1 << 20, tokenizer_dir=tokenizer_dir,
                                num_layers=4, mlp_layer_types=["moe"] * 4)
    run_dir = tmp_path / "run"
    proc = run_cli(["demo", "-c", "tiny_deepseek_v4_dspark", "--set", f"run_dir={run_dir}",
                    "--set", f"target.name_or_path={target_dir}", "--set", "data.max_prompts=6",
                    "--set", "data.max_new_tokens=12", "--set", "eval.batch_size=2",
                    "--set", "drafter.init_from_target=true"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert all(report[tag][name]["num_rounds"] > 0 for tag in ("T1", "T0") for name in ("trained", "untrained"))
    exported = run_dir / "export" / "deepseek-v4-mtp"
    config = json.loads((exported / "config.json").read_text())
    assert config["n_mtp_layers"] == 3 and config["dspark_target_layer_ids"] == [0, 1, 2]
    assert load_drafter(exported).algorithm == "dspark_v4"
