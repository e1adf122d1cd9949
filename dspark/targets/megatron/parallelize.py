"""Tensor parallelism applied from outside to transformers' own model (gpt-fast's ``tp.py``, torchtitan's
``parallelize.py``): the model is built on the meta device, then its projections are swapped for megatron-core's
parallel layers, head counts are made local and the routed experts split over the ranks. The modules' own forwards
run unchanged on each rank's share.

A family is one ``TP_PLANS`` entry. ``split`` patterns name modules or parameters inside a decoder layer (relative
to ``model.layers.<i>.``); the kind says what happens to them:
- ``column``: ``nn.Linear`` -> ``ColumnLinear``, output features split (whole heads, MLP columns);
- ``row``: ``nn.Linear`` -> ``RowLinear``, input features split, the partial products all-reduced;
- ``kv_heads``: a K or V projection split by whole KV heads like ``column`` when the TP size divides its head
  count; otherwise (fewer KV heads than ranks, Gemma4's global layers) each rank keeps, as a plain ``nn.Linear``,
  the one KV head its query heads read, and the attention's ``num_key_value_groups`` shrinks to match;
- ``heads``: a parameter split along dim 0 in its own module (per-head attention sinks, per-group projections);
- ``experts``: fused routed experts split over the ranks by expert. Tokens routed to another rank's experts are
  skipped (transformers' own "not on this rank" expert id) and the partial outputs summed over the group; the
  router stays replicated, so every rank routes identically (its input is replicated).
``local`` divides attributes that count heads or groups by the TP size (a dotted name copies the shared object
first: V4's attention reads ``config.o_groups``). ``divisible`` names the config fields that must split whole,
``kv_heads`` the KV head counts (per layer where the config varies them) that must split whole or divide the
TP size. A multimodal checkpoint (Gemma4) reads those fields from its text config; its decoder layers live under
``model.language_model.layers``.
Every other parameter (norms, routers, low-rank down projections, mHC mixers) is replicated; the embedding and the
LM head are split by vocabulary in every family (a scaled embedding, Gemma4's sqrt(H), keeps its scale).
"""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from dspark.targets.base import text_config
from dspark.targets.megatron import parallel

COLUMN, ROW, HEADS, EXPERTS, KV_HEADS = "column", "row", "heads", "experts", "kv_heads"


@dataclass(frozen=True)
class TPPlan:
    split: dict[str, str]
    local: dict[str, tuple[str, ...]] = field(default_factory=dict)
    divisible: tuple[str, ...] = ()
    kv_heads: tuple[str, ...] = ()


_ATTENTION = {r"self_attn\.(q|k|v)_proj": COLUMN, r"self_attn\.o_proj": ROW}
_MLP = {r"mlp\.(gate|up)_proj": COLUMN, r"mlp\.down_proj": ROW}
_MOE = {r"mlp\.shared_experts\.(gate|up)_proj": COLUMN, r"mlp\.shared_experts\.down_proj": ROW,
        r"mlp\.experts": EXPERTS}
_GQA = ("num_attention_heads", "num_key_value_heads")

TP_PLANS = {
    "llama": TPPlan({**_ATTENTION, **_MLP}, divisible=_GQA),
    "qwen3": TPPlan({**_ATTENTION, **_MLP}, divisible=_GQA),
    "qwen3_moe": TPPlan({**_ATTENTION, **_MLP, **_MOE}, divisible=_GQA),
    "glm4_moe": TPPlan({**_ATTENTION, **_MLP, **_MOE}, divisible=_GQA),  # q/k/v biases split with their rows
    # MLA: the low-rank down projections and their norms are replicated, the per-head up projections split.
    "deepseek_v3": TPPlan({r"self_attn\.(q|q_b|kv_b)_proj": COLUMN, r"self_attn\.o_proj": ROW, **_MLP, **_MOE},
                          divisible=("num_attention_heads",)),
    # One shared KV head (replicated, as are the compressors and the indexer); query heads, their sinks and the
    # grouped output projection's groups split together (group g holds heads g*n/G .. (g+1)*n/G - 1).
    "deepseek_v4": TPPlan({r"self_attn\.q_b_proj": COLUMN, r"self_attn\.sinks": HEADS,
                           r"self_attn\.o_a_proj\.weight": HEADS, r"self_attn\.o_b_proj": ROW, **_MOE},
                          local={r"self_attn": ("num_heads", "num_key_value_groups", "config.o_groups"),
                                 r"self_attn\.o_a_proj": ("n_groups",)},
                          divisible=("num_attention_heads", "o_groups")),
    # Sliding and global layers differ in head dim and KV head count (a global layer may hold fewer KV heads than
    # ranks: replicated; with attention_k_eq_v it has no v_proj). q/k/v norms act per head: replicated.
    **{model_type: TPPlan({r"self_attn\.q_proj": COLUMN, r"self_attn\.(k|v)_proj": KV_HEADS, r"self_attn\.o_proj": ROW,
                          **_MLP}, divisible=("num_attention_heads",),
                         kv_heads=("num_key_value_heads",))
       for model_type in ("gemma4", "gemma4_text", "gemma4_unified")},
}
_IN_LAYER = re.compile(r"model\.(?:language_model\.)?layers\.\d+\.(.+)")


def check_divisible(config, size: int) -> None:
    """Refuse a TP size that cannot split whole heads (or groups), before anything is built or read."""
    plan = TP_PLANS[config.model_type]
    config = text_config(config)  # a multimodal Gemma4 keeps its decoder's fields in text_config
    for name in plan.divisible:
        n = getattr(config, name)
        if n % size:
            raise ValueError(f"target.tensor_parallel={size} does not divide {config.model_type} {name}={n}")
    layer_configs = getattr(config, "per_layer_config", None) or [config]  # Gemma4: per layer type
    for name in plan.kv_heads:
        for n in sorted({getattr(layer, name) for layer in layer_configs}):
            if n % size and size % n:
                raise ValueError(f"target.tensor_parallel={size} neither divides nor is a multiple of "
                                 f"{config.model_type} {name}={n} (KV heads split whole or are replicated)")


def _part(n: int, rank: int, size: int, what: str) -> tuple[int, int]:
    if n % size:
        raise ValueError(f"target.tensor_parallel={size} does not divide {what} ({n})")
    return rank * n // size, (rank + 1) * n // size


def _match(rules: dict[str, str], name: str) -> str | None:
    return next((kind for pattern, kind in rules.items() if re.fullmatch(pattern, name)), None)


def _shrink(module: nn.Module, leaf: str, start: int, stop: int) -> None:
    """Replace parameter ``leaf`` (on the meta device) by its rows ``[start, stop)``: the local shape."""
    param = getattr(module, leaf)
    module._parameters[leaf] = nn.Parameter(param[start:stop], requires_grad=False)


def parallelize(model: nn.Module, rank: int, size: int) -> dict[str, tuple[int, int, int]]:
    """Apply the family's ``TP_PLANS`` entry to ``model`` (a meta-device ``*ForCausalLM``), in place.

    Returns how each split parameter maps onto the full one: name -> ``(dim, start, stop)``; parameters not listed
    are replicated. Names stay transformers' (= the checkpoint's), so the loader reads a parameter under its own name.
    """
    plan = TP_PLANS[model.config.model_type]
    splits: dict[str, tuple[int, int, int]] = {}
    regrouped: set[int] = set()
    for name, module in list(model.named_modules()):
        inner = _IN_LAYER.fullmatch(name)
        if inner is None:
            continue
        kind = _match(plan.split, inner.group(1))
        if kind == KV_HEADS:
            kind = _split_kv_heads(model, name, module, rank, size, splits, regrouped)
        if kind in (COLUMN, ROW):
            _swap_linear(model, name, module, kind, rank, size, splits)
        elif kind == EXPERTS:
            start, stop = _part(module.num_experts, rank, size, f"{name} experts")
            _split_experts(module, start, stop)
            for leaf, _ in list(module.named_parameters(recurse=False)):
                _shrink(module, leaf, start, stop)
                splits[f"{name}.{leaf}"] = (0, start, stop)
        for leaf, param in list(module.named_parameters(recurse=False)):
            if _match(plan.split, f"{inner.group(1)}.{leaf}") == HEADS:
                start, stop = _part(param.shape[0], rank, size, f"{name}.{leaf} rows")
                _shrink(module, leaf, start, stop)
                splits[f"{name}.{leaf}"] = (0, start, stop)
        for pattern, attrs in plan.local.items():
            if re.fullmatch(pattern, inner.group(1)):
                for attr in attrs:
                    _divide(module, attr, size)
    _split_vocabulary(model, rank, size, splits)
    return splits


def _swap_linear(model: nn.Module, name: str, module: nn.Module, kind: str, rank: int, size: int,
                 splits: dict) -> None:
    if not isinstance(module, nn.Linear):
        raise AssertionError(f"{name} is {type(module).__name__}, the TP plan expects an nn.Linear")
    swap = parallel.ColumnLinear if kind == COLUMN else parallel.RowLinear
    dim = 0 if kind == COLUMN else 1
    start, stop = _part(module.weight.shape[dim], rank, size, f"{name} features")
    with torch.device("meta"):
        model.set_submodule(name, swap(module.in_features, module.out_features, module.bias is not None,
                                       module.weight.dtype))
    splits[f"{name}.weight"] = (dim, start, stop)
    if module.bias is not None and kind == COLUMN:  # a row layer adds its whole bias after the reduce
        splits[f"{name}.bias"] = (0, start, stop)


def _split_kv_heads(model: nn.Module, name: str, module: nn.Module, rank: int, size: int, splits: dict,
                    regrouped: set[int]) -> str | None:
    """A K/V projection: ``column`` when the ranks split its heads whole (returned, for the caller to swap).
    Otherwise rank r's query heads (whole, contiguous) all read KV head ``r * heads // size``: that head's rows
    stay here in the plain linear (its output is local, as a column layer's), and the attention repeats it over
    its local query heads only (``num_key_value_groups``, adjusted once per attention)."""
    attention = model.get_submodule(name.rsplit(".", 1)[0])
    heads = module.out_features // attention.head_dim
    if heads % size == 0:
        return COLUMN
    if size % heads:
        raise ValueError(f"target.tensor_parallel={size} neither divides nor is a multiple of {name}'s {heads} "
                         f"KV heads")
    head = rank * heads // size
    start, stop = head * attention.head_dim, (head + 1) * attention.head_dim
    for leaf in ("weight", "bias"):
        if getattr(module, leaf) is not None:
            _shrink(module, leaf, start, stop)
            splits[f"{name}.{leaf}"] = (0, start, stop)
    module.out_features = stop - start
    if id(attention) not in regrouped:  # K and V (when both exist) share the attention's grouping
        regrouped.add(id(attention))
        attention.num_key_value_groups = attention.num_key_value_groups * heads // size
    return None


def _divide(module: nn.Module, attr: str, size: int) -> None:
    *path, leaf = attr.split(".")
    owner = module
    for step in path:  # a shared object (the model config): this module gets its own copy
        child = copy.copy(getattr(owner, step))
        setattr(owner, step, child)
        owner = child
    setattr(owner, leaf, getattr(owner, leaf) // size)


def _split_experts(experts: nn.Module, start: int, stop: int) -> None:
    """Experts ``[start, stop)`` live here. The router's global expert ids become local ones; an expert held by
    another rank becomes id ``stop - start``, which transformers' experts implementations skip (its expert-parallel
    sentinel), with its weight zeroed. The partial sums are all-reduced after the forward."""
    num_local = stop - start
    experts.num_experts = num_local
    experts._is_expert_parallel = True  # the batched implementations clamp the sentinel instead of indexing with it
    signature = inspect.signature(experts.forward)

    def route_locally(module, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        index, weights = bound.arguments["top_k_index"], bound.arguments["top_k_weights"]
        local = index - start
        here = (local >= 0) & (local < num_local)
        bound.arguments["top_k_index"] = torch.where(here, local, num_local)
        bound.arguments["top_k_weights"] = weights.masked_fill(~here, 0)
        return bound.args, bound.kwargs

    experts.register_forward_pre_hook(route_locally, with_kwargs=True)
    experts.register_forward_hook(lambda module, args, out: parallel.all_reduce(out))


def _split_vocabulary(model: nn.Module, rank: int, size: int, splits: dict) -> None:
    """Embedding and LM head split by (padded) vocabulary rows, each rank reading rows ``[start, stop)`` (pad rows
    past the real vocabulary are zero); a tied head shares the embedding's shard, as the full model shares it."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is embed.weight
    vocab, hidden = embed.weight.shape
    # Gemma4 multiplies its embedding by sqrt(H) inside the embedding module (a non-persistent buffer): carried over.
    scale = getattr(embed, "embed_scale", None)
    with torch.device("meta"):
        model.set_input_embeddings(parallel.VocabEmbedding(vocab, hidden, embed.weight.dtype))
        model.set_output_embeddings(parallel.VocabHead(hidden, vocab, head.weight.dtype))
    if scale is not None:
        model.get_input_embeddings().register_buffer("embed_scale", scale.clone(), persistent=False)
    rows = parallel.padded_vocab_size(vocab, size) // size
    names = {id(p): n for n, p in model.named_parameters()}  # a tied head is listed once, as the embedding
    new_embed, new_head = model.get_input_embeddings(), model.get_output_embeddings()
    if tied:
        new_head.weight = new_embed.weight
    for module in (new_embed, new_head):
        splits[names[id(module.weight)]] = (0, rank * rows, (rank + 1) * rows)
