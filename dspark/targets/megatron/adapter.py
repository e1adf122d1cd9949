"""HF checkpoint -> tensor-parallel shards for the llama/qwen3 decoder in ``model.py``.

A rank reads only the rows or columns it owns (``WeightIndex.load_slice``), so no rank ever holds a whole
projection, let alone the whole model. Split rules (``p`` ranks, rank ``r`` owns part ``r`` of ``p`` equal parts):
q/k/v and gate/up rows (output features: whole heads / MLP columns), o_proj and down_proj columns (input
features), embedding and LM head vocabulary rows (padded to a multiple of ``p``, pad rows zero). Norms and
row-parallel biases are replicated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dspark.targets.megatron.model import DecoderSpec
from dspark.targets.weights import expert_parts

# our parameter name after "layers.{i}." -> split dim of the HF tensor (None = replicated); names are HF's minus
# "model.". Experts split along dim 0 (which experts a rank holds), everything else by heads or MLP columns.
_SPLIT_DIM = {
    "self_attn.q_proj.weight": 0, "self_attn.q_proj.bias": 0,
    "self_attn.k_proj.weight": 0, "self_attn.k_proj.bias": 0,
    "self_attn.v_proj.weight": 0, "self_attn.v_proj.bias": 0,
    "self_attn.o_proj.weight": 1, "self_attn.o_proj.bias": None,
    "self_attn.q_norm.weight": None, "self_attn.k_norm.weight": None,
    "self_attn.q_a_proj.weight": None, "self_attn.q_a_proj.bias": None, "self_attn.q_a_layernorm.weight": None,
    "self_attn.q_b_proj.weight": 0, "self_attn.kv_b_proj.weight": 0, "self_attn.kv_a_layernorm.weight": None,
    "self_attn.kv_a_proj_with_mqa.weight": None, "self_attn.kv_a_proj_with_mqa.bias": None,
    "mlp.gate_proj.weight": 0, "mlp.gate_proj.bias": 0,
    "mlp.up_proj.weight": 0, "mlp.up_proj.bias": 0,
    "mlp.down_proj.weight": 1, "mlp.down_proj.bias": None,
    "mlp.shared_experts.gate_proj.weight": 0, "mlp.shared_experts.up_proj.weight": 0,
    "mlp.shared_experts.down_proj.weight": 1,
    "mlp.gate.weight": None, "mlp.gate.e_score_correction_bias": None,
    "mlp.experts.gate_up_proj": 0, "mlp.experts.down_proj": 0,
    "input_layernorm.weight": None, "post_attention_layernorm.weight": None,
}
_VOCAB = {"embed_tokens.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}


@dataclass(frozen=True)
class ShardRead:
    """Read ``hf_name`` (full shape ``hf_shape``) rows/cols ``[start, stop)`` along ``dim`` (None = whole)."""

    hf_name: str
    hf_shape: tuple[int, ...]
    dim: int | None
    start: int = 0
    stop: int = 0


def check_divisible(spec: DecoderSpec, tp_size: int) -> None:
    """Refuse a TP size that cannot split whole heads / MLP columns / experts, before anything is built or read."""
    counts = [("num_attention_heads", spec.num_heads), ("num_key_value_heads", spec.num_kv_heads),
              ("intermediate_size", spec.intermediate_size)]
    if spec.moe is not None:
        counts += [("n_routed_experts", spec.moe.num_experts),
                   ("moe_intermediate_size * n_shared_experts",
                    spec.moe.moe_intermediate_size * spec.moe.num_shared_experts)]
    for what, n in counts:
        if n % tp_size:
            raise ValueError(f"target.tensor_parallel={tp_size} does not divide {spec.family} {what}={n}")


def shard_plan(spec: DecoderSpec, model: nn.Module, tp_rank: int, tp_size: int) -> dict[str, ShardRead]:
    """Our parameter name -> what to read from the checkpoint, for rank ``tp_rank`` of ``tp_size``.

    Works on the meta-device model: full HF shapes are the local shapes times ``tp_size`` along the split dim
    (the vocabulary excepted: megatron pads it, the checkpoint holds ``vocab_size`` rows).
    """
    plan = {}
    for name, param in model.named_parameters():  # a tied LM head is reported once, as embed_tokens
        if name in _VOCAB:
            rows = param.shape[0]  # padded vocab / tp
            start, stop = (min(x, spec.vocab_size) for x in (tp_rank * rows, (tp_rank + 1) * rows))
            plan[name] = ShardRead(_VOCAB[name], (spec.vocab_size, param.shape[1]), 0, start, stop)
            continue
        suffix = name.split(".", 2)[2] if name.startswith("layers.") else None
        if suffix is not None and suffix not in _SPLIT_DIM:
            raise AssertionError(f"parameter {name} has no split rule")  # model and adapter disagree
        dim = _SPLIT_DIM.get(suffix) if suffix else None
        shape = list(param.shape)
        if dim is None:
            plan[name] = ShardRead(f"model.{name}", tuple(shape), None)
        else:
            part = shape[dim]
            shape[dim] *= tp_size
            plan[name] = ShardRead(f"model.{name}", tuple(shape), dim, tp_rank * part, (tp_rank + 1) * part)
    return plan


def expected_checkpoint(plan: dict[str, ShardRead], spec: DecoderSpec, index) -> dict[str, tuple[int, ...]]:
    """Names and full shapes the checkpoint must hold (for ``WeightIndex.check_against``)."""
    expected = {}
    for read in plan.values():
        expected.update(expert_parts(index, read.hf_name, read.hf_shape) or {read.hf_name: read.hf_shape})
    if spec.tie_word_embeddings and "lm_head.weight" in index:  # some tied checkpoints also store the head
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    return expected


@torch.no_grad()
def load_shards(model: nn.Module, plan: dict[str, ShardRead], index, dtype: torch.dtype) -> None:
    """Fill the (materialised, uninitialised) parameters of ``model`` from ``index`` following ``plan``."""
    params = dict(model.named_parameters())
    previous_group = None
    for name, read in plan.items():
        # Pages of the memory-mapped shards that a read touched count towards RSS while mapped (a column slice
        # touches the whole tensor): unmap after each layer so the peak stays one layer above the local shards.
        group = name.split(".", 2)[:2] if name.startswith("layers.") else name
        if group != previous_group:
            index.close()
            previous_group = group
        param = params[name]
        if read.dim is None:
            param.copy_(index.load(read.hf_name, dtype))
            continue
        per_expert = expert_parts(index, read.hf_name, read.hf_shape)
        if per_expert is not None:  # stack this rank's experts; gate rows before up rows, as HF fuses them
            prefix, fused = read.hf_name.rsplit(".", 1)
            projs = ("down_proj",) if fused == "down_proj" else ("gate_proj", "up_proj")
            param.copy_(torch.stack([torch.cat([index.load(f"{prefix}.{e}.{proj}.weight", dtype) for proj in projs])
                                     for e in range(read.start, read.stop)]))
            continue
        part = index.load_slice(read.hf_name, read.dim, read.start, read.stop, dtype)
        rows = read.stop - read.start
        if rows == param.shape[read.dim]:
            param.copy_(part)
        else:  # the vocabulary pad rows of the last rank(s)
            param.zero_()
            param.narrow(read.dim, 0, rows).copy_(part)
    index.close()
