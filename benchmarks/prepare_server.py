"""Server regeneration vs in-process batched regeneration, and the cost of resuming after a kill.

Starts `dspark serve` on 127.0.0.1 for the target, then on the same prompts and settings measures:
  - in-process `regenerate` (one `generate` call per batch of `--batch-size`), the baseline;
  - `regenerate_with_servers` against the local server at 1, 4 and 16 requests in flight;
  - resume: `dspark prepare --server` killed (SIGKILL) once half the rows are on disk, then rerun, against one
    uninterrupted run; overhead = killed run + resumed run - uninterrupted run.
Requests/s, generated tokens/s (answer tokens written) and ratios to the baseline go to a JSON file.

    python benchmarks/prepare_server.py --target builtin:smollm2 --num-prompts 32 --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return env


def _start_server(target: str, max_batch: int):
    proc = subprocess.Popen([sys.executable, "-m", "dspark.cli", "serve", "--set", f"target.name_or_path={target}",
                             "--port", "0", "--max-batch", str(max_batch)], env=_env(), cwd=REPO,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if match := re.search(r"serving .* on (http://\S+)", line):
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # never block on a full pipe
            return proc, match.group(1)
    raise RuntimeError(f"dspark serve exited with {proc.wait()}")


def _answer_tokens(rows: list[dict]) -> int:
    return sum(sum(r["loss_mask"]) for r in rows)


def _prepare_cmd(target: str, run_dir: Path, url: str, args) -> list[str]:
    sets = [f"run_dir={run_dir}", f"target.name_or_path={target}", f"data.max_prompts={args.num_prompts + 1}",
            "data.num_eval_prompts=1", f"data.max_new_tokens={args.max_new_tokens}", "data.regen_temperature=1.0",
            "data.server_max_in_flight=4"]
    return [sys.executable, "-m", "dspark.cli", "prepare", *[a for s in sets for a in ("--set", s)], "--server", url]


def measure_resume(target: str, url: str, args, tmp: Path) -> dict:
    start = time.perf_counter()
    subprocess.run(_prepare_cmd(target, tmp / "whole", url, args), env=_env(), cwd=REPO, check=True,
                   capture_output=True)
    whole_s = time.perf_counter() - start
    partial = tmp / "killed" / "data" / "train.jsonl.partial"
    start = time.perf_counter()
    proc = subprocess.Popen(_prepare_cmd(target, tmp / "killed", url, args), env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    half = args.num_prompts // 2
    while proc.poll() is None and not (partial.is_file() and partial.read_bytes().count(b"\n") >= half):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_s = time.perf_counter() - start
    rows_before = partial.read_bytes().count(b"\n")
    start = time.perf_counter()
    subprocess.run(_prepare_cmd(target, tmp / "killed", url, args), env=_env(), cwd=REPO, check=True,
                   capture_output=True)
    resume_s = time.perf_counter() - start
    same = (tmp / "killed" / "data" / "train.jsonl").read_bytes() == \
        (tmp / "whole" / "data" / "train.jsonl").read_bytes()
    # the rerun redoes only the rows missing at the kill: its time against that share of the uninterrupted run
    left = 1 - rows_before / args.num_prompts
    return {"uninterrupted_s": whole_s, "killed_after_s": killed_s, "rows_before_kill": rows_before,
            "rows_total": args.num_prompts, "resumed_s": resume_s, "resumed_vs_uninterrupted": resume_s / whole_s,
            "share_left_at_kill": left, "overhead_s": killed_s + resume_s - whole_s,
            "overhead_ratio": (killed_s + resume_s) / whole_s, "resumed_equals_uninterrupted": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="builtin:smollm2")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16, help="in-process batch and the server's --max-batch")
    parser.add_argument("--in-flight", default="1,4,16")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "prepare_server.json"))
    args = parser.parse_args()
    os.environ.update(_env())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still stops the server (finally below)

    from dspark.config import TargetConfig
    from dspark.data.output import ResumableJsonl
    from dspark.data.prompts import load_prompts
    from dspark.data.regenerate import plan, regenerate
    from dspark.data.server import ServerOptions, regenerate_with_servers
    from dspark.targets import load_target

    prompts = load_prompts("builtin")[: args.num_prompts]
    proc, url = _start_server(args.target, args.batch_size)
    results: dict = {"target": args.target, "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                     "temperature": 1.0, "batch_size": args.batch_size, "cpu_threads": os.cpu_count(),
                     "command": "python " + " ".join([Path(sys.argv[0]).relative_to(REPO).as_posix()
                                                      if Path(sys.argv[0]).is_absolute() else sys.argv[0],
                                                      *sys.argv[1:]]),
                     "date": time.strftime("%Y-%m-%d")}
    try:
        target = load_target(TargetConfig(name_or_path=args.target, layer_ids=[0]))
        start = time.perf_counter()
        rows = regenerate(target, prompts, max_new_tokens=args.max_new_tokens, temperature=1.0,
                          batch_size=args.batch_size, seed=0, max_seq_len=2048)
        wall = time.perf_counter() - start
        base = {"wall_s": wall, "requests_per_s": len(rows) / wall, "tokens_per_s": _answer_tokens(rows) / wall}
        results["in_process"] = base
        print(f"in-process batch {args.batch_size}: {base['requests_per_s']:.2f} req/s, "
              f"{base['tokens_per_s']:.1f} tok/s")
        del target
        prefixes, keep = plan(_tokenizer(args.target), prompts, 2048)
        for n in (int(v) for v in args.in_flight.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                opts = ServerOptions(urls=[url], max_in_flight=n, max_new_tokens=args.max_new_tokens,
                                     max_seq_len=2048, temperature=1.0)
                out = ResumableJsonl(Path(tmp) / "t.jsonl", opts.settings())
                err = ResumableJsonl(Path(tmp) / "e.jsonl", opts.settings())
                start = time.perf_counter()
                regenerate_with_servers(_tokenizer(args.target), prompts, prefixes, keep, out, err, opts)
                wall = time.perf_counter() - start
                row = {"wall_s": wall, "requests_per_s": len(out.rows) / wall,
                       "tokens_per_s": _answer_tokens(out.rows) / wall, "failed": len(err.rows),
                       "same_rows_as_in_process": out.rows == rows}
                row["tokens_per_s_ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
                results[f"server_in_flight_{n}"] = row
                print(f"server, {n} in flight: {row['requests_per_s']:.2f} req/s, {row['tokens_per_s']:.1f} tok/s "
                      f"({row['tokens_per_s_ratio']:.2f}x in-process), same rows: {row['same_rows_as_in_process']}")
                _save(results, args.out)  # what is measured so far survives an interrupted run
        with tempfile.TemporaryDirectory() as tmp:
            results["resume"] = measure_resume(args.target, url, args, Path(tmp))
        print("resume:", json.dumps(results["resume"]))
    finally:
        proc.kill()
        proc.wait()
    _save(results, args.out)
    print(f"wrote {args.out}")


def _save(results: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")


_TOKENIZERS: dict = {}


def _tokenizer(target: str):
    from dspark.data.server import load_tokenizer

    if target not in _TOKENIZERS:
        _TOKENIZERS[target] = load_tokenizer(target)
    return _TOKENIZERS[target]


if __name__ == "__main__":
    main()
