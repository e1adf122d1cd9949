"""Tiny random targets of every supported family, saved as multi-shard safetensors (for parallel-backend tests).

``save_tiny(family, out_dir, max_shard_bytes)`` writes ``config.json`` + ``model-*.safetensors`` + the index,
built with a fixed seed, so two calls give the same weights. Without a ``tokenizer_dir`` the vocab is small
(256) and no tokenizer is written: enough for ``WeightIndex`` and raw model forwards; pass SmolLM2's tokenizer
directory (the ``tokenizer_dir`` fixture) to get a directory that ``load_target`` accepts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dspark.targets.weights import save_sharded, unique_state_dict

TINY_FAMILY_NAMES = ("llama", "qwen3", "deepseek_v3", "deepseek_v4")


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
