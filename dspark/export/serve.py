"""The one command that serves (or evaluates) an export, with its real paths, per format."""

from __future__ import annotations

import json
import shlex
from pathlib import Path


def _speculative_tokens(fmt: str, config: dict) -> int:
    if fmt == "speculators":
        return int(config["speculators_config"]["proposal_methods"][0]["speculative_tokens"])
    if fmt == "eagle3":
        return int(config["dspark"]["block_size"])
    if fmt.startswith("deepseek-v4-mtp"):
        return int(config["dspark_block_size"])
    return int(config["block_size"])


def serve_commands(fmt: str, export_dir: str | Path, verifier: str | None) -> list[str]:
    """Shell commands (one per engine) that serve ``export_dir`` next to ``verifier`` (the target's HF directory
    or hub id; ``VERIFIER`` as a placeholder when unknown)."""
    export_dir = str(Path(export_dir).resolve())
    config = json.loads((Path(export_dir) / "config.json").read_text())
    k = _speculative_tokens(fmt, config)
    target = verifier or "VERIFIER"
    q = shlex.quote
    if fmt == "speculators":
        spec = json.dumps({"model": export_dir, "num_speculative_tokens": k})
        return [f"vllm serve {q(target)} --speculative-config {q(spec)}"]
    if fmt == "eagle3":
        spec = json.dumps({"method": "eagle3", "model": export_dir, "num_speculative_tokens": k})
        return [f"vllm serve {q(target)} --speculative-config {q(spec)}",
                f"python -m sglang.launch_server --model-path {q(target)} --speculative-algorithm EAGLE3 "
                f"--speculative-draft-model-path {q(export_dir)} --speculative-num-steps {k} "
                f"--speculative-eagle-topk 1 --speculative-num-draft-tokens {k + 1}"]
    if fmt.startswith("deepseek-v4-mtp"):
        # The draft is served from inside the V4 checkpoint: attach it first (no copy of the target's shards).
        attached = export_dir.rstrip("/") + "-attached"
        spec = json.dumps({"method": "dspark", "num_speculative_tokens": k})
        return [f"python tools/attach_drafter.py {q(target)} {q(export_dir)} {q(attached)}",
                f"vllm serve {q(attached)} --speculative-config {q(spec)}",
                f"python -m sglang.launch_server --model-path {q(attached)} --speculative-algorithm DSPARK"]
    # deepspec: the reference implementation's layout; dspark's own speculative-decoding eval reads it as is.
    return [f"dspark eval -c RECIPE --set target.name_or_path={q(target)} --drafter {q(export_dir)}"]
