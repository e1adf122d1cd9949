"""``benchmarks/decode_step.py`` runs end to end on the tiny target (a small grid) and writes one timed row per
(rows, tokens per row), so the script cannot rot between the runs that fill BENCHMARKS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_decode_step_benchmark_runs_on_the_tiny_target(tmp_path):
    out = tmp_path / "decode_step.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode_step.py"), "--target",
                           "builtin:tiny-llama", "-c", "tiny_llama_dspark", "--rows", "1,3", "--tokens-per-row", "1,4",
                           "--context-len", "12", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [(s["rows"], s["tokens_per_row"]) for s in result["steps"]] == [(1, 1), (1, 4), (3, 1), (3, 4)]
    for step in result["steps"]:
        assert step["session_ms"] > 0 and step["plain_forward_ms"] > 0 and step["session_vs_plain"] > 0
