"""Tiny random targets of every supported family, saved as multi-shard safetensors (for parallel-backend tests).

``save_tiny(family, out_dir, max_shard_bytes)`` writes ``config.json`` + ``model-*.safetensors`` + the index,
built with a fixed seed, so two calls give the same weights. Without a ``tokenizer_dir`` the vocab is small
(256) and no tokenizer is written: enough for ``WeightIndex`` and raw model forwards; pass SmolLM2's tokenizer
directory (the ``tokenizer_dir`` fixture) to get a directory that ``load_target`` accepts.

``split_experts`` / ``fuse_experts`` / ``add_mtp_layers`` / ``write_checkpoint`` turn such a model into DeepSeek's
hub layout (one tensor per routed expert, multi-token-prediction layers) and back; ``deepseek_v4_hub_name`` gives a
DeepSeek-V4 tensor's name in DeepSeek's own checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dspark.targets.weights import save_sharded, unique_state_dict

TINY_FAMILY_NAMES = ("llama", "qwen3", "deepseek_v3", "deepseek_v4", "qwen3_moe", "glm4_moe")


def tiny_config(family: str, vocab_size: int, num_layers: int | None = None, **special_ids):
    """A few-hundred-kB HF config of ``family`` (hidden 64); MoE families keep a dense first layer."""
    from transformers import AutoConfig

    dense = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 vocab_size=vocab_size, max_position_embeddings=512, **special_ids)
    if family == "llama":
        return AutoConfig.for_model("llama", num_hidden_layers=num_layers or 3, rms_norm_eps=1e-5,
                                    tie_word_embeddings=True, **dense)
    if family == "qwen3":
        return AutoConfig.for_model("qwen3", num_hidden_layers=num_layers or 3, rms_norm_eps=1e-6,
                                    tie_word_embeddings=False, **dense)
    if family == "qwen3_moe":
        # Every layer MoE (4 experts, top-2, normalised top-k weights as Qwen3-30B-A3B / 235B-A22B).
        return AutoConfig.for_model("qwen3_moe", num_hidden_layers=num_layers or 3, rms_norm_eps=1e-6,
                                    moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                    norm_topk_prob=True, tie_word_embeddings=False, **dense)
    if family == "glm4_moe":
        # GLM-4.5's layer: half-rotary heads, q/k/v biases, q/k norms, layer 0 dense, then 4 sigmoid-routed experts
        # (top-2 of 2 groups) plus a shared expert.
        return AutoConfig.for_model("glm4_moe", num_hidden_layers=num_layers or 3, rms_norm_eps=1e-5,
                                    partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True,
                                    moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                                    n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
                                    norm_topk_prob=True, tie_word_embeddings=False, **dense)
    if family == "deepseek_v3":
        # MLA (q/kv low-rank, decoupled RoPE) + MoE with grouped top-k routing; layer 0 dense.
        return AutoConfig.for_model(
            "deepseek_v3", vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=num_layers or 3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
            n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
            kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
            max_position_embeddings=512, tie_word_embeddings=False, **special_ids,
        )
    if family == "deepseek_v4":
        # Sliding / compressed-sparse / heavily-compressed attention, mHC (2 streams), hash-MoE then top-k MoE.
        n = num_layers or 4
        kinds = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
        return AutoConfig.for_model(
            "deepseek_v4", vocab_size=vocab_size, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=n,
            num_attention_heads=4, num_key_value_heads=1, head_dim=32, q_lora_rank=32, partial_rotary_factor=0.25,
            n_routed_experts=4, num_experts_per_tok=2, hc_mult=2, hc_sinkhorn_iters=3, sliding_window=8,
            o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16, index_topk=4,
            compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
            layer_types=[kinds[i % 3] for i in range(n)], mlp_layer_types=["hash_moe"] + ["moe"] * (n - 1),
            max_position_embeddings=512, **special_ids,
        )
    raise ValueError(f"unknown tiny family {family!r}; expected one of {', '.join(TINY_FAMILY_NAMES)}")


def save_tiny(family: str, out_dir: str | Path, max_shard_bytes: int, *, tokenizer_dir: str | Path | None = None,
              vocab_size: int | None = None, num_layers: int | None = None, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny random ``family`` model as multi-shard safetensors; returns ``out_dir``."""
    return save_tiny_with(family, out_dir, max_shard_bytes, tokenizer_dir=tokenizer_dir, vocab_size=vocab_size,
                          num_layers=num_layers, seed=seed, dtype=dtype)


def save_tiny_with(family: str, out_dir: str | Path, max_shard_bytes: int, *, tokenizer_dir: str | Path | None = None,
                   vocab_size: int | None = None, num_layers: int | None = None, seed: int = 0,
                   dtype: torch.dtype = torch.float32, **config_updates) -> Path:
    """``save_tiny`` with ``config_updates`` set on the tiny config before the model is built (e.g. DeepSeek-V4's
    ``mlp_layer_types``, to put a hash-routed layer on a later pipeline stage)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    special = {}
    tok = None
    if tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                   "pad_token_id": tok.pad_token_id}
        vocab_size = vocab_size or len(tok)
    cfg = tiny_config(family, vocab_size or 256, num_layers, **special)
    for key, value in config_updates.items():
        if not hasattr(cfg, key):
            raise ValueError(f"config_updates: {family} config has no field {key!r}")
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    if family == "deepseek_v4":
        # from_config leaves the hash-MoE routing table at zeros (every token -> expert 0); real checkpoints
        # ship a table, so write a seeded one to exercise the routing.
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):
                g = torch.Generator().manual_seed(seed)
                buf.copy_(torch.randint(0, cfg.n_routed_experts, buf.shape, generator=g))
    out.mkdir(parents=True, exist_ok=True)
    cfg.dtype = str(dtype).removeprefix("torch.")
    cfg.save_pretrained(out)
    save_sharded(unique_state_dict(model), out, max_shard_bytes)
    if tok is not None:
        tok.save_pretrained(out)
    return out


def split_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with fused routed experts (transformers' ``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj
    [E, H, I]``) stored one tensor per expert, as DeepSeek's hub checkpoints do (``experts.{e}.gate_proj.weight``
    ``[I, H]``, ``up_proj``, ``down_proj [H, I]``). Order is kept otherwise."""
    out = {}
    for name, tensor in state.items():
        prefix, _, leaf = name.rpartition(".")
        if not prefix.endswith(".experts") or leaf not in ("gate_up_proj", "down_proj"):
            out[name] = tensor
            continue
        for e, expert in enumerate(tensor):
            halves = zip(("gate_proj", "up_proj"), expert.chunk(2)) if leaf == "gate_up_proj" else [(leaf, expert)]
            out.update({f"{prefix}.{e}.{proj}.weight": half.contiguous() for proj, half in halves})
    return out


def fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``split_experts``: per-expert tensors stacked into transformers' fused layout."""
    import re

    pieces: dict[tuple[str, str], dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for name, tensor in state.items():
        match = re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", name)
        if match is None:
            out[name] = tensor
            continue
        prefix, e, proj = match.group(1), int(match.group(2)), match.group(3)
        leaf = "down_proj" if proj == "down_proj" else "gate_up_proj"
        if (prefix, leaf) not in pieces:
            pieces[prefix, leaf] = {}
            out[f"{prefix}.{leaf}"] = None  # placeholder: keeps the fused tensor where its first piece was
        pieces[prefix, leaf].setdefault(e, {})[proj] = tensor
    for (prefix, leaf), experts in pieces.items():
        projs = ("down_proj",) if leaf == "down_proj" else ("gate_proj", "up_proj")
        out[f"{prefix}.{leaf}"] = torch.stack([torch.cat([experts[e][p] for p in projs]) for e in sorted(experts)])
    return out


def add_mtp_layers(state: dict[str, torch.Tensor], config, seed: int = 0) -> dict[str, torch.Tensor]:
    """``state`` plus DeepSeek-V3's multi-token-prediction layer(s) as its hub checkpoints carry them:
    ``model.layers.{num_hidden_layers + i}.*`` = a decoder layer like the last one (random values) plus
    ``enorm``, ``hnorm``, ``eh_proj [H, 2H]``, ``embed_tokens``, ``shared_head.norm`` and ``shared_head.head``."""
    g = torch.Generator().manual_seed(seed)
    last = f"model.layers.{config.num_hidden_layers - 1}."
    hidden, vocab = config.hidden_size, config.vocab_size
    out = dict(state)
    for i in range(config.num_nextn_predict_layers):
        prefix = f"model.layers.{config.num_hidden_layers + i}."
        extra = {"enorm.weight": (hidden,), "hnorm.weight": (hidden,), "eh_proj.weight": (hidden, 2 * hidden),
                 "embed_tokens.weight": (vocab, hidden), "shared_head.norm.weight": (hidden,),
                 "shared_head.head.weight": (vocab, hidden)}
        shapes = {n.removeprefix(last): tuple(t.shape) for n, t in state.items() if n.startswith(last)} | extra
        out.update({prefix + n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()})
    return out


def write_checkpoint(state: dict[str, torch.Tensor], like_dir: str | Path, out_dir: str | Path, max_shard_bytes: int,
                     **config_updates) -> Path:
    """``state`` as multi-shard safetensors in ``out_dir``, beside ``like_dir``'s config (with ``config_updates``
    applied) and tokenizer files."""
    import json
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True)
    for f in Path(like_dir).iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, out / f.name)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **config_updates}, indent=2))
    save_sharded(state, out, max_shard_bytes)
    return out


# transformers' DeepseekV4ForCausalLM names -> DeepSeek's own (its inference code's module names), applied in order
# to a name without the ``model.`` prefix. Written from DeepSeek-V4's checkpoints, not derived from transformers'
# conversion mapping, so that reading them back through that mapping is a real check.
_V4_HUB_RENAMES = [
    (r"^embed_tokens\.weight$", "embed.weight"), (r"^lm_head\.weight$", "head.weight"),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"), (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.input_layernorm\.", ".attn_norm."), (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.self_attn\.sinks$", ".attn.attn_sink"),
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."), (r"\.compressor\.position_bias$", ".compressor.ape"),
    (r"\.q_a_proj\.", ".wq_a."), (r"\.q_b_proj\.", ".wq_b."), (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."), (r"\.q_a_norm\.", ".q_norm."),
    (r"\.(attn|compressor)\.kv_proj\.", r".\1.wkv."), (r"\.compressor\.gate_proj\.", ".compressor.wgate."),
    (r"\.mlp\.gate\.e_score_correction_bias$", ".ffn.gate.bias"), (r"\.mlp\.", ".ffn."),
    (r"\.(shared_experts|experts\.\d+)\.gate_proj\.", r".\1.w1."),
    (r"\.(shared_experts|experts\.\d+)\.down_proj\.", r".\1.w2."),
    (r"\.(shared_experts|experts\.\d+)\.up_proj\.", r".\1.w3."),
]


def deepseek_v4_hub_name(name: str) -> str:
    """A ``DeepseekV4ForCausalLM`` tensor name (experts per expert, as ``split_experts`` gives them) as DeepSeek's
    own V4 checkpoints spell it: ``model.layers.0.self_attn.q_a_proj.weight`` -> ``layers.0.attn.wq_a.weight``,
    ``...mlp.experts.3.gate_proj.weight`` -> ``...ffn.experts.3.w1.weight``."""
    import re

    out = name.removeprefix("model.")
    for pattern, replacement in _V4_HUB_RENAMES:
        out = re.sub(pattern, replacement, out)
    return out
