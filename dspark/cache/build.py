"""``build_cache``: run the frozen target over conversations and write its features into a cache.

Legend: B batch, T tokens, L feature layers, H hidden size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch

from dspark.cache.reader import inspect_cache
from dspark.cache.writer import CacheWriter, finalize_cache

__all__ = ["build_cache", "inspect_cache"]


def _check_conversation(conv: dict) -> tuple[str, list[int], list[int]]:
    if not isinstance(conv, dict) or not {"id", "input_ids", "loss_mask"} <= set(conv):
        keys = sorted(conv) if isinstance(conv, dict) else type(conv).__name__
        raise ValueError(f"a conversation needs keys id, input_ids, loss_mask; got {keys}")
    sample_id, ids, mask = str(conv["id"]), list(conv["input_ids"]), list(conv["loss_mask"])
    if not ids:
        raise ValueError(f"conversation {sample_id!r} has no tokens")
    if len(mask) != len(ids):
        raise ValueError(f"conversation {sample_id!r}: loss_mask has {len(mask)} entries, input_ids {len(ids)}")
    return sample_id, ids, mask


def _batches(conversations: Iterable[dict], skip: set[str], batch_size: int) -> Iterator[list[tuple]]:
    batch: list[tuple] = []
    for conv in conversations:
        item = _check_conversation(conv)
        if item[0] in skip:
            continue
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def _capture(target, batch: list[tuple], pad_id: int) -> list[dict]:
    """Features of one right-padded batch, cut back to each sample's own length."""
    lengths = [len(ids) for _, ids, _ in batch]
    ids_BT = torch.full((len(batch), max(lengths)), pad_id, dtype=torch.long)
    attention_BT = torch.zeros_like(ids_BT)
    for row, (_, ids, _) in enumerate(batch):
        ids_BT[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_BT[row, : len(ids)] = 1
    device = target.embed_weight.device
    feats = target.features(ids_BT.to(device), attention_BT.to(device))
    samples = []
    for row, ((sample_id, ids, mask), T) in enumerate(zip(batch, lengths)):
        samples.append({
            "id": sample_id,
            "input_ids": ids_BT[row, :T],
            "loss_mask": torch.tensor(mask, dtype=torch.bool),
            "features_TLH": feats.layers_BTLH[row, :T].cpu(),
            "final_TH": feats.final_BTH[row, :T].cpu(),
        })
    return samples


def build_cache(target, conversations: Iterable[dict], out_dir, cfg, *, batch_size: int = 4,
                progress: bool = False, rank: int = 0, finalize: bool = True) -> Path:
    """Capture ``target`` features for ``conversations`` into the cache at ``out_dir``; returns ``out_dir``.

    ``target`` is a ``TargetBackend``; ``conversations`` yields ``{"id", "input_ids", "loss_mask"}`` dicts;
    ``cfg`` is a ``CacheConfig``. Ids already in finished shards are skipped, so rerunning a killed build
    resumes it. With several writer ranks, give each its own ``rank`` and conversations, pass
    ``finalize=False``, and call ``finalize_cache`` once after all ranks are done.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    identity = target.identity()
    pad_id = getattr(target.tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id  # padded positions are masked out and cut off
    total = len(conversations) if hasattr(conversations, "__len__") else None
    with CacheWriter(out_dir, identity, codec=cfg.codec, zstd_level=cfg.zstd_level,
                     samples_per_shard=cfg.samples_per_shard, rank=rank) as writer:
        bar = tqdm(total=total, desc="cache build", unit="conv", disable=not progress)
        for batch in _batches(_counting(conversations, bar), writer.done_ids, batch_size):
            for sample in _capture(target, batch, pad_id):
                writer.add(sample)
        bar.close()
    if finalize:
        finalize_cache(out_dir, identity)
    return out_dir


def _counting(items: Iterable, bar) -> Iterator:
    """Advance the progress bar as conversations are consumed (skipped ones included)."""
    for item in items:
        yield item
        bar.update(1)
