"""Eagle3 exports (SGLang/vLLM LlamaForCausalLMEagle3 and vLLM speculators): round trips give identical logits
and proposals, the files hold exactly the layout's names, and what the layout cannot express is refused."""

import json

import pytest
import torch
from export_helpers import perturbed, random_batch
from safetensors.torch import load_file, save_file

from dspark.config import DrafterConfig, DSparkConfig, Eagle3Config
from dspark.drafters import build_drafter
from dspark.drafters.eagle3 import build_draft_vocab
from dspark.export import export_drafter, load_drafter
from dspark.export.eagle3 import (
    expected_tensor_shapes,
    export_eagle3,
    export_speculators_eagle3,
    load_eagle3,
    load_speculators_eagle3,
)

V, H = 300, 64
TARGET = dict(model_type="qwen3", hidden_size=H, vocab_size=V, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, intermediate_size=96, num_hidden_layers=6, rms_norm_eps=1e-5,
              rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=2, _name_or_path="Qwen/Qwen3-tiny", architectures=["Qwen3ForCausalLM"])
LAYER_IDS = [0, 1, 3]  # SGLang/vLLM capture the inputs of layers 1, 2, 4 of 6
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:draft vocab")]


def _drafter(draft_vocab_size: int = 0):
    torch.manual_seed(0)
    cfg = DrafterConfig(algorithm="eagle3", block_size=5,
                        eagle3=Eagle3Config(ttt_length=3, draft_vocab_size=draft_vocab_size))
    d = build_drafter(cfg, TARGET, LAYER_IDS, torch.randn(V, H), torch.randn(V, H) / 8)
    if draft_vocab_size:
        d.set_draft_vocab(*build_draft_vocab((torch.arange(V) * 7919) % 101, draft_vocab_size))
    return perturbed(d)


def _batch():
    return random_batch(V, H, len(LAYER_IDS), tokens=16)


def _logits(d, batch):
    with torch.no_grad():
        return torch.stack([d.norm(h) @ d.lm_head.weight.T for h in d.ttt_hidden(batch)])


def _same_behaviour(a, b):
    batch = _batch()
    assert torch.equal(_logits(a, batch), _logits(b, batch))
    ctx, ids = batch["features_BTLH"][0, :9], batch["input_ids_BT"][0, :9]
    for temperature in (0.0, 1.0):
        pa = a.propose(ctx, 3, temperature=temperature, context_ids_T=ids, generator=torch.Generator().manual_seed(1))
        pb = b.propose(ctx, 3, temperature=temperature, context_ids_T=ids, generator=torch.Generator().manual_seed(1))
        assert torch.equal(pa.tokens_K, pb.tokens_K)
        torch.testing.assert_close(pa.probs_KV, pb.probs_KV, rtol=0, atol=1e-6)


@pytest.mark.parametrize("draft_vocab_size", [0, 64])
def test_eagle3_layout_round_trip(draft_vocab_size, tmp_path):
    d = _drafter(draft_vocab_size)
    out = export_drafter(d, tmp_path / "e3", "eagle3", target_config=TARGET)
    config = json.loads((out / "config.json").read_text())
    tensors = load_file(str(out / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_tensor_shapes(config)
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == LAYER_IDS  # SGLang: output of layer i
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 4]  # vLLM (read first): input of layer j
    assert config["draft_vocab_size"] == (draft_vocab_size or V) and config["vocab_size"] == V
    assert tensors["midlayer.self_attn.q_proj.weight"].shape == (4 * 16, 2 * H)
    assert torch.equal(tensors["embed_tokens.weight"], d.embed_tokens.weight)
    if draft_vocab_size:
        assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
        assert torch.equal(tensors["lm_head.weight"], d.target_lm_head.weight[torch.arange(64) + tensors["d2t"]])
    else:
        assert "d2t" not in tensors and torch.equal(tensors["lm_head.weight"], d.lm_head.weight)
    loaded = load_drafter(out)  # dispatches on the architecture
    assert type(loaded) is type(d) and loaded.layer_ids == LAYER_IDS and loaded.block_size == 5
    _same_behaviour(d, loaded)
    # A re-export of the loaded drafter writes the same files.
    again = export_eagle3(loaded, None, tmp_path / "again")
    assert json.loads((again / "config.json").read_text()) == config
    for k, v in load_file(str(again / "model.safetensors")).items():
        assert torch.equal(v, tensors[k]), k
    if not draft_vocab_size:  # the full LM head is the target's: the loaded drafter trains like the original
        torch.testing.assert_close(loaded.forward_loss(_batch()).numerator, d.forward_loss(_batch()).numerator)
    else:
        with pytest.raises(ValueError, match="full LM head"):
            loaded.forward_loss(_batch())


@pytest.mark.parametrize("draft_vocab_size", [0, 64])
def test_speculators_round_trip(draft_vocab_size, tmp_path):
    d = _drafter(draft_vocab_size)
    out = export_speculators_eagle3(d, TARGET, tmp_path / "spec")
    config = json.loads((out / "config.json").read_text())
    tensors = load_file(str(out / "model.safetensors"))
    assert config["speculators_model_type"] == "eagle3" and config["norm_before_residual"] is False
    assert config["speculators_config"]["verifier"] == {"name_or_path": "Qwen/Qwen3-tiny",
                                                         "architectures": ["Qwen3ForCausalLM"]}
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 5
    assert config["transformer_layer_config"]["num_hidden_layers"] == 1
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 4]  # vLLM: id j = output of layer j - 1
    assert "layers.0.hidden_norm.weight" in tensors and not any(k.startswith("midlayer.") for k in tensors)
    assert ("d2t" in tensors) == bool(draft_vocab_size)
    _same_behaviour(d, load_speculators_eagle3(out))


def test_refuses_what_the_layout_cannot_express(tmp_path):
    dspark = build_drafter(DrafterConfig(num_layers=1, dspark=DSparkConfig(markov_rank=8)), TARGET, LAYER_IDS,
                           torch.randn(V, H), torch.randn(V, H))
    with pytest.raises(ValueError, match="only Eagle3 drafters"):
        export_drafter(dspark, tmp_path / "x", "eagle3")
    with pytest.raises(ValueError, match="only Eagle3 drafters"):
        export_speculators_eagle3(dspark, TARGET, tmp_path / "y")
    with pytest.raises(ValueError, match="vocab_size"):
        export_eagle3(_drafter(), dict(TARGET, vocab_size=V + 1), tmp_path / "z")

    out = export_eagle3(_drafter(64), TARGET, tmp_path / "ok")
    tensors = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "t2d"}, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="missing: \\['t2d'\\]"):
        load_eagle3(out)
    tensors["d2t"] = tensors["d2t"].int()
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="int64"):
        load_eagle3(out)
    tensors["d2t"] = tensors["d2t"].long()
    tensors["embed_tokens.weight"] = torch.zeros(V, H)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="embed_tokens.weight is all zero"):
        load_eagle3(out)
    config = json.loads((out / "config.json").read_text())
    config["dspark"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version 99"):
        load_eagle3(out)
    with pytest.raises(ValueError, match="config.json is missing"):
        load_eagle3(tmp_path / "nowhere")
