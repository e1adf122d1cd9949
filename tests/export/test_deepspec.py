import dataclasses
import json

import pytest
import torch
from export_helpers import perturbed, random_batch
from safetensors.torch import load_file, save_file

from dspark.config import drafter_config
from dspark.drafters import build_drafter
from dspark.export import load_drafter
from dspark.export.deepspec import deepspec_config, expected_tensor_shapes, export_deepspec, load_deepspec

V, H = 300, 64
TARGET = dict(model_type="llama", hidden_size=H, vocab_size=V, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, intermediate_size=96, num_hidden_layers=6, rms_norm_eps=1e-5,
              rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.02)
LAYER_IDS = [-1, 1, 3]
pytestmark = pytest.mark.usefixtures("one_thread")


def _drafter(**overrides):
    torch.manual_seed(0)
    data = {"num_layers": 2, "num_anchors": 5, **overrides}  # drafter fields as a recipe writes them
    if data.get("algorithm", "dspark") == "dspark":
        data["dspark"] = {"markov_rank": 8, **overrides.get("dspark", {})}
    cfg = drafter_config(data)
    d = build_drafter(cfg, TARGET, LAYER_IDS, torch.randn(V, H), torch.randn(V, H))
    return perturbed(d)


def _batch():
    return random_batch(V, H, len(LAYER_IDS), tokens=20)


CASES = {
    "vanilla": {},
    "gated": dict(dspark={"markov_head_type": "gated"}),
    "rnn": dict(dspark={"markov_head_type": "rnn", "ce_weight": 0.3}, loss_decay=7.0),
    "confidence_without_markov": dict(dspark={"markov_rank": 0}),
    "dflash_layout": dict(dflash_layout=True, block_size=5, dspark={"enable_confidence_head": False}),
    "dflash": dict(algorithm="dflash", intermediate_size=48),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_round_trip_gives_identical_logits(case, tmp_path):
    d = _drafter(**CASES[case])
    out = export_deepspec(d, TARGET, tmp_path / "drafter")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    tensors = load_file(str(out / "model.safetensors"))
    # Exactly the deepspec names (no prefix), frozen target weights included, shapes [out, in].
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_tensor_shapes(config)
    assert torch.equal(tensors["lm_head.weight"], d.lm_head.weight)
    assert torch.equal(tensors["embed_tokens.weight"], d.embed_tokens.weight)
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["model_type"] == "qwen3"
    assert config["num_hidden_layers"] == 2 and config["layer_types"] == ["full_attention"] * 2
    assert config["num_target_layers"] == 6 and config["target_layer_ids"] == LAYER_IDS
    assert config["tie_word_embeddings"] is False and config["dtype"] == "float32"
    assert config["mask_token_id"] == V - 1 and config["rope_parameters"]["rope_theta"] == 100000.0
    assert config["dspark"]["layer_semantics"].startswith("id i = output of decoder layer i")
    assert ("markov_head_type" in config) == (d.markov_rank > 0)
    assert ("confidence_head_with_markov" in config) == (d.confidence_head is not None)

    loaded = load_drafter(out)
    # -1 (mask token) and 0 (intermediate size) are stored resolved.
    assert loaded.cfg == dataclasses.replace(d.cfg, mask_token_id=V - 1, intermediate_size=d.intermediate_size)
    assert deepspec_config(loaded) == config
    anchors = torch.tensor([[3, 9], [0, 14]])
    torch.testing.assert_close(loaded.teacher_forced_logits(_batch(), anchors),
                               d.teacher_forced_logits(_batch(), anchors), rtol=0, atol=0)
    a = d.forward_loss(_batch(), torch.Generator().manual_seed(1))
    b = loaded.forward_loss(_batch(), torch.Generator().manual_seed(1))
    assert a.numerator.item() == b.numerator.item()
    feats = _batch()["features_BTLH"][0, :7]
    pa = d.propose(feats, 11, temperature=0.0)
    pb = loaded.propose(feats, 11, temperature=0.0)
    assert torch.equal(pa.tokens_K, pb.tokens_K) and torch.equal(pa.probs_KV, pb.probs_KV)


def test_export_drafter_dispatches_by_format(tmp_path):
    from dspark.export import export_drafter

    d = load_drafter(export_deepspec(_drafter(), TARGET, tmp_path / "a"))
    out = export_drafter(d, tmp_path / "b", "deepspec")  # a re-export without the target config at hand
    assert (out / "config.json").read_text() == (tmp_path / "a" / "config.json").read_text()
    again, first = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "a" / "model.safetensors"))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    with pytest.raises(ValueError, match="export format 'onnx' unknown; expected one of: deepseek-v4-mtp, "
                                         "deepseek-v4-mtp-fp8, deepspec, eagle3, speculators$"):
        export_drafter(d, tmp_path / "c", "onnx")


def test_bf16_export_and_tied_target_weights(tmp_path):
    d = _drafter()
    d.lm_head.weight = d.embed_tokens.weight  # a tied target shares one matrix: stored twice, loads fine
    d.to(torch.bfloat16)
    out = export_deepspec(d, TARGET, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_drafter(out)
    assert loaded.fc.weight.dtype == torch.bfloat16
    anchors = torch.tensor([[2, 8], [4, 5]])
    torch.testing.assert_close(loaded.teacher_forced_logits(_batch(), anchors),
                               d.teacher_forced_logits(_batch(), anchors), rtol=0, atol=0)


def test_export_refuses_bad_weights_and_mismatched_targets(tmp_path):
    d = _drafter()
    with pytest.raises(ValueError, match="drafter hidden_size 64 does not match the target config's 128"):
        export_deepspec(d, dict(TARGET, hidden_size=128), tmp_path / "x")
    d.embed_tokens.weight = torch.zeros(V, H)
    with pytest.raises(ValueError, match="embed_tokens.weight is all zero or not finite"):
        export_deepspec(d, TARGET, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_loader_is_strict_and_versioned(tmp_path):
    out = export_deepspec(_drafter(dspark={"markov_head_type": "rnn"}), TARGET, tmp_path / "d")
    tensors = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())

    bad = tmp_path / "missing"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in tensors.items() if k != "markov_head.joint_proj.bias"}, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing: \['markov_head.joint_proj.bias'\]; unexpected: none"):
        load_drafter(bad)
    save_file({("model." + k if k == "norm.weight" else k): v for k, v in tensors.items()},
              str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing: \['norm.weight'\]; unexpected: \['model.norm.weight'\]"):
        load_drafter(bad)

    (out / "config.json").write_text(json.dumps(dict(config, dspark=dict(config["dspark"], format_version=99))))
    with pytest.raises(ValueError, match="format_version 99; this dspark reads versions up to 1"):
        load_drafter(out)
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "block_size"}))
    with pytest.raises(ValueError, match="deepspec config lacks required key"):
        load_drafter(out)
    with pytest.raises(ValueError, match="is not a deepspec export: config.json is missing"):
        load_deepspec(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="nowhere is not a drafter directory"):  # load_drafter detects first
        load_drafter(tmp_path / "nowhere")


def test_reference_style_config_without_dspark_section_loads_as_dspark_layout(tmp_path):
    d = _drafter()
    out = export_deepspec(d, TARGET, tmp_path / "ref")
    config = json.loads((out / "config.json").read_text())
    del config["dspark"]
    (out / "config.json").write_text(json.dumps(config))
    loaded = load_drafter(out)
    assert loaded.algorithm == "dspark" and not loaded.dflash_layout and loaded.block_size == 7
    anchors = torch.tensor([[1, 6], [2, 3]])
    torch.testing.assert_close(loaded.teacher_forced_logits(_batch(), anchors),
                               d.teacher_forced_logits(_batch(), anchors), rtol=0, atol=0)
