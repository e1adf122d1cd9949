"""Block-FP8 checkpoints (DeepSeek-V3 / Qwen3-FP8 layout) read dequantised by every backend.

Tiny qwen3 and deepseek_v3 targets are quantised here to FP8 e4m3 with per-block ``*_scale_inv`` and small blocks
whose sizes do not divide the weight shapes (ragged edge blocks; TP ranks and pipeline reads that start inside a
block). Next to each FP8 checkpoint sits its dequantised float32 twin: every backend on the FP8 checkpoint must give
the hf backend's features on the twin.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import free_port, spawn_ranks
from tiny_families import save_tiny

from dspark.config import TargetConfig
from dspark.targets import load_target
from dspark.targets.weights import WeightIndex, save_sharded

VOCAB = 1024  # SmolLM2's tokenizer cut to 1024 ids: every backend needs a tokenizer, the model stays < 1 MB
SHARD_BYTES = 24 << 10  # FP8 tensors are small: still several shards, with scales apart from their weights
# qwen3 (hidden 64, MLP 128, 4x16 q heads, 2x16 kv heads): no shape is a multiple of 24 or 20.
# deepseek_v3: DeepSeek's square blocks, ragged where kv_a_proj_with_mqa has 40 rows and the experts 32 x 64.
BLOCKS = {"qwen3": [24, 20], "deepseek_v3": [16, 16]}
LAYER_IDS = [-1, 0, 1]  # 3 layers: the last (2) is excluded by every backend
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
# Stored unquantised in the real checkpoints: embeddings, LM head, norms, biases, the MoE router and its bias.
UNQUANTISED = ("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight")


def quantize_block_fp8(weight: torch.Tensor, block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8 [..., M, N], scale_inv [..., ceil(M/b0), ceil(N/b1)])`` with each block's max |w| mapped to 448."""
    *lead, rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    padded = weight.new_zeros(*lead, grid[0] * block[0], grid[1] * block[1])
    padded[..., :rows, :cols] = weight
    blocks = padded.unflatten(-1, (grid[1], block[1])).unflatten(-3, (grid[0], block[0]))  # [..., i, b0, j, b1]
    amax = blocks.abs().amax(dim=(-3, -1))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).float()
    quantized = (blocks / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized.flatten(-4, -3).flatten(-2, -1)[..., :rows, :cols].contiguous(), scale_inv


def reference_dequantize(quantized: torch.Tensor, scale_inv: torch.Tensor, block: list[int]) -> torch.Tensor:
    """Block by block, the definition itself: ``w[r, c] = fp8[r, c] * scale_inv[r // b0, c // b1]``."""
    out = quantized.float()
    for i in range(scale_inv.shape[-2]):
        for j in range(scale_inv.shape[-1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[..., rows, cols] *= scale_inv[..., i, j, None, None]
    return out


def write_fp8_checkpoint(float_dir: Path, fp8_dir: Path, twin_dir: Path, block: list[int],
                         per_expert: bool = False) -> dict[str, torch.Tensor]:
    """Quantise ``float_dir`` into ``fp8_dir`` (multi-shard, ``quantization_config`` in its config) and write the
    dequantised values as a float32 checkpoint into ``twin_dir``; returns the FP8 state dict.

    ``per_expert`` stores routed experts one tensor per expert (DeepSeek's hub layout) instead of fused.
    """
    source = WeightIndex(float_dir)
    fp8_state, twin = {}, {}
    for name in source.names():
        tensor = source.load(name)
        parts = {name: tensor}
        if per_expert and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            prefix, leaf = name.rsplit(".", 1)
            parts = {}
            for e, w in enumerate(tensor):
                halves = dict(zip(("gate_proj", "up_proj"), w.chunk(2))) if leaf == "gate_up_proj" else {leaf: w}
                parts.update({f"{prefix}.{e}.{proj}.weight": half for proj, half in halves.items()})
        for part_name, value in parts.items():
            if value.dim() < 2 or part_name.endswith(UNQUANTISED):
                fp8_state[part_name] = twin[part_name] = value
                continue
            quantized, scale_inv = quantize_block_fp8(value, block)
            fp8_state[part_name], fp8_state[f"{part_name}_scale_inv"] = quantized, scale_inv
            twin[part_name] = reference_dequantize(quantized, scale_inv, block)
    config = json.loads((float_dir / "config.json").read_text())
    for out, state, quant in ((fp8_dir, fp8_state, True), (twin_dir, twin, False)):
        out.mkdir(parents=True)
        for f in float_dir.iterdir():
            if not f.name.startswith("model"):
                shutil.copy(f, out / f.name)
        if quant:
            (out / "config.json").write_text(json.dumps({**config, "quantization_config": {
                "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": block}}))
        save_sharded(state, out, SHARD_BYTES)
    return fp8_state


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir) -> dict[str, dict[str, Path]]:
    """Per family: the FP8 checkpoint (``fp8``) and its dequantised float32 twin (``twin``)."""
    root = tmp_path_factory.mktemp("fp8")
    out = {}
    for family, block in BLOCKS.items():
        source = save_tiny(family, root / f"{family}-float", 1 << 30, tokenizer_dir=tokenizer_dir, vocab_size=VOCAB)
        out[family] = {"fp8": root / f"{family}-fp8", "twin": root / f"{family}-twin"}
        write_fp8_checkpoint(source, out[family]["fp8"], out[family]["twin"], block)
    return out


def _spy_reads(index: WeightIndex) -> list[tuple[str, tuple]]:
    """Record every ``get_slice(name)[key]`` the index makes from now on, as ``(name, key)``."""
    reads = []

    class Spy:
        def __init__(self, handle):
            self.handle = handle

        def get_slice(self, name):
            sliced = self.handle.get_slice(name)

            class Recorder:
                def __getitem__(self, key):
                    reads.append((name, key))
                    return sliced[key]

            return Recorder()

    real_handle = index._handle
    index._handle = lambda name: Spy(real_handle(name))
    return reads


def test_dequantised_reads_equal_reference(checkpoints):
    """(a) Every tensor equals the block-by-block reference; slices and flat ranges equal those of the whole."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    for family, dirs in checkpoints.items():
        index, twin = WeightIndex(dirs["fp8"]), WeightIndex(dirs["twin"])
        assert len({index.file_of(n) for n in index.names()}) >= 4  # really multi-shard
        assert index.names() == twin.names()  # scale tensors hidden
        assert not any(n.endswith("_scale_inv") for n in index.names())
        quantised = [n for n in index.names() if index.is_quantized(n)]
        assert len(quantised) > len(index.names()) // 2
        assert not index.is_quantized("model.embed_tokens.weight") and not index.is_quantized("model.norm.weight")
        ragged = [n for n in quantised if any(s % b for s, b in zip(index.shape(n)[-2:], BLOCKS[family]))]
        assert ragged, "no weight with a partial edge block"
        for name in index.names():
            full = index.load(name)
            assert torch.equal(full, twin.load(name)), name
            assert index.shape(name) == tuple(full.shape) and index.dtype(name) == full.dtype
            assert index.load(name, torch.bfloat16).dtype == torch.bfloat16
            if name not in quantised:
                assert index.dtype(name) == twin.dtype(name)
                continue
            assert full.dtype == torch.float32
            # transformers' own (backward-pass) dequantisation agrees on the convention, ragged edges included.
            raw = index._handle(name).get_tensor(name)
            scale = index._handle(name + "_scale_inv").get_tensor(name + "_scale_inv")
            assert torch.equal(_dequantize_fp8_weight(raw, scale, BLOCKS[family], torch.float32), full), name
            for dim in range(full.dim()):
                size = full.shape[dim]
                ranges = [(0, size), (size // 2, size), (min(5, size), min(size, 37)), (size - 1, size), (1, 1)]
                for start, stop in ranges:
                    part = index.load_slice(name, dim, start, stop, torch.float64)
                    assert torch.equal(part, full.narrow(dim, start, stop - start).double()), (name, dim, start)
            n = full.numel()
            for start, stop in [(0, n), (n // 3, n // 2 + 7), (n - 5, n), (9, 9)]:
                assert torch.equal(index.load_flat_range(name, start, stop), full.reshape(-1)[start:stop])


def test_slices_read_only_the_rows_and_blocks_they_need(checkpoints):
    index = WeightIndex(checkpoints["qwen3"]["fp8"])
    name = "model.layers.0.mlp.down_proj.weight"  # [64, 128], blocks of 24 x 20: a scale grid of 3 x 7
    assert index.is_quantized(name) and index.shape(name) == (64, 128)
    reads = _spy_reads(index)
    index.load_slice(name, 0, 32, 64)  # rows 32..63 live in block rows 1..2
    index.load_slice(name, 1, 64, 128)  # columns 64..127 live in block columns 3..6
    index.load_flat_range(name, 130, 300)  # rows 1..2 only
    scale = name + "_scale_inv"
    assert reads == [(name, (slice(32, 64),)), (scale, (slice(1, 3),)),
                     (name, (slice(None), slice(64, 128))), (scale, (slice(None), slice(3, 7))),
                     (name, (slice(1, 3),)), (scale, (slice(0, 1),))]


def _batch(rank: int) -> torch.Tensor:
    """Each rank its own batch (shapes differ)."""
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randint(0, VOCAB, (2, 10) if rank == 0 else (1, 7), generator=g)


# backend -> TargetConfig fields; all three run over the same 2 processes (TP 2, 2 stages, 2 ZeRO-3 partitions)
PARALLEL = {"zero3": {}, "megatron": {"tensor_parallel": 2}, "pipeline": {"pipeline_stages": 2}}


def _worker(rank: int, world: int, port: int, dirs: dict[str, str], out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results = {}
    for family, model_dir in dirs.items():
        for backend, extra in PARALLEL.items():
            target = load_target(TargetConfig(name_or_path=model_dir, layer_ids=LAYER_IDS, backend=backend, **extra))
            feats = target.features(_batch(rank))
            results[family, backend] = {"layers": feats.layers_BTLH, "final": feats.final_BTH,
                                        "embed": target.embed_weight.clone(), "lm_head": target.lm_head_weight.clone()}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _spawn(dirs: dict[str, str], out_dir: Path, world: int = 2, timeout: float = 420) -> list[dict]:
    """Run ``_worker`` on ``world`` processes and load what each rank saved."""
    return spawn_ranks(_worker, (world, free_port(), dirs, str(out_dir)), world, timeout=timeout,
                       what="FP8 workers", results=out_dir)


def test_every_backend_on_fp8_equals_hf_on_the_dequantised_twin(checkpoints, tmp_path, one_thread):
    """(b) hf, zero3, megatron (TP 2) and pipeline (2 stages) on the FP8 checkpoint vs hf on its float32 twin."""
    results = _spawn({family: str(dirs["fp8"]) for family, dirs in checkpoints.items()}, tmp_path)
    for family, dirs in checkpoints.items():
        reference = load_target(TargetConfig(name_or_path=str(dirs["twin"]), layer_ids=LAYER_IDS))
        hf_fp8 = load_target(TargetConfig(name_or_path=str(dirs["fp8"]), layer_ids=LAYER_IDS))
        twin_state, fp8_state = reference.model.state_dict(), hf_fp8.model.state_dict()
        assert twin_state.keys() == fp8_state.keys()
        assert all(torch.equal(fp8_state[k], v) for k, v in twin_state.items()), family
        ours, theirs = hf_fp8.identity().to_dict(), reference.identity().to_dict()
        assert {**ours, "name": ""} == {**theirs, "name": ""}  # a cache built on either serves the other
        for rank, result in enumerate(results):
            want = reference.features(_batch(rank))
            got = {"hf": hf_fp8.features(_batch(rank))} | {b: result[family, b] for b in PARALLEL}
            for backend, feats in got.items():
                layers, final = (feats.layers_BTLH, feats.final_BTH) if backend == "hf" else (
                    feats["layers"], feats["final"])
                msg = f"{family} {backend} rank {rank}"
                torch.testing.assert_close(layers, want.layers_BTLH, atol=1e-5, rtol=1e-5, msg=msg)
                torch.testing.assert_close(final, want.final_BTH, atol=1e-5, rtol=1e-5, msg=msg)
                if backend != "hf":
                    torch.testing.assert_close(feats["embed"], reference.embed_weight, atol=0, rtol=0, msg=msg)
                    torch.testing.assert_close(feats["lm_head"], reference.lm_head_weight, atol=0, rtol=0, msg=msg)


def _small_fp8_dir(path: Path, quant: dict | None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A two-tensor checkpoint (a quantised ``[40, 30]`` weight with 16 x 16 blocks, and a norm) with ``quant``
    as its ``quantization_config`` (None: no quantization_config at all)."""
    weight, scale = quantize_block_fp8(torch.randn(40, 30, generator=torch.Generator().manual_seed(0)), [16, 16])
    tensors = tensors if tensors is not None else {"proj.weight": weight, "proj.weight_scale_inv": scale,
                                                   "norm.weight": torch.ones(30)}
    save_sharded(tensors, path, max_shard_bytes=600)
    config = {"model_type": "qwen3"} | ({"quantization_config": quant} if quant is not None else {})
    if quant is not None and "expert_dtype" in quant:  # where DeepSeek-V4's config.json has it
        config = {"model_type": "deepseek_v4", "expert_dtype": quant["expert_dtype"],
                  "quantization_config": {k: v for k, v in quant.items() if k != "expert_dtype"}}
    (path / "config.json").write_text(json.dumps(config))
    return path


GOOD = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}


@pytest.mark.parametrize("quant, message", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method='gptq' is not supported; only block FP8"),
    ({"quant_method": "awq"}, "quant_method='awq' is not supported; only block FP8"),
    ({"quant_method": "mxfp4"}, "quant_method='mxfp4' is not supported; only block FP8"),
    (GOOD | {"fmt": "e2m1"}, "fmt='e2m1' is not supported; only block FP8"),
    (GOOD | {"expert_dtype": "int4"}, r"expert_dtype='int4' is not supported \(expected 'fp8', or 'fp4' for MXFP4"),
    (GOOD | {"activation_scheme": "static"}, "activation_scheme='static' is not supported"),
    (GOOD | {"weight_block_size": None}, r"weight_block_size=None must be two positive integers \(per-tensor"),
    (GOOD | {"weight_block_size": [16, 0]}, r"weight_block_size=\[16, 0\] must be two positive integers"),
    (GOOD | {"weight_block_size": [32, 32]}, r"_scale_inv has shape \(3, 2\), but .* \[32, 32\] needs \(2, 1\)"),
])
def test_unsupported_or_inconsistent_schemes_fail_before_reading(tmp_path, monkeypatch, quant, message):
    """(c) Refused from config.json and the shard headers alone: no tensor byte is read."""
    import safetensors

    model_dir = _small_fp8_dir(tmp_path / "ckpt", quant)
    monkeypatch.setattr(safetensors, "safe_open", None)  # any tensor read would now crash with a TypeError
    with pytest.raises(ValueError, match=message):
        WeightIndex(model_dir)


def test_broken_weight_scale_pairs(tmp_path):
    """(c) A quantised weight without its scale, a scale without its weight, scales without a quantization_config."""
    weight, scale = quantize_block_fp8(torch.randn(40, 30), [16, 16])
    with pytest.raises(ValueError, match=r"quantised tensor proj.weight \(40, 30\) has no scale \(expected "
                                         r"proj.weight_scale_inv or proj.scale\)"):
        WeightIndex(_small_fp8_dir(tmp_path / "a", GOOD, {"proj.weight": weight, "norm.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match="scale tensors without a quantised weight: proj.weight_scale_inv"):
        WeightIndex(_small_fp8_dir(tmp_path / "c", GOOD,
                                   {"proj.weight": weight.float(), "proj.weight_scale_inv": scale}))
    with pytest.raises(ValueError, match="proj.weight_scale_inv has dtype torch.int32; expected a float scale"):
        WeightIndex(_small_fp8_dir(tmp_path / "d", GOOD, {"proj.weight": weight,
                                                          "proj.weight_scale_inv": scale.int()}))
    with pytest.raises(ValueError, match="scales .proj.weight_scale_inv. but its config.json has no quantization_c"):
        WeightIndex(_small_fp8_dir(tmp_path / "e", None))
    index = WeightIndex(_small_fp8_dir(tmp_path / "ok", GOOD))
    assert index.names() == ["norm.weight", "proj.weight"] and index.shape("proj.weight") == (40, 30)
    with pytest.raises(KeyError, match="proj.weight_scale_inv"):
        index.load("proj.weight_scale_inv")  # hidden: not a tensor of the model


def test_hf_backend_refuses_a_bad_fp8_checkpoint(checkpoints, tmp_path):
    """(c) The hf backend goes through the same checks (before transformers builds anything)."""
    fp8_dir = shutil.copytree(checkpoints["qwen3"]["fp8"], tmp_path / "qwen3-fp8")
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [32, 32]
    (fp8_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"with weight_block_size \[32, 32\] needs"):
        load_target(TargetConfig(name_or_path=str(fp8_dir), layer_ids=LAYER_IDS))
    config["quantization_config"] |= {"weight_block_size": [24, 20], "expert_dtype": "nvfp4"}
    (fp8_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="expert_dtype='nvfp4' is not supported"):
        load_target(TargetConfig(name_or_path=str(fp8_dir), layer_ids=LAYER_IDS))


def test_hf_backend_on_deepseeks_per_expert_layout(checkpoints, tmp_path):
    """DeepSeek's hub layout (one FP8 tensor + scale per expert) goes through transformers' own expert fusing."""
    twin_dir = checkpoints["deepseek_v3"]["twin"]
    fp8_dir = tmp_path / "per-expert"
    state = write_fp8_checkpoint(twin_dir, fp8_dir, tmp_path / "per-expert-twin", BLOCKS["deepseek_v3"],
                                 per_expert=True)
    assert "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv" in state
    reference = load_target(TargetConfig(name_or_path=str(twin_dir), layer_ids=LAYER_IDS))
    hf_fp8 = load_target(TargetConfig(name_or_path=str(fp8_dir), layer_ids=LAYER_IDS))
    want, got = reference.features(_batch(0)), hf_fp8.features(_batch(0))
    # Quantising the dequantised twin again gives the same FP8 values and scales (each block's max is exactly 448
    # times its scale), so this is the same model.
    torch.testing.assert_close(got.layers_BTLH, want.layers_BTLH, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.final_BTH, want.final_BTH, atol=1e-5, rtol=1e-5)
