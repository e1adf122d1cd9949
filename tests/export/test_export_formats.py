"""What a user meets around an export: every format is recognised and loaded back (``load_drafter``, ``dspark eval
--drafter``) with identical tokens in speculative decoding; exports are staged and renamed into place, refuse a
non-empty directory unless ``--overwrite``, are world-readable, name an engine-loadable verifier and print the
command that serves them; bad input is one line."""

import json
import stat

import pytest
import torch
from click.testing import CliRunner
from conftest import run_cli
from export_helpers import perturbed

from dspark.config import TargetConfig, drafter_config
from dspark.drafters import build_drafter
from dspark.eval.specdec import speculative_generate
from dspark.export import detect_format, export_drafter, load_drafter
from dspark.export.verifier import verifier_config

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:draft vocab")]
LAYER_IDS = [0, 1, 2]
DRAFTERS = {  # algorithm settings -> the formats that hold it
    "dspark": (dict(block_size=4, dspark={"markov_rank": 8}), ("deepspec", "speculators")),
    "dflash": (dict(algorithm="dflash", block_size=4), ("deepspec", "speculators")),
    "eagle3": (dict(algorithm="eagle3", block_size=4, eagle3={"ttt_length": 2}), ("eagle3", "speculators")),
}


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    from dspark.targets import load_target

    return load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=LAYER_IDS))


def _drafter(name, target):
    torch.manual_seed(0)
    return perturbed(build_drafter(drafter_config(DRAFTERS[name][0]), target.config, LAYER_IDS,
                                   target.embed_weight.detach().clone(), target.lm_head_weight.detach().clone()))


def _tokens(target, drafter, temperature):
    out = speculative_generate(target, drafter, [5, 17, 99, 3, 250, 8], max_new_tokens=14, temperature=temperature,
                               generator=torch.Generator().manual_seed(4))
    return out.tokens, out.accepted


@pytest.mark.parametrize("name", sorted(DRAFTERS))
def test_each_format_round_trips_to_identical_tokens(name, target, tiny_llama_dir, tmp_path):
    d = _drafter(name, target).eval()
    expected = {t: _tokens(target, d, t) for t in (0.0, 1.0)}
    config = verifier_config(str(tiny_llama_dir))
    for fmt in DRAFTERS[name][1]:
        out = export_drafter(d, tmp_path / fmt, fmt, target_config=config)
        assert detect_format(out) == fmt
        loaded = load_drafter(out, verifier=target).eval()
        assert type(loaded) is type(d)
        for t, tokens in expected.items():
            assert _tokens(target, loaded, t) == tokens, (fmt, t)


def test_export_is_staged_refuses_a_non_empty_dir_and_overwrite_replaces_it_whole(target, tiny_llama_dir,
                                                                                   tmp_path):
    d = _drafter("dspark", target)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty; pass --overwrite"):
        export_drafter(d, out, "deepspec")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # nothing lost, nothing added
    export_drafter(d, out, "deepspec", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in out.iterdir())
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    # A failing export (eagle3 cannot hold 4 layers) leaves the previous export as it was, and no temp dirs.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    e3 = build_drafter(drafter_config(DRAFTERS["eagle3"][0]), target.config, [-1, 0, 1, 2],
                       target.embed_weight, target.lm_head_weight)
    with pytest.raises(ValueError, match="takes exactly 3 feature layers"):
        export_drafter(e3, out, "eagle3", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_speculators_export_never_names_a_null_or_builtin_verifier(target, tmp_path):
    d = _drafter("dspark", target)
    no_arch = {**target.config.to_dict(), "_name_or_path": "/models/x", "architectures": None}
    cases = [(None, "pass the target"), ({**no_arch, "architectures": ["LlamaForCausalLM"],
                                          "_name_or_path": "builtin:smollm2"}, "not loadable by an engine"),
             (no_arch, "has no architectures list")]
    for config, message in cases:
        with pytest.raises(ValueError, match=message):
            export_drafter(d, tmp_path / "s", "speculators", target_config=config)
    assert not (tmp_path / "s").exists()


def test_builtin_target_becomes_an_hf_verifier_dir(tmp_path, monkeypatch):
    """builtin:tiny-llama resolves to its cached HF directory (config with architectures, safetensors, tokenizer)."""
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    config = verifier_config("builtin:tiny-llama")
    path = config._name_or_path
    assert path.startswith(str(tmp_path / "cache")) and config.architectures == ["LlamaForCausalLM"]
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in
                                                                            (tmp_path / "cache").rglob("*")}


def test_detect_format_refuses_what_is_not_a_drafter(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="is not a drafter directory: its config.json .*LlamaForCausalLM"):
        detect_format(tiny_llama_dir)  # a target, not a drafter
    with pytest.raises(ValueError, match="is not a drafter directory: config.json is missing"):
        load_drafter(tmp_path)


def test_cli_export_eval_and_serve_commands(target, tiny_llama_dir, tmp_path):
    """`dspark export` per format prints the engine command with real paths; `dspark eval --drafter` runs every
    format; bad input exits non-zero with one line."""
    from dspark.cli import main

    src = export_drafter(_drafter("dspark", target), tmp_path / "ds", "deepspec")
    e3_src = export_drafter(_drafter("eagle3", target), tmp_path / "e3src", "eagle3")
    runner = CliRunner()
    outputs = {}
    for name, source, fmt in (("spec", src, "speculators"), ("e3", e3_src, "eagle3"), ("e3spec", e3_src,
                                                                                      "speculators")):
        out = tmp_path / name
        result = runner.invoke(main, ["export", str(source), str(out), "--format", fmt, "--verifier",
                                      str(tiny_llama_dir)])
        assert result.exit_code == 0, result.output
        outputs[name] = result.output
        verifier = json.loads((out / "config.json").read_text()).get("speculators_config", {}).get("verifier")
        if verifier:
            assert verifier == {"name_or_path": str(tiny_llama_dir.resolve()), "architectures": ["LlamaForCausalLM"]}
    assert f"serve: vllm serve {tiny_llama_dir.resolve()} --speculative-config" in outputs["spec"]
    assert f'"model": "{(tmp_path / "spec").resolve()}", "num_speculative_tokens": 4' in outputs["spec"]
    assert f"--speculative-algorithm EAGLE3 --speculative-draft-model-path {(tmp_path / 'e3').resolve()}" in \
        outputs["e3"]
    assert '"method": "eagle3"' in outputs["e3"]

    again = runner.invoke(main, ["export", str(src), str(tmp_path / "spec"), "--format", "speculators"])
    assert again.exit_code != 0 and "is not empty; pass --overwrite" in again.output
    bad = runner.invoke(main, ["export", str(tiny_llama_dir), str(tmp_path / "x")])
    assert bad.exit_code != 0 and "is not a drafter directory" in bad.output and not (tmp_path / "x").exists()

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name a colour."}) + "\n")
    proc = run_cli(["eval", "-c", "tiny_llama_dspark", "--set", f"run_dir={tmp_path / 'run'}",
                    "--set", f"target.name_or_path={tiny_llama_dir}", "--set", "eval.temperatures=[0.0]",
                    "--set", "eval.max_new_tokens=8", "--prompts", str(prompts),
                    "--drafter", f"deepspec={src}", "--drafter", f"speculators={tmp_path / 'spec'}",
                    "--drafter", f"eagle3={tmp_path / 'e3'}", "--drafter", f"eagle3_spec={tmp_path / 'e3spec'}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())["p/T0"]
    assert sorted(rows) == ["deepspec", "eagle3", "eagle3_spec", "speculators"]
    # The same drafter in two formats decodes the same way.
    assert rows["deepspec"]["acceptance_K"] == rows["speculators"]["acceptance_K"]
    assert rows["eagle3"]["acceptance_K"] == rows["eagle3_spec"]["acceptance_K"]
