"""DeepSeek-V3/R1 hub checkpoints on the parallel backends: one tensor per routed expert, and MTP layers.

A tiny deepseek_v3 is written three ways: fused float32 (transformers' own layout, the hf reference), the hub
layout (``experts.{e}.gate_proj.weight`` ..., plus one multi-token-prediction layer ``model.layers.3.*``,
multi-shard), and that hub layout in block FP8 (next to its dequantised twin, fused, for the reference). On two
gloo processes zero3 on either hub checkpoint must give the hf backend's features on the fused float32 one, and
megatron (TP 2) must accept the MTP-carrying checkpoint and agree too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_fp8_checkpoints import UNQUANTISED, _spy_reads, quantize_block_fp8, reference_dequantize
from tiny_families import add_mtp_layers, fuse_experts, save_tiny, split_experts, write_checkpoint

from dspark.config import TargetConfig
from dspark.targets import load_target
from dspark.targets.weights import WeightIndex, mtp_tensor_names

VOCAB = 1024  # SmolLM2's tokenizer cut to 1024 ids: every backend needs a tokenizer, the model stays < 1 MB
SHARD_BYTES = 48 << 10  # several shards, with one layer's experts spread over more than one
BLOCK = [16, 16]  # DeepSeek's square blocks shrunk; experts are 32 x 64 / 64 x 32, kv_a_proj_with_mqa 40 rows
LAYER_IDS = [-1, 0, 1]
WORLD = 2
GATE_UP = "model.layers.1.mlp.experts.gate_up_proj"  # [E=4, 2I=64, H=64]: per expert gate [32, 64] then up
DOWN = "model.layers.1.mlp.experts.down_proj"  # [E=4, H=64, I=32]
# backend run over the 2 processes -> (checkpoint, extra TargetConfig fields)
RUNS = {"zero3": ("hub", {}), "zero3-fp8": ("hub_fp8", {}), "megatron": ("hub", {"tensor_parallel": 2})}
REFERENCE = {"hub": "fused", "hub_fp8": "twin"}  # the hf backend's checkpoint each hub checkpoint must match


def _quantise(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(block-FP8 state with *_scale_inv, its dequantised values)``; what DeepSeek keeps unquantised stays so."""
    fp8_state, dequantised = {}, {}
    for name, value in state.items():
        if value.dim() < 2 or name.endswith((*UNQUANTISED, "shared_head.head.weight")):
            fp8_state[name] = dequantised[name] = value
            continue
        quantized, scale_inv = quantize_block_fp8(value, BLOCK)
        fp8_state[name], fp8_state[f"{name}_scale_inv"] = quantized, scale_inv
        dequantised[name] = reference_dequantize(quantized, scale_inv, BLOCK)
    return fp8_state, dequantised


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """``fused`` float32 (transformers' layout), ``hub`` (per expert + MTP layer, float32), ``hub_fp8`` (the same
    in block FP8) and ``twin`` (``hub_fp8`` dequantised, fused, without the MTP layer)."""
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("deepseek_hub")
    fused = save_tiny("deepseek_v3", root / "fused", 1 << 30, tokenizer_dir=tokenizer_dir, vocab_size=VOCAB)
    config = AutoConfig.from_pretrained(fused)
    assert config.num_nextn_predict_layers == 1 and config.num_hidden_layers == 3
    index = WeightIndex(fused)
    hub_state = add_mtp_layers(split_experts({n: index.load(n) for n in index.names()}), config)
    fp8_state, dequantised = _quantise(hub_state)
    mtp = set(mtp_tensor_names(hub_state, config.to_dict()))
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": BLOCK}
    return {
        "fused": fused,
        "hub": write_checkpoint(hub_state, fused, root / "hub", SHARD_BYTES),
        "hub_fp8": write_checkpoint(fp8_state, fused, root / "hub-fp8", SHARD_BYTES, quantization_config=quant),
        "twin": write_checkpoint(fuse_experts({n: v for n, v in dequantised.items() if n not in mtp}), fused,
                                 root / "twin", 1 << 30),
    }


def _batch(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randint(0, VOCAB, (2, 10) if rank == 0 else (1, 7), generator=g)


@contextlib.contextmanager
def _recorded_reads():
    """Record ``(method, name, int args)`` of every WeightIndex read (any instance) inside the block."""
    reads = []
    originals = {m: getattr(WeightIndex, m) for m in ("load", "load_slice", "load_flat_range")}

    def recording(method, read):
        def wrapper(self, name, *args, **kwargs):
            reads.append((method, name, tuple(a for a in args if isinstance(a, int))))
            return read(self, name, *args, **kwargs)
        return wrapper

    for method, read in originals.items():
        setattr(WeightIndex, method, recording(method, read))
    try:
        yield reads
    finally:
        for method, read in originals.items():
            setattr(WeightIndex, method, read)


def _worker(rank: int, port: int, dirs: dict[str, str], out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results = {}
    for run, (checkpoint, extra) in RUNS.items():
        backend = run.split("-")[0]
        with _recorded_reads() as reads:
            target = load_target(TargetConfig(name_or_path=dirs[checkpoint], layer_ids=LAYER_IDS, backend=backend,
                                              **extra))
        feats = target.features(_batch(rank))
        results[run] = {"layers": feats.layers_BTLH, "final": feats.final_BTH, "reads": reads}
        if backend == "zero3":
            results[run]["param_bytes"] = target.partition_bytes()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def parallel_results(checkpoints, tmp_path_factory) -> list[dict]:
    """Every run of ``RUNS`` on 2 processes; a failed or hung rank fails the test instead of hanging it."""
    from conftest import free_port, spawn_ranks

    out = tmp_path_factory.mktemp("hub_out")
    return spawn_ranks(_worker, (free_port(), {k: str(v) for k, v in checkpoints.items()}, str(out)), WORLD,
                       timeout=240, what="hub-layout workers", results=out)


def test_parallel_backends_on_hub_layout_equal_hf_on_fused(checkpoints, parallel_results, one_thread):
    """zero3 (float32 and FP8 hub layout) and megatron TP 2 (float32 hub layout, MTP layer present) vs hf."""
    references = {c: load_target(TargetConfig(name_or_path=str(checkpoints[c]), layer_ids=LAYER_IDS))
                  for c in set(REFERENCE.values())}
    for rank, results in enumerate(parallel_results):
        for run, (checkpoint, _) in RUNS.items():
            want = references[REFERENCE[checkpoint]].features(_batch(rank))
            msg = f"{run} rank {rank}"
            torch.testing.assert_close(results[run]["layers"], want.layers_BTLH, atol=1e-5, rtol=1e-5, msg=msg)
            torch.testing.assert_close(results[run]["final"], want.final_BTH, atol=1e-5, rtol=1e-5, msg=msg)
    # each rank holds half the parameters (plus < 1 element of padding per tensor)
    full = sum(p.numel() * p.element_size() for p in references["fused"].model.parameters())
    for rank, results in enumerate(parallel_results):
        for run in ("zero3", "zero3-fp8"):
            share = results[run]["param_bytes"] / full
            assert 0.45 <= share <= 0.6, f"{run} rank {rank}: holds {share:.3f} of the parameters"


def test_zero3_ranks_read_only_their_own_experts(parallel_results):
    """A fused expert parameter splits over 2 ranks exactly at the middle expert, so rank r reads experts
    2r, 2r+1 of every MoE layer (each in one flat range) and never the other half, the whole set, or the MTP layer."""
    import re

    piece = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight")
    for rank, results in enumerate(parallel_results):
        for run in ("zero3", "zero3-fp8"):
            reads = results[run]["reads"]
            experts = [(m, n) for m, n, _ in reads if ".experts." in n]
            assert {m for m, _ in experts} == {"load_flat_range"}, run  # never a whole expert tensor
            touched = {}
            for _, name in experts:
                layer, e, proj = piece.fullmatch(name).groups()
                touched.setdefault((int(layer), proj), set()).add(int(e))
            assert touched == {(layer, proj): {2 * rank, 2 * rank + 1}
                               for layer in (1, 2) for proj in ("gate_proj", "up_proj", "down_proj")}, (run, rank)
            assert not [n for _, n, _ in reads if n.startswith("model.layers.3.")], run


@pytest.mark.parametrize("checkpoint, reference", REFERENCE.items())
def test_partition_read_touches_only_the_rows_it_needs(checkpoints, checkpoint, reference):
    """A flat range of a fused expert parameter starting inside expert 0's up rows and ending inside expert 2's
    gate rows reads exactly those rows of those tensors (and, for FP8, their blocks' scale rows)."""
    from dspark.targets.zero3 import read_partition

    expert = lambda e, proj: f"model.layers.1.mlp.experts.{e}.{proj}.weight"  # noqa: E731
    index, whole = WeightIndex(checkpoints[checkpoint]), WeightIndex(checkpoints[reference]).load(GATE_UP)
    assert GATE_UP not in index and index.is_quantized(expert(0, "up_proj")) == (checkpoint == "hub_fp8")
    spied = _spy_reads(index)
    # an unquantised row range is read as [a:b], a quantised one as [(a:b,)]: the same rows
    reads = lambda: [(name, key if isinstance(key, tuple) else (key,)) for name, key in spied]  # noqa: E731
    # Per expert 64 rows x 64 columns = 4096 elements, gate rows 0..31 then up rows 32..63. Element 3000 is in
    # expert 0's up row (3000 - 2048) // 64 = 14; element 9000 - 1 is expert 2's gate row (8999 - 8192) // 64 = 12.
    got = read_partition(index, GATE_UP, tuple(whole.shape), 3000, 9000, torch.float32)
    assert torch.equal(got, whole.reshape(-1)[3000:9000])
    rows = [(expert(0, "up_proj"), 14, 32), (expert(1, "gate_proj"), 0, 32), (expert(1, "up_proj"), 0, 32),
            (expert(2, "gate_proj"), 0, 13)]
    if checkpoint == "hub":
        assert reads() == [(name, (slice(a, b),)) for name, a, b in rows]
    else:  # scale row i covers rows 16i .. 16i + 15
        assert reads() == [r for name, a, b in rows for r in ((name, (slice(a, b),)),
                                                            (name + "_scale_inv", (slice(a // 16, -(-b // 16)),)))]
    # The second half of down_proj [4, 64, 32] is experts 2 and 3, whole.
    spied.clear()
    down = WeightIndex(checkpoints[reference]).load(DOWN)
    got = read_partition(index, DOWN, tuple(down.shape), down.numel() // 2, down.numel(), torch.float32)
    assert torch.equal(got, down.reshape(-1)[down.numel() // 2 :])
    assert [r for r in reads() if not r[0].endswith("_scale_inv")] == [
        (expert(e, "down_proj"), (slice(0, 64),)) for e in (2, 3)]
    pieces = [expert(e, "down_proj") for e in range(4)]
    with pytest.raises(ValueError, match=r"have 8192 elements together; flat range \[4096, 8193\) is out of range"):
        index.load_flat_range_of(pieces, 4096, 8193)


def _expected(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """What zero3 checks a checkpoint against: the model's tensors, in the checkpoint's expert layout."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dspark.targets.common import expected_tensors
    from dspark.targets.weights import checkpoint_layout

    with torch.device("meta"):
        expected, _ = expected_tensors(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint)))
    return checkpoint_layout(expected, WeightIndex(checkpoint))


def _edited_copy(src: Path, dst: Path, add: dict[str, torch.Tensor] = {}, drop: tuple[str, ...] = (),  # noqa: B006
                 **config_updates) -> Path:
    """A copy of checkpoint ``src`` with tensors added (in a shard of their own) or dropped from its index."""
    from safetensors.torch import save_file

    out = shutil.copytree(src, dst)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name in drop:
        del index["weight_map"][name]
    if add:
        save_file(add, str(out / "model-extra.safetensors"))
        index["weight_map"].update(dict.fromkeys(add, "model-extra.safetensors"))
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **config_updates}))
    return out


def test_mtp_layers_skipped_with_a_note_anything_else_refused(checkpoints, tmp_path, caplog, monkeypatch):
    from dspark.targets import zero3

    hub = checkpoints["hub"]
    for checkpoint in ("hub", "hub_fp8"):
        index = WeightIndex(checkpoints[checkpoint])
        mtp = index.mtp_names()
        assert len(mtp) > 20 and all(n.startswith("model.layers.3.") for n in mtp)
        assert not any(n.endswith("_scale_inv") for n in mtp) and "model.layers.3.eh_proj.weight" in mtp
        caplog.clear()
        index.check_against(_expected(checkpoints[checkpoint]))
        notes = [r.getMessage() for r in caplog.records]
        assert len(notes) == 1 and f"skipping {len(mtp)} tensors of multi-token-prediction layer(s) 3 " in notes[0]

    # Through the zero3 backend: every check passes before the model would be built.
    class Built(Exception):
        pass

    def built(*args, **kwargs):
        raise Built

    monkeypatch.setattr(zero3, "build_partitioned", built)
    cfg = lambda path: TargetConfig(name_or_path=str(path), backend="zero3", layer_ids=LAYER_IDS)  # noqa: E731
    with pytest.raises(Built):
        load_target(cfg(hub))

    # A layer past the declared MTP layers, or an extra expert in a real layer, is still an error.
    g = torch.Generator().manual_seed(0)
    extra = {"model.layers.4.eh_proj.weight": torch.randn(64, 128, generator=g),
             "model.layers.1.mlp.experts.4.gate_proj.weight": torch.randn(32, 64, generator=g)}
    with pytest.raises(ValueError, match=r"not in the model: model\.layers\.1\.mlp\.experts\.4\.gate_proj\.weight, "
                                         r"model\.layers\.4\.eh_proj\.weight$"):
        load_target(cfg(_edited_copy(hub, tmp_path / "extra", extra)))
    # Without num_nextn_predict_layers the MTP layer's tensors are not skipped.
    with pytest.raises(ValueError, match=r"not in the model: model\.layers\.3\."):
        load_target(cfg(_edited_copy(hub, tmp_path / "no_mtp", num_nextn_predict_layers=0)))
    # A missing expert tensor is named in the per-expert layout.
    gone = "model.layers.2.mlp.experts.3.down_proj.weight"
    with pytest.raises(ValueError, match=rf"missing from the checkpoint: {gone.replace('.', '[.]')}$"):
        load_target(cfg(_edited_copy(hub, tmp_path / "missing", drop=(gone,))))
