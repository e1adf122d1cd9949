"""DeepSeek-V4's mtp.* layout (`dspark export --format deepseek-v4-mtp[-fp8]`): every tensor's name, dtype and shape
against V4_DSPARK.md's table (scaled to the tiny config, and literally at V4-Flash's size on the meta device),
export -> import round trips, the FP8 / MXFP4 quantisers against the dequantisers the loaders use, and refusals."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "drafters"))
from tiny_v4 import features, make_drafter  # noqa: E402

F8, E8M0, BF16, F32, I8 = torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.bfloat16, torch.float32, torch.int8


def spec_table(H, N, D, q_lora, G, o_lora, E, F, C, L, V, r, stages, confidence=True):
    """V4_DSPARK.md section 1 as ``name -> (release dtype, logical shape)``; "FP8"/"FP4" mark quantised weights.
    F is the expert width (moe_intermediate_size), C the mHC streams, L the target layers fed to main_proj."""
    hc = (2 + C) * C
    stage = {"attn.wq_a.weight": ("FP8", (q_lora, H)), "attn.q_norm.weight": (BF16, (q_lora,)),
             "attn.wq_b.weight": ("FP8", (N * D, q_lora)), "attn.wkv.weight": ("FP8", (D, H)),
             "attn.kv_norm.weight": (BF16, (D,)), "attn.wo_a.weight": ("FP8", (G * o_lora, N * D // G)),
             "attn.wo_b.weight": ("FP8", (H, G * o_lora)), "attn.attn_sink": (F32, (N,)),
             "attn_norm.weight": (BF16, (H,)), "ffn_norm.weight": (BF16, (H,)), "ffn.gate.weight": (BF16, (E, H)),
             "ffn.gate.bias": (F32, (E,)), "ffn.shared_experts.w1.weight": ("FP8", (F, H)),
             "ffn.shared_experts.w3.weight": ("FP8", (F, H)), "ffn.shared_experts.w2.weight": ("FP8", (H, F)),
             "hc_attn_fn": (F32, (hc, C * H)), "hc_ffn_fn": (F32, (hc, C * H)), "hc_attn_base": (F32, (hc,)),
             "hc_ffn_base": (F32, (hc,)), "hc_attn_scale": (F32, (3,)), "hc_ffn_scale": (F32, (3,))}
    for e in range(E):
        stage |= {f"ffn.experts.{e}.w1.weight": ("FP4", (F, H)), f"ffn.experts.{e}.w3.weight": ("FP4", (F, H)),
                  f"ffn.experts.{e}.w2.weight": ("FP4", (H, F))}
    table = {f"mtp.{s}.{n}": v for s in range(stages) for n, v in stage.items()}
    table |= {"mtp.0.main_proj.weight": ("FP8", (H, L * H)), "mtp.0.main_norm.weight": (BF16, (H,))}
    last = f"mtp.{stages - 1}."
    table |= {last + "norm.weight": (BF16, (H,)), last + "hc_head_fn": (F32, (C, C * H)),
              last + "hc_head_base": (F32, (C,)), last + "hc_head_scale": (F32, (1,)),
              last + "markov_head.markov_w1.weight": (BF16, (V, r)),
              last + "markov_head.markov_w2.weight": (BF16, (V, r))}
    if confidence:
        table[last + "confidence_head.proj.weight"] = (BF16, (1, H + r))
    return table


def stored_layout(table):
    """The release's stored tensors: FP8 weight + E8M0 128x128 block scale; MXFP4 int8 [M, K/2] + E8M0 [M, K/32]."""
    out = {}
    for name, (dtype, shape) in table.items():
        scale = name.removesuffix(".weight") + ".scale"
        if dtype == "FP8":
            out[name], out[scale] = (F8, shape), (E8M0, tuple(math.ceil(d / 128) for d in shape))
        elif dtype == "FP4":
            out[name], out[scale] = (I8, (shape[0], shape[1] // 2)), (E8M0, (shape[0], shape[1] // 32))
        else:
            out[name] = (dtype, shape)
    return out


def read(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def test_fp8_export_matches_the_tensor_table(tmp_path, one_thread):
    from dspark.export import export_drafter

    drafter = make_drafter()
    out = export_drafter(drafter, tmp_path / "fp8", "deepseek-v4-mtp-fp8")
    tensors = read(out)
    want = stored_layout(spec_table(H=64, N=4, D=32, q_lora=32, G=2, o_lora=16, E=4, F=32, C=2, L=3, V=256, r=16,
                                    stages=3))
    want |= {"embed.weight": (BF16, (256, 64)), "head.weight": (BF16, (256, 64))}
    assert {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()} == want
    import json

    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("n_mtp_layers", "dspark_block_size", "dspark_markov_rank",
                                   "dspark_target_layer_ids", "dspark_noise_token_id")} == {
        "n_mtp_layers": 3, "dspark_block_size": 5, "dspark_markov_rank": 16, "dspark_target_layer_ids": [0, 1, 3],
        "dspark_noise_token_id": 255}
    assert config["quantization_config"]["weight_block_size"] == [128, 128] and config["expert_dtype"] == "fp4"


def test_v4_flash_drafter_has_the_released_shapes_on_the_meta_device():
    """At V4-Flash's size (transformers' DeepseekV4Config defaults), the export's tensors are the table's literal
    shapes, and with scales they number 4,705 (1,565 per stage), as counted from the released shard headers."""
    from transformers import DeepseekV4Config

    from dspark.config import DrafterConfig, DSparkConfig
    from dspark.drafters.v4 import DSparkV4Drafter
    from dspark.export.deepseek_v4 import mtp_tensors

    config = DeepseekV4Config()
    with torch.device("meta"):
        frozen = torch.empty(129280, 4096)
        drafter = DSparkV4Drafter(DrafterConfig(algorithm="dspark_v4", num_layers=3, block_size=5, mask_token_id=128799,
                                                dspark=DSparkConfig(markov_rank=256)), config, [40, 41, 42], frozen,
                                  frozen)
    tensors = mtp_tensors(drafter)
    table = spec_table(H=4096, N=64, D=512, q_lora=1024, G=8, o_lora=1024, E=256, F=2048, C=4, L=3, V=129280,
                       r=256, stages=3)
    assert {n: tuple(t.shape) for n, (t, _) in tensors.items()} == {n: s for n, (_, s) in table.items()}
    literal = {"mtp.1.attn.wq_b.weight": (32768, 1024), "mtp.1.attn.wo_a.weight": (8192, 4096),
               "mtp.0.main_proj.weight": (4096, 12288), "mtp.2.hc_ffn_fn": (24, 16384),
               "mtp.2.confidence_head.proj.weight": (1, 4352), "mtp.0.ffn.experts.255.w2.weight": (4096, 2048)}
    assert {n: tuple(tensors[n][0].shape) for n in literal} == literal
    assert len(stored_layout(table)) == 4705


def test_round_trips_give_identical_draft_logits(tmp_path, one_thread):
    """none: exact; bf16: equal to the drafter with DeepSeek's BF16 tensors rounded; fp8: what the dequantisers
    read back re-exports to the same values, and its distributions stay close."""
    import copy

    from dspark.export import export_drafter, load_drafter
    from dspark.export.deepseek_v4 import export_deepseek_v4_mtp, mtp_tensors

    drafter = make_drafter().eval()
    batch, anchors = features(2, 30), torch.tensor([[3, 12, 20], [8, 15, 24]])

    def logits(d):
        with torch.no_grad():
            return d.teacher_forced_logits(batch, anchors)

    want = logits(drafter)
    exact = load_drafter(export_deepseek_v4_mtp(drafter, None, tmp_path / "none", quantization="none")).eval()
    assert torch.equal(logits(exact), want)

    rounded = copy.deepcopy(drafter)
    with torch.no_grad():
        tensors = [t for t, kind in mtp_tensors(rounded).values() if kind != "f32"]
        for t in tensors + [rounded.embed_tokens.weight, rounded.lm_head.weight]:  # the frozen copies are BF16 too
            t.copy_(t.to(torch.bfloat16).float())
    bf16 = load_drafter(export_drafter(drafter, tmp_path / "bf16", "deepseek-v4-mtp")).eval()
    assert torch.equal(logits(bf16), logits(rounded))
    assert not torch.equal(logits(rounded), want)

    fp8 = load_drafter(export_drafter(drafter, tmp_path / "fp8", "deepseek-v4-mtp-fp8")).eval()
    # Values already on the FP8 / MXFP4 grids survive another quantisation (scales may come out smaller, the values
    # they encode do not change).
    again = load_drafter(export_drafter(fp8, tmp_path / "fp8_again", "deepseek-v4-mtp-fp8")).eval()
    assert torch.equal(logits(again), logits(fp8))
    probs_fp8, probs = logits(fp8).softmax(-1), want.softmax(-1)
    assert (probs_fp8 - probs).abs().sum(-1).max() < 0.2


def test_quantisers_invert_the_loaders_dequantisers():
    """Values on each format's grid survive quantise -> ``dspark.targets.fp8.dequantize`` exactly (block scales,
    partial edge blocks, nibble order, sign), and arbitrary values land within half a grid step."""
    from dspark.export.deepseek_v4 import quantize_fp8_block, quantize_mxfp4
    from dspark.targets.fp8 import dequantize, e2m1_values, unpack_fp4

    g = torch.Generator().manual_seed(0)
    codes = e2m1_values()[torch.randint(0, 16, (6, 64), generator=g)]
    scales = torch.exp2(torch.randint(-6, 4, (6, 2), generator=g).float())
    codes[:, 0], codes[:, 32] = 6.0, -6.0  # each group reaches the top of the grid, so its scale is recovered
    w = codes * scales.repeat_interleave(32, 1)
    packed, scale = quantize_mxfp4(w)
    assert torch.equal(dequantize(unpack_fp4(packed), scale, (1, 32)), w)

    w8 = torch.randn(200, 130, generator=g) * 3
    q, s = quantize_fp8_block(w8)
    assert s.shape == (2, 2) and q.dtype == torch.float8_e4m3fn
    back = dequantize(q, s, (128, 128))
    assert torch.equal(dequantize(*quantize_fp8_block(back), (128, 128)), back)
    # Relative error 2**-4 (3 mantissa bits) for normal values; half a subnormal step (2**-10 of the block scale,
    # here 2**-5) below e4m3's normal range.
    assert ((back - w8).abs() <= w8.abs() * 2**-4 + 2**-15).all()


def test_formats_that_cannot_hold_the_drafter_are_refused(tmp_path):
    from dspark.export import export_drafter

    with pytest.raises(ValueError, match="export format 'deepspec' cannot hold drafter 'dspark_v4'"):
        export_drafter(make_drafter(), tmp_path / "x", "deepspec")


def test_serve_commands_attach_then_serve_the_checkpoint(tmp_path):
    """The mtp.* draft is served from inside the V4 checkpoint: attach first, then vLLM's "dspark" method and
    SGLang's DSPARK algorithm on the attached directory, with the draft's block size as the proposal length."""
    from dspark.export.serve import serve_commands

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text(json.dumps({"model_type": "deepseek_v4", "dspark_block_size": 5}))
    attach, vllm, sglang = serve_commands("deepseek-v4-mtp", tmp_path / "export", "/models/v4")
    attached = f"{tmp_path / 'export'}-attached"
    assert attach == f"python tools/attach_drafter.py /models/v4 {tmp_path / 'export'} {attached}"
    spec = '{"method": "dspark", "num_speculative_tokens": 5}'
    assert vllm == f"vllm serve {attached} --speculative-config '{spec}'"
    assert sglang == f"python -m sglang.launch_server --model-path {attached} --speculative-algorithm DSPARK"


def test_cli_refuses_bad_v4_input_in_one_line(tmp_path):
    """`dspark export` (in process): a V4 draft into a layout that cannot hold it, and a V4 checkpoint without
    mtp.* tensors asked for its draft, each one `Error:` line naming what was wrong and what was expected."""
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from dspark.cli import main
    from dspark.export import export_drafter

    export = export_drafter(make_drafter(), tmp_path / "draft", "deepseek-v4-mtp")
    # A V4 checkpoint that ships only the target (DeepSeek's names, no mtp.*): the export's config, target tensors.
    bare = tmp_path / "v4-without-draft"
    bare.mkdir()
    config = {k: v for k, v in json.loads((export / "config.json").read_text()).items() if not k.startswith("dspark")}
    (bare / "config.json").write_text(json.dumps(config))
    save_file({"embed.weight": torch.zeros(4, 64), "layers.0.attn_norm.weight": torch.ones(64)},
              str(bare / "model.safetensors"))
    cases = [(export, "deepspec", "export format 'deepspec' cannot hold drafter 'dspark_v4'; expected one of: "
                                  "deepseek-v4-mtp, deepseek-v4-mtp-fp8"),
             (bare, "deepseek-v4-mtp", f"{bare} holds no mtp.* tensors: this V4 checkpoint ships no DSpark draft to "
                                       "load")]
    for i, (source, fmt, message) in enumerate(cases):
        result = CliRunner().invoke(main, ["export", str(source), str(tmp_path / f"out{i}"), "--format", fmt])
        assert result.exit_code == 1 and result.output == f"Error: {message}\n", result.output
        assert not (tmp_path / f"out{i}").exists()  # nothing half-written
