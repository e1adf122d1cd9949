"""Attach a DSpark draft exported as DeepSeek-V4's ``mtp.*`` tensors to an existing V4 checkpoint directory, the way
DeepSeek ships V4-Flash/Pro: one directory whose index names the target's tensors and the draft's.

    python tools/attach_drafter.py V4_DIR EXPORT OUT

``EXPORT`` is ``dspark export --format deepseek-v4-mtp`` (or ``deepseek-v4-mtp-fp8``) output. ``OUT`` gets symbolic
links to ``V4_DIR``'s shards and other files (nothing of the target is copied), the export's ``mtp.*`` tensors
alone in ``mtp-dspark.safetensors``, a new ``model.safetensors.index.json`` mapping every target tensor to its
shard and every ``mtp.*`` tensor of the export to that file (the export's own embed/head copies are left out: the
target's are the ones served), and ``config.json`` = the target's config plus DeepSeek's DSpark keys. Any ``mtp.*``
tensors the target already had are replaced by the export's (a warning says so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DRAFT_FILE = "mtp-dspark.safetensors"
DSPARK_KEYS = ("n_mtp_layers", "dspark_block_size", "dspark_markov_rank", "dspark_target_layer_ids",
               "dspark_noise_token_id", "dspark")


def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _weight_map(model_dir: Path) -> dict[str, str]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    if (model_dir / SINGLE_FILE).is_file():
        return {name: SINGLE_FILE for name in _tensor_names(model_dir / SINGLE_FILE)}
    raise ValueError(f"{model_dir} has neither {INDEX_FILE} nor {SINGLE_FILE}; expected a V4 checkpoint directory")


def attach(v4_dir, export_dir, out_dir) -> Path:
    """Write ``out_dir`` (see the module docstring); returns it."""
    v4_dir, export_dir, out_dir = Path(v4_dir), Path(export_dir), Path(out_dir)
    target = json.loads((v4_dir / "config.json").read_text())
    if target.get("model_type") != "deepseek_v4":
        raise ValueError(f"{v4_dir}: model_type {target.get('model_type')!r} is not deepseek_v4; the mtp.* DSpark "
                         "draft attaches to a DeepSeek-V4 checkpoint")
    draft = json.loads((export_dir / "config.json").read_text())
    missing = [k for k in DSPARK_KEYS if k not in draft]
    if missing or not (export_dir / SINGLE_FILE).is_file():
        raise ValueError(f"{export_dir} is not a deepseek-v4-mtp export (lacks {', '.join(missing) or SINGLE_FILE})")
    for key in ("hidden_size", "vocab_size", "hc_mult", "num_hidden_layers"):
        if target.get(key) != draft.get(key):
            raise ValueError(f"{export_dir} was trained for a target with {key}={draft.get(key)}; {v4_dir} has "
                             f"{target.get(key)}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty; expected a new directory")
    weight_map = _weight_map(v4_dir)
    replaced = sorted(n for n in weight_map if n.startswith("mtp."))
    if replaced:
        warnings.warn(f"{v4_dir} already ships {len(replaced)} mtp.* tensors; the export's replace them", stacklevel=2)
    weight_map = {n: f for n, f in weight_map.items() if not n.startswith("mtp.")}
    draft_names = [n for n in _tensor_names(export_dir / SINGLE_FILE) if n.startswith("mtp.")]
    weight_map.update({n: DRAFT_FILE for n in draft_names})

    out_dir.mkdir(parents=True, exist_ok=True)
    for item in v4_dir.iterdir():
        if item.name not in ("config.json", INDEX_FILE) and not item.name.startswith("."):
            os.symlink(item.resolve(), out_dir / item.name)
    # The draft's mtp.* tensors are written to their own file (not linked): loaders such as transformers' read every
    # tensor of a listed file and rename DeepSeek's embed/head, so the export's BF16 copies would replace the
    # target's own.
    from safetensors.torch import load_file, save_file

    draft_tensors = load_file(str(export_dir / SINGLE_FILE))
    save_file({n: draft_tensors[n] for n in draft_names}, str(out_dir / DRAFT_FILE), metadata={"format": "pt"})
    (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")
    config = {**target, **{k: draft[k] for k in DSPARK_KEYS}}
    if "quantization_config" in draft and "quantization_config" not in target:
        config["quantization_config"], config["expert_dtype"] = draft["quantization_config"], draft["expert_dtype"]
    elif "quantization_config" in draft and (draft["quantization_config"].get("weight_block_size")
                                             != target["quantization_config"].get("weight_block_size")):
        raise ValueError(f"{export_dir} is quantised with blocks {draft['quantization_config']['weight_block_size']}"
                         f", {v4_dir} with {target['quantization_config'].get('weight_block_size')}; export again")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("v4_dir")
    parser.add_argument("export_dir")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    try:
        out = attach(args.v4_dir, args.export_dir, args.out_dir)
    except (ValueError, OSError) as exc:
        print(f"attach_drafter: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
