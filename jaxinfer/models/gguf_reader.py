"""Read GGUF checkpoints (llama.cpp's format) into Hugging Face names and layouts.

The config and tokenizer are built from the metadata by ``gguf_metadata`` without torch, equal
to what ``AutoConfig`` / ``AutoTokenizer`` give for ``gguf_file=``. The tensors are located
through the same header parse, viewed in the file's memory map and dequantized to float32 with
the gguf package's vectorized numpy code (``gguf.quants.dequantize``), then renamed to Hugging
Face names and, where llama.cpp's converter permuted rows for its rotary layout (q/k projections
of llama), un-permuted exactly as ``transformers.modeling_gguf_pytorch_utils.LlamaTensorProcessor``
does. The result is identical to the state dict that
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` builds.

Loading is loud: a tensor in the file without a mapping raises ``ValueError`` naming it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from jaxinfer.models import gguf_metadata
from jaxinfer.models.gguf_blocks import BLOCK_TYPES, LAYOUTS, GGUFBlocks

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class _ArchSpec:
    """How one GGUF architecture maps onto Hugging Face names."""

    # GGUF name (without ".weight"/".bias") -> HF module name.
    globals: dict[str, str]
    # Per-layer GGUF suffix after "blk.N." -> HF module suffix after "model.layers.N.".
    layer: dict[str, str]
    # Per-layer GGUF suffixes whose rows llama.cpp permuted for its rotary layout:
    # suffix -> which config field holds the head count used for that permutation.
    permuted: dict[str, str] = field(default_factory=dict)
    # Tensors that carry nothing the HF model has (derived from the config): skipped knowingly,
    # as transformers skips them.
    derived: frozenset[str] = frozenset()


_LLAMA_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_LLAMA_GLOBALS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# general.architecture -> mapping. To add e.g. qwen2 (no q/k permutation in llama.cpp's
# converter): _ArchSpec(globals=_LLAMA_GLOBALS, layer=_LLAMA_LAYER), its config keys in
# gguf_metadata._CONFIG_KEYS, and check both against transformers on a real file. Mistral GGUFs
# are written with architecture "llama".
_ARCHITECTURES: dict[str, _ArchSpec] = {
    "llama": _ArchSpec(
        globals=_LLAMA_GLOBALS,
        layer=_LLAMA_LAYER,
        permuted={"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"},
        # Llama-3.x files carry rope_freqs.weight (the rope-scaling factors, computed from the
        # config's rope parameters); transformers drops it too.
        derived=frozenset({"rope_freqs.weight"}),
    ),
}

SUPPORTED_ARCHITECTURES = tuple(sorted(_ARCHITECTURES))

_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(.+)\.(weight|bias)$")


# --------------------------------------------------------------------------- locating files


def is_gguf(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def resolve_gguf(model: str, gguf_file: str | None) -> tuple[Path, Path] | None:
    """Find the GGUF checkpoint ``model`` (and optionally ``gguf_file``) point at.

    Returns ``(folder, file)`` when ``model`` is a ``.gguf`` file, or a folder plus ``gguf_file``,
    or a folder holding exactly one ``.gguf`` and no ``*.safetensors``; else ``None``.

    Raises ``FileNotFoundError`` when ``gguf_file`` is given but cannot be found (an explicit
    request must not silently fall back to safetensors), and ``ValueError`` when a folder without
    safetensors holds several ``.gguf`` files (say which one with ``gguf_file``).
    """
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf" and not is_gguf(path):
            return None
        if gguf_file is not None and Path(gguf_file).name != path.name:
            raise ValueError(
                f"model {model!r} is a GGUF file already but gguf_file={gguf_file!r} names another"
            )
        path = path.resolve()
        return path.parent, path

    if gguf_file is not None:
        candidate = Path(gguf_file).expanduser()
        if not candidate.is_absolute():
            candidate = path / candidate
        if not candidate.is_file():
            raise FileNotFoundError(f"GGUF file {gguf_file!r} not found (looked for {candidate})")
        candidate = candidate.resolve()
        return candidate.parent, candidate

    if not path.is_dir():
        return None
    ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if not ggufs or any(path.glob("*.safetensors")):
        return None
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ValueError(
            f"{path} holds several GGUF files ({names}); choose one with gguf_file=<name>"
        )
    file = ggufs[0].resolve()
    return file.parent, file


# --------------------------------------------------------------------------- config, tokenizer


def _check_pair(folder: Path, file: Path) -> tuple[Path, str]:
    folder, file = Path(folder), Path(file)
    if not (folder / file.name).is_file():
        # Be forgiving when the caller passed a file outside ``folder``: use the file's own folder.
        if file.is_file():
            return file.parent, file.name
        raise FileNotFoundError(f"GGUF file {file.name!r} not found in {folder}")
    return folder, file.name


def load_gguf_config(folder: Path, file: Path):
    """The ``transformers.PretrainedConfig`` that transformers builds from the GGUF metadata."""
    folder, name = _check_pair(folder, file)
    metadata = gguf_metadata.read_gguf_metadata(folder / name)
    return gguf_metadata.build_gguf_config(metadata, str(folder), str(folder / name))


def load_gguf_tokenizer(folder: Path, file: Path):
    """The tokenizer transformers builds from the GGUF metadata, with its chat template."""
    folder, name = _check_pair(folder, file)
    metadata = gguf_metadata.read_gguf_metadata(
        folder / name, string_arrays=gguf_metadata.TOKENIZER_STRING_ARRAYS
    )
    return gguf_metadata.build_gguf_tokenizer(metadata, str(folder))


# --------------------------------------------------------------------------- tensors


# ggml types that the file stores as plain numpy values (gguf.GGUFReader's table); every other
# type is blocks of bytes that gguf.quants.dequantize decodes.
_PLAIN_TYPES = {
    gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.F32: np.float32,
    gguf.GGMLQuantizationType.F64: np.float64,
    gguf.GGMLQuantizationType.I8: np.int8,
    gguf.GGMLQuantizationType.I16: np.int16,
    gguf.GGMLQuantizationType.I32: np.int32,
    gguf.GGMLQuantizationType.I64: np.int64,
}


def _stored_bytes(info: gguf_metadata.GGUFTensorInfo) -> int:
    """Bytes of one tensor's data in the file (quantized types store blocks of elements)."""
    try:
        qtype = gguf.GGMLQuantizationType(info.ggml_type)
    except ValueError:
        raise ValueError(
            f"GGUF tensor {info.name} has unknown ggml type {info.ggml_type}"
        ) from None
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(info.shape, dtype=np.int64)) * type_size // block


def check_tensor_extents(file: Path, metadata: gguf_metadata.GGUFMetadata, size: int) -> None:
    """Raise naming `file` when its tensor table points past its end: a cut-off download fails
    here, before any tensor is read, instead of deep inside a reshape."""
    ends = [(info.offset + _stored_bytes(info), info.name) for info in metadata.tensors]
    if not ends:
        return
    end, name = max(ends)
    if end > size:
        cut = sum(e > size for e, _ in ends)
        raise ValueError(
            f"{file}: truncated GGUF file: it has {size} bytes but its tensor table needs {end} "
            f"(tensor {name} ends there; {cut} of {len(ends)} tensors lie past the end). "
            "Download it again."
        )


def _tensor_data(blob: np.ndarray, info: gguf_metadata.GGUFTensorInfo) -> np.ndarray:
    """A zero-copy view of one tensor's stored data, shaped as ``gguf.GGUFReader`` shapes it.

    The tensor table comes from ``gguf_metadata`` rather than ``gguf.GGUFReader``, which spends
    about a second building a numpy array per vocabulary string before it reaches the tensors.
    """
    nbytes = _stored_bytes(info)  # raises on an unknown type
    qtype = gguf.GGMLQuantizationType(info.ggml_type)
    raw = blob[info.offset : info.offset + nbytes]
    shape = tuple(reversed(info.shape))  # numpy order: slowest-moving dimension first
    if qtype in _PLAIN_TYPES:
        return raw.view(_PLAIN_TYPES[qtype]).reshape(shape)
    return raw.reshape(gguf.quants.quant_shape_to_byte_shape(shape, qtype))


def _config_get(config: Any, key: str) -> Any:
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


def _hf_name(spec: _ArchSpec, gguf_name: str, num_layers: int | None) -> str | None:
    """HF name of a GGUF tensor, or None when it has no mapping."""
    m = _LAYER_RE.match(gguf_name)
    if m:
        idx, sub, kind = int(m.group(1)), m.group(2), m.group(3)
        if num_layers is not None and idx >= num_layers:
            return None
        hf_sub = spec.layer.get(sub)
        return None if hf_sub is None else f"model.layers.{idx}.{hf_sub}.{kind}"
    m = _GLOBAL_RE.match(gguf_name)
    if m:
        hf = spec.globals.get(m.group(1))
        return None if hf is None else f"{hf}.{m.group(2)}"
    return None


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (== transformers' ``_reverse_permute_weights``)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute {rows} rows over {n_head} heads")
    dim = rows // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def read_gguf_tensors(
    file: Path, config, keep_blocks: bool = False
) -> dict[str, np.ndarray | GGUFBlocks]:
    """All tensors of ``file`` under Hugging Face names and layouts, dequantized to float32.

    ``keep_blocks`` (``quantization="gguf"``): 2-D tensors stored as Q8_0, Q4_0, Q4_1, Q4_K or
    Q6_K come back as ``GGUFBlocks`` instead: the file's bytes, rows un-permuted the same way
    (gguf_blocks.py). A row must be whole blocks (a K-quant's 256-element super-blocks: ggml
    itself stores K-quants only for such rows); a tensor that is not is dequantized as without.

    ``config`` is the model's config (``load_gguf_config``); its ``num_attention_heads`` and
    ``num_key_value_heads`` undo llama.cpp's q/k permutation and ``num_hidden_layers`` bounds the
    layer indices. ``lm_head.weight`` is present only when the file holds ``output.weight``
    (otherwise the embedding is tied). Raises ``ValueError`` for an unsupported architecture or a
    tensor without a mapping.
    """
    metadata = gguf_metadata.read_gguf_metadata(file)
    arch = metadata.architecture
    spec = _ARCHITECTURES.get(arch)
    if spec is None:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ValueError(
            f"GGUF architecture {arch!r} ({Path(file).name}) is not supported; "
            f"supported architectures: {supported}"
        )
    num_layers = _config_get(config, "num_hidden_layers")

    # Map every name first, so that an unmapped tensor fails before any dequantization work.
    plan = []
    unmapped = []
    for tensor in metadata.tensors:
        if tensor.name in spec.derived:
            continue
        hf = _hf_name(spec, tensor.name, num_layers)
        if hf is None:
            unmapped.append(tensor.name)
        else:
            plan.append((tensor, hf))
    if unmapped:
        shown = ", ".join(unmapped[:20])
        more = f" and {len(unmapped) - 20} more" if len(unmapped) > 20 else ""
        raise ValueError(
            f"GGUF file {Path(file).name} ({arch}, {num_layers} layers in the config) holds "
            f"{len(unmapped)} tensor(s) with no Hugging Face mapping: {shown}{more}"
        )

    heads = {}
    for key in set(spec.permuted.values()):
        value = _config_get(config, key)
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"config.{key} is needed to read q/k projections, got {value!r}")
        heads[key] = int(value)

    # A plain ndarray view of the mapping: np.memmap slices run Python-level finalizers.
    blob = np.asarray(np.memmap(file, dtype=np.uint8, mode="r"))  # [file bytes]
    check_tensor_extents(Path(file), metadata, blob.size)
    out: dict[str, np.ndarray] = {}
    for tensor, hf in plan:
        if hf in out:
            raise ValueError(f"two GGUF tensors map to {hf} (second: {tensor.name})")
        # GGUF lists shapes in ggml's ne order (fastest dim first); numpy/HF order is reversed,
        # which for 2-D weights is HF's [out, in].
        shape = tuple(reversed(tensor.shape))
        data = _tensor_data(blob, tensor)
        m = _LAYER_RE.match(tensor.name)
        permuted = m is not None and m.group(2) in spec.permuted
        qtype = gguf.GGMLQuantizationType(tensor.ggml_type).name
        if (
            keep_blocks
            and len(shape) == 2
            and qtype in BLOCK_TYPES
            and shape[1] % LAYOUTS[qtype].elements == 0
        ):
            blocks = GGUFBlocks.split(data, qtype)
            if permuted:  # whole rows: the blocks run along each row
                n_head = heads[spec.permuted[m.group(2)]]
                blocks = blocks.map_rows(lambda a, n=n_head: _reverse_permute(a, n))
            out[hf] = blocks
            continue
        w = gguf.quants.dequantize(data, tensor.ggml_type)
        if np.may_share_memory(w, data):
            # F32 tensors come back as views of the file's memory map: own the data instead.
            w = np.array(w, dtype=np.float32, order="C", copy=True)
        w = np.ascontiguousarray(w, dtype=np.float32).reshape(shape)
        if permuted:
            w = _reverse_permute(w, heads[spec.permuted[m.group(2)]])
        out[hf] = w
    return out
