"""The items of ``gpu_suite.py``: each runs in its own child process, raises on a failed check and returns figures.

Correctness: greedy speculative decoding equals target decoding per drafter; the zero3 and megatron (TP 1)
backends give hf's features; the launchers under ``deepspeed --num_gpus 1``; a ZeRO-3 + offload training step; the
NaN stop. Throughput: one drafter training step at the Qwen3-4B reference shapes (tokens/s, fraction of the
device's bf16 peak, and the pre-fold vocabulary loss as an in-run baseline); batched evaluation tokens/s against
plain target decoding; cache reader GB/s from local disk.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks


@dataclass
class Item:
    fn: object
    gpu_timeout_s: float
    cpu_timeout_s: float = 90.0
    cuda_only: str = ""  # why it is skipped on CPU (empty: it runs there)
    after: list[str] = field(default_factory=list)  # items whose output it uses
    needs_module: str = ""  # skipped when this module is missing at run time

    def timeout_s(self, small: bool) -> float:
        return self.cpu_timeout_s if small else self.gpu_timeout_s


def skip_reason(item: Item, device: str, records: dict) -> str | None:
    if item.needs_module and importlib.util.find_spec(item.needs_module) is None:
        return f"module {item.needs_module} does not exist in this checkout"
    if device == "cpu" and item.cuda_only:
        return item.cuda_only
    failed = [name for name in item.after if records.get(name, {}).get("status") != "pass"]
    if failed:
        return f"needs {', '.join(failed)}, which did not pass"
    return None


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else (os.uname().machine + " CPU")


def run(name: str, args) -> dict:
    """Child-process entry: a one-process world (gloo on CPU, NCCL on CUDA), then the item."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    torch.manual_seed(0)
    return ITEMS[name].fn(_Context(args.device, args.small, Path(args.work)))


@dataclass
class _Context:
    device: str
    small: bool
    work: Path


# -- correctness -------------------------------------------------------------------------------------------------


def _specdec(ctx: _Context, recipe: str, target_name: str | None = "builtin:tiny-llama") -> dict:
    """Greedy speculative decoding (batch 1 and 4, untrained drafter) equals the target's own greedy decoding."""
    import torch

    from dspark.config import load_config
    from dspark.data.chat import prompt_ids
    from dspark.data.prompts import load_prompts
    from dspark.drafters import build_drafter
    from dspark.eval.specdec import speculative_generate_batch, target_generate
    from dspark.targets import load_target

    cfg = load_config(recipe, [f"target.name_or_path={target_name}"] if target_name else [])
    target = load_target(cfg.target, device=ctx.device)
    drafter = build_drafter(cfg.drafter, target.config, cfg.target.layer_ids, target.embed_weight,
                            target.lm_head_weight).to(ctx.device).eval()
    num_prompts, tokens = (4, 8) if ctx.small else (8, 32)
    prompts = [prompt_ids(target.tokenizer, p) for p in load_prompts("builtin", num_prompts)]
    stop_ids = [target.tokenizer.eos_token_id]
    expected = [target_generate(target, p, max_new_tokens=tokens, temperature=0.0, stop_ids=stop_ids)
                for p in prompts]
    figures = {}
    for batch in (1, 4):
        generators = [torch.Generator(device=ctx.device).manual_seed(i) for i in range(num_prompts)]
        results = speculative_generate_batch(target, drafter, prompts, max_new_tokens=tokens, temperature=0.0,
                                             generators=generators, batch_size=batch, stop_ids=stop_ids)
        for i, (result, want) in enumerate(zip(results, expected)):
            if result.tokens != want:
                first = next((j for j, (a, b) in enumerate(zip(result.tokens, want)) if a != b),
                             min(len(result.tokens), len(want)))
                raise AssertionError(f"batch {batch}, prompt {i}: speculative tokens differ from the target's at "
                                     f"token {first}")
        accepted = sum(a for r in results for a in r.accepted)
        figures[f"tau_batch{batch}"] = round(1 + accepted / max(1, sum(len(r.accepted) for r in results)), 4)
    figures["summary"] = f"{num_prompts} prompts x {tokens} tokens equal to the target at batch 1 and 4"
    return figures


def _v4_recipe() -> str:
    recipes = sorted(p.stem for p in (REPO / "dspark" / "recipes").iterdir() if "v4" in p.stem and "tiny" in p.stem)
    if not recipes:
        raise FileNotFoundError("dspark.drafters.v4 exists but dspark/recipes has no tiny *v4* recipe to build it")
    return recipes[0]


def _local_tiny_target(ctx: _Context) -> Path:
    """builtin:tiny-llama's local directory (zero3 and megatron load local checkpoints)."""
    from dspark.targets.source import resolve_target_source

    return Path(resolve_target_source("builtin:tiny-llama")[0])


def backends_features(ctx: _Context) -> dict:
    """zero3 and megatron (tensor parallel 1) compute the hf backend's features on this device."""
    import torch

    from dspark.config import TargetConfig
    from dspark.targets import load_target

    path = _local_tiny_target(ctx)
    ids_BT = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    features, figures = {}, {}
    for backend, extra in (("hf", {}), ("zero3", {}), ("megatron", {"tensor_parallel": 1})):
        target = load_target(TargetConfig(name_or_path=str(path), backend=backend, layer_ids=[0, 1, 2], **extra),
                             device=ctx.device)
        out = target.features(ids_BT.to(ctx.device))
        features[backend] = (out.layers_BTLH.float().cpu(), out.final_BTH.float().cpu())
        del target
    tol = dict(rtol=1e-3, atol=1e-3) if ctx.device == "cuda" else dict(rtol=1e-5, atol=1e-5)
    for backend in ("zero3", "megatron"):
        for got, want in zip(features[backend], features["hf"]):
            figures[f"{backend}_max_abs_diff"] = max(figures.get(f"{backend}_max_abs_diff", 0.0),
                                                     float((got - want).abs().max()))
            torch.testing.assert_close(got, want, **tol, msg=lambda m, b=backend: f"{b} features differ from hf: {m}")
    figures["summary"] = "zero3 and megatron TP1 features equal hf's"
    return figures


def _cli(command: list[str], timeout_s: float, deepspeed: bool = False) -> str:
    """Run ``python -m dspark.cli ...`` or ``deepspeed --num_gpus 1 launcher/...``; raise with its error line."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    if deepspeed:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        full = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(port),
                *command]
    else:
        full = [sys.executable, "-m", "dspark.cli", *command]
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        raise RuntimeError(f"{' '.join(command[:2])} exited {proc.returncode}: {lines[-1] if lines else ''}")
    return proc.stdout


def _run_sets(ctx: _Context) -> list[str]:
    return ["--set", f"run_dir={ctx.work / 'run'}", "--set", "target.name_or_path=builtin:tiny-llama"]


def launcher_prepare(ctx: _Context) -> dict:
    out = _cli(["launcher/prepare.py", "--config", "tiny_llama_dspark", *_run_sets(ctx)], 150, deepspeed=True)
    if not (ctx.work / "run" / "data" / "train.jsonl").is_file():
        raise AssertionError(f"launcher/prepare.py wrote no train.jsonl; output ends: {out[-300:]}")
    return {"summary": "launcher/prepare.py under deepspeed --num_gpus 1 (NCCL) wrote the conversations"}


def zero3_offload_step(ctx: _Context) -> dict:
    _cli(["cache", "build", "-c", "tiny_llama_dspark", *_run_sets(ctx)], 120)
    _cli(["train", "-c", "tiny_llama_dspark", *_run_sets(ctx), "--set", "train.zero_stage=3",
          "--set", "train.offload_optimizer=true", "--set", "train.max_steps=1"], 150)
    if not (ctx.work / "run" / "drafter" / "config.json").is_file():
        raise AssertionError("dspark train (ZeRO-3 + optimizer offload, 1 step) exported no drafter")
    return {"summary": "cache build, then one ZeRO-3 + CPU-offload training step, exported"}


def launcher_eval(ctx: _Context) -> dict:
    import json

    _cli(["launcher/eval.py", "--config", "tiny_llama_dspark", *_run_sets(ctx)], 150, deepspeed=True)
    report = json.loads((ctx.work / "run" / "eval" / "report.json").read_text())
    return {"summary": f"launcher/eval.py under deepspeed --num_gpus 1 (NCCL): report keys {sorted(report)}"}


def nan_stop(ctx: _Context) -> dict:
    """A NaN loss at step 2 stops training on the device without saving (the all-reduced finite check)."""
    from dspark.config import load_config
    from dspark.drafters.dspark.model import DSparkDrafter
    from dspark.train.trainer import NonFiniteLossError, train

    forward_loss, calls = DSparkDrafter.forward_loss, {"n": 0}

    def poisoned(self, batch, generator=None):
        out = forward_loss(self, batch, generator)
        calls["n"] += 1
        if calls["n"] == 2:
            out = out._replace(numerator=out.numerator * float("nan"))
        return out

    DSparkDrafter.forward_loss = poisoned
    run_dir = ctx.work / "nan_run"
    cfg = load_config("tiny_llama_dspark", [f"run_dir={run_dir}", "target.name_or_path=builtin:tiny-llama"])
    try:
        train(cfg, cache_dir=ctx.work / "run" / "cache", progress=False)
    except NonFiniteLossError as exc:
        if (run_dir / "drafter").exists():
            raise AssertionError("the NaN stop exported a drafter") from exc
        return {"summary": f"stopped: {str(exc)[:120]}"}
    raise AssertionError("training with a NaN loss at step 2 did not stop")


ITEMS_CORRECTNESS = {
    "specdec_dspark": Item(lambda ctx: _specdec(ctx, "tiny_llama_dspark"), 90),
    "specdec_dflash": Item(lambda ctx: _specdec(ctx, "tiny_llama_dflash"), 90),
    "specdec_eagle3": Item(lambda ctx: _specdec(ctx, "tiny_llama_eagle3"), 90),
    "specdec_v4": Item(lambda ctx: _specdec(ctx, _v4_recipe(), None), 90, needs_module="dspark.drafters.v4"),
    "backends_features": Item(backends_features, 120),
}
_CPU_SKIP = ("needs CUDA and NCCL; its gloo path on CPU is covered by tests/{}")
ITEMS_PIPELINE = {
    "launcher_prepare": Item(launcher_prepare, 150, cuda_only=_CPU_SKIP.format("test_launchers_multiproc.py")),
    "zero3_offload_step": Item(zero3_offload_step, 240, cuda_only=_CPU_SKIP.format("train/test_zero_parity.py"),
                               after=["launcher_prepare"]),
    "launcher_eval": Item(launcher_eval, 150, cuda_only=_CPU_SKIP.format("test_launchers_multiproc.py"),
                          after=["zero3_offload_step"]),
    "nan_stop": Item(nan_stop, 120, cuda_only=_CPU_SKIP.format("train/test_resume.py"),
                     after=["zero3_offload_step"]),
}

from gpu_suite_speed import ITEMS_SPEED  # noqa: E402  (throughput items, in their own module)

ITEMS = {**ITEMS_CORRECTNESS, **ITEMS_PIPELINE, **ITEMS_SPEED}
