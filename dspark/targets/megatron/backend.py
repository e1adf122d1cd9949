"""The ``megatron`` backend: the target split over a tensor-parallel group with megatron-core layers.

Every rank of a TP group runs every layer on its shard of heads / MLP columns / vocabulary; row-parallel
layers all-reduce, so hidden states (and therefore features) are replicated within the group. Callers:
- ``features``: each rank passes its own batch; the group gathers the batches, runs them together and hands
  every rank its own rows back (the trainer need not know ranks are coupled).
- ``decode_session`` / ``generate``: every rank of the group calls with the same prompts and seeds (as
  ``dspark eval`` does); logits are gathered over the vocabulary so each rank sees the full distribution, and
  sampled tokens are broadcast from the group's first rank so ranks cannot drift apart.

Legend: B batch, T tokens, L feature layers, H hidden size, V vocab, N new tokens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from dspark.targets.base import (
    DecodeSession,
    TargetBackend,
    TargetFeatures,
    TargetIdentity,
    config_hash,
)
from dspark.targets.megatron import adapter, parallel
from dspark.targets.megatron.model import (
    Decoder,
    DecoderSpec,
    KVCache,
    rope_inverse_frequencies,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _check_layer_ids(layer_ids: list[int], num_layers: int, name: str) -> None:
    bad = [i for i in layer_ids if i < -1 or i >= num_layers - 1]
    if bad:
        raise ValueError(f"target.layer_ids {bad} out of range for {name}: it has {num_layers} decoder layers, "
                         f"valid ids are -1..{num_layers - 2} (the last layer is excluded)")


class MegatronTarget(TargetBackend):
    """A llama/qwen3 target sharded over ``tensor_parallel`` ranks. Build with ``from_config`` or ``from_dir``."""

    collective = True

    def __init__(self, model: Decoder, hf_config, tokenizer, layer_ids: list[int], name: str, tp_size: int):
        self.model = model.eval()
        self.hf_config = hf_config
        self.tokenizer = tokenizer
        self.layer_ids = list(layer_ids)
        self.name = name
        self.tp_size = tp_size
        self._full_weights: dict[str, torch.Tensor] = {}
        self.device = next(model.parameters()).device

    @classmethod
    def from_config(cls, cfg, device: str = "cpu") -> MegatronTarget:
        from dspark.targets.hf import local_checkpoint_dir

        source, display = local_checkpoint_dir(cfg.name_or_path, "megatron")
        if cfg.dtype not in _DTYPES:
            raise ValueError(f"target.dtype must be one of {', '.join(_DTYPES)}, got {cfg.dtype!r}")
        return cls.from_dir(source, layer_ids=cfg.layer_ids, tp_size=cfg.tensor_parallel,
                            dtype=_DTYPES[cfg.dtype], name=display, device=device)

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, layer_ids: list[int], tp_size: int,
                 dtype: torch.dtype = torch.float32, name: str | None = None, tokenizer=None,
                 device: str = "cpu") -> MegatronTarget:
        """Validate config, TP size and checkpoint index first; then build on meta and read only local shards.

        ``device`` is where this rank's shards live and compute (``cuda:<local rank>`` under NCCL, ``cpu`` under
        gloo); collectives run on the process group's backend, so it must be the device that backend serves.
        """
        from transformers import AutoConfig, AutoTokenizer

        from dspark.targets.families import require_family
        from dspark.targets.weights import WeightIndex

        if tp_size < 1:
            raise ValueError(f"target.tensor_parallel must be >= 1, got {tp_size}")
        model_dir = Path(model_dir)
        name = name or model_dir.name
        hf_config = AutoConfig.from_pretrained(model_dir)
        require_family(hf_config.model_type, "megatron", str(model_dir))
        spec = DecoderSpec.from_hf_config(hf_config)
        _check_layer_ids(layer_ids, spec.num_layers, name)
        adapter.check_divisible(spec, tp_size)
        index = WeightIndex(model_dir)  # FileNotFoundError naming a missing shard
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)

        parallel.init_tensor_parallel(tp_size)
        inv_freq, rope_scaling = rope_inverse_frequencies(hf_config)
        with torch.device("meta"):  # shapes only: the plan and the index check cost no memory
            model = Decoder(spec, parallel.MegatronLayers(tp_size, dtype), inv_freq, rope_scaling).cast(dtype)
        plan = adapter.shard_plan(spec, model, parallel.tp_rank(), tp_size)
        index.check_against(adapter.expected_checkpoint(plan, spec, index))
        model.to_empty(device=device)  # allocates this rank's shards only
        model.tie_weights()
        adapter.load_shards(model, plan, index, dtype)
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model, hf_config, tokenizer, layer_ids, name, tp_size)

    # -- interface ---------------------------------------------------------------------------------------

    @property
    def config(self):
        return self.hf_config

    def parameter_bytes(self) -> int:
        """Bytes of the parameters this rank holds (tied weights counted once)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def _gathered_vocab_weight(self, which: str) -> torch.Tensor:
        # The drafter reuses the frozen embedding and LM head whole, so these two (and only these) are gathered
        # once, over the vocabulary rows, and the megatron pad rows dropped. A collective: every rank of the
        # group asks (as the trainer does on every rank).
        if which == "lm_head" and self.model.spec.tie_word_embeddings:
            which = "embed_tokens"
        if which not in self._full_weights:
            shard_VH = getattr(self.model, which).weight
            full_VH = parallel.gather_last_dim(shard_VH.t(), self.tp_size).t()
            self._full_weights[which] = full_VH[: self.hf_config.vocab_size].contiguous()
        return self._full_weights[which]

    @property
    def embed_weight(self) -> torch.Tensor:
        return self._gathered_vocab_weight("embed_tokens")

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self._gathered_vocab_weight("lm_head")

    def identity(self) -> TargetIdentity:
        cfg, tok = self.hf_config, self.tokenizer
        vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode()
        return TargetIdentity(
            name=self.name, config_hash=config_hash(cfg.to_dict()), layer_ids=list(self.layer_ids),
            hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, num_layers=cfg.num_hidden_layers,
            tokenizer_hash=hashlib.sha256(vocab).hexdigest()[:16], chat_template=getattr(tok, "chat_template", None),
        )

    def logits(self, final_BTH: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary fp32 logits: each rank's vocab shard, gathered over the TP group, pad columns cut."""
        return parallel.gather_last_dim(self.model.lm_head(final_BTH), self.tp_size)[
            ..., : self.hf_config.vocab_size].float()

    @torch.no_grad()
    def features(self, input_ids_BT, attention_mask_BT=None) -> TargetFeatures:
        input_ids_BT = input_ids_BT.to(self.device)
        mask_BT = torch.ones_like(input_ids_BT) if attention_mask_BT is None else attention_mask_BT.to(self.device)
        ids_GT, mask_GT, rows = self._gather_group_batches(input_ids_BT, mask_BT)
        # as HF's features(): no position_ids
        positions_GT = torch.arange(ids_GT.shape[1], device=self.device).expand_as(ids_GT)
        layers, final_GTH = self.model(ids_GT, positions_GT, mask_GT, self.layer_ids)
        B, T = input_ids_BT.shape
        layers_BTLH = torch.stack(layers, dim=2)[rows : rows + B, :T]
        return TargetFeatures(layers_BTLH=layers_BTLH, final_BTH=final_GTH[rows : rows + B, :T])

    def _gather_group_batches(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor):
        """Concatenate the TP group's batches (right-padded to the longest); returns them and our first row."""
        if self.tp_size == 1:
            return ids_BT, mask_BT, 0
        group = parallel.tp_group()
        shape = torch.tensor(ids_BT.shape, dtype=torch.long, device=self.device)
        shapes = [torch.empty_like(shape) for _ in range(self.tp_size)]
        dist.all_gather(shapes, shape, group=group)
        rows_max, width = (int(max(s[d] for s in shapes)) for d in (0, 1))
        # gloo gathers equal shapes only: pad every batch to the largest, then keep each rank's real rows.
        padded = torch.zeros(rows_max, width, 2, dtype=torch.long, device=self.device)
        padded[: ids_BT.shape[0], : ids_BT.shape[1], 0] = ids_BT
        padded[: ids_BT.shape[0], : ids_BT.shape[1], 1] = mask_BT
        parts = [torch.empty_like(padded) for _ in range(self.tp_size)]
        dist.all_gather(parts, padded, group=group)
        both = torch.cat([part[: int(s[0])] for part, s in zip(parts, shapes)])
        rows = sum(int(s[0]) for s in shapes[: parallel.tp_rank()])
        return both[..., 0], both[..., 1], rows

    def decode_group(self) -> tuple[int, int]:
        """One tensor-parallel group decodes together; the data-parallel groups take different prompts."""
        return parallel.dp_rank(), parallel.dp_size()

    def decode_session(self) -> MegatronDecodeSession:
        return MegatronDecodeSession(self)

    def _agree(self, tokens_B: torch.Tensor) -> torch.Tensor:
        """Every rank drew with the same seed from the same gathered logits; the broadcast from the group's
        first rank guarantees agreement even if a collective's rounding ever differed between ranks."""
        if self.tp_size > 1:
            dist.broadcast(tokens_B, src=parallel.tp_src_rank(), group=parallel.tp_group())
        return tokens_B

    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens, temperature, batch_size, seed, progress=False, indices=None):
        from tqdm import tqdm

        from dspark.targets.sampling import RowSampler, batch_indices

        indices = batch_indices(indices, len(prompts))

        tok = self.tokenizer
        eos, pad_id = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        outputs: list[list[int]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding per batch
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for batch_idx in tqdm(batches, desc="regenerate", disable=not progress, unit="batch"):
            # per-prompt seeds (dspark.targets.sampling), the same on every TP rank
            sampler = RowSampler(seed, [indices[i] for i in batch_idx])
            new = self._generate_batch([prompts[i] for i in batch_idx], max_new_tokens, temperature, sampler,
                                       eos, pad_id)
            for i, tokens in zip(batch_idx, new):
                outputs[i] = tokens
        return outputs

    def _generate_batch(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                        sampler, eos: int | None, pad_id: int) -> list[list[int]]:
        """Left-padded batch; positions count real tokens only (as HF generate), pad slots are masked keys."""
        width = max(len(p) for p in prompts)
        ids_BT = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask_BS = torch.zeros_like(ids_BT)
        for row, p in enumerate(prompts):
            ids_BT[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask_BS[row, width - len(p) :] = 1
        ids_BT, mask_BS = ids_BT.to(self.device), mask_BS.to(self.device)
        positions_BT = (mask_BS.cumsum(-1) - 1).clamp(min=0)
        cache = KVCache(len(self.model.layers))
        done_B = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        new_tokens: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            _, final_BTH = self.model(ids_BT, positions_BT, mask_BS, [], cache)
            logits_BV = self.logits(final_BTH[:, -1])
            next_B = sampler.sample(logits_BV, temperature)
            next_B = self._agree(torch.where(done_B, torch.full_like(next_B, pad_id), next_B))
            new_tokens.append(next_B)
            if eos is not None:
                done_B |= next_B == eos
            if bool(done_B.all()):
                break
            ids_BT = next_B.view(-1, 1)
            positions_BT = positions_BT[:, -1:] + 1
            mask_BS = torch.cat([mask_BS, torch.ones_like(ids_BT)], dim=1)
        out = torch.stack(new_tokens, dim=1).tolist()
        return [row[: row.index(eos) + 1] if eos in row else row for row in out]


class MegatronDecodeSession(DecodeSession):
    """One sequence with a KV cache of this rank's KV heads; all TP ranks must extend/truncate in lockstep."""

    def __init__(self, target: MegatronTarget):
        self.target = target
        self.cache = KVCache(len(target.model.layers))
        self.length = 0

    @torch.no_grad()
    def extend(self, ids_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.target.device
        ids_1N = ids_N.view(1, -1).to(device=device, dtype=torch.long)
        n = ids_1N.shape[1]
        positions_1N = torch.arange(self.length, self.length + n, device=device).view(1, -1)
        key_mask_1S = torch.ones(1, self.length + n, dtype=torch.long, device=device)
        layers, final_1NH = self.target.model(ids_1N, positions_1N, key_mask_1S, self.target.layer_ids, self.cache)
        self.length += n
        return self.target.logits(final_1NH[0]), torch.stack(layers, dim=2)[0]

    def truncate(self, length: int) -> None:
        if length < self.length:
            self.cache.crop(length)
            self.length = length
