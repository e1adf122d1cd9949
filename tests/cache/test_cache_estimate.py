"""Cache size estimates (DeepSpec's raw layout vs ours) and the `dspark cache estimate` / `inspect --json` CLI."""

import json

import pytest
from conftest import run_cli
from test_cache_io import write_cache

from dspark.cache import inspect_cache
from dspark.cache.estimate import default_layer_ids, estimate


def write_ratios(path, rows) -> str:
    path.write_text(json.dumps({"target": "toy", "hidden_size": 16, "codecs": rows}))
    return path


def test_qwen3_4b_raw_layout_is_30_7_kb_per_token(tmp_path):
    est = estimate(target="Qwen3-4B", num_tokens=1_000)
    assert est["layer_ids"] == [1, 9, 17, 25, 33] and est["hidden_size"] == 2560
    # 4 (int32 id) + 1 (uint8 mask) + 2 * 5 * 2560 (bf16 features) + 2 * 2560 (bf16 final hidden)
    assert est["deepspec_raw"]["bytes_per_token"] == 30725
    assert est["deepspec_raw"]["total_bytes"] == 30725 * 1_000
    assert estimate(target="qwen3-4b", num_tokens=1, mask_bytes=2)["deepspec_raw"]["bytes_per_token"] == 30726
    assert estimate(target="deepseek-v3", num_tokens=1)["deepspec_raw"]["bytes_per_token"] == 86021
    raw = estimate(target="qwen3-4b", num_tokens=10, codec="raw")["dspark"]
    assert raw["bytes_per_token"] == 30725 and raw["ratio_vs_raw_bf16"] == 1.0


def test_our_size_uses_measured_ratios_or_labelled_defaults(tmp_path):
    ratios = write_ratios(tmp_path / "r.json", [{"codec": "fp8", "zstd_level": 1, "ratio_vs_raw_bf16": 2.0},
                                                {"codec": "fp8", "zstd_level": 9, "ratio_vs_raw_bf16": 2.5}])
    est = estimate(hidden_size=100, num_layers=3, num_tokens=10, codec="fp8", zstd_level=7, ratios_path=ratios)
    assert est["dspark"]["bytes_per_token"] == 5 + (2 * 3 * 100 + 2 * 100) / 2.5  # nearest measured level: 9
    assert est["dspark"]["ratio_source"].startswith("measured in r.json on toy (H=16), zstd level 9")
    fallback = estimate(hidden_size=100, num_tokens=10, codec="bf16", ratios_path=ratios)
    assert fallback["dspark"]["ratio_source"].startswith("default ratio (assumed, not measured")
    assert fallback["num_feature_layers"] == 5 and fallback["layer_ids"] is None


def test_hf_config_targets_and_bad_requests(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"hidden_size": 1024, "num_hidden_layers": 28}))
    est = estimate(target=str(tmp_path / "m"), num_tokens=5)
    assert est["hidden_size"] == 1024 and est["layer_ids"] == default_layer_ids(28) == [1, 7, 13, 19, 25]
    assert estimate(target=str(tmp_path / "m" / "config.json"), num_tokens=5, layer_ids=[3, 4])["layer_ids"] == [3, 4]
    assert estimate(target=str(tmp_path / "m"), num_tokens=5, layer_ids=[3, 27])["layer_ids"] == [3, 27]  # the last
    with pytest.raises(ValueError, match=r"layer ids \[3, 28\] must lie in -1..27 for m \(28 layers"):
        estimate(target=str(tmp_path / "m"), num_tokens=5, layer_ids=[3, 28])
    with pytest.raises(ValueError, match="is neither a builtin name"):
        estimate(target="qwen9-1t", num_tokens=5)
    with pytest.raises(ValueError, match="either a target .* or --hidden-size, not both or neither"):
        estimate(target="qwen3-4b", hidden_size=8, num_tokens=5)
    with pytest.raises(ValueError, match=r"--num-layers 2 contradicts --layer-ids \[1, 2, 3\]"):
        estimate(hidden_size=8, num_layers=2, layer_ids=[1, 2, 3], num_tokens=5)


def test_cli_estimate_and_inspect_json(tmp_path):
    proc = run_cli(["cache", "estimate", "--target", "qwen3-4b", "--num-tokens", "1.24e9"])
    assert proc.returncode == 0, proc.stderr
    assert "DeepSpec raw: 30.7 KB/token" in proc.stdout and "-> 38.1 TB" in proc.stdout
    proc = run_cli(["cache", "estimate", "--hidden-size", "7168", "--num-tokens", "1000", "--codec", "fp8",
                    "--ratios", str(write_ratios(tmp_path / "r.json", [])), "--json"])
    assert proc.returncode == 0, proc.stderr
    est = json.loads(proc.stdout)
    assert est["deepspec_raw"]["bytes_per_token"] == 86021 and est["codec"] == "fp8"
    assert "assumed" in est["dspark"]["ratio_source"]
    proc = run_cli(["cache", "estimate", "--target", "qwen3-4b", "--hidden-size", "8", "--num-tokens", "1"])
    assert proc.returncode != 0 and "Error: give either a target" in proc.stderr and "Traceback" not in proc.stderr

    path = write_cache(tmp_path / "c", range(5))
    proc = run_cli(["cache", "inspect", str(path), "--json"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(json.dumps(inspect_cache(path)))


def test_gemma4_12b_raw_layout_is_46_kb_per_token():
    est = estimate(target="gemma4-12b", num_tokens=1)
    assert est["layer_ids"] == [5, 17, 29, 41, 46] and est["hidden_size"] == 3840
    assert est["deepspec_raw"]["bytes_per_token"] == 4 + 1 + 2 * 5 * 3840 + 2 * 3840  # 46.1 KB
