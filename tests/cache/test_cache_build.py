"""build_cache on a tiny real target: cached features equal live ``target.features``; resume; sizes.

Legend: B batch, T tokens, L feature layers, H hidden size.
"""

import json

import pytest
import torch

from dspark.cache import CacheReader, build_cache, inspect_cache
from dspark.config import CacheConfig, TargetConfig
from dspark.targets import load_target


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[0, 2]))


def make_conversations(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        T = int(torch.randint(4, 40, (1,), generator=g))
        out.append({"id": f"conv-{i}", "input_ids": torch.randint(0, 49152, (T,), generator=g).tolist(),
                    "loss_mask": (torch.rand(T, generator=g) > 0.3).long().tolist()})
    return out


def live(target, conv: dict):
    """Unpadded live features of one conversation: (layers [T, L, H], final [T, H])."""
    feats = target.features(torch.tensor([conv["input_ids"]]))
    return feats.layers_BTLH[0], feats.final_BTH[0]


def test_unbatched_cache_equals_live_features_bitwise(target, tmp_path):
    convs = make_conversations(6)
    out = build_cache(target, convs, tmp_path / "c", CacheConfig(samples_per_shard=4), batch_size=1)
    reader = CacheReader(out, expected=target.identity())
    assert len(reader) == 6
    for conv in convs:
        sample = reader.get(conv["id"])
        layers_TLH, final_TH = live(target, conv)
        assert sample["input_ids"].tolist() == conv["input_ids"]
        assert sample["loss_mask"].tolist() == [bool(m) for m in conv["loss_mask"]]
        assert torch.equal(sample["features_TLH"].view(torch.int16), layers_TLH.to(torch.bfloat16).view(torch.int16))
        assert torch.equal(sample["final_TH"].view(torch.int16), final_TH.to(torch.bfloat16).view(torch.int16))


def test_padded_batches_are_cut_back_to_each_sample(target, tmp_path):
    convs = make_conversations(7, seed=1)
    out = build_cache(target, convs, tmp_path / "c", CacheConfig(), batch_size=3, progress=True)
    reader = CacheReader(out)
    for conv in convs:
        sample = reader.get(conv["id"])
        layers_TLH, final_TH = live(target, conv)
        assert sample["features_TLH"].shape == (len(conv["input_ids"]), 2, 64)
        # Padding changes the attention kernel's rounding, so at most one bf16 ulp apart.
        torch.testing.assert_close(sample["features_TLH"].float(), layers_TLH, atol=1e-5, rtol=1 / 128)
        torch.testing.assert_close(sample["final_TH"].float(), final_TH, atol=1e-5, rtol=1 / 128)


def test_rerun_resumes_without_duplicates(target, tmp_path):
    convs = make_conversations(9, seed=2)
    cfg = CacheConfig(samples_per_shard=4)
    build_cache(target, convs[:5], tmp_path, cfg, batch_size=2)
    shards_before = json.loads((tmp_path / "manifest.json").read_text())["shards"]
    build_cache(target, convs, tmp_path, cfg, batch_size=2)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shards"][:2] == shards_before  # finished shards are never rewritten
    assert manifest["num_samples"] == 9
    reader = CacheReader(tmp_path)
    assert sorted(reader.ids) == sorted(c["id"] for c in convs)
    with pytest.raises(ValueError, match="conversation 'bad': loss_mask has 1 entries, input_ids 2"):
        build_cache(target, [{"id": "bad", "input_ids": [1, 2], "loss_mask": [1]}], tmp_path / "x", cfg)


def test_byte_planes_beat_raw_on_real_features(target, tmp_path):
    convs = make_conversations(8, seed=3)
    sizes = {}
    for codec in ("raw", "bf16"):
        build_cache(target, convs, tmp_path / codec, CacheConfig(codec=codec), batch_size=4)
        sizes[codec] = inspect_cache(tmp_path / codec)
    raw, planes = sizes["raw"], sizes["bf16"]
    assert raw["num_tokens"] == planes["num_tokens"] == sum(len(c["input_ids"]) for c in convs)
    # raw = int32 id + uint8 mask + bf16 (L + 1) * H per token, exactly the reference layout.
    assert raw["bytes_per_token"] == 4 + 1 + 2 * 3 * 64 and raw["ratio_vs_raw_bf16"] == 1.0
    assert planes["bytes_per_token"] < raw["bytes_per_token"]
    assert planes["ratio_vs_raw_bf16"] > 1.0
    assert planes["target"] == target.identity().name and planes["codec"] == "bf16"


def test_stale_cache_is_refused_naming_the_first_differing_sample(target, tmp_path):
    """Resume matches ids; the per-sample content hash catches a cache built from other conversations."""
    from dspark.cache.format import remove_cache_files

    convs = make_conversations(5, seed=3)
    out = build_cache(target, convs, tmp_path / "c", CacheConfig(samples_per_shard=2), batch_size=2)
    build_cache(target, convs, out, CacheConfig(samples_per_shard=2), batch_size=2)  # same data: resumes
    changed = [dict(c) for c in convs]
    changed[3]["loss_mask"] = [1 - m for m in changed[3]["loss_mask"]]  # only the mask of one sample differs
    with pytest.raises(ValueError, match=r"^cache .* is stale: sample 'conv-3' differs from the conversations "
                                         r"\(first differing sample.*dspark cache build --rebuild"):
        build_cache(target, changed, out, CacheConfig(samples_per_shard=2), batch_size=2)
    with pytest.raises(ValueError, match=r"is stale: it holds sample 'conv-4', which the conversations no longer"):
        build_cache(target, convs[:4], out, CacheConfig(samples_per_shard=2), batch_size=2)
    assert remove_cache_files(out) == 7  # 3 shards + 3 indexes + manifest
    build_cache(target, changed, out, CacheConfig(samples_per_shard=2), batch_size=2)
    assert CacheReader(out).get("conv-3")["loss_mask"].tolist() == [bool(m) for m in changed[3]["loss_mask"]]


def test_schema_1_cache_stays_readable_but_is_not_resumed(target, tmp_path):
    convs = make_conversations(3, seed=4)
    out = build_cache(target, convs, tmp_path / "c", CacheConfig(samples_per_shard=2), batch_size=2)
    for path in out.iterdir():  # rewrite as the previous version wrote it: schema 1, no content hashes
        if path.name.endswith(".json"):
            meta = json.loads(path.read_text())
            meta["schema_version"] = 1
            for entry in meta.get("samples", []):
                del entry["content"]
            path.write_text(json.dumps(meta))
    assert CacheReader(out).get("conv-1")["input_ids"].tolist() == convs[1]["input_ids"]
    with pytest.raises(ValueError, match=r"written before samples carried content hashes \(schema 1\)"):
        build_cache(target, convs, out, CacheConfig(samples_per_shard=2), batch_size=2)
