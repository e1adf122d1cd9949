"""Run inside the ``speculators`` venv (tools/setup_speculators_env.sh), never imported by pytest.

    python speculators_forward.py JOBS.json      # [[EXPORT_DIR, INPUTS.safetensors, OUT.safetensors], ...]

One process for every job (importing the package takes seconds); a job the package refuses writes its traceback
to OUT.error instead. Each job loads EXPORT_DIR with the package's own ``SpeculatorModel.from_pretrained``
(config validation, class registry, verifier weights from the verifier directory named in the export) and runs
its training forward in fp32 on the given inputs, with eager attention (flex attention needs a compiler on CPU).
The anchors the DFlash family would sample at random are pinned to ``anchors`` so the blocks match ours. Writes
every logits tensor the package's forward hands to its loss (``logits``: DFlash family ``[1, A*block, W]``;
``logits_step{s}`` per Eagle3 TTT step ``[1, T, W]``), plus ``d2t``/``t2d`` when the model has them.
"""

import sys

import torch
from safetensors.torch import load_file, save_file


def main(export_dir: str, inputs_path: str, out_path: str) -> None:
    from speculators import SpeculatorModel, SpeculatorModelConfig

    inputs = load_file(inputs_path)
    config = SpeculatorModelConfig.from_pretrained(export_dir)
    config.transformer_layer_config._attn_implementation = "eager"
    model = SpeculatorModel.from_pretrained(export_dir, config=config).float().eval()
    kind = config.speculators_model_type
    captured = {}
    module = sys.modules[type(model).__module__]

    def capture(logits, *args, **kwargs):
        step = args[3] if kind == "eagle3" else None  # eagle3 passes (logits, targets, mask, prev, ttt_step, ...)
        captured["logits" if step is None else f"logits_step{step}"] = logits.detach().clone()
        return torch.zeros(()), {}

    module.compute_metrics = capture
    hidden = inputs["hidden_states"]
    common = dict(hidden_states=hidden, input_ids=inputs["input_ids"], loss_mask=inputs["loss_mask"],
                  verifier_last_hidden_states=inputs["verifier_last_hidden_states"],
                  document_ids=torch.zeros_like(inputs["input_ids"]))
    with torch.no_grad():
        if kind == "eagle3":
            model(**common, ttt_steps=int(inputs["ttt_steps"]))
        else:
            anchors = inputs["anchors"]
            import speculators.models.dflash.core as dflash_core

            dflash_core.select_anchors = lambda mask, n, block: (anchors, torch.ones_like(anchors, dtype=torch.bool))
            model(**common, max_anchors=anchors.numel())
    for name in ("d2t", "t2d"):
        if getattr(model, name, None) is not None:
            captured[name] = getattr(model, name).clone()
    save_file({k: v.contiguous() for k, v in captured.items()}, out_path)


if __name__ == "__main__":
    import json
    import traceback

    for export_dir, inputs_path, out_path in json.loads(open(sys.argv[1]).read()):
        try:
            main(export_dir, inputs_path, out_path)
        except Exception:  # noqa: BLE001 - reported to the test, which decides
            with open(out_path + ".error", "w") as f:
                f.write(traceback.format_exc())
