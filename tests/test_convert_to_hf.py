"""tools/convert_to_hf.py on checkpoints of real 2-process ZeRO runs: the export equals the trained drafter.

The runs are the ZeRO parity test's (``tests/train/test_zero_parity.py``), made once per session.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "train"))
from test_zero_parity import STEPS, zero_runs_dir

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _tool():
    spec = importlib.util.spec_from_file_location("convert_to_hf", REPO / "tools" / "convert_to_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, tiny_llama_dir) -> Path:
    return zero_runs_dir(tmp_path_factory, tiny_llama_dir)


def _sample_batch(drafter):
    g = torch.Generator().manual_seed(0)
    V, L, H = drafter.vocab_size, len(drafter.layer_ids), drafter.hidden_size
    return {"input_ids_BT": torch.randint(0, V, (2, 24), generator=g),
            "loss_mask_BT": torch.ones(2, 24, dtype=torch.bool),
            "features_BTLH": torch.randn(2, 24, L, H, generator=g), "final_BTH": torch.randn(2, 24, H, generator=g)}


def _assert_same_logits(trained, exported):
    anchors = torch.tensor([[2, 9, 15], [0, 7, 19]])
    torch.testing.assert_close(exported.teacher_forced_logits(_sample_batch(trained), anchors),
                               trained.teacher_forced_logits(_sample_batch(trained), anchors), rtol=0, atol=0)


@pytest.mark.parametrize("run", ["zero3", "zero2", "zero0"])
def test_checkpoint_converts_to_the_trained_drafter(run, zero_runs, tmp_path):
    from safetensors.torch import load_file

    from dspark.export import load_drafter
    from dspark.export.speculators import load_speculators

    tool = _tool()
    run_dir = zero_runs / run
    _drafter, hf_config, stage = tool.rebuild_drafter(run_dir)
    assert stage == int(run[-1])
    trained = load_drafter(run_dir / "drafter")  # what the trainer itself wrote at the end (ZeRO-3: gathered)

    deepspec = tool.convert(run_dir, tmp_path / "deepspec", "deepspec")
    ours, theirs = load_file(deepspec / "model.safetensors"), load_file(run_dir / "drafter" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), run
    assert json.loads((deepspec / "config.json").read_text()) == json.loads((run_dir / "drafter" / "config.json")
                                                                            .read_text())
    _assert_same_logits(trained, load_drafter(deepspec))

    spec = tool.convert(run_dir, tmp_path / "speculators", "speculators")
    verifier = json.loads((spec / "config.json").read_text())["speculators_config"]["verifier"]
    assert verifier["name_or_path"] == str(hf_config._name_or_path)
    _assert_same_logits(trained, load_speculators(spec))  # embed/lm_head from the verifier named in the config


def test_older_tag_and_bad_inputs(zero_runs, tmp_path, capsys):
    tool = _tool()
    run_dir = tmp_path / "run"
    shutil.copytree(zero_runs / "zero2", run_dir)
    assert tool.checkpoint_tag_dir(run_dir).name == f"step{STEPS}"
    with pytest.raises(FileNotFoundError, match=r"step2 is not a complete checkpoint \(dspark_complete.json"):
        tool.checkpoint_tag_dir(run_dir, "step2")

    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "train": {**config["train"], "zero_stage": 3}}))
    with pytest.raises(ValueError, match=r"written with ZeRO 2 but .*config.json says train.zero_stage=3"):
        tool.rebuild_drafter(run_dir)
    heads = {**config["drafter"]["dspark"], "markov_rank": 8}
    (run_dir / "config.json").write_text(json.dumps({**config, "drafter": {**config["drafter"], "dspark": heads}}))
    with pytest.raises(ValueError, match=r"checkpoint tensors do not match the drafter"):
        tool.rebuild_drafter(run_dir)
    (run_dir / "config.json").unlink()
    assert tool.main([str(run_dir), str(tmp_path / "out")]) == 2
    assert "the run's resolved config is missing" in capsys.readouterr().err
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint"):
        tool.convert(run_dir, tmp_path / "out")
