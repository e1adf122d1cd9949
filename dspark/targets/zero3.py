"""The ``zero3`` backend: DeepSpeed ZeRO stage 3 inference. Each rank holds 1/N of every parameter.

The HF model is built under ``deepspeed.zero.Init`` (each module is partitioned as soon as it is constructed)
and each rank then fills only its own flat partition from the safetensors shards
(``WeightIndex.load_flat_range``), so no rank ever reads or holds the whole model. Routed experts may be stored
fused (transformers' layout) or one tensor per expert (DeepSeek's hub layout); in the latter a rank's flat range of
a fused parameter maps onto rows of a few experts' tensors, and only those rows are read. At forward time one
all-gather per decoder layer (and per embedding / final norm / LM head) makes that layer whole, it runs, and it
is partitioned again: peak parameter memory is 1/N of the model plus one layer.

Every rank gets features for its own data, but the gathers are collectives: all ranks must run the same
number of forwards (``features``, ``DecodeSession.extend``) in the same order, with any batch and sequence
sizes. ``generate`` keeps ranks in step by itself.

Legend: B batch, T tokens, L feature layers, H hidden size, V vocab, N new tokens.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os

import torch
from torch import nn

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
from dspark.targets.families import require_hostable
from dspark.targets.weights import WeightIndex, expert_parts


def read_partition(index: WeightIndex, name: str, shape: tuple[int, ...], start: int, stop: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Elements ``[start, stop)`` of parameter ``name`` (model shape ``shape``) flattened, from either layout.

    A fused expert parameter stored per expert is, flattened, its pieces flattened one after another, so the
    range covers a run of pieces (usually a few experts): only the rows of those pieces that the range touches
    are read, never the whole expert set.
    """
    parts = expert_parts(index, name, shape)
    if parts is None:
        return index.load_flat_range(name, start, stop, dtype)
    return index.load_flat_range_of(list(parts), start, stop, dtype)


def gather_units(module: nn.Module) -> list[nn.Module]:
    """The modules gathered as one piece: each decoder layer, and every other child of the model containers.

    A container is a module holding a ``ModuleList`` (the layer stack), or holding such a module (a multimodal
    Gemma4's ``model.language_model``); it is opened up, everything else is a unit. For a CausalLM this gives
    embed_tokens, layers.0 .. layers.n-1, norm, rotary_emb, lm_head.
    """
    def holds_stack(m: nn.Module) -> bool:
        return any(isinstance(c, nn.ModuleList) for c in m.children())

    units = []
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            units.extend(child)
        elif holds_stack(child) or any(holds_stack(c) for c in child.children()):
            units.extend(gather_units(child))
        else:
            units.append(child)
    return units


class _LayerGather:
    """Forward hooks: all-gather a unit's partitions before its forward, re-partition them right after."""

    def __init__(self, model: nn.Module):
        import deepspeed

        self._gathered = deepspeed.zero.GatheredParameters
        self._open: dict[int, object] = {}
        covered: set[int] = set()
        for unit in gather_units(model):
            params = list(unit.parameters())
            if not params:
                continue
            covered.update(id(p) for p in params)
            unit.register_forward_pre_hook(lambda mod, args, params=params: self._enter(mod, params))
            unit.register_forward_hook(lambda mod, args, out: self._exit(mod), always_call=True)
        # Parameters owned by a container itself (none in the supported families) stay gathered per call.
        self.resident = [p for p in model.parameters() if id(p) not in covered]

    def _enter(self, module: nn.Module, params: list) -> None:
        ctx = self._gathered(params)
        ctx.__enter__()
        self._open[id(module)] = ctx

    def _exit(self, module: nn.Module) -> None:
        ctx = self._open.pop(id(module), None)
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def call(self):
        """Context for one top-level call: container-owned parameters whole for its duration."""
        return self._gathered(self.resident) if self.resident else contextlib.nullcontext()


def _local_device() -> torch.device:
    """This rank's device on DeepSpeed's accelerator (CPU under ``DS_ACCELERATOR=cpu``, else ``LOCAL_RANK``'s GPU)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(accelerator.current_device_name())


@functools.cache
def _malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_host_memory() -> None:
    """Hand freed heap memory back to the OS. On CPU every gather allocates and frees a whole layer; glibc keeps
    those blocks, and a 2-rank run was measured holding ~0.5 GB more RSS per rank than its partitions need
    (SmolLM2-135M: ~1.2 GB instead of ~0.67 GB)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def fill_partitions(model: nn.Module, index: WeightIndex) -> None:
    """Copy each rank's slice of every parameter from the checkpoint into its ZeRO-3 partition.

    DeepSpeed pads a parameter's ``ds_numel`` elements up to a multiple of the partition group size and gives
    rank r the flat range ``[r * p, (r + 1) * p)`` with ``p = param.ds_tensor.ds_numel``; the padding (on the
    last ranks only) is zeroed. Buffers are not partitioned and are read whole. Values are cast to the dtype
    each partition was built with (modules kept in fp32 under bf16 stay fp32, as in transformers' loading).
    """
    import torch.distributed as dist

    # Shard by shard, closing each when done: its mapped pages leave RSS, so the load peak is this rank's
    # partitions plus what it read of one shard (not of the whole checkpoint). A parameter stored per expert is
    # sorted by the shard of its first piece; shards its other pieces live in are closed right after it.
    def stored(name: str, param) -> list[str]:
        return list(expert_parts(index, name, tuple(param.ds_shape)) or [name])

    params = sorted(((name, param, stored(name, param)) for name, param in model.named_parameters()),
                    key=lambda item: index.file_of(item[2][0]))
    for i, (name, param, pieces) in enumerate(params):
        part = param.ds_tensor
        assert not getattr(param, "ds_persist", False), f"{name} is persistent: the zero.Init config changed"
        rank = dist.get_rank(group=param.ds_process_group)
        start = min(rank * part.ds_numel, param.ds_numel)
        stop = min(start + part.ds_numel, param.ds_numel)
        with torch.no_grad():
            part[: stop - start].copy_(read_partition(index, name, tuple(param.ds_shape), start, stop, part.dtype))
            part[stop - start :].zero_()
        file = index.file_of(pieces[0])
        for other in {index.file_of(p) for p in pieces} - {file}:
            index.close(other)
        if i + 1 == len(params) or index.file_of(params[i + 1][2][0]) != file:
            index.close(file)
    for module_name, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                with torch.no_grad():
                    buf.copy_(index.load(f"{module_name}.{name}" if module_name else name, buf.dtype))


class ZeRO3Target(TargetBackend):
    """The target partitioned over all ranks with ZeRO-3; ``model`` is a transformers ``*ForCausalLM``."""

    collective = True

    def __init__(self, model, tokenizer, layer_ids: list[int], name: str, index: WeightIndex):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.layer_ids = list(layer_ids)
        self.name = name
        self.index = index
        self.device = _local_device()
        self._gather = _LayerGather(self.model)
        names = {id(p): n for n, p in model.named_parameters()}
        self._embed_name = names[id(model.get_input_embeddings().weight)]
        self._lm_head_name = names[id(model.get_output_embeddings().weight)]
        self._full: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg, device: str = "cpu") -> ZeRO3Target:
        """Check everything that can be checked on metadata, then build partitioned and load this rank's part.

        ``device`` is not used: partitions live on this rank's device of DeepSpeed's accelerator, where the
        all-gathers run (the trainer's own device on GPU, the CPU under ``DS_ACCELERATOR=cpu``).
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from dspark.targets.source import local_checkpoint_dir

        source, display = local_checkpoint_dir(cfg.name_or_path, "zero3")
        dtype = torch_dtype(cfg.dtype)
        hf_config = AutoConfig.from_pretrained(source)
        require_hostable(hf_config, "zero3", source)
        check_layer_ids(cfg.layer_ids, text_config(hf_config).num_hidden_layers, display)
        index = WeightIndex(source)  # FileNotFoundError for a missing shard, before any tensor is read
        with torch.device("meta"):
            check_checkpoint(AutoModelForCausalLM.from_config(hf_config), index)
        tokenizer = AutoTokenizer.from_pretrained(source)

        model = build_partitioned(hf_config, dtype)
        fill_partitions(model, index)
        index.close()
        return cls(model, tokenizer, cfg.layer_ids, display, index)

    # -- interface ---------------------------------------------------------------------------------------

    @property
    def config(self):
        """The decoder's config (a multimodal Gemma4's ``text_config``)."""
        return text_config(self.model.config)

    @property
    def embed_weight(self) -> torch.Tensor:
        """The full ``[V, H]`` embedding, needed whole by the drafter: read once from the checkpoint (no
        collective, so ranks need not agree on when it is asked for) and kept."""
        return self._full_tensor(self._embed_name)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The full ``[V, H]`` LM head (the embedding when tied), read once from the checkpoint like
        ``embed_weight``."""
        return self._full_tensor(self._lm_head_name)

    def _full_tensor(self, name: str) -> torch.Tensor:
        if name not in self._full:
            dtype = self.model.get_input_embeddings().weight.dtype
            self._full[name] = self.index.load(name, dtype).to(self.device)
        return self._full[name]

    def identity(self) -> TargetIdentity:
        return target_identity(self.config, self.tokenizer, self.layer_ids, self.name)

    @torch.no_grad()
    def features(self, input_ids_BT, attention_mask_BT=None) -> TargetFeatures:
        """Features of this rank's batch. Collective: every rank must call it the same number of times."""
        mask = attention_mask_BT.to(self.device) if attention_mask_BT is not None else None
        with self._gather.call(), raw_last_hidden_state(self.model):
            out = self.model.base_model(input_ids=input_ids_BT.to(self.device), attention_mask=mask,
                                        output_hidden_states=True)
        if self.device.type == "cpu":
            release_freed_host_memory()
        return TargetFeatures(layers_BTLH=select_layers(out.hidden_states, self.layer_ids),
                              final_BTH=out.last_hidden_state)

    def partition_bytes(self) -> int:
        """Bytes of parameter partitions this rank holds (padding included; buffers excluded)."""
        return sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in self.model.parameters())

    def decode_group(self) -> tuple[int, int]:
        """Every forward gathers each layer from all ranks, so the whole world decodes one set of sequences."""
        return 0, 1

    def generate_group(self) -> tuple[int, int]:
        """``generate`` keeps ranks with different prompts stepping together, so every rank takes its own."""
        from dspark import distributed

        return distributed.rank(), distributed.world_size()

    def decode_session(self) -> HFDecodeSession:
        """transformers' KV cache over the layer-gathered model. Lockstep only: each ``extend`` is a collective
        forward, so every rank calls it the same number of times (a rank with nothing to decode feeds a dummy token
        into a session of its own); a ``truncate`` that rolls back by replay (DeepSeek-V4) runs forwards too, so
        every rank truncates to the same length at the same step (as speculative decoding does)."""
        return HFDecodeSession(self, forward_context=self._gather.call)

    def generate(self, prompts, *, max_new_tokens, temperature, batch_size, seed, progress=False, indices=None):
        """Batched generation of this rank's prompts. Ranks may hold different numbers of prompts: ``synced``
        generation keeps every rank stepping until all are done, so all ranks run the same forwards."""
        after = release_freed_host_memory if self.device.type == "cpu" else None
        return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        batch_size=batch_size, seed=seed, progress=progress, indices=indices, device=self.device,
                        synced=True, forward_context=self._gather.call, after_batch=after)


def build_partitioned(hf_config, dtype: torch.dtype) -> nn.Module:
    """The HF model constructed under ``zero.Init``: every parameter is partitioned over all ranks as soon as
    its module exists, so a rank holds at most one module whole (during construction) and 1/N afterwards."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import DeepSpeedTensorOverride
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from dspark.distributed import init_distributed

    init_distributed()
    device = _local_device()
    # Tensor dtypes are left to transformers (``tensor_overrides`` without dtype): zero.Init would otherwise
    # cast every floating tensor to one dtype, the fp32 RoPE frequencies and the fp32-kept MoE router included,
    # and features would drift from the hf backend's in bf16. Persistence (small parameters kept whole on every
    # rank) is off, so every parameter is partitioned the way fill_partitions expects.
    ds_config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_model_persistence_threshold": 0},
    }
    # Random init is skipped (every value is loaded next, and HF's init would index the already-partitioned
    # tensors); that also skips the weight tying HF's init does, so tie explicitly.
    remote = "cpu" if device.type == "cpu" else None
    device_only = [DeepSpeedTensorOverride.device]
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=remote,
                                                tensor_overrides=device_only):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.tie_weights()
    gc.collect()  # a tied LM head's own (replaced) partition sits in a reference cycle until collected
    return model
