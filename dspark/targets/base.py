"""The interface every target backend implements.

Legend: B batch, T tokens, L feature layers, H hidden size, V vocab, N new tokens in a decode step.
Layer id i = output of decoder layer i before the final norm, for i in -1..num_layers - 1 (-1 = the embedding
output; HF's ``hidden_states[i + 1]`` except for the last layer, see ``dspark.targets.common``). A target with
several residual streams per token (DeepSeek-V4's mHC) gives their mean for each layer.
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import asdict, dataclass

import torch


@dataclass
class TargetFeatures:
    layers_BTLH: torch.Tensor  # raw decoder-layer outputs (pre final norm) at the requested layer ids
    final_BTH: torch.Tensor  # final hidden state: post-norm, pre-LM-head


@dataclass
class TargetIdentity:
    """What a cache or a drafter must agree on with the target it was built for."""

    name: str
    config_hash: str
    layer_ids: list[int]
    hidden_size: int
    vocab_size: int
    num_layers: int
    tokenizer_hash: str
    chat_template: str | None
    layer_semantics: str = "id i = output of decoder layer i (HF hidden_states[i+1]); -1 = embeddings"

    def to_dict(self) -> dict:
        return asdict(self)

    def mismatches(self, other: "TargetIdentity | dict") -> list[str]:
        """Fields that differ, each as 'field: ours vs theirs' (chat template and name are informative)."""
        theirs = other if isinstance(other, dict) else other.to_dict()
        out = []
        for key in ("config_hash", "layer_ids", "hidden_size", "vocab_size", "tokenizer_hash"):
            if self.to_dict()[key] != theirs.get(key):
                out.append(f"{key}: {theirs.get(key)!r} (cache) vs {self.to_dict()[key]!r} (target {self.name})")
        return out


def text_config(config):
    """The decoder's config: ``text_config`` of a multimodal config (Gemma4's ``gemma4`` and ``gemma4_unified``
    nest the text model's fields there), else ``config`` itself."""
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def softcap_logits(logits: torch.Tensor, config) -> torch.Tensor:
    """``cap * tanh(logits / cap)`` with the target's ``final_logit_softcapping`` (Gemma4), as its own LM-head
    forward does; unchanged when the target has none. ``config``: an HF config or a plain dict."""
    cfg = text_config(config)
    cap = cfg.get("final_logit_softcapping") if isinstance(cfg, dict) else getattr(cfg, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


def config_hash(config_dict: dict) -> str:
    """Hash of the architecture-defining fields of an HF config (names and paths excluded)."""
    skip = {"_name_or_path", "_model_name_or_path", "transformers_version", "quantization_config", "dtype",
            "torch_dtype", "architectures", "_commit_hash", "use_cache"}
    clean = {k: v for k, v in sorted(config_dict.items()) if k not in skip}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TargetBackend(abc.ABC):
    """A frozen target: features for training, incremental decoding for evaluation and regeneration."""

    layer_ids: list[int]
    tokenizer: object
    # True where ``features`` is a collective call (zero3, pipeline, megatron): every rank must call it the same
    # number of times, so a rank with nothing left to capture still takes part with a dummy batch.
    collective: bool = False

    def decode_group(self) -> tuple[int, int]:
        """``(index, count)`` of the groups of ranks that decode together.

        The ranks of one group call ``decode_session`` methods with the same sequences in lockstep (a tensor- or
        pipeline-parallel group, or the whole world for zero3); different groups decode different prompts
        independently, so ``dspark eval`` splits its prompts over the groups. Default: every rank on its own.
        """
        from dspark import distributed

        return distributed.rank(), distributed.world_size()

    def generate_group(self) -> tuple[int, int]:
        """``(index, count)`` of the groups that share one ``generate`` call (same prompts on every member);
        ``dspark prepare`` splits the prompts over the groups. Default: as ``decode_group``."""
        return self.decode_group()

    @abc.abstractmethod
    def features(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None) -> TargetFeatures:
        """Hidden states of ``layer_ids`` and the final hidden state for a (right-padded) batch."""

    @property
    @abc.abstractmethod
    def embed_weight(self) -> torch.Tensor:
        """Frozen input embedding ``[V, H]``."""

    @property
    @abc.abstractmethod
    def lm_head_weight(self) -> torch.Tensor:
        """Frozen LM head ``[V, H]``."""

    @abc.abstractmethod
    def identity(self) -> TargetIdentity: ...

    @abc.abstractmethod
    def decode_session(self) -> "DecodeSession":
        """A single-sequence incremental decoder with a KV cache."""

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, batch_size: int,
                 seed: int, progress: bool = False, indices: list[int] | None = None) -> list[list[int]]:
        """Batched generation with a KV cache; returns the new tokens of each prompt (stop token included).

        Prompt k samples from its own generator seeded by ``(seed, indices[k])`` (default ``indices`` = 0..n-1;
        ``dspark.targets.sampling``), so its answer does not depend on the batch, rank or group it lands in.
        """


class DecodeSession(abc.ABC):
    """Incremental decoding of one sequence. ``extend`` appends tokens; ``truncate`` rolls the cache back."""

    length: int

    @abc.abstractmethod
    def extend(self, ids_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``ids_N`` after the current prefix; returns (logits ``[N, V]`` fp32, features ``[N, L, H]``)."""

    @abc.abstractmethod
    def truncate(self, length: int) -> None:
        """Forget every position ``>= length``."""
