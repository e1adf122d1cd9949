"""Where training samples come from: a finished cache (``CacheReader``) or the target running live (online mode).

Legend: T tokens, L feature layers, H hidden size, V vocab.

Both are a ``SampleSource``: ``len(source)`` samples, and ``iter_samples(seed=, epoch=, rank=, world_size=,
start=)`` yielding this rank's samples of one epoch as the dicts a cache stores (``id``, ``input_ids`` long
``[T]``, ``loss_mask`` bool ``[T]``, ``features_TLH`` bf16 ``[T, L, H]``, ``final_TH`` bf16 ``[T, H]``). The
trainer reads only that, so it never knows whether features come from disk or from a live target.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Protocol

import torch

from dspark.config import RunConfig
from dspark.targets.base import TargetIdentity


class SampleSource(Protocol):
    def __len__(self) -> int: ...

    def iter_samples(self, seed: int, epoch: int, rank: int = 0, world_size: int = 1, *,
                     start: int = 0) -> Iterator[dict]: ...


@dataclass
class FrozenTarget:
    """What a drafter takes from its target: HF config, identity, and the frozen embedding and LM head."""

    hf_config: object
    identity: TargetIdentity
    embed_VH: torch.Tensor
    lm_head_VH: torch.Tensor


def frozen_parts(target) -> FrozenTarget:
    """Clones: the drafter's engine may cast its parameters in place (bf16), the target must stay untouched."""
    return FrozenTarget(target.config, target.identity(), target.embed_weight.detach().to("cpu", copy=True),
                        target.lm_head_weight.detach().to("cpu", copy=True))


# Where HF causal LMs of the supported families keep the two tensors a drafter reuses.
_EMBED_NAME, _LM_HEAD_NAME = "model.embed_tokens.weight", "lm_head.weight"


def frozen_parts_from_files(target_cfg) -> FrozenTarget | None:
    """The frozen parts read from the target's checkpoint directory alone: its HF config and tokenizer (for the
    identity) and the two tensors, through the safetensors index, without building the model.

    None where that is not possible (a .gguf file or hub id, no safetensors, other tensor names): the caller
    then loads the whole target.
    """
    from transformers import AutoConfig, AutoTokenizer

    from dspark.targets.hf import HFTarget, resolve_target_source
    from dspark.targets.weights import WeightIndex

    source, gguf_file, display = resolve_target_source(target_cfg.name_or_path)
    if gguf_file or not Path(source).is_dir():
        return None
    try:
        index = WeightIndex(source)
    except FileNotFoundError:
        return None  # e.g. only pytorch_model.bin
    config = AutoConfig.from_pretrained(source)
    lm_head_name = _EMBED_NAME if config.get_text_config().tie_word_embeddings else _LM_HEAD_NAME
    if _EMBED_NAME not in index or lm_head_name not in index:
        return None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[target_cfg.dtype]
    # The hf backend's identity reads only the config, tokenizer, layer ids and name: sharing it keeps the
    # identity equal to that of the loaded target by construction.
    owner = SimpleNamespace(model=SimpleNamespace(config=config), tokenizer=AutoTokenizer.from_pretrained(source),
                            layer_ids=list(target_cfg.layer_ids), name=display)
    identity = HFTarget.identity(owner)  # type: ignore[arg-type]
    return FrozenTarget(config, identity, index.load(_EMBED_NAME, dtype), index.load(lm_head_name, dtype))


class LiveSource:
    """Samples computed by running ``target`` on the conversations, ``batch_size`` at a time (online mode).

    The epoch order is the one a cache built by one process from the same conversations would be read in
    (``cache.samples_per_shard``, ``cache.shuffle_buffer``), and features are rounded to bf16 exactly as the
    cache writer stores them, so an online run trains on the same samples, in the same order, with the same
    numbers (up to the padding of the capture batches) as a run from that cache. ``start`` must be a multiple
    of ``batch_size`` for a resumed epoch to capture the same padded batches as an uninterrupted one.
    """

    def __init__(self, target, conversations: list[dict], *, batch_size: int, samples_per_shard: int,
                 shuffle_buffer: int):
        from dspark.cache.build import check_conversations, pad_id_of

        if batch_size < 1 or samples_per_shard < 1 or shuffle_buffer < 0:
            raise ValueError(f"LiveSource needs batch_size >= 1, samples_per_shard >= 1 and shuffle_buffer >= 0, "
                             f"got {batch_size}, {samples_per_shard}, {shuffle_buffer}")
        self.target = target
        self.items = check_conversations(conversations)
        vocab = target.identity().vocab_size
        for sample_id, ids, _ in self.items:
            if max(ids) >= vocab:
                raise ValueError(f"conversation {sample_id!r} has token id {max(ids)}, outside the target's "
                                 f"vocabulary of {vocab}")
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        n, per = len(self.items), samples_per_shard
        self.shard_sizes = [min(per, n - i) for i in range(0, n, per)]
        self._pad_id = pad_id_of(target)

    def __len__(self) -> int:
        return len(self.items)

    def sample_order(self, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """Conversation indices this rank reads in ``epoch`` (the cache reader's order, see the class doc)."""
        from dspark.cache.stream import epoch_order

        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        return epoch_order(self.shard_sizes, seed, epoch, self.shuffle_buffer)[rank::world_size]

    def iter_samples(self, seed: int, epoch: int, rank: int = 0, world_size: int = 1, *,
                     start: int = 0) -> Iterator[dict]:
        from dspark.cache.build import capture_batch

        order = self.sample_order(seed, epoch, rank, world_size)[start:]
        for i in range(0, len(order), self.batch_size):
            batch = [self.items[p] for p in order[i : i + self.batch_size]]
            for sample in capture_batch(self.target, batch, self._pad_id):
                sample["features_TLH"] = sample["features_TLH"].to(torch.bfloat16)
                sample["final_TH"] = sample["final_TH"].to(torch.bfloat16)
                yield sample


def open_source(cfg: RunConfig, *, cache_dir: Path, conversations_path: Path,
                device: str = "cpu") -> tuple[SampleSource, FrozenTarget]:
    """The sample source of a training run and its target's frozen parts.

    ``train.online``: host the target (``load_target``) on ``device`` and feed live features from the
    conversations at ``conversations_path``, one capture per micro batch. Otherwise read the cache at
    ``cache_dir``, refused when it was built for another target; the frozen parts are then read from the
    checkpoint files without building the target where possible (else it is loaded, then freed).
    """
    from dspark.targets import load_target

    if cfg.train.online:
        from dspark.data.regenerate import read_conversations

        conversations = read_conversations(conversations_path)  # fails fast, before the target loads
        target = load_target(cfg.target, device=device)
        source = LiveSource(target, conversations, batch_size=cfg.train.micro_batch_size,
                            samples_per_shard=cfg.cache.samples_per_shard, shuffle_buffer=cfg.cache.shuffle_buffer)
        return source, frozen_parts(target)

    from dspark.cache import CacheReader

    if not (Path(cache_dir) / "manifest.json").is_file():
        raise ValueError(f"no hidden-state cache at {cache_dir} (manifest.json missing): run `dspark cache build` "
                         f"first, or train online (--set train.online=true)")
    parts = frozen_parts_from_files(cfg.target)  # every backend's identity is the config + tokenizer one
    if parts is None:
        target = load_target(cfg.target)
        parts = frozen_parts(target)
        del target
    reader = CacheReader(cache_dir, expected=parts.identity, shuffle_buffer=cfg.cache.shuffle_buffer,
                         skip_corrupt=cfg.cache.skip_corrupt)
    return reader, parts
