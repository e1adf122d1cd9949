"""Shared fixtures: tiny random targets built from real HF configs, with SmolLM2's real tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dspark.targets.tiny import make_tiny_target, smollm2_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
EVAL_DATASETS = SHARED / "eval_datasets"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return smollm2_tokenizer(tmp_path_factory.mktemp("tok") / "smollm2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("tiny") / "llama", "llama", tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3", tokenizer_dir)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: OpenMP start-up dominates, and on a loaded 2-core machine two threads run ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
