"""DeepSeek-V4's own ``mtp.*`` layout for the V4 DSpark drafter (``dspark_v4``), export and import.

Tensor names, shapes and dtypes are those of the ``mtp.{0,1,2}.*`` tensors inside DeepSeek-V4-Flash/Pro
(V4_DSPARK.md section 1); the config keys are ``n_mtp_layers``, ``dspark_block_size``, ``dspark_markov_rank``,
``dspark_target_layer_ids`` and ``dspark_noise_token_id``. The directory holds ``config.json`` (the target's V4
config plus those keys and a versioned ``dspark`` section) and ``model.safetensors`` with the ``mtp.*`` tensors plus
the frozen ``embed.weight`` / ``head.weight`` (BF16 in DeepSeek's checkpoints; written so the directory loads on its
own; ``tools/attach_drafter.py`` points a V4 checkpoint's index at the ``mtp.*`` ones only).

Quantisation (``quantization``): ``none`` keeps the drafter's dtype (the trainer's own save; exact round trip),
``bf16`` writes DeepSeek's dtypes unquantised (BF16, F32 for sinks, selection biases and mHC), ``fp8`` writes the
released quantisation: FP8 e4m3 linears with one E8M0 scale per 128x128 block and MXFP4 routed experts (e2m1 codes,
two per int8, one E8M0 scale per 1x32 group). Reading goes through ``WeightIndex``, whose dequantisers
(``dspark.targets.fp8``) are the ones the target loaders use.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

FORMAT = "deepseek-v4-mtp"
SECTION_VERSION = 1
QUANTIZATIONS = ("none", "bf16", "fp8")
FP8_BLOCK = 128
MXFP4_GROUP = 32
FP8_MAX, FP4_MAX = 448.0, 6.0

# Stage tensors: the drafter's name (after ``stages.{s}.``) -> DeepSeek's (after ``mtp.{s}.``), and its storage
# kind: "fp8" (a linear, FP8 in the release), "bf16", "f32". Routed experts are handled apart (MXFP4 in the release).
_STAGE = [
    ("attn_hc.fn", "hc_attn_fn", "f32"), ("attn_hc.base", "hc_attn_base", "f32"),
    ("attn_hc.scale", "hc_attn_scale", "f32"), ("ffn_hc.fn", "hc_ffn_fn", "f32"),
    ("ffn_hc.base", "hc_ffn_base", "f32"), ("ffn_hc.scale", "hc_ffn_scale", "f32"),
    ("input_layernorm.weight", "attn_norm.weight", "bf16"),
    ("post_attention_layernorm.weight", "ffn_norm.weight", "bf16"),
    ("self_attn.q_a_proj.weight", "attn.wq_a.weight", "fp8"),
    ("self_attn.q_a_norm.weight", "attn.q_norm.weight", "bf16"),
    ("self_attn.q_b_proj.weight", "attn.wq_b.weight", "fp8"), ("self_attn.kv_proj.weight", "attn.wkv.weight", "fp8"),
    ("self_attn.kv_norm.weight", "attn.kv_norm.weight", "bf16"),
    ("self_attn.o_a_proj.weight", "attn.wo_a.weight", "fp8"), ("self_attn.o_b_proj.weight", "attn.wo_b.weight", "fp8"),
    ("self_attn.sinks", "attn.attn_sink", "f32"),
    ("mlp.gate.weight", "ffn.gate.weight", "bf16"), ("mlp.gate.e_score_correction_bias", "ffn.gate.bias", "f32"),
    ("mlp.shared_experts.gate_proj.weight", "ffn.shared_experts.w1.weight", "fp8"),
    ("mlp.shared_experts.up_proj.weight", "ffn.shared_experts.w3.weight", "fp8"),
    ("mlp.shared_experts.down_proj.weight", "ffn.shared_experts.w2.weight", "fp8"),
]
_FIRST = [("main_proj.weight", "main_proj.weight", "fp8"), ("main_norm.weight", "main_norm.weight", "bf16")]
_LAST = [("norm.weight", "norm.weight", "bf16"), ("hc_head.hc_fn", "hc_head_fn", "f32"),
         ("hc_head.hc_base", "hc_head_base", "f32"), ("hc_head.hc_scale", "hc_head_scale", "f32"),
         ("markov_head.markov_w1.weight", "markov_head.markov_w1.weight", "bf16"),
         ("markov_head.markov_w2.weight", "markov_head.markov_w2.weight", "bf16"),
         ("confidence_head.proj.weight", "confidence_head.proj.weight", "bf16")]
_EXPERT_PROJS = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))


def mtp_tensors(drafter) -> dict[str, tuple[torch.Tensor, str]]:
    """DeepSeek name -> (the drafter's tensor, storage kind), in checkpoint order; routed experts split per expert
    (kind "fp4"): transformers' fused ``gate_up_proj [E, 2I, H]`` is w1 rows then w3 rows, ``down_proj`` is w2."""
    state = drafter.state_dict()
    num = len(drafter.stages)
    out: dict[str, tuple[torch.Tensor, str]] = {}
    for s in range(num):
        extra = (_FIRST if s == 0 else []) + (_LAST if s == num - 1 else [])
        for ours, theirs, kind in extra + _STAGE:
            key = ours if (ours, theirs, kind) in extra else f"stages.{s}.{ours}"
            if key in state:  # confidence_head.proj is absent without a confidence head
                out[f"mtp.{s}.{theirs}"] = (state[key], kind)
        gate_up, down = state[f"stages.{s}.mlp.experts.gate_up_proj"], state[f"stages.{s}.mlp.experts.down_proj"]
        inter = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            pieces = {"w1": gate_up[e, :inter], "w3": gate_up[e, inter:], "w2": down[e]}
            for w, _ in _EXPERT_PROJS:
                out[f"mtp.{s}.ffn.experts.{e}.{w}.weight"] = (pieces[w], "fp4")
    return out


def quantize_fp8_block(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(float8_e4m3fn weight, E8M0 scale [ceil(M/b), ceil(N/b)])``: each block's scale is the smallest power of
    two that brings its largest magnitude within e4m3's 448 (DeepSeek's ``scale_fmt: ue8m0``)."""
    M, N = w.shape
    rows, cols = math.ceil(M / block), math.ceil(N / block)
    padded = torch.zeros(rows * block, cols * block)
    padded[:M, :N] = w.float()
    amax = padded.view(rows, block, cols, block).abs().amax(dim=(1, 3))
    scale = _power_of_two_scale(amax, FP8_MAX)
    q = (w.float() / scale.repeat_interleave(block, 0)[:M].repeat_interleave(block, 1)[:, :N])
    return q.to(torch.float8_e4m3fn), scale.to(torch.float8_e8m0fnu)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 [M, K/2] packed e2m1 codes, low nibble first, E8M0 scale [M, K/32])`` with round-to-nearest codes."""
    from dspark.targets.fp8 import e2m1_values

    M, K = w.shape
    if K % MXFP4_GROUP:
        raise ValueError(f"MXFP4 needs rows of whole {MXFP4_GROUP}-value groups; got a [{M}, {K}] expert weight")
    groups = w.float().view(M, K // MXFP4_GROUP, MXFP4_GROUP)
    scale = _power_of_two_scale(groups.abs().amax(dim=-1), FP4_MAX)
    x = groups / scale.unsqueeze(-1)
    magnitudes = e2m1_values()[:8]  # codes 0..7 are the non-negative values in increasing order
    code = (x.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1)
    code = (code + 8 * (x < 0)).view(M, K).to(torch.uint8)
    packed = code[:, 0::2] | (code[:, 1::2] << 4)
    return packed.view(torch.int8), scale.to(torch.float8_e8m0fnu)


def _power_of_two_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """``2 ** ceil(log2(amax / qmax))`` (1 for an all-zero group), in E8M0's range."""
    exponent = torch.ceil(torch.log2(amax.clamp(min=1e-30) / qmax)).clamp(-127, 127)
    return torch.where(amax > 0, torch.exp2(exponent), torch.ones_like(amax))


def export_deepseek_v4_mtp(drafter, target_config, out_dir, quantization: str = "bf16") -> Path:
    """Write ``drafter`` (a ``dspark_v4`` drafter) as DeepSeek-V4's ``mtp.*`` tensors; see the module docstring."""
    from dspark.export.common import write_checkpoint

    if getattr(drafter, "algorithm", None) != "dspark_v4":
        raise ValueError(f"export format {FORMAT} holds DeepSeek-V4's mtp.* draft (algorithm dspark_v4); drafter "
                         f"{getattr(drafter, 'algorithm', type(drafter).__name__)!r} does not fit it (use deepspec, "
                         "speculators or eagle3)")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} unknown; expected one of {', '.join(QUANTIZATIONS)}")
    tensors: dict[str, torch.Tensor] = {}
    for name, (t, kind) in mtp_tensors(drafter).items():
        t = t.detach().cpu().contiguous()
        if quantization == "none":
            tensors[name] = t
        elif kind == "f32":
            tensors[name] = t.float()
        elif quantization == "bf16" or kind == "bf16":
            tensors[name] = t.to(torch.bfloat16)
        else:
            weight, scale = quantize_fp8_block(t) if kind == "fp8" else quantize_mxfp4(t)
            tensors[name], tensors[name.removesuffix(".weight") + ".scale"] = weight, scale
    frozen_dtype = drafter.embed_tokens.weight.dtype if quantization == "none" else torch.bfloat16
    tensors["embed.weight"] = drafter.embed_tokens.weight.detach().cpu().to(frozen_dtype).contiguous()
    tensors["head.weight"] = drafter.lm_head.weight.detach().cpu().to(frozen_dtype).contiguous()
    return write_checkpoint(Path(out_dir), tensors, mtp_config(drafter, quantization))


def export_mtp_bf16(drafter, target_config, out_dir) -> Path:
    """``dspark export --format deepseek-v4-mtp``: DeepSeek's dtypes, unquantised."""
    return export_deepseek_v4_mtp(drafter, target_config, out_dir, quantization="bf16")


def export_mtp_fp8(drafter, target_config, out_dir) -> Path:
    """``dspark export --format deepseek-v4-mtp-fp8``: the released quantisation (FP8 blocks, MXFP4 experts)."""
    return export_deepseek_v4_mtp(drafter, target_config, out_dir, quantization="fp8")


def mtp_config(drafter, quantization: str) -> dict:
    """The target's V4 config plus DeepSeek's DSpark keys (and the quantisation the tensors are stored in)."""
    config = {k: v for k, v in drafter.config.to_dict().items() if k != "quantization_config"}
    cfg = drafter.cfg
    config.update({
        "model_type": "deepseek_v4",
        "n_mtp_layers": len(drafter.stages),
        "dspark_block_size": drafter.block_size,
        "dspark_markov_rank": drafter.markov_rank,
        "dspark_target_layer_ids": list(drafter.layer_ids),
        "dspark_noise_token_id": drafter.mask_token_id,
        "dspark": {"format_version": SECTION_VERSION, "algorithm": "dspark_v4", "num_anchors": cfg.num_anchors,
                   "loss_decay": cfg.loss_decay, "ce_weight": cfg.dspark.ce_weight, "l1_weight": cfg.dspark.l1_weight,
                   "bce_weight": cfg.dspark.bce_weight, "moe_bias_update_rate": cfg.v4.moe_bias_update_rate},
    })
    if quantization == "fp8":
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [FP8_BLOCK] * 2,
                                         "activation_scheme": "dynamic", "scale_fmt": "ue8m0"}
        config["expert_dtype"] = "fp4"
    config["dtype"] = str(drafter.dtype).removeprefix("torch.") if quantization == "none" else "bfloat16"
    return config


_STAGE_OF = re.compile(r"mtp\.(\d+)\.(.*)")


def _our_name(deepseek_name: str) -> str | None:
    """The drafter's name of a DeepSeek ``mtp.*`` tensor (experts as per-expert pieces); None if unknown."""
    m = _STAGE_OF.fullmatch(deepseek_name)
    if m is None:
        return None
    s, rest = m.group(1), m.group(2)
    for ours, theirs, _ in _FIRST + _LAST:
        if rest == theirs:
            return ours
    for ours, theirs, _ in _STAGE:
        if rest == theirs:
            return f"stages.{s}.{ours}"
    if e := re.fullmatch(r"ffn\.experts\.(\d+)\.(w[123])\.weight", rest):
        proj = dict(_EXPERT_PROJS)[e.group(2)]
        return f"stages.{s}.mlp.experts.{e.group(1)}.{proj}.weight"
    return None


def load_deepseek_v4_mtp(model_dir) -> torch.nn.Module:
    """The DSpark draft stored as ``mtp.*`` in ``model_dir`` (an export, or a whole V4 checkpoint such as the
    released one; quantised tensors are dequantised by ``WeightIndex``) as a ``dspark_v4`` drafter in fp32."""
    from dspark.config import DrafterConfig, DSparkConfig, V4Config
    from dspark.drafters.v4 import DSparkV4Drafter
    from dspark.targets.weights import WeightIndex, fuse_expert_pieces

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "deepseek_v4":
        raise ValueError(f"{model_dir}: model_type {config.get('model_type')!r} is not deepseek_v4; expected a "
                         "DeepSeek-V4 checkpoint or a deepseek-v4-mtp export")
    section = config.get("dspark") or {}
    if section.get("format_version", SECTION_VERSION) > SECTION_VERSION:
        raise ValueError(f"{model_dir}: dspark section format_version {section['format_version']} is newer than this "
                         f"reader's {SECTION_VERSION}; update dspark")
    index = WeightIndex(model_dir)
    ours = {}
    for logical in index.names():
        stored = index.stored_name(logical)
        if stored.startswith("mtp."):
            name = _our_name(stored)
            if name is None:
                raise ValueError(f"{model_dir}: tensor {stored} is not part of DeepSeek-V4's DSpark mtp.* layout")
            ours[name] = logical
    if not ours:
        raise ValueError(f"{model_dir} holds no mtp.* tensors: this V4 checkpoint ships no DSpark draft to load")
    missing = [k for k in ("dspark_block_size", "dspark_markov_rank", "dspark_target_layer_ids",
                           "dspark_noise_token_id") if k not in config]
    if missing:
        raise ValueError(f"{model_dir}/config.json has mtp.* tensors but lacks {', '.join(missing)}; expected "
                         "DeepSeek's DSpark config keys")
    stages = sorted({int(n.split(".")[1]) for n in ours if n.startswith("stages.")})
    given = {k: section[k] for k in ("num_anchors", "loss_decay", "ce_weight", "l1_weight", "bce_weight",
                                     "moe_bias_update_rate") if k in section}
    cfg = DrafterConfig(
        algorithm="dspark_v4", num_layers=config.get("n_mtp_layers") or len(stages),
        block_size=config["dspark_block_size"], mask_token_id=config["dspark_noise_token_id"],
        **{k: given[k] for k in ("num_anchors", "loss_decay") if k in given},
        dspark=DSparkConfig(markov_rank=config["dspark_markov_rank"],
                            enable_confidence_head="confidence_head.proj.weight" in ours,
                            **{k: given[k] for k in ("ce_weight", "l1_weight", "bce_weight") if k in given}),
        v4=V4Config(**{k: given[k] for k in ("moe_bias_update_rate",) if k in given}))
    target = {k: v for k, v in config.items() if k != "quantization_config"}
    embed, head = (index.load(frozen_name(index, *names), torch.float32)
                   for names in (("embed.weight", "model.embed_tokens.weight"), ("head.weight", "lm_head.weight")))
    drafter = DSparkV4Drafter(cfg, target, config["dspark_target_layer_ids"], embed, head)
    state = fuse_expert_pieces({name: index.load(logical, torch.float32) for name, logical in ours.items()})
    drafter.load_state_dict(state, strict=True)
    return drafter


def frozen_name(index, deepseek: str, transformers: str) -> str:
    """The name ``WeightIndex`` reads the target's frozen embedding / LM head under: DeepSeek's own
    (``embed.weight``, renamed by the index) or transformers' (``model.embed_tokens.weight``) in a converted one."""
    for logical in index.names():
        if index.stored_name(logical) in (deepseek, transformers):
            return logical
    raise ValueError(f"{index.model_dir} has neither {deepseek} nor {transformers}: the target's frozen "
                     f"{'embedding' if deepseek.startswith('embed') else 'LM head'}, which the draft needs")
