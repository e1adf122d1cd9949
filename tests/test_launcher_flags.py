"""`launcher/prepare.py --restart` and `launcher/build_cache.py --rebuild`: the launchers take the options of
`dspark prepare` / `dspark cache build` and pass them through (their multi-process runs are in
test_launchers_multiproc.py and tests/cache/test_build_multiproc.py)."""

import argparse
import importlib.util
import json

import pytest
from conftest import REPO

from dspark import stages
from dspark.config import load_config
from dspark.data.output import ResumableJsonl
from dspark.distributed import launcher_parser


def _launcher(name):
    spec = importlib.util.spec_from_file_location(f"launcher_{name}", REPO / "launcher" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the __main__ block does not run
    return module


def _cfg(run_dir, target_dir, max_new_tokens):
    return load_config("tiny_llama_dspark", [f"run_dir={run_dir}", f"target.name_or_path={target_dir}",
                                             "data.max_prompts=6", "data.num_eval_prompts=2",
                                             f"data.max_new_tokens={max_new_tokens}"])


def test_launcher_restart_and_rebuild_reach_the_stages(tmp_path, tiny_llama_dir, one_thread):
    prepare, build = _launcher("prepare"), _launcher("build_cache")
    argv = ["--config", "tiny_llama_dspark", "--set", "run_dir=x"]
    for module, flag in ((prepare, "restart"), (build, "rebuild")):
        parser = launcher_parser(module.__doc__, module._options)
        assert getattr(parser.parse_args(argv + [f"--{flag}"]), flag) is True
        assert getattr(parser.parse_args(argv), flag) is False
    # a partial regeneration made with other settings: refused, then discarded with --restart
    cfg = _cfg(tmp_path, tiny_llama_dir, 4)
    planted = ResumableJsonl(tmp_path / "data" / "train.jsonl", {"other": "settings"})
    planted.append([{"id": "p00000", "input_ids": [1], "loss_mask": [1]}])
    planted.close()
    with pytest.raises(ValueError, match="regenerated with other settings.*pass --restart to discard it"):
        prepare._prepare(cfg, 0, 1, argparse.Namespace(restart=False))
    prepare._prepare(cfg, 0, 1, argparse.Namespace(restart=True))
    rows = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["input_ids"]) > 1 for r in rows)
    # a cache of these conversations, then new conversations: the stale cache is refused, --rebuild replaces it
    build._build(cfg, 0, 1, argparse.Namespace(rebuild=False))
    longer = _cfg(tmp_path, tiny_llama_dir, 6)
    prepare._prepare(longer, 0, 1, argparse.Namespace(restart=True))
    with pytest.raises(ValueError, match=r"is stale: sample 'p0000[0-5]' differs"):
        build._build(longer, 0, 1, argparse.Namespace(rebuild=False))
    build._build(longer, 0, 1, argparse.Namespace(rebuild=True))
    stages.build_cache(longer)  # resuming the rebuilt cache: it holds exactly the new conversations
