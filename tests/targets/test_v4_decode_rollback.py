"""DeepSeek-V4 decode sessions roll back exactly by snapshot and replay, on hf, zero3 and pipeline.

V4's cache cannot crop (sliding-window keys and compressor state only move forward), so ``truncate`` restores the
cache copied before the last extend and re-feeds the kept tokens. Speculative decoding's calls are replayed here:
a prefill, then rounds of [anchor + 4 drafts] with rejections at various points, over a sequence that runs well past
the sliding window (8) and through many compression windows (2 and 4). Every extend must give what a fresh session
fed exactly the kept tokens gives. The parallel backends run the same calls on 2 gloo processes in one spawn.

Legend: N new tokens, L feature layers, C mHC streams, H hidden size, V vocab.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tiny_families import save_tiny_with, tiny_config

from dspark.config import TargetConfig
from dspark.targets import load_target
from dspark.targets.decode import cache_crops_exactly
from dspark.targets.hf import HFTarget
from tests.conftest import free_port, spawn_ranks

LAYER_IDS = [-1, 0, 2]  # 4 layers over 2 stages: -1 and 0 on stage 0, 2 on stage 1
MLP_LAYER_TYPES = ["hash_moe", "moe", "hash_moe", "moe"]  # hash routing on both stages: ids reach stage 1
VOCAB = 1024  # SmolLM2's tokenizer, the model's vocab cut to its first 1024 ids
PREFILL = 6
# Tokens kept of each round's 5 fed (anchor + 4 drafts): 1 = every draft rejected, 5 = all accepted (no rollback).
KEPT = [2, 5, 1, 4, 3, 1, 5, 2, 4]
WORLD = 2


def schedule() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The prompt and every round's 5 fed ids (random, so rejected drafts differ from what is kept later)."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, VOCAB, (PREFILL,), generator=gen)
    return prompt, [torch.randint(3, VOCAB, (5,), generator=gen) for _ in KEPT]


def run_rounds(target) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Speculative decoding's session calls: (logits ``[N, V]``, features ``[N, L, C, H]``) of every extend."""
    prompt, rounds = schedule()
    session = target.decode_session()
    outputs = [session.extend(prompt)]
    for ids_N, kept in zip(rounds, KEPT):
        before = session.length
        outputs.append(session.extend(ids_N))
        session.truncate(before + kept)
        assert session.length == before + kept
    return outputs


def fresh_references(target) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each extend of ``run_rounds`` as a fresh session gives it, fed only the kept tokens (the prompt, then each
    round's kept part as one extend, as the rolled-back session had them) and then the round's ids.

    The same chunks matter: on the tiny V4 the lightning indexer's top-k meets ties (ReLU scores at exactly 0, two
    index heads), broken differently for a different number of queries per forward, so one extend of all the kept
    tokens gives other logits past ~13 tokens (whether or not anything was rolled back).
    """
    prompt, rounds = schedule()
    refs, kept = [target.decode_session().extend(prompt)], [prompt]
    for ids_N, num_kept in zip(rounds, KEPT):
        session = target.decode_session()
        for chunk in kept:
            session.extend(chunk)
        refs.append(session.extend(ids_N))
        kept.append(ids_N[:num_kept])
    assert sum(chunk.numel() for chunk in kept) > 3 * 8  # well past the sliding window, many compression windows
    return refs


def assert_matches(got: list, want: list, what: str) -> None:
    assert len(got) == len(want) == len(KEPT) + 1
    for step, ((logits_NV, feats_NLCH), (ref_logits, ref_feats)) in enumerate(zip(got, want)):
        torch.testing.assert_close(logits_NV, ref_logits, atol=1e-5, rtol=1e-5, msg=f"{what} extend {step} logits")
        torch.testing.assert_close(feats_NLCH, ref_feats, atol=1e-5, rtol=1e-5, msg=f"{what} extend {step} feats")


@pytest.fixture(scope="module")
def v4_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return save_tiny_with("deepseek_v4", tmp_path_factory.mktemp("v4-rollback") / "deepseek_v4", 120_000,
                          tokenizer_dir=tokenizer_dir, vocab_size=VOCAB, num_layers=4, mlp_layer_types=MLP_LAYER_TYPES)


@pytest.fixture(scope="module")
def hf_v4(v4_dir) -> HFTarget:
    return load_target(TargetConfig(backend="hf", name_or_path=str(v4_dir), dtype="float32", layer_ids=LAYER_IDS))


@pytest.fixture(scope="module")
def references(hf_v4) -> list:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fresh_references(hf_v4)
    finally:
        torch.set_num_threads(before)


def test_hf_rollback_equals_a_session_fed_only_the_kept_tokens(hf_v4, references, one_thread):
    assert not cache_crops_exactly(hf_v4.decode_session().cache)
    got = run_rounds(hf_v4)
    assert got[1][1].shape == (5, len(LAYER_IDS), hf_v4.config.hidden_size)  # the mean of the mHC streams
    assert_matches(got, references, "hf")
    # Without the rollback (the old crop) the state after a rejection would differ: the check has teeth.
    prompt, rounds = schedule()
    stale = hf_v4.decode_session()
    stale.extend(prompt)
    stale.extend(rounds[0])  # keeps 2 of 5 in run_rounds; here all 5 stay in the cache
    wrong_NV, _ = stale.extend(rounds[1])
    assert not torch.allclose(wrong_NV, references[2][0], atol=1e-3)


def test_hf_rollback_refuses_to_go_past_the_last_extend(hf_v4, references, one_thread):
    prompt, rounds = schedule()
    session = hf_v4.decode_session()
    session.extend(prompt)
    session.extend(rounds[0])
    with pytest.raises(ValueError, match=r"truncate\(5\) of a 11-token decode session: target .*deepseek_v4.* only "
                                         r"that extend's tokens can be dropped \(it started at 6\)"):
        session.truncate(PREFILL - 1)
    with pytest.raises(ValueError, match="truncate needs a length >= 0, got -1"):
        session.truncate(-1)
    session.truncate(PREFILL + KEPT[0])
    with pytest.raises(ValueError, match=r"truncate\(7\) of a 8-token .*\(none since the last rollback\)"):
        session.truncate(PREFILL + 1)
    session.truncate(PREFILL + KEPT[0])  # not dropping anything is fine
    # The refused calls left the session as it was: it goes on as a fresh one would.
    logits_NV, feats_NLCH = session.extend(rounds[1])
    torch.testing.assert_close(logits_NV, references[2][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats_NLCH, references[2][1], atol=1e-5, rtol=1e-5)


def test_full_attention_caches_still_crop_without_snapshots(one_thread):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    llama = HFTarget(AutoModelForCausalLM.from_config(tiny_config("llama", 64)).eval(), None, [0], "tiny-llama")
    session = llama.decode_session()
    assert cache_crops_exactly(session.cache)
    ids_T = torch.randint(3, 64, (9,))
    session.extend(ids_T[:6])
    session.extend(ids_T[6:])
    assert session._snapshot is None  # no copy kept: the crop path is today's
    session.truncate(4)  # further back than the last extend: a crop can do it
    torch.testing.assert_close(session.extend(ids_T[4:])[0], llama.decode_session().extend(ids_T)[0][4:],
                               atol=1e-5, rtol=1e-5)


def test_greedy_speculative_decoding_on_v4_equals_target_decoding(hf_v4, one_thread):
    from dspark.config import DrafterConfig, DSparkConfig
    from dspark.drafters import build_drafter
    from dspark.eval.specdec import speculative_generate, target_generate

    torch.manual_seed(0)
    drafter = build_drafter(DrafterConfig(block_size=4, dspark=DSparkConfig(markov_rank=16)),
                            hf_v4.config, LAYER_IDS, hf_v4.embed_weight, hf_v4.lm_head_weight).eval()
    prompt, _ = schedule()
    result = speculative_generate(hf_v4, drafter, prompt.tolist(), max_new_tokens=24,
                                  temperature=0.0)
    assert result.tokens == target_generate(hf_v4, prompt.tolist(), max_new_tokens=24, temperature=0.0)
    assert len(result.tokens) == 24 and max(result.proposed) == 4
    assert any(a < p for a, p in zip(result.accepted, result.proposed))  # rejections happened: rollbacks ran


def _worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    out = {}
    for backend, extra in (("zero3", {}), ("pipeline", {"pipeline_stages": 2})):
        target = load_target(TargetConfig(backend=backend, name_or_path=model_dir, dtype="float32",
                                          layer_ids=LAYER_IDS, **extra))
        out[backend] = run_rounds(target)
        session = target.decode_session()
        session.extend(torch.arange(3, 9))
        session.extend(torch.arange(9, 12))
        try:
            session.truncate(4)  # refused on every rank alike, before any collective
        except ValueError as exc:
            out[f"{backend} error"] = str(exc)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


def test_zero3_and_pipeline_roll_back_like_a_fresh_session(v4_dir, references, tmp_path):
    results = spawn_ranks(_worker, (free_port(), str(v4_dir), str(tmp_path)), WORLD, timeout=150,
                          what="2-process zero3/pipeline rollback run", results=tmp_path)
    for rank, got in enumerate(results):
        for backend in ("zero3", "pipeline"):
            assert_matches(got[backend], references, f"{backend} rank {rank}")
            assert "truncate(4) of a 9-token decode session" in got[f"{backend} error"]
