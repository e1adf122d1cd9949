"""Sharded safetensors reading: whole tensors, slices along one dim, or flat element ranges.

Parallel backends never hold the whole model: each rank asks for the rows, columns or flat partition it owns.
Only the JSON headers are parsed up front (so a missing shard or a mismatched index is reported before any
tensor is read); tensor bytes are read through ``safe_open(...).get_slice``, which maps the file and copies
only the requested rows.

Block-FP8 checkpoints (``quantization_config`` with ``quant_method: fp8`` in ``config.json``, see
``dspark.targets.fp8``), DeepSeek-V4's MXFP4 experts included, are dequantised on read: names and shapes are those of
the logical weights (the scale tensors are hidden), and every read returns real values, touching only the quantised
rows/columns (packed bytes) and the scale rows it needs.

DeepSeek-V4 checkpoints in DeepSeek's own names (``embed.weight``, ``layers.{i}.attn.wq_a.weight``,
``layers.{i}.ffn.experts.{e}.w1.weight`` ...) are listed under transformers' names: the renames are transformers' own
``deepseek_v4`` conversion mapping, the ``model.`` prefix is added as transformers adds it for
``DeepseekV4ForCausalLM``, and experts ``w1/w3/w2`` become ``gate_proj/up_proj/down_proj`` pieces (below).

Two things of DeepSeek-V3/R1 hub checkpoints are handled here for every backend: routed experts stored one tensor
per expert (``mlp.experts.{e}.gate_proj.weight`` ...) where transformers holds them fused (``expert_parts`` names
the pieces of a fused tensor, ``load_flat_range_of`` reads a flat range across them), and the multi-token-prediction
layers ``model.layers.{num_hidden_layers + i}.*`` (V4: ``mtp.{i}.*``) that transformers does not build
(``check_against`` skips them).
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from pathlib import Path

import torch

from dspark.targets import fp8

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors header dtype codes -> torch dtypes
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}


def _read_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors header (8-byte little-endian length, then JSON); no tensor bytes."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} has a corrupt safetensors header: {exc}") from None
    header.pop("__metadata__", None)
    return header


def _mtp_layers(config: dict) -> range:
    """Layer ids of DeepSeek's multi-token-prediction layers declared by a raw ``config.json`` dict (empty range
    without ``num_nextn_predict_layers > 0``; transformers 5 also spells it ``num_mtp_layers``)."""
    num_mtp = config.get("num_nextn_predict_layers", config.get("num_mtp_layers")) or 0
    # DeepSeek-V4 with a DSpark draft: the root config says 1 but n_mtp_layers stages ship (V4_DSPARK.md 6.1).
    num_mtp = max(num_mtp, config.get("n_mtp_layers") or 0)
    num_layers = config.get("num_hidden_layers")
    if num_mtp <= 0 or num_layers is None:
        return range(0)
    return range(num_layers, num_layers + num_mtp)


def mtp_tensor_names(names, config: dict) -> list[str]:
    """The tensors of DeepSeek's multi-token-prediction layers among ``names``: ``model.layers.{i}.*`` with
    ``num_hidden_layers <= i < num_hidden_layers + num_nextn_predict_layers`` (V3), or ``mtp.{j}.*`` with ``j <
    num_nextn_predict_layers`` (V4's own names), for a ``config`` (the raw ``config.json`` dict) that declares
    ``num_nextn_predict_layers > 0``; none otherwise. transformers builds no module for them, so a checkpoint may
    carry them beside the model's tensors."""
    layers = _mtp_layers(config)
    return sorted(n for n in names if (layer := _mtp_layer_of(n, layers.start)) is not None and layer in layers)


def _mtp_layer_of(name: str, num_layers: int) -> int | None:
    """The layer id ``name`` belongs to, counting V4's ``mtp.{j}`` as layer ``num_layers + j``; None outside
    layers."""
    if m := re.match(r"model\.layers\.(\d+)\.", name):
        return int(m.group(1))
    if m := re.match(r"mtp\.(\d+)\.", name):
        return num_layers + int(m.group(1))
    return None


_V4_EXPERT = re.compile(r"(.*\.experts\.\d+)\.w([123])\.weight")
_V4_EXPERT_PROJS = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}


def deepseek_v4_model_names(stored: list[str]) -> dict[str, str]:
    """DeepSeek-V4 tensor names as DeepSeek stores them -> the names ``DeepseekV4ForCausalLM`` has.

    transformers' own ``deepseek_v4`` renames (``attn`` -> ``self_attn``, ``wq_a`` -> ``q_a_proj``, ...) apply in
    order; then, as its loader does for this model, everything but ``lm_head.weight`` and the MTP layers
    (``mtp.*``, ignored by the model) gains the ``model.`` prefix. transformers fuses routed experts
    ``experts.{e}.w1/w3/w2.weight`` into ``gate_up_proj`` (w1 rows, then w3 rows) and ``down_proj``; here each
    stays a piece, named ``experts.{e}.gate_proj/up_proj/down_proj.weight`` as ``expert_parts`` expects.
    """
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    renamings = [t for t in get_checkpoint_conversion_mapping("deepseek_v4") if isinstance(t, WeightRenaming)]
    out = {}
    for name in stored:
        renamed = name
        for renaming in renamings:
            renamed, _ = renaming.rename_source_key(renamed)
        if m := _V4_EXPERT.fullmatch(renamed):
            renamed = f"{m.group(1)}.{_V4_EXPERT_PROJS[m.group(2)]}.weight"
        if renamed != "lm_head.weight" and not renamed.startswith("mtp."):
            renamed = "model." + renamed
        out[name] = renamed
    return out


def _is_deepseek_v4_native(config: dict, stored) -> bool:
    """A ``deepseek_v4`` checkpoint in DeepSeek's own names (transformers' names all start with ``model.`` or are
    ``lm_head.weight``)."""
    return config.get("model_type") == "deepseek_v4" and "embed.weight" in stored and not any(
        n.startswith("model.") for n in stored)


def _short_list(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class WeightIndex:
    """Tensor names, shapes and dtypes of an HF checkpoint directory, and lazy partial reads of its tensors.

    ``model_dir`` holds either ``model.safetensors.index.json`` (multi-shard) or one ``model.safetensors``. When
    its ``config.json`` declares block-FP8 quantisation, quantised tensors read as their dequantised values.
    """

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        # The quantisation scheme first: an unsupported one is refused before any shard is looked at.
        self.quantization = fp8.BlockFP8.from_model_dir(self.model_dir)
        index_path = self.model_dir / INDEX_FILE
        if index_path.is_file():
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (self.model_dir / f).is_file()})
            if missing:
                raise FileNotFoundError(
                    f"{index_path} names {len(missing)} shard file(s) that do not exist: {', '.join(missing)}"
                )
        elif (self.model_dir / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise FileNotFoundError(f"{self.model_dir} has neither {INDEX_FILE} nor {SINGLE_FILE}")

        self._file: dict[str, str] = {}  # tensor name -> shard file name (scale tensors included)
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}  # every stored tensor
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        for file in files:
            for name, entry in _read_header(self.model_dir / file).items():
                if weight_map is not None and weight_map.get(name) != file:
                    continue  # a tensor the index places elsewhere (or not at all) is not ours to read
                if entry["dtype"] not in _DTYPES:
                    raise ValueError(f"{self.model_dir / file}: tensor {name} has unsupported dtype {entry['dtype']}")
                self._file[name] = file
                self._meta[name] = (tuple(entry["shape"]), _DTYPES[entry["dtype"]])
        if weight_map is not None:
            absent = [n for n, f in weight_map.items() if n not in self._file]
            if absent:
                raise ValueError(f"{index_path} lists tensors missing from their shard files: {_short_list(absent)}")
        self._handles: dict[str, object] = {}
        self._quant: dict[str, fp8.Quantized] = {}  # stored name of a quantised tensor -> how it is quantised
        if self.quantization is not None:
            self._quant = self.quantization.pair_scales(self._meta, str(self.model_dir))
        else:
            stray = sorted({s for n, (_, dtype) in self._meta.items() if dtype in fp8.FP8_DTYPES
                            for s in fp8.scale_names(n) if s in self._meta}
                           | {n for n, (_, dtype) in self._meta.items() if dtype == fp8.E8M0})
            if stray:
                raise ValueError(f"{self.model_dir} stores FP8 weights with scales ({_short_list(stray, 3)}) but its "
                                 f"config.json has no quantization_config to say how to read them")
        config_path = self.model_dir / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        # What callers see: logical tensors (dequantised float32 for quantised ones) under the model's names,
        # scales hidden. Reads map a logical name back to the stored one.
        scales = {q.scale for q in self._quant.values()}
        stored = [n for n in self._meta if n not in scales]
        renames = (deepseek_v4_model_names(stored) if _is_deepseek_v4_native(config, stored)
                   else {n: n for n in stored})
        self._stored: dict[str, str] = {}  # logical name -> stored name
        for name, logical in renames.items():
            if logical in self._stored:
                raise ValueError(f"{self.model_dir}: tensors {self._stored[logical]} and {name} both map to {logical}")
            self._stored[logical] = name
        self._logical = {}
        for logical, name in self._stored.items():
            shape, dtype = self._meta[name]
            quant = self._quant.get(name)
            self._logical[logical] = (quant.logical_shape(shape), torch.float32) if quant else (shape, dtype)
        self._mtp = frozenset(mtp_tensor_names(self._logical, config))
        self._mtp_declared = _mtp_layers(config)

    # -- metadata ---------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Logical tensor names (scale tensors of a quantised checkpoint are not listed)."""
        return sorted(self._logical)

    def __contains__(self, name: str) -> bool:
        return name in self._logical

    def is_quantized(self, name: str) -> bool:
        """Whether ``name`` is stored quantised (block FP8 or MXFP4; reads return it dequantised)."""
        self._entry(name)
        return self._stored[name] in self._quant

    def stored_name(self, name: str) -> str:
        """The name the checkpoint stores ``name`` under (itself, except for DeepSeek-V4's own names)."""
        self._entry(name)
        return self._stored[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        """The dtype a read with ``dtype=None`` returns (float32 for a dequantised tensor)."""
        return self._entry(name)[1]

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def mtp_names(self) -> list[str]:
        """Tensors of the multi-token-prediction layers (see ``mtp_tensor_names``), judged by ``config.json``."""
        return sorted(self._mtp)

    def check_against(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Refuse a checkpoint whose tensor names or shapes differ from what the model config builds.

        Tensors of DeepSeek's multi-token-prediction layers (``mtp_names``) are not built by the model and are
        skipped with a one-line note; any other tensor the model does not have is an error.
        """
        missing = [n for n in expected if n not in self._logical]
        unexpected = [n for n in self._logical if n not in expected]
        skipped = [n for n in unexpected if n in self._mtp]
        if skipped:
            unexpected = [n for n in unexpected if n not in self._mtp]
            declared = self._mtp_declared
            layers = sorted({_mtp_layer_of(n, declared.start) for n in skipped})
            logger.warning("%s: skipping %d tensors of multi-token-prediction layer(s) %s (num_hidden_layers=%d, "
                           "num_nextn_predict_layers=%d): the model does not use them", self.model_dir, len(skipped),
                           ", ".join(map(str, layers)), declared.start, len(declared))
        mismatched = [f"{n} {self.shape(n)} (checkpoint) vs {tuple(s)} (config)"
                      for n, s in expected.items() if n in self._logical and self.shape(n) != tuple(s)]
        if missing or unexpected or mismatched:
            parts = []
            if missing:
                parts.append(f"missing from the checkpoint: {_short_list(missing)}")
            if unexpected:
                parts.append(f"not in the model: {_short_list(unexpected)}")
            if mismatched:
                parts.append(f"shape mismatch: {_short_list(mismatched, 4)}")
            raise ValueError(f"weights in {self.model_dir} do not match the model config; " + "; ".join(parts))

    # -- reads --------------------------------------------------------------------------------------------

    def load(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor (dequantised if stored quantised), cast to ``dtype`` if given."""
        shape = self.shape(name)  # KeyError naming the checkpoint for an unknown (or hidden scale) tensor
        if self.is_quantized(name):
            return self._cast(self._dequantized(name, 0, 0, shape[0]), dtype)
        stored = self._stored[name]
        return self._cast(self._handle(stored).get_tensor(stored), dtype)

    def load_slice(self, name: str, dim: int, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``tensor.narrow(dim, start, stop - start)``, reading only those rows/columns."""
        shape = self.shape(name)
        if not -len(shape) <= dim < len(shape):
            raise ValueError(f"{name} has shape {shape}; dim {dim} is out of range")
        dim %= len(shape)
        if not 0 <= start <= stop <= shape[dim]:
            raise ValueError(f"{name} has shape {shape}; slice [{start}, {stop}) of dim {dim} is out of range")
        if self.is_quantized(name):
            return self._cast(self._dequantized(name, dim, start, stop), dtype)
        index, stored = (slice(None),) * dim + (slice(start, stop),), self._stored[name]
        return self._cast(self._handle(stored).get_slice(stored)[index], dtype)

    def load_flat_range(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor (a ZeRO-3 partition), reading only covering rows."""
        shape, numel = self.shape(name), self.numel(name)
        if not 0 <= start <= stop <= numel:
            raise ValueError(f"{name} has {numel} elements; flat range [{start}, {stop}) is out of range")
        if len(shape) == 0:
            return self.load(name, dtype).reshape(1)[start:stop]
        row = numel // shape[0] if shape[0] else 1
        first, last = start // row, -(-stop // row)  # rows that cover the range
        if self.is_quantized(name):
            rows = self._dequantized(name, 0, first, last).reshape(-1)
        else:
            stored = self._stored[name]
            rows = self._handle(stored).get_slice(stored)[first:last].reshape(-1)
        return self._cast(rows[start - first * row : stop - first * row], dtype)

    def load_flat_range_of(self, names: list[str], start: int, stop: int,
                           dtype: torch.dtype | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the concatenation of the flattened tensors ``names`` (a fused tensor
        stored in pieces, see ``expert_parts``); only the pieces the range overlaps are read, each through
        ``load_flat_range`` (so only their covering rows, dequantised if quantised)."""
        if not names:
            raise ValueError("load_flat_range_of needs at least one tensor name")
        total = sum(self.numel(n) for n in names)
        if not 0 <= start <= stop <= total:
            raise ValueError(f"{len(names)} tensors {names[0]} ... have {total} elements together; flat range "
                             f"[{start}, {stop}) is out of range")
        dtype = dtype or self.dtype(names[0])
        pieces, offset = [torch.empty(0, dtype=dtype)], 0
        for name in names:
            numel = self.numel(name)
            first, last = max(start, offset), min(stop, offset + numel)
            if first < last:
                pieces.append(self.load_flat_range(name, first - offset, last - offset, dtype))
            offset += numel
        return torch.cat(pieces)

    def file_of(self, name: str) -> str:
        """The shard file (relative to ``model_dir``) holding ``name`` (its quantised values, for a quantised
        tensor)."""
        return self._file[self.stored_name(name)]

    def close(self, file: str | None = None) -> None:
        """Drop the open handle of ``file`` (default: all). Reads go through memory maps whose touched pages
        count towards RSS until unmapped, so a loader closes each shard once it is done with it; later reads
        reopen lazily."""
        if file is None:
            self._handles.clear()
        else:
            self._handles.pop(file, None)

    # -- internals ----------------------------------------------------------------------------------------

    def _entry(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if name not in self._logical:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.model_dir}")
        return self._logical[name]

    def _dequantized(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """fp32 values of quantised ``name`` narrowed to ``[start, stop)`` along ``dim``: reads only those
        rows/columns (for MXFP4 columns, the bytes holding them) and the scale rows/columns of the blocks they
        touch."""
        stored, ndim, lead = self._stored[name], len(self.shape(name)), (slice(None),) * dim
        quant = self._quant[stored]
        unpack_cols = quant.packed and dim == ndim - 1
        # Packed columns: bytes [start // 2, ceil(stop / 2)) hold the values; unpacked, drop a leading odd one.
        lo, hi = (start // 2, -(-stop // 2)) if unpack_cols else (start, stop)
        raw = self._handle(stored).get_slice(stored)[lead + (slice(lo, hi),)]
        values = fp8.unpack_fp4(raw) if quant.packed else raw
        if unpack_cols:
            values = values.narrow(-1, start - 2 * lo, stop - start)
        scale_start, scale_stop = fp8.scale_range(quant.block, dim, ndim, start, stop)
        scale = self._handle(quant.scale).get_slice(quant.scale)[lead + (slice(scale_start, scale_stop),)]
        first_row = start if dim == ndim - 2 else 0
        first_col = start if dim == ndim - 1 else 0
        return fp8.dequantize(values, scale, quant.block, first_row, first_col)

    def _handle(self, name: str):
        from safetensors import safe_open

        if name not in self._meta:  # scale tensors are read here too, though hidden from callers
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.model_dir}")
        file = self._file[name]
        if file not in self._handles:  # opened on first use, kept open: the header parse is paid once per file
            self._handles[file] = safe_open(self.model_dir / file, framework="pt", device="cpu")
        return self._handles[file]

    @staticmethod
    def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)


_FUSED_EXPERTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def expert_parts(index: WeightIndex, name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]] | None:
    """The per-expert tensors that store a fused expert tensor of the model, when ``index`` uses that layout.

    transformers holds routed experts fused: ``mlp.experts.gate_up_proj [E, 2I, H]`` (each expert's gate rows,
    then its up rows) and ``mlp.experts.down_proj [E, H, I]``. DeepSeek's hub checkpoints store
    ``mlp.experts.{e}.gate_proj.weight [I, H]``, ``up_proj`` and ``down_proj [H, I]``. Returns name -> shape of
    those pieces in the fused tensor's memory order (so the fused tensor flattened is the pieces flattened one
    after another), or None when ``name`` is not such a tensor or the checkpoint stores it fused.
    """
    prefix, _, leaf = name.rpartition(".")
    if not prefix.endswith(".experts") or leaf not in _FUSED_EXPERTS or len(shape) != 3 or name in index:
        return None
    projs = _FUSED_EXPERTS[leaf]
    if f"{prefix}.0.{projs[0]}.weight" not in index:
        return None
    num_experts, rows, cols = shape
    piece = (rows // len(projs), cols)
    return {f"{prefix}.{e}.{proj}.weight": piece for e in range(num_experts) for proj in projs}


_EXPERT_PIECE = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def fuse_expert_pieces(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with per-expert pieces (``experts.{e}.gate_proj.weight`` ...) stacked into transformers' fused
    ``experts.gate_up_proj`` / ``experts.down_proj``: the inverse of ``expert_parts``, for loaders that hand a whole
    state dict to transformers (its own fusing only knows each model's checkpoint names, not these)."""
    pieces: dict[tuple[str, str], dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for name, tensor in state.items():
        if (m := _EXPERT_PIECE.fullmatch(name)) is None:
            out[name] = tensor
            continue
        leaf = "down_proj" if m.group(3) == "down_proj" else "gate_up_proj"
        pieces.setdefault((m.group(1), leaf), {}).setdefault(int(m.group(2)), {})[m.group(3)] = tensor
    for (prefix, leaf), experts in pieces.items():
        projs = _FUSED_EXPERTS[leaf]
        complete = sorted(experts) == list(range(len(experts))) and all(set(p) == set(projs) for p in experts.values())
        if not complete:
            raise ValueError(f"{prefix}: per-expert tensors do not cover experts 0..{len(experts) - 1} with "
                             f"{', '.join(projs)} each (found experts {sorted(experts)[:8]})")
        out[f"{prefix}.{leaf}"] = torch.stack([torch.cat([experts[e][p] for p in projs]) for e in sorted(experts)])
    return out


def checkpoint_layout(expected: dict[str, tuple[int, ...]], index: WeightIndex) -> dict[str, tuple[int, ...]]:
    """The model's tensors ``expected`` (name -> shape, transformers' names) in the layout ``index`` stores them:
    fused expert tensors stored per expert become their pieces (``expert_parts``). For ``check_against``."""
    stored = {}
    for name, shape in expected.items():
        stored.update(expert_parts(index, name, shape) or {name: shape})
    return stored


def unique_state_dict(model) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without aliases (a tied LM head shares the embedding's storage), as HF saves it."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor
    return out


def save_sharded(state_dict: dict[str, torch.Tensor], out_dir: str | Path, max_shard_bytes: int) -> None:
    """Write ``state_dict`` as HF-style shards (``model-0000i-of-0000n.safetensors``) plus the index JSON.

    Tensors are packed in order; a shard closes before the tensor that would push it past ``max_shard_bytes``
    (a single larger tensor gets a shard of its own). Tensors sharing storage (tied weights) are copied, since
    safetensors refuses aliases: drop tied names first if the loader does not expect them.
    """
    from safetensors.torch import save_file

    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().to("cpu").contiguous().clone()
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
