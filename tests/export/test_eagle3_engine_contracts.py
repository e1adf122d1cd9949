"""Every ``--format eagle3`` export is checked against the loader contracts of SGLang and vLLM, written down below
as a table (neither engine installs on a CPU machine). Read from the engines' sources:

SGLang (sgl-project/sglang):
- ``python/sglang/srt/models/llama_eagle3.py``: ``LlamaModel.__init__`` builds ``fc`` as ``Linear(3 *
  target_hidden_size, hidden_size)`` (``hidden_size`` when no ``target_hidden_size``) and one ``midlayer``
  (a Llama decoder layer whose ``qkv_proj`` reads ``2 * hidden_size``, plus ``hidden_norm``);
  ``LlamaForCausalLMEagle3.__init__`` sizes ``lm_head`` ``[draft_vocab_size, hidden_size]`` (untied);
  ``load_weights`` fuses ``q/k/v_proj`` and ``gate/up_proj``, looks each name up as is or under ``model.``, turns
  ``d2t`` into hot token ids (``d2t + arange``) and skips ``t2d``.
- ``python/sglang/srt/model_executor/model_runner.py``: ``ModelRunner.__init__`` reads
  ``eagle_config["eagle_aux_hidden_state_layer_ids"]`` from the draft config;
  ``python/sglang/srt/models/llama.py``: ``LlamaForCausalLM.set_eagle3_layers_to_capture`` adds 1 to each id and
  ``LlamaModel.forward`` captures the residual stream entering those layers: SGLang id i = output of layer i.
vLLM (vllm-project/vllm):
- ``vllm/model_executor/models/llama_eagle3.py``: ``LlamaModel.__init__`` builds ``fc`` as ``3 *
  target_hidden_size -> hidden_size``, ``layers.0`` with ``qkv_proj`` of input ``2 * hidden_size`` and
  ``hidden_norm``; ``LlamaModel.load_weights`` renames ``midlayer.`` to ``layers.0.``;
  ``Eagle3LlamaForCausalLM.__init__`` sizes ``lm_head`` ``[draft_vocab_size, hidden_size]`` and
  ``draft_id_to_target_id`` int64 ``[draft_vocab_size]``; ``load_weights`` maps ``d2t`` onto it, skips ``t2d``,
  prefixes ``model.`` to every name but ``lm_head`` and loads with ``AutoWeightsLoader`` (an unknown name fails).
- ``vllm/v1/worker/gpu_model_runner.py``: ``_get_eagle3_aux_layers_from_config`` takes the draft config's
  top-level ``eagle_aux_hidden_state_layer_ids`` first (then ``eagle_config``'s), as is;
  ``vllm/model_executor/models/llama.py``: ``LlamaModel.forward`` appends ``hidden_states + residual`` before
  running layer j when j is in that list: vLLM id j = the input of layer j (there is no residual before layer 0).
"""

import json

import pytest
import torch
from export_helpers import perturbed
from safetensors.torch import load_file

from dspark.config import DrafterConfig, Eagle3Config, TargetConfig
from dspark.drafters import build_drafter
from dspark.drafters.eagle3 import build_draft_vocab
from dspark.export import export_drafter

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:draft vocab")]

# The loader contract of each engine. "ids": where the feature layer ids are read from; "captures": the decoder
# layer whose input the engine captures for id j; "names": how a checkpoint tensor name becomes the engine's
# parameter (None: skipped by the loader); "params": the engine's parameter shapes from the draft config.
CONTRACTS = {
    "sglang": {
        "ids": lambda cfg: cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"],
        "captures": lambda j: j + 1,
        "fc_in": lambda cfg: 3 * cfg.get("target_hidden_size", cfg["hidden_size"]),
        "names": lambda n: None if n == "t2d" else ("hot_token_id" if n == "d2t" else n),
    },
    "vllm": {
        "ids": lambda cfg: cfg.get("eagle_aux_hidden_state_layer_ids")
        or cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"],
        "captures": lambda j: j,
        "fc_in": lambda cfg: 3 * cfg.get("target_hidden_size", cfg["hidden_size"]),
        "names": lambda n: None if n == "t2d" else ("draft_id_to_target_id" if n == "d2t"
                                                    else n.replace("midlayer.", "layers.0.")),
    },
}


def engine_params(cfg: dict, engine: str) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Every parameter the engine's Eagle3 Llama draft model declares for ``cfg``, by checkpoint-side name (after
    the engine's own renames), with its shape and (where the engine fixes it) dtype."""
    H, V, W = cfg["hidden_size"], cfg["vocab_size"], cfg.get("draft_vocab_size") or cfg["vocab_size"]
    heads, kv, D, inter = (cfg["num_attention_heads"], cfg["num_key_value_heads"],
                           cfg.get("head_dim", H // cfg["num_attention_heads"]), cfg["intermediate_size"])
    layer = "midlayer." if engine == "sglang" else "layers.0."
    params = {"embed_tokens.weight": ((V, H), None), "fc.weight": ((H, CONTRACTS[engine]["fc_in"](cfg)), None),
              "norm.weight": ((H,), None), "lm_head.weight": ((W, H), None),
              layer + "input_layernorm.weight": ((H,), None), layer + "hidden_norm.weight": ((H,), None),
              layer + "post_attention_layernorm.weight": ((H,), None),
              layer + "self_attn.q_proj.weight": ((heads * D, 2 * H), None),
              layer + "self_attn.k_proj.weight": ((kv * D, 2 * H), None),
              layer + "self_attn.v_proj.weight": ((kv * D, 2 * H), None),
              layer + "self_attn.o_proj.weight": ((H, heads * D), None),
              layer + "mlp.gate_proj.weight": ((inter, H), None), layer + "mlp.up_proj.weight": ((inter, H), None),
              layer + "mlp.down_proj.weight": ((H, inter), None)}
    if W < V:
        params["hot_token_id" if engine == "sglang" else "draft_id_to_target_id"] = ((W,), torch.int64)
    return params


def check_contract(export_dir, engine: str) -> list[int]:
    """Assert the export loads under ``engine``'s contract; returns the decoder layers whose inputs it captures."""
    cfg = json.loads((export_dir / "config.json").read_text())
    tensors = load_file(str(export_dir / "model.safetensors"))
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["num_hidden_layers"] == 1 and cfg["tie_word_embeddings"] is False
    params = engine_params(cfg, engine)
    loaded = {}
    for name, t in tensors.items():
        mapped = CONTRACTS[engine]["names"](name)
        if mapped is None:
            continue
        assert mapped in params, f"{engine} has no parameter for {name}"
        loaded[mapped] = t
    missing = sorted(set(params) - set(loaded) - {"embed_tokens.weight"})  # both take embed_tokens from the target
    assert not missing, f"{engine} parameters not in the export: {missing}"
    for name, (shape, dtype) in params.items():
        if name in loaded:
            assert tuple(loaded[name].shape) == shape, (engine, name, tuple(loaded[name].shape), shape)
            assert dtype is None or loaded[name].dtype == dtype, (engine, name, loaded[name].dtype)
    if "t2d" in tensors:
        assert tensors["t2d"].dtype == torch.bool and tuple(tensors["t2d"].shape) == (cfg["vocab_size"],)
        d2t = tensors["d2t"]
        # Both engines read target id = draft id + d2t; t2d marks exactly those targets.
        targets = torch.arange(d2t.numel()) + d2t
        assert torch.equal(torch.nonzero(tensors["t2d"]).flatten(), targets.sort().values)
    ids = CONTRACTS[engine]["ids"](cfg)
    assert len(ids) == 3, f"{engine} builds fc for 3 feature layers, the export names {ids}"
    return [CONTRACTS[engine]["captures"](j) for j in ids]


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    from dspark.targets import load_target

    return load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[0, 1, 2]))


def _drafter(target, layer_ids, draft_vocab_size=0):
    torch.manual_seed(0)
    cfg = DrafterConfig(algorithm="eagle3", eagle3=Eagle3Config(ttt_length=2, draft_vocab_size=draft_vocab_size))
    d = build_drafter(cfg, target.config, layer_ids, target.embed_weight.detach().clone(),
                      target.lm_head_weight.detach().clone())
    if draft_vocab_size:
        d.set_draft_vocab(*build_draft_vocab((torch.arange(d.vocab_size) * 7919) % 1009, draft_vocab_size))
    return perturbed(d)


@pytest.mark.parametrize("draft_vocab_size", [0, 3000])
@pytest.mark.parametrize("engine", sorted(CONTRACTS))
def test_export_meets_the_engine_contract_and_captures_our_features(engine, draft_vocab_size, target, tmp_path):
    """The layers each engine captures, read from the export as the engine reads them, hold exactly the features
    the drafter was trained on (our ``features()``; captured here with a forward pre-hook on those layers)."""
    layer_ids = [0, 1, 2]
    out = export_drafter(_drafter(target, layer_ids, draft_vocab_size), tmp_path / "e3", "eagle3",
                         target_config=target.config)
    captured_layers = check_contract(out, engine)
    model, captured = target.model, {}
    hooks = [model.model.layers[j].register_forward_pre_hook(
        lambda mod, args, kwargs, j=j: captured.__setitem__(j, (args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True) for j in captured_layers]
    ids_BT = torch.randint(0, target.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    try:
        ours_BTLH = target.features(ids_BT).layers_BTLH
    finally:
        for h in hooks:
            h.remove()
    engine_BTLH = torch.stack([captured[j] for j in captured_layers], dim=2)
    torch.testing.assert_close(engine_BTLH, ours_BTLH, rtol=0, atol=0)


@pytest.mark.parametrize("layer_ids,expected", [
    ([-1, 1, 2], "takes feature layer ids >= 0"),  # vLLM has no residual stream to capture before layer 0
    ([0, 1], "takes exactly 3 feature layers, this drafter has 2"),
    ([-1, 0, 1, 2], "takes exactly 3 feature layers, this drafter has 4"),
])
def test_eagle3_format_refuses_what_the_engines_cannot_load(layer_ids, expected, target, tmp_path):
    with pytest.raises(ValueError, match="--format eagle3") as err:
        export_drafter(_drafter(target, layer_ids), tmp_path / "e3", "eagle3", target_config=target.config)
    assert expected in str(err.value) and "speculators" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "e3").exists()


def test_serve_recipes_take_three_layers_and_reference_recipes_keep_five():
    """Each `*_eagle3_serve` recipe feeds the engines 3 layers (low, middle, high = their default capture), while
    the reference Eagle3 recipe it derives from keeps its 5."""
    import runpy

    from dspark.config import RECIPES_DIR, list_recipes, load_config

    serve = [name for name in list_recipes() if name.endswith("_eagle3_serve")]
    assert len(serve) == 4
    for name in serve:
        cfg, layers = load_config(name), runpy.run_path(str(RECIPES_DIR / f"{name}.py"))["NUM_TARGET_LAYERS"]
        assert cfg.drafter.algorithm == "eagle3" and cfg.target.layer_ids == [1, layers // 2 - 1, layers - 4]
        assert len(load_config(name.removesuffix("_serve")).target.layer_ids) == 5
