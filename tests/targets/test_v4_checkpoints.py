"""DeepSeek-V4's own checkpoint layout read dequantised: DeepSeek's tensor names, FP8 e4m3 weights with E8M0 block
scales under ``<module>.scale``, MXFP4 routed experts (two e2m1 codes per int8 byte, one E8M0 scale per 32 values)
stored one tensor per expert, and ``mtp.*`` layers.

A tiny deepseek_v4 is written that way (multi-shard, blocks of 16 x 24 so FP8 edges are ragged) next to its
dequantised float32 twin in transformers' layout; every read must equal the twin exactly, and the hf and zero3
backends on it must give hf's features on the twin. FP4 values are checked against a decoder written here from the
OCP MX spec and against transformers' own CPU dequantiser (``Fp8Dequantize``); FP8 against transformers'
``_dequantize_fp8_weight``.
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
from tiny_families import deepseek_v4_hub_name, fuse_experts, save_tiny, split_experts

from dspark.config import TargetConfig
from dspark.targets import load_target
from dspark.targets.weights import WeightIndex, checkpoint_layout, expert_parts, save_sharded

VOCAB = 1024
SHARD_BYTES = 12 << 10  # FP8/FP4 tensors are small: many shards, scales often apart from their weights
BLOCK = [16, 24]  # hidden 64 and q_lora 32 are not multiples of 24: ragged edge blocks
LAYER_IDS = [-1, 0, 1]  # 4 layers: the last (3) is excluded by every backend
WORLD = 2
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
E2M1_MAX = 6.0
# OCP MX spec, e2m1 (bit 3 sign, 2 exponent bits with bias 1, 1 mantissa bit): codes 0-7 are these magnitudes.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Stored unquantised in DeepSeek-V4-Flash: embeddings, head, router, and the compressor / indexer projections.
UNQUANTISED = ("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight", "compressor.kv_proj.weight",
               "compressor.gate_proj.weight", "indexer.kv_proj.weight", "indexer.gate_proj.weight",
               "weights_proj.weight")
QUANT = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "activation_scheme": "dynamic",
         "weight_block_size": BLOCK}


def _pow2_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= x (1 where x is 0), as E8M0 stores scales."""
    return torch.where(x > 0, torch.exp2(torch.ceil(torch.log2(x))), torch.ones_like(x))


def quantize_fp8_e8m0(weight: torch.Tensor, block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8 [M, N], E8M0 scale [ceil(M/b0), ceil(N/b1)])``: each block's scale the power of two that fits its
    max |w| under 448."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    padded = weight.new_zeros(grid[0] * block[0], grid[1] * block[1])
    padded[:rows, :cols] = weight
    amax = padded.unflatten(1, (grid[1], block[1])).unflatten(0, (grid[0], block[0])).abs().amax(dim=(1, 3))
    scale = _pow2_at_least(amax / FP8_MAX)
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    quantized = (weight / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized, scale.to(torch.float8_e8m0fnu)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 [M, K/2], E8M0 scale [M, K/32])``: each 32-value block scaled by a power of two, rounded to the
    nearest e2m1 code, column 2b in the low nibble of byte b and column 2b + 1 in the high one."""
    rows, cols = weight.shape
    blocks = weight.unflatten(1, (cols // 32, 32))
    scale = _pow2_at_least(blocks.abs().amax(dim=-1) / E2M1_MAX)
    scaled = (blocks / scale[..., None]).flatten(1)
    values = torch.tensor(E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES))
    codes = (scaled[..., None] - values).abs().argmin(dim=-1).to(torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.view(torch.int8), scale.to(torch.float8_e8m0fnu)


def reference_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The spec, value by value: byte b of a row is columns 2b (low nibble) and 2b + 1 (high nibble), code c means
    ``(-1)^(c >> 3) * E2M1_MAGNITUDES[c & 7]``, times the E8M0 scale ``2^(byte - 127)`` of its 32-column block."""
    raw = packed.view(torch.uint8).long()
    rows, width = raw.shape
    out = torch.empty(rows, 2 * width)
    exponents = scale.view(torch.uint8).long()
    for r in range(rows):
        for b in range(width):
            for col, code in ((2 * b, int(raw[r, b]) & 0xF), (2 * b + 1, int(raw[r, b]) >> 4)):
                sign = -1.0 if code >> 3 else 1.0
                out[r, col] = sign * E2M1_MAGNITUDES[code & 7] * 2.0 ** (int(exponents[r, col // 32]) - 127)
    return out


def reference_fp8(quantized: torch.Tensor, scale: torch.Tensor, block: list[int]) -> torch.Tensor:
    """Block by block: ``w[r, c] = fp8[r, c] * 2^(scale_byte[r // b0, c // b1] - 127)``."""
    out = quantized.float()
    exponents = scale.view(torch.uint8).long()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] *= 2.0 ** (
                int(exponents[i, j]) - 127)
    return out


def _scale_name(hub_weight: str) -> str:
    return hub_weight.removesuffix(".weight") + ".scale"


def write_v4_checkpoint(float_dir: Path, native_dir: Path, twin_dir: Path) -> dict[str, torch.Tensor]:
    """``float_dir`` (transformers' layout) quantised into DeepSeek-V4's own layout in ``native_dir`` (plus two
    ``mtp.0`` tensors), and the dequantised values as a float32 checkpoint in transformers' layout in ``twin_dir``;
    returns the native state dict."""
    source = WeightIndex(float_dir)
    pieces = split_experts({name: source.load(name) for name in source.names()})
    native, twin = {}, {}
    for name, value in pieces.items():
        hub = deepseek_v4_hub_name(name)
        if ".experts." in name and ".shared_experts." not in name:
            native[hub], native[_scale_name(hub)] = quantize_mxfp4(value)
            twin[name] = reference_fp4(native[hub], native[_scale_name(hub)])
        elif value.dim() == 2 and name.endswith(".weight") and not name.endswith(UNQUANTISED):
            native[hub], native[_scale_name(hub)] = quantize_fp8_e8m0(value, BLOCK)
            twin[name] = reference_fp8(native[hub], native[_scale_name(hub)], BLOCK)
        else:
            native[hub] = twin[name] = value
    g = torch.Generator().manual_seed(7)  # DeepSeek ships its MTP layer beside the model: tensors it must skip
    native["mtp.0.attn.wq_a.weight"], native["mtp.0.attn.wq_a.scale"] = quantize_fp8_e8m0(
        torch.randn(32, 64, generator=g), BLOCK)
    native["mtp.0.ffn.experts.0.w1.weight"], native["mtp.0.ffn.experts.0.w1.scale"] = quantize_mxfp4(
        torch.randn(32, 64, generator=g))
    native["mtp.0.enorm.weight"] = torch.ones(64)
    config = json.loads((float_dir / "config.json").read_text())
    for out, state, extra in ((native_dir, native, {"quantization_config": QUANT, "expert_dtype": "fp4"}),
                              (twin_dir, fuse_experts(twin), {})):
        out.mkdir(parents=True)
        for f in float_dir.iterdir():
            if not f.name.startswith("model"):
                shutil.copy(f, out / f.name)
        (out / "config.json").write_text(json.dumps({**config, **extra}, indent=2))
        save_sharded(state, out, SHARD_BYTES)
    return native


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("v4")
    source = save_tiny("deepseek_v4", root / "float", 1 << 30, tokenizer_dir=tokenizer_dir, vocab_size=VOCAB)
    write_v4_checkpoint(source, root / "native", root / "twin")
    return {"native": root / "native", "twin": root / "twin"}


def _raw(index: WeightIndex, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored (quantised) tensor of logical ``name`` and its stored scale."""
    stored = index.stored_name(name)
    scale = stored.removesuffix(".weight") + ".scale"
    return index._handle(stored).get_tensor(stored), index._handle(scale).get_tensor(scale)


def test_reads_equal_the_twin_and_transformers_dequantisation(checkpoints):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    index, twin = WeightIndex(checkpoints["native"]), WeightIndex(checkpoints["twin"])
    assert len({index.file_of(n) for n in index.names()}) >= 4  # really multi-shard
    assert not any(n.endswith((".scale", "_scale_inv")) and index.is_quantized(n) for n in index.names())
    expected = {name: twin.shape(name) for name in twin.names()}
    index.check_against(checkpoint_layout(expected, index))  # the model's names; mtp.* skipped with a note
    assert index.mtp_names() == ["mtp.0.enorm.weight", "mtp.0.mlp.experts.0.gate_proj.weight",
                                 "mtp.0.self_attn.q_a_proj.weight"]
    fp4 = [n for n in index.names() if index.is_quantized(n) and index._handle(index.stored_name(n)).get_slice(
        index.stored_name(n)).get_dtype() == "I8"]
    fp8 = [n for n in index.names() if index.is_quantized(n) and n not in fp4]
    assert len(fp4) == 3 * 4 * 4 + 1 and len(fp8) > 20  # every routed expert piece (4 layers x 4 experts), + MTP
    assert any(index.shape(n)[1] % BLOCK[1] for n in fp8), "no FP8 weight with a partial edge block"
    dequantizer = Fp8Dequantize(None)
    for name in index.names():
        full = index.load(name)
        assert index.shape(name) == tuple(full.shape) and index.dtype(name) == full.dtype
        if name in fp4:  # transformers' own unpacking (its LUT, nibble order, scale grid) agrees
            raw, scale = _raw(index, name)
            assert raw.dtype == torch.int8 and scale.dtype == torch.float8_e8m0fnu
            assert torch.equal(dequantizer._dequantize_one(raw, scale, torch.float32), full), name
        elif name in fp8:
            raw, scale = _raw(index, name)
            assert raw.dtype == torch.float8_e4m3fn and scale.dtype == torch.float8_e8m0fnu
            assert torch.equal(_dequantize_fp8_weight(raw, scale, BLOCK, torch.float32), full), name
    for name, shape in expected.items():
        parts = expert_parts(index, name, shape)
        if parts is None:
            assert torch.equal(index.load(name), twin.load(name)), name
            continue
        pieces = [index.load(p) for p in parts]  # the fused expert tensor, pieces in memory order
        assert torch.equal(torch.cat([p.reshape(-1) for p in pieces]), twin.load(name).reshape(-1)), name


@pytest.mark.parametrize("kind", ["fp4", "fp8"])
def test_slices_and_flat_ranges_equal_the_whole(checkpoints, kind):
    index = WeightIndex(checkpoints["native"])
    names = {"fp4": ["model.layers.1.mlp.experts.2.up_proj.weight", "model.layers.2.mlp.experts.0.down_proj.weight"],
             "fp8": ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.1.mlp.shared_experts.down_proj.weight"]}
    for name in names[kind]:
        full = index.load(name)
        for dim in range(full.dim()):
            size = full.shape[dim]
            ranges = [(0, size), (size // 2, size), (5, 30), (7, 8), (size - 1, size), (1, 1), (3, 3), (33, 50)]
            for start, stop in [(a, b) for a, b in ranges if b <= size]:
                part = index.load_slice(name, dim, start, stop, torch.float64)
                assert torch.equal(part, full.narrow(dim, start, stop - start).double()), (name, dim, start, stop)
        n = full.numel()
        for start, stop in [(0, n), (n // 3, n // 2 + 7), (n - 5, n), (9, 9), (31, 97)]:
            assert torch.equal(index.load_flat_range(name, start, stop), full.reshape(-1)[start:stop])


def test_slices_read_only_their_rows_and_bytes(checkpoints):
    from test_fp8_checkpoints import _spy_reads

    index = WeightIndex(checkpoints["native"])
    expert = "model.layers.1.mlp.experts.2.gate_proj.weight"  # [32, 64]: int8 [32, 32], scales [32, 2]
    dense = "model.layers.0.self_attn.q_a_proj.weight"  # [32, 64]: fp8, scales [2, 3] (blocks 16 x 24)
    assert index.shape(expert) == (32, 64) and index.shape(dense) == (32, 64)
    hub_expert, hub_dense = "layers.1.ffn.experts.2.w1", "layers.0.attn.wq_a"
    assert index.stored_name(expert) == hub_expert + ".weight"
    reads = _spy_reads(index)
    index.load_slice(expert, 0, 5, 9)  # rows 5..8 and their scale rows
    index.load_slice(expert, 1, 33, 50)  # columns 33..49: bytes 16..24, scale block 1
    index.load_flat_range(expert, 130, 300)  # rows 2..4
    index.load_slice(dense, 1, 30, 64)  # columns 30..63: scale block columns 1..2
    index.load_slice(dense, 0, 16, 17)  # row 16: scale block row 1
    assert reads == [
        (hub_expert + ".weight", (slice(5, 9),)), (hub_expert + ".scale", (slice(5, 9),)),
        (hub_expert + ".weight", (slice(None), slice(16, 25))), (hub_expert + ".scale", (slice(None), slice(1, 2))),
        (hub_expert + ".weight", (slice(2, 5),)), (hub_expert + ".scale", (slice(2, 5),)),
        (hub_dense + ".weight", (slice(None), slice(30, 64))), (hub_dense + ".scale", (slice(None), slice(1, 3))),
        (hub_dense + ".weight", (slice(16, 17),)), (hub_dense + ".scale", (slice(1, 2),)),
    ]


def test_names_are_the_ones_transformers_loads_them_as(checkpoints):
    """Every stored name through transformers' own loader renames (its deepseek_v4 mapping, its FP8 quantizer's
    ``.scale`` rename and the ``model.`` prefix against the model's state dict) lands where the index puts it."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    from transformers.quantizers import AutoHfQuantizer

    index = WeightIndex(checkpoints["native"])
    config = AutoConfig.from_pretrained(checkpoints["native"])
    assert config.quantization_config["expert_dtype"] == "fp4"  # moved inside by transformers, as V4.1 has it
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    quantizer = AutoHfQuantizer.from_config(config.quantization_config, pre_quantized=True)
    transforms = get_model_conversion_mapping(model, hf_quantizer=quantizer)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()

    def theirs(stored: str) -> str:
        return rename_source_key(stored, renamings, converters, model.base_model_prefix, meta)[0]

    fused = {part: name for name, t in meta.items() for part in expert_parts(index, name, tuple(t.shape)) or ()}
    assert len(fused) == 4 * 4 * 3
    for name in set(index.names()) - set(index.mtp_names()):  # mtp.* are ignored by transformers' loader
        stored = index.stored_name(name)
        assert theirs(stored) == fused.get(name, name), stored
        if index.is_quantized(name):  # their scale name follows their weight name
            want = fused[name] if name in fused else name.removeprefix("model.") + "_scale_inv"
            assert theirs(stored.removesuffix(".weight") + ".scale") == want, stored
    assert {n for n in index.names() if n in meta or n in fused} | set(index.mtp_names()) == set(index.names())


def _worker(rank: int, port: int, native_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    target = load_target(TargetConfig(name_or_path=native_dir, layer_ids=LAYER_IDS, backend="zero3"))
    feats = target.features(_batch(rank))
    torch.save({"layers": feats.layers_BTLH, "final": feats.final_BTH, "embed": target.embed_weight.clone(),
                "lm_head": target.lm_head_weight.clone()}, Path(out_dir) / f"rank{rank}.pt")


def _batch(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(20 + rank)
    return torch.randint(0, VOCAB, (2, 10) if rank == 0 else (1, 13), generator=g)


def test_hf_and_zero3_on_v4_layout_equal_hf_on_the_twin(checkpoints, tmp_path, one_thread):
    results = spawn_ranks(_worker, (free_port(), str(checkpoints["native"]), str(tmp_path)), WORLD, timeout=240,
                          what="zero3 workers", results=tmp_path)
    reference = load_target(TargetConfig(name_or_path=str(checkpoints["twin"]), layer_ids=LAYER_IDS))
    hf_native = load_target(TargetConfig(name_or_path=str(checkpoints["native"]), layer_ids=LAYER_IDS))
    twin_state, native_state = reference.model.state_dict(), hf_native.model.state_dict()
    assert twin_state.keys() == native_state.keys()
    assert all(torch.equal(native_state[k], v) for k, v in twin_state.items())
    for rank, zero3 in enumerate(results):
        want = reference.features(_batch(rank))
        hf = hf_native.features(_batch(rank))
        got = {"hf": (hf.layers_BTLH, hf.final_BTH), "zero3": (zero3["layers"], zero3["final"])}
        for backend, (layers, final) in got.items():
            torch.testing.assert_close(layers, want.layers_BTLH, atol=1e-5, rtol=1e-5, msg=f"{backend} rank {rank}")
            torch.testing.assert_close(final, want.final_BTH, atol=1e-5, rtol=1e-5, msg=f"{backend} rank {rank}")
        assert torch.equal(zero3["embed"], reference.embed_weight)
        assert torch.equal(zero3["lm_head"], reference.lm_head_weight)


# -- bad inputs: refused from config.json and the shard headers alone ----------------------------------------


def _small_v4_dir(path: Path, tensors: dict[str, torch.Tensor], quant: dict | None = QUANT,
                  expert_dtype: str | None = "fp4") -> Path:
    """A checkpoint of ``tensors`` under DeepSeek-V4's names, with ``quant`` as its quantization_config and
    ``expert_dtype`` beside it (None: left out)."""
    save_sharded(tensors, path, max_shard_bytes=600)
    config = {"model_type": "deepseek_v4"} | ({"quantization_config": quant} if quant is not None else {})
    config |= {"expert_dtype": expert_dtype} if expert_dtype is not None else {}
    (path / "config.json").write_text(json.dumps(config))
    return path


def _good() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w1, w1_scale = quantize_mxfp4(torch.randn(8, 64, generator=g))
    wq, wq_scale = quantize_fp8_e8m0(torch.randn(40, 30, generator=g), BLOCK)
    return {"embed.weight": torch.randn(16, 8, generator=g), "layers.0.ffn.experts.0.w1.weight": w1,
            "layers.0.ffn.experts.0.w1.scale": w1_scale, "layers.0.attn.wq_a.weight": wq,
            "layers.0.attn.wq_a.scale": wq_scale}


E1, WQ = "layers.0.ffn.experts.0.w1", "layers.0.attn.wq_a"


@pytest.mark.parametrize("edit, message", [
    ({E1 + ".scale": torch.ones(8, 3).to(torch.float8_e8m0fnu)},
     r"w1.scale has shape \(8, 3\), but packed FP4 .*w1.weight \(8, 32\) \(\(8, 64\) values, one scale per 32\) "
     r"needs \(8, 2\)"),
    ({WQ + ".scale": torch.ones(2, 2).to(torch.float8_e8m0fnu)},
     r"wq_a.scale has shape \(2, 2\), but .*wq_a.weight \(40, 30\) with weight_block_size \[16, 24\] needs \(3, 2\)"),
    ({E1 + ".weight": torch.zeros(8, 17, dtype=torch.int8), E1 + ".scale": torch.ones(8, 1).to(torch.float8_e8m0fnu)},
     r"packed FP4 tensor .*w1.weight \(8, 17\) is 17 bytes \(34 values\) wide; MXFP4 needs whole blocks of 32"),
    ({E1 + ".scale": torch.ones(8, 2, dtype=torch.int32)}, r"w1.scale has dtype torch.int32; expected a float scale"),
    ({WQ + ".weight_scale_inv": torch.ones(3, 2)}, r"wq_a.weight has two scales \(.*wq_a.weight_scale_inv, .*scale\)"),
    ({"layers.0.attn.wo_a.scale": torch.ones(2, 2).to(torch.float8_e8m0fnu)},
     "scale tensors without a quantised weight: layers.0.attn.wo_a.scale"),
])
def test_bad_tensors_are_clear_errors(tmp_path, monkeypatch, edit, message):
    import safetensors

    model_dir = _small_v4_dir(tmp_path / "ckpt", _good() | edit)
    monkeypatch.setattr(safetensors, "safe_open", None)  # any tensor read would now crash with a TypeError
    with pytest.raises(ValueError, match=message):
        WeightIndex(model_dir)


def test_config_variants(tmp_path):
    """expert_dtype beside (V4) or inside (V4.1) the quantization_config; FP4 tensors need it; others refused."""
    index = WeightIndex(_small_v4_dir(tmp_path / "v4", _good()))
    inside = WeightIndex(_small_v4_dir(tmp_path / "v41", _good(), QUANT | {"expert_dtype": "fp4"}, None))
    for ix in (index, inside):
        assert ix.names() == ["model.embed_tokens.weight", "model.layers.0.mlp.experts.0.gate_proj.weight",
                              "model.layers.0.self_attn.q_a_proj.weight"]
        assert ix.shape("model.layers.0.mlp.experts.0.gate_proj.weight") == (8, 64)
        assert ix.dtype("model.layers.0.mlp.experts.0.gate_proj.weight") == torch.float32
    with pytest.raises(ValueError, match=r"w1.weight is int8 with a scale .*, i.e. packed FP4 \(MXFP4\), but "
                                         r"quantization_config.expert_dtype is 'fp8'; expected 'fp4'"):
        WeightIndex(_small_v4_dir(tmp_path / "fp8", _good(), expert_dtype=None))
    with pytest.raises(ValueError, match=r"expert_dtype='nvfp4' is not supported \(expected 'fp8', or 'fp4'"):
        WeightIndex(_small_v4_dir(tmp_path / "nv", _good(), expert_dtype="nvfp4"))
    with pytest.raises(ValueError, match=r"stores FP8 weights with scales \(layers.0.attn.wq_a.scale, "
                                         r"layers.0.ffn.experts.0.w1.scale\) but its config.json has no quantizati"):
        WeightIndex(_small_v4_dir(tmp_path / "none", _good(), quant=None, expert_dtype=None))
