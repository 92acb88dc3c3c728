"""A GGUF file's metadata, and the Hugging Face config and tokenizer it describes, without torch.

transformers 5.x builds both itself (``AutoConfig`` / ``AutoTokenizer`` with ``gguf_file=``), but
its GGUF reader (``integrations/gguf/reader.py``, ``modeling_gguf_pytorch_utils.py``) imports
torch, and a torch requirement pulls gigabytes of CUDA wheels from the public index. So this module
reads the metadata itself and takes from transformers only what is torch-free: the config classes
and the GGUF tokenizer converter (``convert_gguf_tokenizer``, a function of plain data). The result
equals transformers' own on the same file; ``tests/models/test_gguf_metadata.py`` compares them.

The header is walked with ``struct`` over a memory map, and the vocabulary's strings are decoded
only when the tokenizer asks for them: about 0.05 s for SmolLM2's 49k tokens and 49k merges, where
``gguf.GGUFReader`` takes about a second (it builds a numpy array for each of ~100k strings) and
transformers' config path took 3-8 s (torch import and a full parse, twice: config, tokenizer).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUF_MAGIC, GGUFValueType

# Scalar value types: struct format (little-endian) and numpy dtype for arrays of them.
_SCALARS: dict[int, tuple[str, str]] = {
    GGUFValueType.UINT8: ("<B", "<u1"),
    GGUFValueType.INT8: ("<b", "<i1"),
    GGUFValueType.UINT16: ("<H", "<u2"),
    GGUFValueType.INT16: ("<h", "<i2"),
    GGUFValueType.UINT32: ("<I", "<u4"),
    GGUFValueType.INT32: ("<i", "<i4"),
    GGUFValueType.FLOAT32: ("<f", "<f4"),
    GGUFValueType.BOOL: ("<?", "?"),
    GGUFValueType.UINT64: ("<Q", "<u8"),
    GGUFValueType.INT64: ("<q", "<i8"),
    GGUFValueType.FLOAT64: ("<d", "<f8"),
}

# Magic, version, tensor count and metadata count: the fixed part every GGUF file starts with.
_HEADER_BYTES = 24
# The string arrays the tokenizer needs in full; every other string array is only measured.
TOKENIZER_STRING_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor's data lies in the file, and how it is stored."""

    name: str
    ggml_type: int  # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # ggml's ne order: the fastest-moving dimension first
    offset: int  # absolute byte offset of the data in the file


@dataclass(frozen=True)
class GGUFMetadata:
    """The key-value metadata and tensor table of one GGUF file (no tensor data)."""

    # key -> str | int | float | bool | list; string arrays only when asked for (see read).
    values: dict[str, Any]
    # Every array's length, read or not: a vocabulary's size needs no decoded vocabulary.
    array_lengths: dict[str, int]
    tensors: tuple[GGUFTensorInfo, ...]

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    @property
    def architecture(self) -> str:
        arch = self.values.get("general.architecture")
        if arch is None:
            raise ValueError("GGUF file has no general.architecture")
        return str(arch)


def read_gguf_metadata(file: str | Path, string_arrays: Collection[str] = ()) -> GGUFMetadata:
    """Parse ``file``'s header: metadata values and the tensor table, never the tensor data.

    String arrays (the vocabulary, the merges) are decoded only for the keys in
    ``string_arrays``; the others are skipped and recorded in ``array_lengths`` only.
    Raises ``ValueError`` for a file that is not GGUF v2/v3 little-endian.
    """
    size = Path(file).stat().st_size
    if size < _HEADER_BYTES:  # mmap refuses an empty file; a shorter one has no header to read
        raise ValueError(
            f"{file}: {size} bytes, too short to be a GGUF file (its header alone takes "
            f"{_HEADER_BYTES}; truncated download?)"
        )
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            return _parse(buf, str(file), frozenset(string_arrays))
        except struct.error as error:  # a read past the end of the file
            raise ValueError(
                f"{file}: truncated or corrupt GGUF header: the file ends ({size} bytes) inside "
                f"its metadata or tensor table (truncated download?) [{error}]"
            ) from error
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{file}: truncated or corrupt GGUF header: a metadata string is not UTF-8 "
                f"({error})"
            ) from error


def _parse(buf: mmap.mmap, name: str, string_arrays: frozenset[str]) -> GGUFMetadata:
    if struct.unpack_from("<I", buf, 0)[0] != GGUF_MAGIC:
        raise ValueError(f"{name} does not start with the GGUF magic bytes")
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", buf, 4)  # _HEADER_BYTES
    if version not in (2, 3):
        # A big-endian file reads as a huge version here; v1 counted in 32 bits.
        raise ValueError(f"{name}: GGUF version {version} (little-endian v2/v3 are supported)")

    def string(pos: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", buf, pos)
        pos += 8
        return buf[pos : pos + length].decode("utf-8"), pos + length

    values: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    pos = 24
    for _ in range(kv_count):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if kind == GGUFValueType.STRING:
            values[key], pos = string(pos)
        elif kind in _SCALARS:
            fmt = _SCALARS[kind][0]
            (values[key],) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
        elif kind == GGUFValueType.ARRAY:
            item_kind, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            lengths[key] = count
            if item_kind in _SCALARS:
                dtype = np.dtype(_SCALARS[item_kind][1])
                if pos + count * dtype.itemsize > len(buf):
                    raise ValueError(f"{name}: metadata {key!r} runs past the end of the file")
                values[key] = np.frombuffer(buf, dtype, count, pos).tolist()
                pos += count * dtype.itemsize
            elif item_kind == GGUFValueType.STRING:
                if key in string_arrays:
                    items = []
                    for _ in range(count):
                        item, pos = string(pos)
                        items.append(item)
                    values[key] = items
                else:
                    for _ in range(count):  # variable-length items: walk them
                        pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            else:
                raise ValueError(f"{name}: metadata {key!r} is an array of type {item_kind}")
        else:
            raise ValueError(f"{name}: metadata {key!r} has unknown value type {kind}")

    table = []
    for _ in range(tensor_count):
        tensor, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        shape = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        pos += 4 + 8 * n_dims
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        table.append((tensor, ggml_type, shape, offset))
    # The data section starts at the next multiple of the alignment after the tensor table.
    alignment = int(values.get("general.alignment", 32))
    data_start = -(-pos // alignment) * alignment
    tensors = tuple(
        GGUFTensorInfo(name=t, ggml_type=k, shape=tuple(s), offset=data_start + o)
        for t, k, s, o in table
    )
    return GGUFMetadata(values=values, array_lengths=lengths, tensors=tensors)


# --------------------------------------------------------------------------- config

# llama.cpp's key (after "<architecture>.") -> Hugging Face config field, per architecture that
# read_gguf_tensors supports. The same table as transformers' GGUF_CONFIG_MAPPING["llama"]; note
# that it, like transformers, carries no rope-scaling keys.
_CONFIG_KEYS: dict[str, dict[str, str]] = {
    "llama": {
        "context_length": "max_position_embeddings",
        "block_count": "num_hidden_layers",
        "feed_forward_length": "intermediate_size",
        "embedding_length": "hidden_size",
        "rope.dimension_count": "head_dim",
        "rope.freq_base": "rope_theta",
        "attention.head_count": "num_attention_heads",
        "attention.head_count_kv": "num_key_value_heads",
        "attention.layer_norm_rms_epsilon": "rms_norm_eps",
        "vocab_size": "vocab_size",
    },
}
_TOKEN_ID_KEYS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}


def gguf_config_dict(metadata: GGUFMetadata) -> dict[str, Any]:
    """The config dict transformers builds from this metadata (``model_type`` included).

    Raises ``ValueError`` naming the supported architectures for any other.
    """
    arch = metadata.architecture
    keys = _CONFIG_KEYS.get(arch)
    if keys is None:
        supported = ", ".join(sorted(_CONFIG_KEYS))
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported architectures: {supported}"
        )
    values = metadata.values
    config: dict[str, Any] = {"model_type": arch}
    if "general.name" in values:
        config["_model_name_or_path"] = values["general.name"]
    for suffix, field in keys.items():
        if f"{arch}.{suffix}" in values:
            config[field] = values[f"{arch}.{suffix}"]
    for key, field in _TOKEN_ID_KEYS.items():
        if key in values:
            config[field] = values[key]
    # llama.cpp writes output.weight only when the head is not the embedding matrix.
    config["tie_word_embeddings"] = "output.weight" not in metadata.tensor_names
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata.array_lengths:
        config["vocab_size"] = metadata.array_lengths["tokenizer.ggml.tokens"]
    return config


def build_gguf_config(metadata: GGUFMetadata, name_or_path: str, file: str | None = None):
    """The ``PretrainedConfig`` that ``AutoConfig.from_pretrained(gguf_file=)`` gives; its values
    checked first (``config_checks``), errors naming ``file``."""
    from transformers import AutoConfig

    from jaxinfer.models import config_checks

    config_dict = gguf_config_dict(metadata)
    where = f"{file or name_or_path} (GGUF metadata)"
    config_checks.check_values(config_dict, where)  # before the config class divides by them
    config = AutoConfig.for_model(**config_dict)
    config._name_or_path = name_or_path
    config_checks.note_default_length(config_dict, config.max_position_embeddings, where)
    return config


# --------------------------------------------------------------------------- tokenizer

_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def _tokenizer_converter():
    """transformers' torch-free GGUF tokenizer pieces: (key renames, converter function).

    They moved from ``integrations/ggml.py`` to ``integrations/gguf/`` during 5.x; both modules
    import tokenizers and transformers' tokenizer classes only, never torch.
    """
    try:
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError:
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    return GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer


def build_gguf_tokenizer(metadata: GGUFMetadata, name_or_path: str):
    """The tokenizer ``AutoTokenizer.from_pretrained(gguf_file=)`` gives, chat template included.

    ``metadata`` must have been read with ``TOKENIZER_STRING_ARRAYS``. The inputs are gathered as
    transformers' ``get_gguf_tokenizer`` gathers them, then handed to its converter.
    """
    from transformers import PreTrainedTokenizerFast

    renames, convert = _tokenizer_converter()
    values = metadata.values
    if "tokenizer.ggml.tokens" not in values:
        raise ValueError("GGUF metadata has no vocabulary: read it with TOKENIZER_STRING_ARRAYS")
    grouped = {
        group: {
            field: values[f"tokenizer.{key}"]
            for key, field in table.items()
            if f"tokenizer.{key}" in values
        }
        for group, table in renames.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # Older files carry no flag, and llama.cpp adds BOS to a sentencepiece vocabulary then.
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for name, key in _SPECIAL_TOKENS.items():
        token_id = values.get(key)
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None

    backend, extra = convert(metadata.architecture, tokenizer_dict)
    # The converter's own settings win, as in transformers' loader (`kwargs.update(...)` in that
    # order); some versions (5.17) repeat a special token there, e.g. unk_token.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, name_or_path=name_or_path, **{**tokenizer_config, **extra}
    )
