"""Turn a raw DeepSpeed training checkpoint into an attach-on export, in any format, without a training job.

    python tools/convert_to_hf.py RUN_DIR OUT_DIR [--format deepspec|speculators|eagle3] [--tag step100]

RUN_DIR is a training run directory: ``config.json`` (the resolved run config the trainer saved) and
``checkpoints/step{n}/`` (DeepSpeed's files + dspark's commit record). The newest complete checkpoint is used
unless ``--tag`` names one. ZeRO 0 checkpoints hold the whole module in ``mp_rank_00_model_states.pt``; ZeRO 1-3
ones keep the fp32 master weights partitioned over the ranks' optimizer files, which DeepSpeed's
``zero_to_fp32`` merges (any world size; one process, no GPU). The drafter is rebuilt from the run config around
the target's frozen embedding and LM head (so the target must be reachable at ``target.name_or_path``), cast to
the training precision, and written with ``dspark.export.export_drafter`` (the target config names the verifier).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def checkpoint_tag_dir(run_dir: Path, tag: str | None = None) -> Path:
    """``checkpoints/<tag>`` (default: the newest checkpoint with a commit record)."""
    from dspark.train import checkpoint

    ckpt_dir = Path(run_dir) / "checkpoints"
    if tag is None:
        found = checkpoint.latest_complete(ckpt_dir)
        if found is None:
            raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint (a step*/ directory with "
                                    f"{checkpoint.MARKER})")
        return found[0]
    tag_dir = ckpt_dir / tag
    if not (tag_dir / checkpoint.MARKER).is_file():
        raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint ({checkpoint.MARKER} missing)")
    return tag_dir


def zero_stage_of(tag_dir: Path) -> int:
    """The ZeRO stage a checkpoint was written with, from DeepSpeed's own record in the model-states file."""
    model_states = tag_dir / "mp_rank_00_model_states.pt"
    if not model_states.is_file():
        # ZeRO-3 names its model file per rank.
        if any(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")):
            return 3
        raise FileNotFoundError(f"{tag_dir}: no DeepSpeed model-states file (mp_rank_00_model_states.pt)")
    states = torch.load(model_states, map_location="cpu", weights_only=False)
    return int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))


def trained_state_dict(tag_dir: Path) -> tuple[dict[str, torch.Tensor], int]:
    """(full fp32 state dict of the trained module, ZeRO stage) of one checkpoint tag."""
    stage = zero_stage_of(tag_dir)
    if stage == 0:
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}, 0
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return dict(state), stage


def rebuild_drafter(run_dir: Path, tag: str | None = None):
    """(drafter with the checkpoint's weights, target HF config, ZeRO stage) of a training run."""
    from dspark.config import config_from_dict
    from dspark.drafters import build_drafter
    from dspark.targets import load_target

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: the run's resolved config is missing (the trainer writes it)")
    cfg = config_from_dict(json.loads(config_path.read_text()))
    tag_dir = checkpoint_tag_dir(run_dir, tag)
    state, stage = trained_state_dict(tag_dir)
    if stage != cfg.train.zero_stage:
        raise ValueError(f"{tag_dir} was written with ZeRO {stage} but {config_path} says train.zero_stage="
                         f"{cfg.train.zero_stage}: is this the run's own config?")
    target = load_target(cfg.target)
    hf_config = target.config
    drafter = build_drafter(cfg.drafter, hf_config, cfg.target.layer_ids, target.embed_weight.detach().clone(),
                            target.lm_head_weight.detach().clone())
    del target
    expected = {k: tuple(v.shape) for k, v in drafter.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        reshaped = [f"{k} {got[k]} vs {expected[k]}" for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
        raise ValueError(f"{tag_dir}: checkpoint tensors do not match the drafter of {config_path}; missing: "
                         f"{missing or 'none'}; unexpected: {extra or 'none'}; other shapes: {reshaped or 'none'}")
    drafter.load_state_dict(state, strict=True)
    # The trainer exports the engine's module, which holds the weights in the training precision.
    drafter.to(torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32)
    return drafter.eval(), hf_config, stage


def convert(run_dir: Path, out_dir: Path, fmt: str = "deepspec", tag: str | None = None,
            overwrite: bool = False) -> Path:
    """Export the drafter of ``run_dir``'s checkpoint (newest complete, or ``tag``) to ``out_dir`` in ``fmt``.
    Formats an engine loads name the run's target as an engine-loadable verifier (a built-in target is written as
    an HF directory first, ``dspark.export.verifier``); a non-empty ``out_dir`` needs ``overwrite``."""
    from dspark.config import config_from_dict
    from dspark.export import export_drafter
    from dspark.export.verifier import verifier_config

    drafter, hf_config, _ = rebuild_drafter(run_dir, tag)
    if fmt != "deepspec":
        name = config_from_dict(json.loads((Path(run_dir) / "config.json").read_text())).target.name_or_path
        hf_config = verifier_config(name)
    return export_drafter(drafter, out_dir, fmt, target_config=hf_config, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    from dspark.export import FORMATS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="training run directory (config.json + checkpoints/)")
    parser.add_argument("out_dir", type=Path, help="where to write the export")
    parser.add_argument("--format", dest="fmt", default="deepspec", choices=sorted(FORMATS))
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR whole")
    args = parser.parse_args(argv)
    try:
        out = convert(args.run_dir, args.out_dir, args.fmt, args.tag, args.overwrite)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
