"""Shared fixtures: tiny random targets built from real HF configs, with SmolLM2's real tokenizer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dspark.targets.tiny import make_tiny_target, smollm2_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
EVAL_DATASETS = SHARED / "eval_datasets"
# Set by an in-process training run (dspark.distributed.init_distributed); a child process must not inherit
# them, or it would join that (finished) world instead of starting its own.
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn: Callable, args: tuple, nprocs: int, *, timeout: float, what: str,
                results: Path | None = None) -> list | None:
    """Run ``fn(rank, *args)`` on ``nprocs`` spawned processes and wait at most ``timeout`` seconds.

    A failure on one rank leaves the others stuck in a collective, so every wait has a deadline: past it every
    process is killed and the test fails naming ``what``. A rank that raises (or dies) fails the test with its
    traceback; torch stops the other ranks. The children start without this process's distributed variables
    (``DIST_ENV``): each worker sets its own, and an inherited MASTER_PORT would send it to a finished world.
    With ``results``, returns ``torch.load(results / f"rank{r}.pt")`` for every rank.
    """
    import torch.multiprocessing as mp

    saved = {key: os.environ.pop(key) for key in DIST_ENV if key in os.environ}
    try:  # a spawned child copies the environment when it starts: only the start needs it cleared
        ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    finally:
        os.environ.update(saved)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not finish within {timeout} s (a hung rank)", pytrace=False)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:  # the former holds the rank's traceback
        pytest.fail(f"{what}: rank {exc.error_index} failed:\n{exc}", pytrace=False)
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    return [torch.load(results / f"rank{r}.pt") for r in range(nprocs)] if results is not None else None


def run_cli(args: list[str], timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """Run ``python -m dspark.cli ARGS`` (or, when ``args[0]`` is a path, that program) in a clean environment."""
    clean = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    clean.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2", **env)
    command = args if args and os.sep in args[0] else [sys.executable, "-m", "dspark.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=clean, cwd=REPO)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return smollm2_tokenizer(tmp_path_factory.mktemp("tok") / "smollm2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("tiny") / "llama", "llama", tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3", tokenizer_dir)


@pytest.fixture(scope="session")
def gemma4_tokenizer_dir(tmp_path_factory) -> Path:
    from dspark.targets.tiny_gemma4 import gemma4_tokenizer

    return gemma4_tokenizer(tmp_path_factory.mktemp("tok") / "gemma4")


@pytest.fixture(scope="session")
def tiny_gemma4_dir(tmp_path_factory, gemma4_tokenizer_dir) -> Path:
    return make_tiny_target(tmp_path_factory.mktemp("tiny") / "gemma4", "gemma4", gemma4_tokenizer_dir)


@pytest.fixture(autouse=True)
def _one_thread_in_process():
    """Every test computes in this process on one thread (the CLI children keep OMP_NUM_THREADS=2, see
    ``run_cli``). The models here are tiny: measured on the lossless tests, two threads took 3.5x as long on a
    2-core machine with one other job, and 9x on a single call; a test that wants more sets it itself."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: OpenMP start-up dominates, and on a loaded 2-core machine two threads run ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_demo_run(tmp_path_factory, tiny_llama_dir) -> tuple[Path, str]:
    """`dspark demo -c tiny_llama_dspark` once per session; tests that write into a run copy what they need."""
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    proc = run_cli(["demo", "-c", "tiny_llama_dspark", "--set", f"run_dir={run_dir}",
                    "--set", f"target.name_or_path={tiny_llama_dir}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc.stdout


@pytest.fixture(scope="module")
def single_process_world():
    """For modules that call ``train()`` in this process: it sets up a one-process world through the environment.
    Undo it afterwards (through DeepSpeed, which otherwise keeps the dead group), else later tests' subprocesses
    inherit RANK/MASTER_PORT and a later in-process run finds a stale group."""
    from dspark.distributed import shutdown

    saved = {k: os.environ.get(k) for k in DIST_ENV}
    yield
    shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def decoded_report(target, drafter, prompts: list[str], *, temperature: float, max_new_tokens: int, batch_size: int,
                   seed: int = 0, confidence_threshold: float = 0.0, num_threads: int = 2) -> dict:
    """What ``dspark eval`` reports for ``drafter`` on ``prompts``, decoded here (timings left out, as in
    ``timeless``). ``num_threads``: the CLI children's OMP_NUM_THREADS (``run_cli``), so that reductions split
    the same way and the numbers agree bit for bit."""
    from dspark.data.chat import prompt_ids
    from dspark.eval.specdec import evaluate

    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        ids = [prompt_ids(target.tokenizer, p) for p in prompts]
        stop_ids = [i for i in [target.tokenizer.eos_token_id] if i is not None]
        report = evaluate(target, drafter, ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                          stop_ids=stop_ids, batch_size=batch_size, confidence_threshold=confidence_threshold)
    finally:
        torch.set_num_threads(before)
    row = timeless(json.loads(json.dumps(report.to_dict())))
    row["verify_policy"] = "threshold" if confidence_threshold else "full"  # as `dspark eval` labels its rows
    return row


def timeless(report: dict) -> dict:
    """A report dict without its wall-clock fields (the drafter's and the plain target's, and their ratio)."""
    return {k: v for k, v in report.items()
            if k not in ("wall_s", "tokens_per_s", "target_tokens_per_s", "speedup_vs_target")}


def expected_demo_eval(run_dir: Path, target_dir: Path, *overrides: str) -> dict:
    """The eval report that a `dspark demo -c tiny_llama_dspark` run's drafter and the untrained one (the seed's
    initialisation) give when decoded here on the run's held-out prompts: ``{"T<t>": {name: report}}``, timings
    left out. ``overrides``: the run's ``--set`` options besides run_dir and the target."""
    import torch

    from dspark.config import load_config
    from dspark.data.prompts import load_prompts
    from dspark.drafters import build_drafter
    from dspark.export import load_drafter
    from dspark.targets import load_target

    cfg = load_config("tiny_llama_dspark", [f"target.name_or_path={target_dir}", *overrides])
    target = load_target(cfg.target)
    drafters = {"trained": load_drafter(run_dir / "drafter").eval()}
    torch.manual_seed(cfg.train.seed)  # after loading: building a module draws from the global RNG
    drafters["untrained"] = build_drafter(cfg.drafter, target.config, cfg.target.layer_ids, target.embed_weight,
                                          target.lm_head_weight).eval()
    prompts = load_prompts(str(run_dir / "data" / "eval_prompts.jsonl"), cfg.eval.num_prompts)
    return {f"T{t:g}": {name: decoded_report(target, drafter, prompts, temperature=t,
                                             max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
                        for name, drafter in drafters.items()}
            for t in cfg.eval.temperatures}
