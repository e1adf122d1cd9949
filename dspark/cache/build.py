"""``build_cache``: run the frozen target over conversations and write its features into a cache.

Legend: B batch, T tokens, L feature layers, H hidden size.

Conversations are cut into capture batches in file order *before* anything is skipped or split between
ranks, and rank r of W captures batches r, r + W, r + 2W, ... So every sample is computed in the same padded
batch whatever the number of writer ranks and however often a killed build was resumed: padding changes the
attention kernel's rounding, and this keeps caches built by 1 or N processes bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from dspark.cache.format import content_hash
from dspark.cache.reader import inspect_cache
from dspark.cache.writer import CacheWriter, finalize_cache

__all__ = ["build_cache", "capture_batch", "check_conversations", "inspect_cache"]

# A validated conversation: (sample id, token ids, loss mask).
Item = tuple[str, list[int], list[int]]


def _check_conversation(conv: dict) -> Item:
    if not isinstance(conv, dict) or not {"id", "input_ids", "loss_mask"} <= set(conv):
        keys = sorted(conv) if isinstance(conv, dict) else type(conv).__name__
        raise ValueError(f"a conversation needs keys id, input_ids, loss_mask; got {keys}")
    sample_id, ids, mask = str(conv["id"]), list(conv["input_ids"]), list(conv["loss_mask"])
    if not ids:
        raise ValueError(f"conversation {sample_id!r} has no tokens")
    if len(mask) != len(ids):
        raise ValueError(f"conversation {sample_id!r}: loss_mask has {len(mask)} entries, input_ids {len(ids)}")
    return sample_id, ids, mask


def check_conversations(conversations: Iterable[dict]) -> list[Item]:
    """Validate every conversation and refuse duplicate ids (a cache is keyed by sample id).

    Every rank checks the whole list, so bad input fails on all ranks alike instead of hanging the others.
    """
    items, seen = [], set()
    for conv in conversations:
        item = _check_conversation(conv)
        if item[0] in seen:
            raise ValueError(f"conversation id {item[0]!r} occurs more than once; sample ids must be unique")
        seen.add(item[0])
        items.append(item)
    return items


@torch.no_grad()
def capture_batch(target, batch: list[Item], pad_id: int) -> list[dict]:
    """Features of one right-padded batch, cut back to each sample's own length (CPU tensors, target dtype).

    Returns one dict per conversation with the keys a cache sample has (``id``, ``input_ids``, ``loss_mask``,
    ``features_TLH``, ``final_TH``).
    """
    lengths = [len(ids) for _, ids, _ in batch]
    ids_BT = torch.full((len(batch), max(lengths)), pad_id, dtype=torch.long)
    attention_BT = torch.zeros_like(ids_BT)
    for row, (_, ids, _) in enumerate(batch):
        ids_BT[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_BT[row, : len(ids)] = 1
    device = target.embed_weight.device
    feats = target.features(ids_BT.to(device), attention_BT.to(device))
    layers_BTLH = feats.layers_BTLH  # DeepSeek-V4's mHC streams are averaged by the backend
    samples = []
    for row, ((sample_id, ids, mask), T) in enumerate(zip(batch, lengths)):
        samples.append({
            "id": sample_id,
            "input_ids": ids_BT[row, :T],
            "loss_mask": torch.tensor(mask, dtype=torch.bool),
            "features_TLH": layers_BTLH[row, :T].cpu(),
            "final_TH": feats.final_BTH[row, :T].cpu(),
        })
    return samples


def check_not_stale(out_dir, done: dict[str, str | None], items: list[Item]) -> None:
    """Refuse to resume into a cache whose finished samples are not exactly these conversations.

    Resume skips the ids already on disk, so a cache built from older conversations (another ``prepare``) would
    otherwise be kept silently. Raises one line naming the first sample (in conversation order) whose stored
    content differs, or a stored id the conversations no longer have.
    """
    if not done:
        return
    hint = "rebuild it with `dspark cache build --rebuild` (or delete it)"
    ids = set()
    for sample_id, input_ids, loss_mask in items:
        ids.add(sample_id)
        if sample_id not in done:
            continue
        stored = done[sample_id]
        if stored is None:
            raise ValueError(f"cache {out_dir} was written before samples carried content hashes (schema 1), so "
                             f"resuming it cannot be checked against the conversations; {hint}")
        if stored != content_hash(input_ids, loss_mask):
            raise ValueError(f"cache {out_dir} is stale: sample {sample_id!r} differs from the conversations "
                             f"(first differing sample; they changed since the cache was built); {hint}")
    extra = sorted(set(done) - ids)
    if extra:
        raise ValueError(f"cache {out_dir} is stale: it holds sample {extra[0]!r}, which the conversations no longer "
                         f"have ({len(extra)} such); {hint}")


def pad_id_of(target) -> int:
    """Token used for right padding; padded positions are masked out of attention and cut off afterwards."""
    pad_id = getattr(target.tokenizer, "pad_token_id", None)
    return 0 if pad_id is None else pad_id


def build_cache(target, conversations: Iterable[dict], out_dir, cfg, *, batch_size: int = 4,
                progress: bool = False, rank: int = 0, world_size: int = 1, finalize: bool = True) -> Path:
    """Capture ``target`` features for ``conversations`` into the cache at ``out_dir``; returns ``out_dir``.

    ``target`` is a ``TargetBackend``; ``conversations`` yields ``{"id", "input_ids", "loss_mask"}`` dicts;
    ``cfg`` is a ``CacheConfig``. Ids already in finished shards (of any rank) are skipped, so rerunning a
    killed build resumes it. Several writer ranks pass the same ``conversations`` with their ``rank`` and
    ``world_size`` (each captures every ``world_size``-th batch into its own shards) and ``finalize=False``;
    one of them calls ``finalize_cache`` after all are done. ``finalize`` with ``world_size > 1`` is refused:
    the other ranks' shards may not be finished yet.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if finalize and world_size > 1:
        raise ValueError("build_cache(finalize=True) needs world_size 1; with several ranks call finalize_cache "
                         "once after every rank has finished")
    out_dir = Path(out_dir)
    identity = target.identity()
    items = check_conversations(conversations)
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)][rank::world_size]
    pad_id = pad_id_of(target)
    with CacheWriter.from_config(out_dir, identity, cfg, rank=rank) as writer:
        check_not_stale(out_dir, writer.done_contents, items)
        bar = tqdm(total=sum(map(len, batches)), desc="cache build", unit="conv", disable=not progress)
        # A collective backend needs every rank in every forward: all ranks take the same number of turns, and a
        # rank whose batch is done (or that has none left) joins with a one-token dummy batch.
        turns = -(-len(items) // (batch_size * world_size)) if getattr(target, "collective", False) else len(batches)
        for turn in range(turns):
            batch = batches[turn] if turn < len(batches) else []
            # A batch cut by a kill is captured whole again (same padding, same bits); only new ids are added.
            if batch and not all(sample_id in writer.done_ids for sample_id, _, _ in batch):
                for sample in capture_batch(target, batch, pad_id):
                    writer.add(sample)
            elif getattr(target, "collective", False):
                target.features(torch.full((1, 1), pad_id, dtype=torch.long), torch.ones(1, 1, dtype=torch.long))
            bar.update(len(batch))
        bar.close()
    if finalize:
        finalize_cache(out_dir, identity)
    return out_dir

