"""vLLM speculators' layout: round trips with the verifier's embedding/LM head, required keys, refusals."""

import dataclasses
import json

import pytest
import torch
from export_helpers import perturbed, random_batch
from safetensors.torch import load_file, save_file

from dspark.config import DrafterConfig, DSparkConfig, Eagle3Config, drafter_config
from dspark.drafters import build_drafter
from dspark.export.speculators import export_speculators, load_speculators

V, H = 300, 64
TARGET = {"model_type": "llama", "hidden_size": H, "vocab_size": V, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "num_hidden_layers": 6,
          "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
          "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
          "initializer_range": 0.02, "_name_or_path": "/models/tiny-verifier", "architectures": ["LlamaForCausalLM"]}
LAYER_IDS = [-1, 1, 3]
pytestmark = pytest.mark.usefixtures("one_thread")


def _frozen():
    g = torch.Generator().manual_seed(7)
    return torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)


def _drafter(**overrides):
    torch.manual_seed(0)
    data = {"num_layers": 2, "num_anchors": 5, **overrides}  # drafter fields as a recipe writes them
    if data.get("algorithm", "dspark") == "dspark":
        data["dspark"] = {"markov_rank": 8, **overrides.get("dspark", {})}
    cfg = drafter_config(data)
    d = build_drafter(cfg, TARGET, LAYER_IDS, *_frozen())
    return perturbed(d)


def _batch():
    return random_batch(V, H, len(LAYER_IDS), tokens=20)


def _verifier():
    return (TARGET, *_frozen())


def _same_logits(a, b):
    anchors = torch.tensor([[3, 9], [0, 14]])
    torch.testing.assert_close(b.teacher_forced_logits(_batch(), anchors), a.teacher_forced_logits(_batch(), anchors),
                               rtol=0, atol=0)
    feats = _batch()["features_BTLH"][0, :7]
    pa, pb = a.propose(feats, 11, temperature=0.0), b.propose(feats, 11, temperature=0.0)
    assert torch.equal(pa.tokens_K, pb.tokens_K) and torch.equal(pa.probs_KV, pb.probs_KV)


CASES = {
    "vanilla": {},
    "gated": {"dspark": {"markov_head_type": "gated"}},
    "rnn": {"dspark": {"markov_head_type": "rnn", "ce_weight": 0.3}, "loss_decay": 7.0},
    "confidence_without_markov": {"dspark": {"markov_rank": 0}},
    "dflash_layout": {"dflash_layout": True, "block_size": 5, "dspark": {"enable_confidence_head": False}},
    "dflash": {"algorithm": "dflash", "intermediate_size": 48},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_takes_frozen_weights_from_the_verifier(case, tmp_path):
    d = _drafter(**CASES[case])
    out = export_speculators(d, TARGET, tmp_path / "spec")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    tensors = load_file(str(out / "model.safetensors"))
    # Never the embedding; the LM head only for a pruned draft vocabulary (never for these drafters).
    assert "embed_tokens.weight" not in tensors and "lm_head.weight" not in tensors
    assert "fc.weight" in tensors and "layers.1.self_attn.q_proj.weight" in tensors
    algorithm = d.algorithm
    assert config["speculators_model_type"] == algorithm
    assert config["architectures"] == [{"dspark": "DSparkSpeculator", "dflash": "DFlashSpeculator"}[algorithm]]
    assert config["speculators_version"] == "0.9.0" and config["tie_word_embeddings"] is False
    spec = config["speculators_config"]
    assert spec["algorithm"] == algorithm and spec["default_proposal_method"] == "greedy"
    assert spec["verifier"] == {"name_or_path": "/models/tiny-verifier", "architectures": ["LlamaForCausalLM"]}
    (method,) = spec["proposal_methods"]
    assert method["proposal_type"] == "greedy" and method["speculative_tokens"] == d.block_size
    layer = config["transformer_layer_config"]
    assert layer["num_hidden_layers"] == 2 and layer["model_type"] == "qwen3" and layer["hidden_size"] == H
    assert "target_layer_ids" not in config and "target_layer_ids" not in layer and "block_size" not in layer
    # vLLM's aux ids count the hidden state entering layer j (0 = embeddings): ours + 1.
    assert config["aux_hidden_state_layer_ids"] == [0, 2, 4] and config["draft_vocab_size"] == V
    assert config["mask_token_id"] == V - 1
    # DSpark layout: the anchor slot predicts (speculative tokens = block_size); DFlash layout: K + 1 slots.
    assert config["sample_from_anchor"] is (not d.dflash_layout)
    assert config["block_size"] == d.block_size + int(d.dflash_layout)
    if algorithm == "dspark":
        assert config["markov_rank"] == d.markov_rank
        assert ("markov_head_type" in config) == (d.markov_rank > 0)
        assert config["enable_confidence_head"] == (d.confidence_head is not None)
    else:
        assert not {"markov_rank", "enable_confidence_head"} & set(config)

    loaded = load_speculators(out, verifier=_verifier())
    assert loaded.cfg == dataclasses.replace(d.cfg, mask_token_id=V - 1, intermediate_size=d.intermediate_size)
    assert torch.equal(loaded.embed_tokens.weight, d.embed_tokens.weight)
    _same_logits(d, loaded)
    a = d.forward_loss(_batch(), torch.Generator().manual_seed(1))
    b = loaded.forward_loss(_batch(), torch.Generator().manual_seed(1))
    assert a.numerator.item() == b.numerator.item()


def test_verifier_weights_overwrite_frozen_tensors_in_the_file(tmp_path):
    d = _drafter()
    out = export_speculators(d, TARGET, tmp_path / "spec")
    tensors = load_file(str(out / "model.safetensors"))
    tensors["embed_tokens.weight"] = torch.zeros(V, H)  # a stale copy: the verifier's must win
    save_file(tensors, str(out / "model.safetensors"))
    _same_logits(d, load_speculators(out, verifier=_verifier()))
    embed, lm_head = _frozen()
    other = load_speculators(out, verifier=(TARGET, embed, lm_head * 2))
    assert torch.equal(other.lm_head.weight, lm_head * 2)
    anchors = torch.tensor([[3, 9], [0, 14]])
    logits = other.teacher_forced_logits(_batch(), anchors)
    assert not torch.allclose(logits, d.teacher_forced_logits(_batch(), anchors))


def test_loads_the_verifier_named_in_the_config(tmp_path, tiny_llama_dir):
    from dspark.config import TargetConfig
    from dspark.targets import load_target

    target = load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[0, 1]))
    torch.manual_seed(0)
    d = build_drafter(DrafterConfig(num_layers=1, block_size=3, dspark=DSparkConfig(markov_rank=4)), target.config,
                      [0, 1],
                      target.embed_weight.detach().clone(), target.lm_head_weight.detach().clone())
    out = export_speculators(d, target.config, tmp_path / "spec")
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == str(tiny_llama_dir)
    assert config["speculators_config"]["verifier"]["architectures"] == ["LlamaForCausalLM"]
    loaded = load_speculators(out)  # verifier=None: loads the target at verifier.name_or_path
    feats = torch.randn(6, 2, target.config.hidden_size, generator=torch.Generator().manual_seed(3))
    pa, pb = d.propose(feats, 5, temperature=0.0), loaded.propose(feats, 5, temperature=0.0)
    assert torch.equal(pa.tokens_K, pb.tokens_K) and torch.equal(pa.probs_KV, pb.probs_KV)


def test_required_keys_and_versions_are_checked(tmp_path):
    out = export_speculators(_drafter(dspark={"markov_head_type": "rnn"}), TARGET, tmp_path / "spec")
    config = json.loads((out / "config.json").read_text())

    def rewrite(data):
        (out / "config.json").write_text(json.dumps(data))

    for key, shown in [("aux_hidden_state_layer_ids", "aux_hidden_state_layer_ids"),
                       ("sample_from_anchor", "sample_from_anchor"), ("markov_head_type", "markov_head_type")]:
        rewrite({k: v for k, v in config.items() if k != key})
        with pytest.raises(ValueError, match=f"speculators config lacks required key\\(s\\) {shown}"):
            load_speculators(out, verifier=_verifier())
    rewrite({**config, "speculators_config": {k: v for k, v in config["speculators_config"].items()
                                              if k != "verifier"}})
    with pytest.raises(ValueError, match="lacks required key\\(s\\) speculators_config.verifier"):
        load_speculators(out, verifier=_verifier())
    rewrite({**config, "transformer_layer_config": {k: v for k, v in config["transformer_layer_config"].items()
                                                    if k != "head_dim"}})
    with pytest.raises(ValueError, match="transformer_layer_config.head_dim"):
        load_speculators(out, verifier=_verifier())
    rewrite({**config, "dspark": {**config["dspark"], "format_version": 99}})
    with pytest.raises(ValueError, match="format_version 99; this dspark reads versions up to 1"):
        load_speculators(out, verifier=_verifier())
    rewrite({**config, "speculators_config": {**config["speculators_config"],
                                              "verifier": {"name_or_path": None, "architectures": None}}})
    with pytest.raises(ValueError, match="verifier.name_or_path is null: pass the verifier"):
        load_speculators(out)
    rewrite(config)
    with pytest.raises(ValueError, match="transformer_layer_config.vocab_size 300 does not match the verifier's 301"):
        load_speculators(out, verifier=(dict(TARGET, vocab_size=V + 1), *_frozen()))
    tensors = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "norm.weight"}, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing: \['norm.weight'\]; unexpected: none"):
        load_speculators(out, verifier=_verifier())
    with pytest.raises(ValueError, match="is not a speculators export: config.json is missing"):
        load_speculators(tmp_path / "nowhere", verifier=_verifier())


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="holds dspark, dflash and eagle3 drafters, got 'Linear'"):
        export_speculators(torch.nn.Linear(2, 2), TARGET, tmp_path / "x")
    # The loader takes embed_tokens/lm_head from the verifier: a drafter for another vocabulary cannot be written.
    with pytest.raises(ValueError, match="drafter vocab_size 300 does not match the verifier's 512"):
        export_speculators(_drafter(), dict(TARGET, vocab_size=512), tmp_path / "x")
    with pytest.raises(ValueError, match="built for a 6-layer target, the verifier has 8"):
        export_speculators(_drafter(), dict(TARGET, num_hidden_layers=8), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # Never a null verifier (speculators 0.9 refuses `architectures: None` at config validation) nor a builtin: one.
    with pytest.raises(ValueError, match="names its verifier; pass the target"):
        export_speculators(_drafter(), None, tmp_path / "no_verifier")
    with pytest.raises(ValueError, match="has no architectures list"):
        export_speculators(_drafter(), dict(TARGET, architectures=None), tmp_path / "no_verifier")
    with pytest.raises(ValueError, match="'builtin:smollm2' is not loadable by an engine"):
        export_speculators(_drafter(), dict(TARGET, _name_or_path="builtin:smollm2"), tmp_path / "no_verifier")
    assert not (tmp_path / "no_verifier").exists()


def test_eagle3_goes_to_the_eagle3_writer(tmp_path):
    from dspark.export import export_drafter

    eagle3 = pytest.importorskip("dspark.export.eagle3", reason="the eagle3 exporter is another helper's module")
    torch.manual_seed(0)
    cfg = DrafterConfig(algorithm="eagle3", num_layers=1, block_size=3, eagle3=Eagle3Config(ttt_length=2))
    d = build_drafter(cfg, TARGET, LAYER_IDS, *_frozen())
    out = export_drafter(d, tmp_path / "e3", "speculators", target_config=TARGET)
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3"
    assert config["eagle_aux_hidden_state_layer_ids"] == [0, 2, 4]
    loaded = load_speculators(out)  # dispatches to the eagle3 loader (eagle3 stores its own embedding)
    reference = eagle3.load_speculators_eagle3(out)
    assert loaded.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), d.state_dict().values()))


def test_cli_export_format_choices_come_from_formats(tmp_path):
    from click.testing import CliRunner

    from dspark.cli import main
    from dspark.export import FORMATS
    from dspark.export.deepspec import export_deepspec

    assert {"deepspec", "speculators", "eagle3"} <= set(FORMATS)
    drafter_dir = export_deepspec(_drafter(), TARGET, tmp_path / "drafter")
    # A drafter outside a run directory does not name its target: the speculators format needs --verifier.
    result = CliRunner().invoke(main, ["export", str(drafter_dir), str(tmp_path / "out"), "--format",
                                       "speculators"])
    assert result.exit_code != 0 and "pass the target (--verifier NAME_OR_PATH)" in result.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["export", str(drafter_dir), str(tmp_path / "x"), "--format", "onnx"])
    assert result.exit_code != 0 and "'onnx' is not one of" in result.output
