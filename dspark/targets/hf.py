"""The ``hf`` backend: the whole target in one process through transformers.

Legend: B batch, T tokens, L feature layers, H hidden size, V vocab, N new tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from dspark.targets.base import TargetBackend, TargetFeatures, TargetIdentity, softcap_logits, text_config
from dspark.targets.common import (
    check_layer_ids,
    raw_last_hidden_state,
    select_layers,
    target_identity,
    torch_dtype,
)
from dspark.targets.decode import HFDecodeSession, generate
from dspark.targets.source import dspark_cache_dir, resolve_target_source


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


def _gguf_copy_dir(folder: str, gguf_file: str) -> Path:
    """Where the float safetensors copy of a GGUF lives (``~/.cache/dspark/targets/<name>-<key>``)."""
    gguf_path = Path(folder) / gguf_file
    key = hashlib.sha256(f"{gguf_path.resolve()}:{gguf_path.stat().st_size}".encode()).hexdigest()[:12]
    return dspark_cache_dir() / "targets" / f"{gguf_path.stem}-{key}"


def safetensors_dir(name_or_path: str) -> Path:
    """A directory of safetensors holding the target's own tensors, for readers of single tensors (``WeightIndex``):
    the target's directory, or for a GGUF target (the built-in one included) its dequantised float copy, made on
    first use (about 15 s)."""
    source, gguf_file, _ = resolve_target_source(name_or_path)
    if gguf_file is None:
        if not Path(source).is_dir():
            raise ValueError(f"target {name_or_path} is not a local checkpoint directory; its tensors cannot be read "
                             "one by one (download it first)")
        return Path(source)
    cached = _gguf_copy_dir(source, gguf_file)
    if not (cached / "model.safetensors").is_file():
        _load_gguf_cached(source, gguf_file, torch.float32)
    if not (cached / "model.safetensors").is_file():
        raise ValueError(f"could not write the dequantised copy of {name_or_path} to {cached} (read-only cache?)")
    return cached


def _load_gguf_cached(folder: str, gguf_file: str, dtype: torch.dtype):
    """Dequantising a GGUF takes ~15 s; keep a float safetensors copy under ~/.cache/dspark/targets."""
    cached = _gguf_copy_dir(folder, gguf_file)
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
        check_layer_ids(self.layer_ids, text_config(model.config).num_hidden_layers, name)

    @classmethod
    def from_config(cls, cfg, device: str = "cpu") -> "HFTarget":
        source, gguf_file, display = resolve_target_source(cfg.name_or_path)
        dtype = torch_dtype(cfg.dtype)
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
    def device(self) -> torch.device:
        return self.model.device

    @property
    def embed_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def identity(self) -> TargetIdentity:
        return target_identity(self.config, self.tokenizer, self.layer_ids, self.name)

    @torch.no_grad()
    def features(self, input_ids_BT, attention_mask_BT=None) -> TargetFeatures:
        with raw_last_hidden_state(self.model):
            out = self.model.model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, output_hidden_states=True)
        return TargetFeatures(layers_BTLH=select_layers(out.hidden_states, self.layer_ids),
                              final_BTH=out.last_hidden_state)

    def decode_session(self) -> "HFDecodeSession":
        return HFDecodeSession(self)

    def batch_decode_session(self, num_rows: int = 0) -> "HFBatchDecodeSession":
        """Several sequences decoded together, each at its own length (see ``HFBatchDecodeSession``)."""
        return HFBatchDecodeSession(self, num_rows)

    def generate(self, prompts, *, max_new_tokens, temperature, batch_size, seed, progress=False, indices=None):
        return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        batch_size=batch_size, seed=seed, progress=progress, indices=indices)


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
    pads_rows = True  # a step runs every fed row at the longest feed's length (a prefix scheduler prices that)

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
    def extend(self, ids: list[torch.Tensor], last_only: list[bool] | None = None
               ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Feed ``ids[r]`` (1-D) after row r's prefix, every fed row in one forward; returns per row (logits
        ``[N_r, V]`` fp32, features ``[N_r, L, H]``). A row fed no tokens sits the step out (None): the forward
        runs on the fed rows' part of the cache alone, so a prompt admitted beside decoding rows is not padded
        across them. A row with ``last_only[r]`` gets the logits of its last position alone (``[1, V]``; a
        prefill needs no more), so the LM head does not run over the whole prompt."""
        if len(ids) != len(self.lengths) or all(x.numel() == 0 for x in ids):
            raise ValueError(f"extend needs one id tensor per row ({len(self.lengths)} rows), at least one "
                             f"non-empty, got sizes {[x.numel() for x in ids]}")
        last_only = list(last_only) if last_only is not None else [False] * len(ids)
        if len(last_only) != len(ids):
            raise ValueError(f"extend got {len(last_only)} last_only flags for {len(ids)} rows; expected one per row")
        fed = [row for row, x in enumerate(ids) if x.numel()]
        if len(fed) == len(ids):
            return self._extend_all(ids, last_only)
        lengths, index = self.lengths, torch.tensor(fed, dtype=torch.long)
        whole = [(layer.keys, layer.values) if layer.is_initialized and layer.keys.dim() == 4 else None
                 for layer in self.cache.layers]
        self._set(lambda x: x.index_select(0, index.to(x.device)) if x.dim() == 4 else x)
        self.lengths = [lengths[row] for row in fed]
        outputs = self._extend_all([ids[row] for row in fed], [last_only[row] for row in fed])
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

    def _extend_all(self, ids: list[torch.Tensor], last_only: list[bool]) -> list[tuple[torch.Tensor, torch.Tensor]]:
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
        with raw_last_hidden_state(model):
            out = model.model(input_ids=ids_BN, attention_mask=mask_B1NC, position_ids=position_BN, cache=self.cache,
                              use_cache=True, output_hidden_states=True)
        features_BNLH = select_layers(out.hidden_states, self.target.layer_ids)
        # One LM-head call over every row's real positions (packed, padding skipped): per-row calls cost ~2x at
        # batch 4 on CPU, and the LM head is the largest product of a step for small targets.
        wanted_BN = step_N < num_new_B[:, None]
        last_B = torch.tensor(last_only, dtype=torch.bool, device=device)
        wanted_BN &= ~last_B[:, None] | (step_N == num_new_B[:, None] - 1)
        logits_MV = softcap_logits(model.lm_head(out.last_hidden_state[wanted_BN]).float(), model.config)
        counts = [x.numel() for x in ids]
        results = [(logits_NV, features_BNLH[row, :num]) for row, (logits_NV, num) in
                   enumerate(zip(logits_MV.split([1 if last else n for n, last in zip(counts, last_only)]), counts))]
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
