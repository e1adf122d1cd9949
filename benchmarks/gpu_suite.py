"""One prepared check of every device path: correctness items and throughput items, each in its own subprocess.

    python benchmarks/gpu_suite.py                         # on one GPU: at most ~8 minutes, NCCL
    python benchmarks/gpu_suite.py --device cpu --small    # the same items on CPU, small shapes, gloo (seconds each)
    python benchmarks/gpu_suite.py --items specdec_dspark,step_dspark --out FILE

Every item runs as ``python benchmarks/gpu_suite.py --item NAME`` in a child process with its own timeout (and
the suite with an overall budget), so one failure or hang does not stop the rest. The JSON (``--out``) records per
item: status (pass / fail / skip), seconds, the error line of a failure or the reason for a skip, and the item's
figures. A short table goes to stdout. Items that need CUDA or NCCL are skipped on CPU with the reason and the CPU
test that covers their gloo path. The items themselves live in ``gpu_suite_items.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import gpu_suite_items as items  # noqa: E402  (a sibling module: benchmarks/ is no package)


def _error_line(text: str) -> str:
    """The last line of a child's output that says what went wrong (a traceback's final line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line or "assert" in line.lower() or "Exception" in line:
            return line[:500]
    return lines[-1][:500] if lines else "(no output)"


def run_item(name: str, args, timeout_s: float, work: Path) -> dict:
    """Run one item in a child process; returns its record (status, seconds, error or figures)."""
    result_file = work / f"{name}.result.json"
    result_file.unlink(missing_ok=True)  # a previous run's result must not pass for this one
    command = [sys.executable, str(Path(__file__).resolve()), "--item", name, "--device", args.device,
               "--work", str(work), "--result", str(result_file)] + (["--small"] if args.small else [])
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    start = time.perf_counter()
    # Its own session, so that a timeout kills the item's whole process tree (deepspeed launches grandchildren).
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return {"status": "fail", "seconds": round(time.perf_counter() - start, 1),
                "error": f"timed out after {timeout_s:.0f} s; last output: {_error_line(stderr + stdout)}"}
    record = {"seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode == 0 and result_file.is_file():
        record.update(json.loads(result_file.read_text()))
        record.setdefault("status", "pass")
    else:
        record.update(status="fail", error=_error_line(stderr + stdout), returncode=proc.returncode)
    return record


def run_suite(args) -> dict:
    names = args.items.split(",") if args.items else list(items.ITEMS)
    unknown = [n for n in names if n not in items.ITEMS]
    if unknown:
        raise SystemExit(f"unknown items {unknown}; expected some of {', '.join(items.ITEMS)}")
    deadline = time.monotonic() + args.budget_s
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_suite_"))
    work.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    for name in names:
        item = items.ITEMS[name]
        reason = items.skip_reason(item, args.device, records)
        left = deadline - time.monotonic()
        if reason is None and left < 5:
            reason = f"the suite's budget of {args.budget_s} s is spent"
        if reason is not None:
            records[name] = {"status": "skip", "seconds": 0.0, "reason": reason}
        else:
            timeout_s = min(item.timeout_s(args.small), left)
            records[name] = run_item(name, args, timeout_s, work)
        print(_row(name, records[name]), flush=True)
    return records


def _row(name: str, record: dict) -> str:
    detail = record.get("error") or record.get("reason") or record.get("summary", "")
    return f"{name:<22} {record['status']:<5} {record['seconds']:>7.1f} s  {detail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--small", action="store_true", help="small shapes (a few seconds per item on CPU)")
    parser.add_argument("--items", default="", help=f"comma-separated subset of {', '.join(items.ITEMS)}")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole suite's wall-clock limit")
    parser.add_argument("--work", default="", help="scratch directory on local disk (default: a new temp dir)")
    parser.add_argument("--out", default="benchmarks/results/gpu_suite.json")
    parser.add_argument("--item", help=argparse.SUPPRESS)  # child mode: run one item
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    if args.item:
        figures = items.run(args.item, args)
        Path(args.result).write_text(json.dumps(figures, indent=2) + "\n")
        return

    start = time.perf_counter()
    records = run_suite(args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    result = {"device": args.device, "device_name": items.device_name(args.device), "small": args.small,
              "machine": platform.machine(), "commit": commit.stdout.strip() or None,
              "date": time.strftime("%Y-%m-%d %H:%M"), "wall_s": round(time.perf_counter() - start, 1),
              "counts": {s: sum(r["status"] == s for r in records.values()) for s in ("pass", "fail", "skip")},
              "items": records}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['counts']} in {result['wall_s']} s -> {args.out}")


if __name__ == "__main__":
    main()
