import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_families import save_tiny, tiny_config

from dspark.targets.weights import INDEX_FILE, WeightIndex, save_sharded, unique_state_dict


def _tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (50, 8), "layer.0.proj.weight": (12, 8), "layer.0.norm.weight": (8,),
              "experts.gate_up": (4, 6, 8), "scale": (), "empty_rows": (0, 4)}
    return {name: torch.randn(shape, generator=g).to(dtype) for name, shape in shapes.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_reads_equal_full_tensor_slices(tmp_path, dtype):
    tensors = _tensors(dtype)
    save_sharded(tensors, tmp_path, max_shard_bytes=500)
    index_json = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(set(index_json["weight_map"].values())) >= 3  # really multi-shard

    index = WeightIndex(tmp_path)
    assert index.names() == sorted(tensors)
    for name, full in tensors.items():
        assert index.shape(name) == tuple(full.shape) and index.dtype(name) == dtype
        assert torch.equal(index.load(name), full)
        assert index.load(name, torch.float64).dtype == torch.float64
        for dim in range(full.dim()):
            size = full.shape[dim]
            for start, stop in [(0, size), (1, max(1, size - 1)), (size // 2, size), (size, size)]:
                if start <= stop <= size:
                    assert torch.equal(index.load_slice(name, dim, start, stop), full.narrow(dim, start, stop - start))
        flat = full.reshape(-1)
        n = flat.numel()
        for start, stop in [(0, n), (0, n // 3), (n // 3, n // 2 + 5), (n - 1, n), (7, 7)]:
            if 0 <= start <= stop <= n:
                assert torch.equal(index.load_flat_range(name, start, stop), flat[start:stop])
                assert index.load_flat_range(name, start, stop, torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="out of range"):
        index.load_flat_range("embed.weight", 0, 401)
    with pytest.raises(ValueError, match="out of range"):
        index.load_slice("embed.weight", 1, 0, 9)
    with pytest.raises(KeyError, match="nope"):
        index.load("nope")


def test_flat_range_reads_only_covering_rows(tmp_path):
    save_sharded({"w": torch.arange(100 * 16, dtype=torch.float32).view(100, 16)}, tmp_path, 1 << 20)
    index = WeightIndex(tmp_path)
    requested = []
    real = index._handle("w")

    class Spy:  # records the row range get_slice is asked for
        def get_slice(self, name):
            sl = real.get_slice(name)

            class Rows:
                def __getitem__(self, key):
                    requested.append(key)
                    return sl[key]

            return Rows()

    index._handles[index._file["w"]] = Spy()
    out = index.load_flat_range("w", 40, 70)  # elements 40..69 live in rows 2..4
    assert torch.equal(out, torch.arange(40, 70, dtype=torch.float32))
    assert requested == [slice(2, 5)]


def test_single_file_checkpoint(tmp_path):
    tensors = _tensors(torch.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    index = WeightIndex(tmp_path)
    assert index.names() == sorted(tensors)
    assert torch.equal(index.load_slice("layer.0.proj.weight", 1, 2, 5), tensors["layer.0.proj.weight"][:, 2:5])


def test_missing_shard_and_missing_checkpoint_fail_before_reading(tmp_path, monkeypatch):
    save_sharded(_tensors(torch.float32), tmp_path, max_shard_bytes=500)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[1].unlink()
    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", None)  # any tensor read would now crash with a TypeError
    with pytest.raises(FileNotFoundError, match=shards[1].name):
        WeightIndex(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors.index.json nor model.safetensors"):
        WeightIndex(tmp_path / "nowhere")


def test_index_naming_tensor_absent_from_shard(tmp_path):
    save_sharded(_tensors(torch.float32), tmp_path, max_shard_bytes=500)
    index_json = json.loads((tmp_path / INDEX_FILE).read_text())
    index_json["weight_map"]["ghost.weight"] = next(iter(index_json["weight_map"].values()))
    (tmp_path / INDEX_FILE).write_text(json.dumps(index_json))
    with pytest.raises(ValueError, match="ghost.weight"):
        WeightIndex(tmp_path)


def test_check_against_names_missing_unexpected_and_mismatched(tmp_path):
    from transformers import AutoModelForCausalLM

    save_tiny("qwen3", tmp_path / "qwen3", max_shard_bytes=64 * 1024)
    index = WeightIndex(tmp_path / "qwen3")
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3", 256))
    expected = {name: tuple(t.shape) for name, t in unique_state_dict(model).items()}
    index.check_against(expected)  # the same config: no complaint

    wrong = dict(expected)
    del wrong["model.layers.1.mlp.up_proj.weight"]
    wrong["model.layers.9.mlp.up_proj.weight"] = (128, 64)
    wrong["model.norm.weight"] = (32,)
    with pytest.raises(ValueError) as err:
        index.check_against(wrong)
    msg = str(err.value)
    assert "missing from the checkpoint: model.layers.9.mlp.up_proj.weight" in msg
    assert "not in the model: model.layers.1.mlp.up_proj.weight" in msg
    assert "model.norm.weight (64,) (checkpoint) vs (32,) (config)" in msg


@pytest.mark.parametrize("family", ["llama", "deepseek_v3"])
def test_save_tiny_round_trips_through_transformers(tmp_path, family):
    """A multi-shard tiny checkpoint written by save_sharded loads in transformers with identical weights."""
    from transformers import AutoModelForCausalLM

    out = save_tiny(family, tmp_path / family, max_shard_bytes=32 * 1024)
    assert len(list(out.glob("model-*.safetensors"))) > 2
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    index = WeightIndex(out)
    for name, tensor in unique_state_dict(loaded).items():
        assert torch.equal(tensor, index.load(name)), name


@pytest.mark.parametrize("backend", ["zero3", "pipeline", "megatron"])
def test_sharded_backends_refuse_what_is_not_a_local_checkpoint_directory(tmp_path, backend):
    from dspark.config import TargetConfig
    from dspark.targets import load_target

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    for name, what in ((str(gguf), "a GGUF file"), ("someorg/some-model", "not a local directory")):
        with pytest.raises(ValueError, match=rf"target.backend={backend} reads a local directory of safetensors "
                                             rf"shards; .* is {what}"):
            load_target(TargetConfig(name_or_path=name, backend=backend, layer_ids=[0]))
