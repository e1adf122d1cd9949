"""Benchmark: one training step (forward_loss + backward + AdamW) of each drafter algorithm, on this machine's device.

The drafters are sized for SmolLM2-135M (hidden 576, vocab 49152, 5 feature layers, the smollm2_* recipes) and fed
random target features of a fixed batch, so the figure is the drafter's own cost, free of data loading. Block
tokens/s (supervised block slots per second) is reported per algorithm and precision, with every row's ratio to
DSpark in fp32 measured in the same run. Also the peak device memory (GPU) or peak RSS (CPU).

Each DSpark row is also timed with the vocabulary loss as it was before the LM-head and Markov-bias products
were folded into one (``reference_chunked_vocab_loss``, kept here only as the baseline), alternating the two
paths step by step so both see the same machine load: ``step_ms_reference`` and ``speedup_vs_reference``.

    python benchmarks/drafter_step.py [--device cuda] [--steps 10] [--batch 4 --seq 512] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import time
from pathlib import Path

RECIPES = {"dspark": "smollm2_dspark", "dflash": "smollm2_dflash", "eagle3": "smollm2_eagle3"}


@functools.cache
def _reference_loss_class():
    """The chunked vocabulary loss before commit "fold the Markov bias into the LM-head product" (same maths:
    separate LM-head and W2 products each way, a ``log p`` tensor per chunk). Built lazily: torch is imported
    inside."""
    import torch

    class _ReferenceChunkedVocabLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h_NH, u_NR, w2_VR, lm_head_VH, final_NH, labels_N, coef_ce_N, coef_l1_N, chunk_rows):
            N = h_NH.shape[0]
            lm_VH = lm_head_VH.float()
            w2f_VR = w2_VR.float() if w2_VR is not None else None
            need_grad = any(ctx.needs_input_grad[:3])
            use_l1_grad = bool((coef_l1_N != 0).any())
            ce_N = torch.empty(N, dtype=torch.float32, device=h_NH.device)
            l1_N = torch.empty(N, dtype=torch.float32, device=h_NH.device)
            grad_h_NH = grad_u_NR = grad_w2_VR = None
            if need_grad:
                grad_h_NH = torch.zeros(h_NH.shape, dtype=torch.float32, device=h_NH.device)
                if u_NR is not None:
                    grad_u_NR = torch.zeros(u_NR.shape, dtype=torch.float32, device=h_NH.device)
                    grad_w2_VR = torch.zeros_like(w2f_VR)
            for start in range(0, N, chunk_rows):
                rows = slice(start, min(start + chunk_rows, N))
                z_CV = h_NH[rows].float() @ lm_VH.T
                if u_NR is not None:
                    u_CR = u_NR[rows].float()
                    z_CV = z_CV + u_CR @ w2f_VR.T
                logp_CV = z_CV.log_softmax(dim=-1)
                del z_CV
                p_CV = logp_CV.exp()
                labels_C1 = labels_N[rows].unsqueeze(1)
                ce_N[rows] = -logp_CV.gather(1, labels_C1).squeeze(1)
                del logp_CV
                diff_CV = p_CV - (final_NH[rows].float() @ lm_VH.T).softmax(dim=-1)
                l1_N[rows] = diff_CV.abs().sum(dim=-1)
                if not need_grad:
                    continue
                coef_ce_C1 = coef_ce_N[rows].float().unsqueeze(1)
                grad_CV = p_CV * coef_ce_C1
                grad_CV.scatter_add_(1, labels_C1, -coef_ce_C1)
                if use_l1_grad:
                    sign_CV = diff_CV.sign_()
                    sign_CV -= (p_CV * sign_CV).sum(dim=-1, keepdim=True)
                    grad_CV += p_CV * sign_CV * coef_l1_N[rows].float().unsqueeze(1)
                grad_h_NH[rows] = grad_CV @ lm_VH
                if u_NR is not None:
                    grad_u_NR[rows] = grad_CV @ w2f_VR
                    grad_w2_VR += grad_CV.T @ u_CR
            loss = (coef_ce_N.float() * ce_N).sum() + (coef_l1_N.float() * l1_N).sum()
            ctx.mark_non_differentiable(ce_N, l1_N)
            ctx.grads = (grad_h_NH, grad_u_NR, grad_w2_VR)
            ctx.dtypes = (h_NH.dtype, u_NR.dtype if u_NR is not None else None,
                          w2_VR.dtype if w2_VR is not None else None)
            return loss, ce_N, l1_N

        @staticmethod
        def backward(ctx, grad_loss, _grad_ce, _grad_l1):
            grads = []
            for g, dtype in zip(ctx.grads, ctx.dtypes):
                grads.append(None if g is None else (g * grad_loss).to(dtype))
            ctx.grads = None
            return (*grads, None, None, None, None, None, None)


    return _ReferenceChunkedVocabLoss


def reference_chunked_vocab_loss(h_NH, u_NR, w2_VR, lm_head_VH, final_NH, labels_N, coef_ce_N, coef_l1_N,
                                 chunk_rows, softcap: float = 0.0, fold_markov: bool = True):
    """``dspark.drafters.dspark.loss.chunked_vocab_loss`` as it was before the fold (``fold_markov`` ignored; no
    softcap: the reference predates Gemma4)."""
    import torch

    if softcap:
        raise ValueError("the pre-fold reference loss has no softcap")

    if not torch.is_grad_enabled():
        h_NH = h_NH.detach()
        u_NR = u_NR.detach() if u_NR is not None else None
        w2_VR = w2_VR.detach() if w2_VR is not None else None
    return _reference_loss_class().apply(h_NH, u_NR, w2_VR, lm_head_VH, final_NH, labels_N, coef_ce_N.detach(),
                                         coef_l1_N.detach(), chunk_rows)


@contextlib.contextmanager
def reference_loss():
    """Within the block, DSpark/DFlash drafters train with ``reference_chunked_vocab_loss``."""
    from dspark.drafters.dspark import model

    saved = model.chunked_vocab_loss
    model.chunked_vocab_loss = reference_chunked_vocab_loss
    try:
        yield
    finally:
        model.chunked_vocab_loss = saved


def _batch(B: int, T: int, L: int, H: int, V: int, device, dtype, generator):
    import torch

    ids_BT = torch.randint(0, V, (B, T), generator=generator)
    mask_BT = torch.zeros(B, T, dtype=torch.bool)
    mask_BT[:, T // 4:] = True  # a prompt, then a supervised answer
    return {"input_ids_BT": ids_BT.to(device), "loss_mask_BT": mask_BT.to(device),
            "features_BTLH": torch.randn(B, T, L, H, generator=generator).to(device, dtype),
            "final_BTH": torch.randn(B, T, H, generator=generator).to(device, dtype)}


def measure(algorithm: str, precision: str, args) -> dict:
    import torch
    from transformers import AutoConfig

    from dspark.config import load_config
    from dspark.drafters import build_drafter
    from dspark.train.metrics import peak_rss_gb

    cfg = load_config(RECIPES[algorithm])
    # SmolLM2-135M's architecture (the builtin target), without loading its weights: the frozen embedding and
    # LM head are random tensors of the real shapes.
    config = AutoConfig.for_model("llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                                  rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    embed_VH = (torch.randn(49152, 576, generator=gen) * 0.02).to(device, dtype)
    torch.manual_seed(0)
    drafter = build_drafter(cfg.drafter, config, cfg.target.layer_ids, embed_VH, embed_VH).to(device, dtype)
    optimizer = torch.optim.AdamW(drafter.trainable_parameters(), lr=1e-4)
    batch = _batch(args.batch, args.seq, len(cfg.target.layer_ids), 576, 49152, device, dtype, gen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> int:
        out = drafter.forward_loss(batch, torch.Generator(device=device).manual_seed(1))
        (out.numerator / out.weight_sum.clamp_min(1e-6)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(out.num_tokens)

    def timed_step(reference: bool) -> tuple[float, int]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with reference_loss() if reference else contextlib.nullcontext():
            tokens = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, tokens

    # DSpark and DFlash train through the chunked vocabulary loss: time the reference path alternately with it.
    paths = (False, True) if algorithm in ("dspark", "dflash") and args.reference else (False,)
    for _ in range(args.warmup):
        for reference in paths:
            timed_step(reference)
    wall, tokens = dict.fromkeys(paths, 0.0), 0
    for _ in range(args.steps):
        for reference in paths:
            seconds, num = timed_step(reference)
            wall[reference] += seconds
            tokens += num if not reference else 0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else peak_rss_gb()
    row = {"algorithm": algorithm, "precision": precision, "step_ms": round(1000 * wall[False] / args.steps, 2),
           "block_tokens_per_step": tokens // args.steps, "block_tokens_per_s": round(tokens / wall[False], 1),
           "peak_memory_gb": round(peak, 3)}
    if True in wall:
        row["step_ms_reference"] = round(1000 * wall[True] / args.steps, 2)
        row["speedup_vs_reference"] = round(wall[True] / wall[False], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--algorithms", default=",".join(RECIPES))
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip timing the pre-fold vocabulary loss alongside DSpark and DFlash")
    parser.add_argument("--out", default="benchmarks/results/drafter_step.json")
    args = parser.parse_args()

    import torch

    rows = [measure(a, p, args) for a in args.algorithms.split(",") for p in args.precisions.split(",")]
    base = next((r for r in rows if r["algorithm"] == "dspark" and r["precision"] == "fp32"), rows[0])
    for row in rows:
        row["tokens_per_s_vs_dspark_fp32"] = round(row["block_tokens_per_s"] / base["block_tokens_per_s"], 3)
        print(json.dumps(row))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    result = {"device": args.device, "device_name": device_name or platform.machine(), "torch": torch.__version__,
              "batch": args.batch, "seq": args.seq, "steps": args.steps, "threads": torch.get_num_threads(),
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
