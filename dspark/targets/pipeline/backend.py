"""The ``pipeline`` backend: the target's decoder layers partitioned over pipeline stages.

Legend: B batch, T tokens, L feature layers, H hidden size, P pipeline stages, C mHC streams (DeepSeek-V4's
``hc_mult``), X one token's state between layers: ``[H]``, or ``[C, H]`` for V4 (``token_shape``).

Partition and build. DeepSpeed's ``PipelineModule`` owns the layout: one ``LayerSpec`` for the embedding, one per
decoder layer, one for the final norm, partitioned with ``partition_method="type:TargetDecoderLayer"`` so the
decoder layers are balanced exactly (the embedding lands on stage 0, the final norm on the last stage) and no
spec is built to count its parameters (``"parameters"`` would build every layer on every rank). A spec is built
only on the stage that owns it; building constructs the HF layer on the meta device, then reads only that
layer's tensors from the safetensors index, so no rank ever materialises the whole model. The HF decoder layer
classes are reused as they are; each stage computes the rotary embeddings and the causal mask locally.

Running the forward. Not ``PipelineEngine.eval_batch``: it needs a training engine and batch-size config, fixed
micro-batch counts, returns outputs on the last stage only (feature layers of earlier stages would have to ride
along the activation tuple through every later stage), and a failed inference-only call leaves the other rank
hanging (ENV.md). Instead ``features`` is a collective over each pipeline: every member's batch is one
micro-batch; stage s runs its layers on micro-batch m as soon as it receives m's activation from stage s-1 and
sends its output on with a non-blocking send (so stage s-1 is already on micro-batch m+1). Feature layers are read
on the stage that holds them and sent straight to the rank that owns the batch: **every rank gets the features
of its own batch**, like ``zero3``. Plain torch.distributed send/recv with a tag per message kind (tested on
gloo; nccl takes the same calls). A world larger than ``pipeline_stages`` holds world/P replicas of the pipeline
(DeepSpeed's pipe x data topology), each running the batches of its own members.

Memory. Stage 0 holds the embedding and its share of decoder layers, the last stage its share plus the final
norm; the LM head is not part of the pipeline (features stop at the final norm). ``embed_weight`` and
``lm_head_weight`` (needed on every training rank by the drafter) are read from the checkpoint on first use by
ranks that do not hold them; the last stage reads the LM head on its first decoding step.

DeepSeek-V4. Its decoder layers carry ``hc_mult`` residual streams: stage 0 expands the embedding into them, the
stages pass ``[B, T, C, H]`` on, feature layers travel as ``[B, T, L, C, H]`` (layer -1 being the expanded
embedding) and are handed over as the mean over the streams, as every backend gives them, and the last stage
collapses the streams (``hc_head``) before the final norm. Every V4 layer needs the token ids (hash-routed MoE
layers look their experts up by id), the "main" and "compress" rotary tables and the sliding-window mask: every
stage has the ids (broadcast in ``features``, passed along with the hidden state in ``generate``) and computes
the rest locally. The compressors inside each layer hold
their own rotary tables (non-persistent buffers, not in checkpoints): recomputed when the layer is loaded.

Decoding (``decode_session``, ``generate``): ``decode.py``, every member of one pipeline replica in lockstep.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch

from dspark.targets.base import TargetBackend, TargetFeatures, TargetIdentity, text_config
from dspark.targets.common import check_checkpoint, check_layer_ids, collapse_streams, target_identity, torch_dtype
from dspark.targets.families import require_hostable
from dspark.targets.pipeline.stages import (
    LAYER_TYPED,
    TAG_FEATURES,
    TAG_FINAL,
    TAG_HIDDEN,
    TargetDecoderLayer,
    TargetEmbedding,
    TargetFinalNorm,
    family_classes,
)
from dspark.targets.weights import WeightIndex

V4_ROPE_TYPES = ("main", "compress")  # V4's rotary tables: sliding layers use "main", compressed ones "compress"


def decoder_prefix(config) -> str:
    """Where the decoder's tensors live: ``model.`` (a causal LM), ``model.language_model.`` (a multimodal Gemma4)."""
    return "model." if text_config(config) is config else "model.language_model."


class PipelineTarget(TargetBackend):
    """The target's layers partitioned over ``num_stages`` pipeline stages (see the module docstring).

    Collective: every rank of the job constructs it, and every rank of a pipeline calls ``features`` together
    (each with its own batch; shapes may differ).
    """

    collective = True

    def __init__(self, model_dir: str | Path, layer_ids: list[int], *, num_stages: int = 0,
                 dtype: torch.dtype = torch.float32, name: str | None = None, tokenizer=None):
        from transformers import AutoConfig

        self.model_dir = Path(model_dir)
        self.name = name or self.model_dir.name
        self.layer_ids = list(layer_ids)
        self.tokenizer = tokenizer
        self.dtype = dtype
        config = AutoConfig.from_pretrained(self.model_dir)
        require_hostable(config, "pipeline", str(self.model_dir))  # before anything is loaded
        if config._attn_implementation is None:  # what HF's from_pretrained picks: the hf backend's numerics
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

            sdpa = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]._supports_sdpa  # V4 is eager-only (attention sinks)
            config._attn_implementation = "sdpa" if sdpa else "eager"
        # A multimodal Gemma4 nests its decoder's config (``text_config``) and weights (``model.language_model.``).
        self.prefix = decoder_prefix(config)
        self._model_config = config
        config = text_config(config)
        config._attn_implementation = self._model_config._attn_implementation
        self._config = config
        num_layers = config.num_hidden_layers
        check_layer_ids(self.layer_ids, num_layers, self.name)
        initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if initialized else int(os.environ.get("WORLD_SIZE", "1"))
        stages = num_stages or world
        if stages < 1:
            raise ValueError(f"target.pipeline_stages must be >= 1 (or 0 = the world size), got {num_stages}")
        if stages > num_layers:
            raise ValueError(f"target.pipeline_stages={stages} is more than the {num_layers} decoder layers of "
                             f"{self.name}: every stage needs at least one layer")
        if world % stages:
            raise ValueError(f"target.pipeline_stages={stages} must divide the world size {world}")
        self.weights = WeightIndex(self.model_dir)  # FileNotFoundError for a missing shard, headers only
        from transformers import AutoModelForCausalLM

        # The whole model on the meta device (free): its names and shapes are checked against the checkpoint's
        # headers before any stage loads, and its module classes are the ones each stage builds.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self._model_config)
        check_checkpoint(model, self.weights)
        self.classes = family_classes(model)
        del model
        self.streams = self.classes.stream_head is not None
        # Per-token state passed between stages and sent as a feature layer: [H], or [C, H] with mHC streams.
        self.token_shape = (config.hc_mult, config.hidden_size) if self.streams else (config.hidden_size,)
        self._build(stages)
        self._resident: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg, device: str = "cpu") -> PipelineTarget:
        """``device`` is not used: DeepSpeed's accelerator places each stage (``cuda:LOCAL_RANK`` or cpu)."""
        from dspark.targets.source import local_checkpoint_dir

        source, display = local_checkpoint_dir(cfg.name_or_path, "pipeline")
        dtype = torch_dtype(cfg.dtype)
        tokenizer = None
        if (Path(source) / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source)
        return cls(source, cfg.layer_ids, num_stages=cfg.pipeline_stages, dtype=dtype, name=display,
                   tokenizer=tokenizer)

    def _build(self, num_stages: int) -> None:
        from deepspeed.pipe import LayerSpec, PipelineModule

        from dspark.distributed import init_distributed

        init_distributed()
        os.environ.setdefault("LOCAL_RANK", "0")  # PipelineModule reads it; launchers set it
        config, classes, weights, dtype, prefix = self._config, self.classes, self.weights, self.dtype, self.prefix
        specs = [LayerSpec(TargetEmbedding, config, classes, weights, dtype, prefix)]
        specs += [LayerSpec(TargetDecoderLayer, config, classes, i, weights, dtype, prefix)
                  for i in range(config.num_hidden_layers)]
        specs.append(LayerSpec(TargetFinalNorm, config, classes, weights, dtype, prefix))
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints the partition table on rank 0
            self.module = PipelineModule(specs, num_stages=num_stages, partition_method="type:TargetDecoderLayer")
        self.module.eval()
        grid = self.module._grid
        self.stage = grid.get_stage_id()
        self.num_stages = num_stages
        self.pipe_ranks: list[int] = list(grid.pp_group)  # global rank of each stage of this rank's pipeline
        self.pipe_group = grid.get_pipe_parallel_group()
        self.replica, self.num_replicas = grid.get_data_parallel_id(), grid.data_parallel_size
        assert self.pipe_ranks[self.stage] == torch.distributed.get_rank()
        self.device = next(self.module.parameters()).device
        self.rotary = classes.rotary(config=config).to(self.device)  # every stage computes its own cos/sin
        # Which requested ids each stage produces (-1 on stage 0), from the partition every rank knows.
        parts = [int(p) for p in self.module.parts]  # spec index bounds; spec 1 + i is decoder layer i
        self.stage_layer_ids = []
        for s in range(num_stages):
            held = {i - 1 for i in range(parts[s], parts[s + 1]) if 1 <= i <= config.num_hidden_layers}
            held |= {-1} if s == 0 else set()
            self.stage_layer_ids.append([i for i in self.layer_ids if i in held])

    # -- interface ---------------------------------------------------------------------------------------

    @property
    def config(self):
        return self._config

    def _weight(self, name: str) -> torch.Tensor:
        if name not in self._resident:
            self._resident[name] = self.weights.load(name, self.dtype).to(self.device)
        return self._resident[name]

    @property
    def embed_weight(self) -> torch.Tensor:
        if self.stage == 0:
            return self.module.forward_funcs[0].embed_tokens.weight
        return self._weight(self.prefix + "embed_tokens.weight")  # read on first use by the other stages

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if self._config.tie_word_embeddings:
            return self.embed_weight
        return self._weight("lm_head.weight")  # not in the pipeline: features stop at the final norm

    def parameter_bytes(self) -> int:
        """Bytes of the parameters this stage holds (the lazily read embedding / LM head copies excluded)."""
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    def identity(self) -> TargetIdentity:
        return target_identity(self._config, self.tokenizer, self.layer_ids, self.name)

    def decode_group(self) -> tuple[int, int]:
        """One pipeline replica decodes together; the replicas (world / stages of them) take different prompts."""
        return self.replica, self.num_replicas

    def decode_session(self):
        """A KV-cached decoder of one sequence; every member of this rank's pipeline extends it in lockstep."""
        from dspark.targets.pipeline.decode import PipelineDecodeSession

        return PipelineDecodeSession(self)

    def generate(self, prompts, *, max_new_tokens, temperature, batch_size, seed, progress=False, indices=None):
        """Left-padded batched generation; every member of this rank's pipeline passes the same prompts."""
        from dspark.targets.pipeline.decode import generate

        return generate(self, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        batch_size=batch_size, seed=seed, progress=progress, indices=indices)

    # -- features ----------------------------------------------------------------------------------------

    def _exchange_batches(self, input_ids_BT, attention_mask_BT) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Every pipeline member's (ids, mask): its shape first (all-gather), then the ids+mask (broadcast)."""
        import torch.distributed as dist

        B, T = input_ids_BT.shape
        meta = torch.tensor([B, T, attention_mask_BT is not None], dtype=torch.long, device=self.device)
        metas = [torch.empty_like(meta) for _ in self.pipe_ranks]
        dist.all_gather(metas, meta, group=self.pipe_group)
        batches = []
        for src, (b, t, has_mask) in zip(self.pipe_ranks, (m.tolist() for m in metas)):
            if src == dist.get_rank():
                mask = attention_mask_BT if has_mask else torch.ones_like(input_ids_BT)
                buf = torch.stack([input_ids_BT.long(), mask.long()]).to(self.device)
            else:
                buf = torch.empty(2, b, t, dtype=torch.long, device=self.device)
            dist.broadcast(buf, src=src, group=self.pipe_group)
            batches.append((buf[0], buf[1] if has_mask else None))
        return batches

    def _layer_inputs(self, ids_BT, mask_BT, hidden_BTX, position_ids_BT, cache, first_layer: int) -> dict:
        """What the family's model forward passes each decoder layer besides the hidden state: the same mask,
        positions and rotary tables, computed on this stage (plus V4's token ids and its two rotary tables)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        position_ids = position_ids_BT
        if position_ids is None:
            position_ids = torch.arange(hidden_BTX.shape[1], device=self.device).unsqueeze(0)
        # The mask and rotary read only batch, length, dtype and device of ``like_BTH`` (one stream under mHC).
        like_BTH = hidden_BTX[:, :, 0] if self.streams else hidden_BTX
        # The cache is sized from this stage's first layer: the earlier layers' entries are empty here.
        if self._config.model_type in LAYER_TYPED:
            return self._typed_layer_inputs(mask_BT, like_BTH, position_ids, cache, first_layer)
        make_mask = create_sliding_window_causal_mask if self.streams else create_causal_mask
        causal = make_mask(config=self._config, inputs_embeds=like_BTH, attention_mask=mask_BT, cache=cache,
                           position_ids=position_ids, layer_idx=first_layer if cache is not None else None)
        if not self.streams:
            return {"attention_mask": causal, "position_embeddings": self.rotary(like_BTH, position_ids=position_ids),
                    "position_ids": position_ids, "cache": cache, "use_cache": cache is not None}
        assert ids_BT is not None, "V4 layers route by token id: every stage needs the ids"
        tables = {kind: self.rotary(like_BTH, position_ids=position_ids, layer_type=kind) for kind in V4_ROPE_TYPES}
        return {"attention_mask": causal, "position_embeddings": tables, "position_ids": position_ids,
                "input_ids": ids_BT, "cache": cache}

    def _typed_layer_inputs(self, mask_BT, like_BTH, position_ids, cache, first_layer: int) -> dict:
        """Gemma4's layer inputs: a mask and a rotary table per layer type (``TargetDecoderLayer`` picks its own),
        and a fresh dict in which the last layer of each type leaves its K/V (as the model forward passes)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        config, masks, tables = self._config, {}, {}
        for kind in set(config.layer_types):
            # The cache is sized from this stage's first layer of that type (earlier layers' entries are empty).
            own = [i for i in range(first_layer, config.num_hidden_layers) if config.layer_types[i] == kind]
            make_mask = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            masks[kind] = make_mask(config=config, inputs_embeds=like_BTH, attention_mask=mask_BT, cache=cache,
                                    position_ids=position_ids,
                                    layer_idx=(own[0] if own else first_layer) if cache is not None else None)
            tables[kind] = self.rotary(like_BTH, position_ids, kind)
        return {"attention_mask": masks, "position_embeddings": tables, "position_ids": position_ids,
                "cache": cache, "shared_kv_states": {}}

    def _run_stage(self, ids_BT, mask_BT, hidden_BTX, position_ids_BT=None, cache=None):
        """This stage's layers on one micro-batch: (output hidden, requested features [B,T,L_s,X] or None).

        Without ``cache``: a whole right-padded batch at positions 0..T-1 (``features``). With ``cache`` (decoding):
        new tokens at ``position_ids_BT`` after the cached prefix; ``mask_BT`` then covers prefix + new tokens
        (None = no padding), as in HF's model forward. ``ids_BT`` are read by stage 0, and by every V4 stage.
        """
        wanted = set(self.stage_layer_ids[self.stage])
        found: dict[int, torch.Tensor] = {}
        layer_inputs = None
        for fn in self.module.forward_funcs:
            if isinstance(fn, TargetEmbedding):
                hidden_BTX = fn(ids_BT)
                if -1 in wanted:
                    found[-1] = hidden_BTX
            elif isinstance(fn, TargetDecoderLayer):
                if layer_inputs is None:
                    layer_inputs = self._layer_inputs(ids_BT, mask_BT, hidden_BTX, position_ids_BT, cache, fn.layer_id)
                hidden_BTX = fn(hidden_BTX, layer_inputs)
                if fn.layer_id in wanted:
                    found[fn.layer_id] = hidden_BTX
            else:
                hidden_BTX = fn(hidden_BTX)
        ids = self.stage_layer_ids[self.stage]
        return hidden_BTX, (torch.stack([found[i] for i in ids], dim=2).contiguous() if ids else None)

    @torch.no_grad()
    def features(self, input_ids_BT, attention_mask_BT=None) -> TargetFeatures:
        """Collective over this rank's pipeline; returns the features of this rank's own (right-padded) batch."""
        import torch.distributed as dist

        me, ranks, H, token = dist.get_rank(), self.pipe_ranks, self._config.hidden_size, self.token_shape
        last = self.num_stages - 1
        batches = self._exchange_batches(input_ids_BT, attention_mask_BT)
        pending = []  # (work, tensor): a non-blocking send and the tensor it must keep alive
        mine: dict[int, torch.Tensor] = {}  # tag -> what this rank computed for its own batch
        for owner, (ids_BT, mask_BT) in zip(ranks, batches):
            B, T = ids_BT.shape
            hidden_BTX = None
            if self.stage > 0:
                hidden_BTX = torch.empty(B, T, *token, dtype=self.dtype, device=self.device)
                dist.recv(hidden_BTX, src=ranks[self.stage - 1], tag=TAG_HIDDEN)
            hidden_BTX, feats_BTLH = self._run_stage(ids_BT, mask_BT, hidden_BTX)
            hidden_BTX = hidden_BTX.contiguous()  # [B, T, X]; [B, T, H] after the last stage's final norm
            outgoing = [(ranks[self.stage + 1], hidden_BTX, TAG_HIDDEN)] if self.stage < last else []
            if feats_BTLH is not None:
                outgoing.append((owner, feats_BTLH, TAG_FEATURES))
            if self.stage == last:
                outgoing.append((owner, hidden_BTX, TAG_FINAL))
            for dst, tensor, tag in outgoing:
                if dst == me:
                    mine[tag] = tensor
                else:
                    pending.append((dist.isend(tensor, dst=dst, tag=tag), tensor))

        # Collect this rank's own batch: each stage's feature layers, then the final hidden state.
        B, T = input_ids_BT.shape
        by_id: dict[int, torch.Tensor] = {}
        for s, ids in enumerate(self.stage_layer_ids):
            if not ids:
                continue
            if s == self.stage:
                part_BTLH = mine[TAG_FEATURES]
            else:
                part_BTLH = torch.empty(B, T, len(ids), *token, dtype=self.dtype, device=self.device)
                dist.recv(part_BTLH, src=ranks[s], tag=TAG_FEATURES)
            by_id.update(zip(ids, part_BTLH.unbind(2)))
        if self.stage == last:
            final_BTH = mine[TAG_FINAL]
        else:
            final_BTH = torch.empty(B, T, H, dtype=self.dtype, device=self.device)
            dist.recv(final_BTH, src=ranks[last], tag=TAG_FINAL)
        for work, _ in pending:
            work.wait()
        layers_BTLH = collapse_streams(torch.stack([by_id[i] for i in self.layer_ids], dim=2), 4)  # V4: mean of C
        return TargetFeatures(layers_BTLH=layers_BTLH, final_BTH=final_BTH)
