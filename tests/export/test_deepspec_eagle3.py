"""The deepspec Eagle3 layout (DESIGN 8.1, 8.2): a Gemma4 Eagle3 drafter exports as the reference's
Gemma4Eagle3Model and a q/k-normed Qwen3 one (drafter.eagle3.qk_norm) as its Qwen3Eagle3Model, with the contract's
config fields, tensor names and shapes; load_drafter gives the native logits and proposals back; the Llama midlayer
stays in the eagle3 / speculators layouts and each layout refuses the other's drafters."""

import json

import pytest
import torch
from export_helpers import perturbed, random_batch
from safetensors.torch import load_file, save_file

from dspark.config import DrafterConfig, Eagle3Config
from dspark.drafters import build_drafter
from dspark.export import detect_format, export_drafter, load_drafter

pytestmark = pytest.mark.usefixtures("one_thread")
V, H = 300, 64
LAYER_IDS = [0, 1, 2]
QWEN3 = dict(model_type="qwen3", hidden_size=H, vocab_size=V, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, intermediate_size=96, num_hidden_layers=4, rms_norm_eps=1e-6,
             rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, max_position_embeddings=512,
             _name_or_path="Qwen/Qwen3-tiny")

# The text-config fields the reference's Gemma4 Eagle3 config builder requires of its target.
GEMMA4_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                      "num_global_key_value_heads", "global_head_dim", "attention_bias", "attention_dropout",
                      "attention_k_eq_v", "enable_moe_block", "head_dim", "hidden_activation",
                      "hidden_size_per_layer_input", "initializer_range", "max_position_embeddings",
                      "num_key_value_heads", "num_kv_shared_layers", "rms_norm_eps", "rope_parameters",
                      "use_double_wide_mlp", "final_logit_softcapping")


def _target(family: str):
    from dspark.targets.tiny_gemma4 import tiny_gemma4_config

    return tiny_gemma4_config(V, 4) if family == "gemma4" else QWEN3


def _drafter(family: str, qk_norm: bool | None = None):
    torch.manual_seed(0)
    qk_norm = family == "qwen3" if qk_norm is None else qk_norm
    cfg = DrafterConfig(algorithm="eagle3", block_size=5, eagle3=Eagle3Config(ttt_length=3, qk_norm=qk_norm))
    embed = torch.randn(V, H)
    return perturbed(build_drafter(cfg, _target(family), LAYER_IDS, embed, embed if family == "gemma4" else
                                   torch.randn(V, H) / 8))


def _expected_shapes(family: str) -> dict[str, tuple[int, ...]]:
    # Gemma4: global head dim 32, one global KV head shared by K and V (no v_proj); Qwen3: head dim 16, 2 KV heads.
    D, nKV, nH, inter = (32, 1, 4, 128) if family == "gemma4" else (16, 2, 4, 96)
    p = "layers.0."
    shapes = {"embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "fc.weight": (H, 3 * H), "norm.weight": (H,),
              p + "hidden_norm.weight": (H,), p + "input_layernorm.weight": (H,),
              p + "post_attention_layernorm.weight": (H,), p + "self_attn.q_proj.weight": (nH * D, 2 * H),
              p + "self_attn.k_proj.weight": (nKV * D, 2 * H), p + "self_attn.o_proj.weight": (H, nH * D),
              p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,),
              p + "mlp.gate_proj.weight": (inter, H), p + "mlp.up_proj.weight": (inter, H),
              p + "mlp.down_proj.weight": (H, inter)}
    if family == "gemma4":
        shapes.update({p + "pre_feedforward_layernorm.weight": (H,), p + "post_feedforward_layernorm.weight": (H,),
                       p + "layer_scalar": (1,)})
    else:
        shapes[p + "self_attn.v_proj.weight"] = (nKV * D, 2 * H)
    return shapes


def _same_behaviour(a, b):
    batch = random_batch(V, H, len(LAYER_IDS), tokens=16)
    with torch.no_grad():
        for ha, hb in zip(a.ttt_hidden(batch), b.ttt_hidden(batch)):
            assert torch.equal(a.draft_logits(ha), b.draft_logits(hb))
    ctx, ids = batch["features_BTLH"][0, :9], batch["input_ids_BT"][0, :9]
    for temperature in (0.0, 1.0):
        pa = a.propose(ctx, 3, temperature=temperature, context_ids_T=ids, generator=torch.Generator().manual_seed(1))
        pb = b.propose(ctx, 3, temperature=temperature, context_ids_T=ids, generator=torch.Generator().manual_seed(1))
        assert torch.equal(pa.tokens_K, pb.tokens_K)
        torch.testing.assert_close(pa.probs_KV, pb.probs_KV, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["gemma4", "qwen3"])
def test_deepspec_eagle3_export_is_the_contract_and_round_trips(family, tmp_path):
    d = _drafter(family)
    target = _target(family)
    out = export_drafter(d, tmp_path / "e3", "deepspec", target_config=target)
    config = json.loads((out / "config.json").read_text())
    tensors = load_file(str(out / "model.safetensors"))
    assert {k: tuple(t.shape) for k, t in tensors.items()} == _expected_shapes(family)  # no prefix, no v_norm
    # DESIGN 8.1: the draft fields on top of the target's config.
    assert config["architectures"] == [f"{family.capitalize()}Eagle3Model"]
    assert (config["num_hidden_layers"], config["draft_num_hidden_layers"], config["layer_types"]) == (
        1, 1, ["full_attention"])
    assert (config["num_target_layers"], config["target_layer_ids"]) == (4, LAYER_IDS)
    assert (config["ttt_length"], config["step_loss_decay"], config["tie_word_embeddings"]) == (3, 0.8, False)
    if family == "gemma4":  # DESIGN 8.2: every text-config field, global geometry on top, the reference's rope keys
        assert config["model_type"] == "gemma4_text" and config["target_model_name_or_path"] == ""
        assert (config["target_model_type"], config["target_text_model_type"]) == ("gemma4", "gemma4_text")
        for field, value in target.to_dict().items():
            if not field.startswith("_") and field not in (
                    "num_hidden_layers", "layer_types", "rope_parameters", "tie_word_embeddings", "architectures",
                    "transformers_version", "dtype", "per_layer_config"):
                assert config[field] == json.loads(json.dumps(value)), field
        assert set(config) >= set(GEMMA4_TEXT_FIELDS)
        assert (config["global_head_dim"], config["num_global_key_value_heads"]) == (32, 1)
        rope = config["rope_parameters"]
        assert {k: rope[k] for k in ("full_attention", "sliding_attention")} == target.rope_parameters
        assert (rope["rope_type"], rope["rope_theta"]) == ("default", None)
        assert torch.equal(tensors["layers.0.layer_scalar"], torch.ones(1))
    else:
        assert config["model_type"] == "qwen3" and config["target_model_name_or_path"] == "Qwen/Qwen3-tiny"
        for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                      "rope_parameters", "vocab_size", "max_position_embeddings", "intermediate_size"):
            assert config[field] == target[field], field
    assert detect_format(out) == "deepspec"
    loaded = load_drafter(out)
    _same_behaviour(d, loaded)
    assert loaded.cfg.eagle3.qk_norm is (family == "qwen3") and loaded.block_size == 5


def test_each_eagle3_layout_refuses_the_other_midlayer(tmp_path):
    with pytest.raises(ValueError, match="midlayer has Gemma4's layer, which the Llama midlayer of the eagle3 and "
                                         "speculators layouts cannot hold; export it with --format deepspec"):
        export_drafter(_drafter("gemma4"), tmp_path / "a", "eagle3")
    with pytest.raises(ValueError, match=r"midlayer has q/k norms \(drafter.eagle3.qk_norm\)"):
        export_drafter(_drafter("qwen3"), tmp_path / "b", "speculators", target_config=QWEN3)
    llama = _drafter("qwen3", qk_norm=False)
    with pytest.raises(ValueError, match="Llama midlayer .*: use --format eagle3"):
        export_drafter(llama, tmp_path / "c", "deepspec")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_loader_refuses_a_broken_deepspec_eagle3_dir(tmp_path):
    out = export_drafter(_drafter("gemma4"), tmp_path / "e3", "deepspec")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "draft_num_hidden_layers": 2, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="dspark's Eagle3 has exactly one draft layer"):
        load_drafter(out)
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(out / "model.safetensors"))
    tensors["layers.0.self_attn.v_proj.weight"] = torch.zeros(32, 2 * H)  # K = V: the reference has no v_proj
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected: \['layers.0.self_attn.v_proj.weight'\]"):
        load_drafter(out)
