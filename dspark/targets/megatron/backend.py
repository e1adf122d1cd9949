"""The ``megatron`` backend: the target split over a tensor-parallel group with megatron-core layers.

transformers' own model is built on the meta device and parallelised from outside (``parallelize.py``); each rank
then reads only its shards (``adapter.py``). Every rank of a TP group runs every layer on its share of heads / MLP
columns / experts / vocabulary; row-parallel layers and the experts all-reduce, so hidden states (and therefore
features) are replicated within the group. Callers:
- ``features``: each rank passes its own batch; the group gathers the batches, runs them together and hands
  every rank its own rows back (the trainer need not know ranks are coupled).
- ``decode_session`` / ``generate``: every rank of the group calls with the same prompts and seeds (as
  ``dspark eval`` does). The LM head gathers its logits over the vocabulary, so each rank sees the full
  distribution; all-reduce and all-gather hand every rank the same bits, so ranks sampling with the same seed draw
  the same tokens. Decoding is transformers' own (its cache classes, its ``generate``), as in the hf backend.

Legend: B batch, T tokens, L feature layers, H hidden size, V vocab.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from dspark.targets.base import TargetBackend, TargetFeatures, TargetIdentity, text_config
from dspark.targets.common import (
    check_checkpoint,
    check_layer_ids,
    raw_last_hidden_state,
    select_layers,
    target_identity,
    torch_dtype,
)
from dspark.targets.decode import HFDecodeSession, generate
from dspark.targets.megatron import adapter, parallel, parallelize


class MegatronTarget(TargetBackend):
    """A target sharded over ``tensor_parallel`` ranks; ``model`` is a parallelised transformers ``*ForCausalLM``."""

    collective = True

    def __init__(self, model, tokenizer, layer_ids: list[int], name: str, tp_size: int):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.layer_ids = list(layer_ids)
        self.name = name
        self.tp_size = tp_size
        self._full_weights: dict[str, torch.Tensor] = {}
        self.device = next(model.parameters()).device

    @classmethod
    def from_config(cls, cfg, device: str = "cpu") -> MegatronTarget:
        from dspark.targets.source import local_checkpoint_dir

        source, display = local_checkpoint_dir(cfg.name_or_path, "megatron")
        return cls.from_dir(source, layer_ids=cfg.layer_ids, tp_size=cfg.tensor_parallel,
                            dtype=torch_dtype(cfg.dtype), name=display, device=device)

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, layer_ids: list[int], tp_size: int,
                 dtype: torch.dtype = torch.float32, name: str | None = None, device: str = "cpu") -> MegatronTarget:
        """Validate config, TP size and checkpoint index first; then build on meta and read only local shards.

        ``device`` is where this rank's shards live and compute (``cuda:<local rank>`` under NCCL, ``cpu`` under
        gloo); collectives run on the process group's backend, so it must be the device that backend serves.
        """
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from dspark.targets.families import require_hostable
        from dspark.targets.weights import WeightIndex

        if tp_size < 1:
            raise ValueError(f"target.tensor_parallel must be >= 1, got {tp_size}")
        model_dir = Path(model_dir)
        name = name or model_dir.name
        config = AutoConfig.from_pretrained(model_dir)
        require_hostable(config, "megatron", str(model_dir))  # Gemma4: dense text decoders only
        check_layer_ids(layer_ids, text_config(config).num_hidden_layers, name)
        parallelize.check_divisible(config, tp_size)
        index = WeightIndex(model_dir)  # FileNotFoundError naming a missing shard
        tokenizer = AutoTokenizer.from_pretrained(model_dir)

        parallel.init_tensor_parallel(tp_size)
        # Parameters on the meta device (shapes only: the checks and the plan cost no memory); buffers real, so the
        # rotary tables are computed by the modules themselves, as in the hf backend.
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.tie_weights()  # from_config leaves a tied head untied
        expected = check_checkpoint(model, index)
        splits = parallelize.parallelize(model, parallel.tp_rank(), tp_size)
        adapter.load_shards(model, splits, expected, index, device)
        return cls(model, tokenizer, layer_ids, name, tp_size)

    # -- interface ---------------------------------------------------------------------------------------

    @property
    def config(self):
        """The decoder's config (a multimodal Gemma4's ``text_config``), as the hf backend's."""
        return text_config(self.model.config)

    def parameter_bytes(self) -> int:
        """Bytes of the parameters this rank holds (tied weights counted once)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def _gathered_vocab_weight(self, module) -> torch.Tensor:
        # The drafter reuses the frozen embedding and LM head whole, so these two (and only these) are gathered
        # once, over the vocabulary rows, and the megatron pad rows dropped. A collective: every rank of the
        # group asks (as the trainer does on every rank).
        shard_VH = module.weight
        if id(shard_VH) not in self._full_weights:
            full_VH = parallel.gather_last_dim(shard_VH.t()).t()
            self._full_weights[id(shard_VH)] = full_VH[: self.config.vocab_size].contiguous()
        return self._full_weights[id(shard_VH)]

    @property
    def embed_weight(self) -> torch.Tensor:
        return self._gathered_vocab_weight(self.model.get_input_embeddings())

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self._gathered_vocab_weight(self.model.get_output_embeddings())

    def identity(self) -> TargetIdentity:
        return target_identity(self.config, self.tokenizer, self.layer_ids, self.name)

    @torch.no_grad()
    def features(self, input_ids_BT, attention_mask_BT=None) -> TargetFeatures:
        input_ids_BT = input_ids_BT.to(self.device)
        mask_BT = torch.ones_like(input_ids_BT) if attention_mask_BT is None else attention_mask_BT.to(self.device)
        ids_GT, mask_GT, rows = self._gather_group_batches(input_ids_BT, mask_BT)
        with raw_last_hidden_state(self.model):
            out = self.model.model(input_ids=ids_GT, attention_mask=mask_GT, output_hidden_states=True)
        B, T = input_ids_BT.shape
        return TargetFeatures(layers_BTLH=select_layers(out.hidden_states, self.layer_ids)[rows : rows + B, :T],
                              final_BTH=out.last_hidden_state[rows : rows + B, :T])

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

    def decode_session(self) -> HFDecodeSession:
        """One sequence with transformers' cache of this rank's heads; every TP rank extends and truncates in
        lockstep (a rollback by replay, DeepSeek-V4's, runs forwards too)."""
        return HFDecodeSession(self)

    def generate(self, prompts, *, max_new_tokens, temperature, batch_size, seed, progress=False, indices=None):
        """transformers' generation, as the hf backend runs it (per-prompt seeds from ``indices``); every rank of
        the group passes the same prompts."""
        return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        batch_size=batch_size, seed=seed, progress=progress, indices=indices)
