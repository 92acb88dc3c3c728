"""Checkpoint folders and GGUF files -> (config, parameter pytree, tokenizer). Loud on any mismatch.

Every tensor goes through the model's weight declarations: a tensor with no declaration, a declared
weight the checkpoint lacks, or a shape that disagrees fails the load naming the tensor. Silent
partial loads are how an engine ends up generating fluent nonsense.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxinfer.models import config_checks, gguf_reader, hub
from jaxinfer.models.fused_projections import fuse_projections
from jaxinfer.models.gguf_blocks import GGUFBlocks
from jaxinfer.models.gguf_weight import blocks_for_device
from jaxinfer.models.placement import ONE_DEVICE, WeightPlacement
from jaxinfer.models.quantization import is_quantized_path, quantize_for_device
from jaxinfer.models.registry import model_family
from jaxinfer.models.tokenizer_loading import (  # noqa: F401 (re-exported)
    load_eos_token_ids,
    load_generation_defaults,
    load_tokenizer,
)
from jaxinfer.runtime.mesh import check_tensor_parallel, kv_head_replication
from jaxinfer.runtime.pipeline import StageLayout

logger = logging.getLogger("jaxinfer")

# Buffers some checkpoints carry that are recomputed here rather than loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_TORCH_DTYPE_NAMES = {
    "float32": "float32",
    "torch.float32": "float32",
    "bfloat16": "bfloat16",
    "torch.bfloat16": "bfloat16",
    "float16": "float16",
    "torch.float16": "float16",
    "half": "float16",
}


@dataclass(frozen=True)
class CheckpointSource:
    """Where a model lives: a Hugging Face folder, or a GGUF file (and the folder holding it)."""

    folder: Path
    gguf_file: Path | None = None

    @classmethod
    def resolve(
        cls,
        model: str,
        gguf_file: str | None = None,
        *,
        revision: str | None = None,
        download_dir: str | None = None,
    ) -> CheckpointSource:
        """A local folder or .gguf file, else a Hugging Face hub id fetched into the hub cache
        (models/hub.py; `revision` and `download_dir` apply to hub ids only)."""
        path = Path(os.path.expanduser(model))
        if not path.exists() and hub.is_hub_id(model):
            folder, file = hub.resolve_model(model, gguf_file, revision, download_dir)
            return cls(folder=folder, gguf_file=file)
        if revision not in (None, "main"):
            raise ValueError(
                f"EngineConfig.revision={revision!r} applies to a Hugging Face hub id, but "
                f"{model!r} is a local path: check out that revision there, or drop revision"
            )
        if not path.exists():
            hint = ""
            if model.endswith(".gguf") and model.count("/") == 2:
                repo, name = model.rsplit("/", 1)
                hint = f"; a GGUF file in a hub repo is model={repo!r}, gguf_file={name!r}"
            raise ValueError(
                f"EngineConfig.model: {model!r} does not exist (a checkpoint folder or .gguf "
                f"file, or a Hugging Face hub id such as 'org/name'){hint}"
            )
        gguf = gguf_reader.resolve_gguf(str(path), gguf_file)
        if gguf is not None:
            return cls(folder=gguf[0], gguf_file=gguf[1])
        if not (path / "config.json").is_file():
            raise ValueError(
                f"EngineConfig.model: {model!r} has no config.json (and no .gguf file)"
            )
        return cls(folder=path)


def load_hf_config(source: CheckpointSource):
    """The transformers config, its stated values checked first (models/config_checks.py)."""
    from transformers import AutoConfig

    if source.gguf_file is not None:  # checked in gguf_metadata.build_gguf_config
        return gguf_reader.load_gguf_config(source.folder, source.gguf_file)
    stated = config_checks.read_config_json(source.folder)
    hf_config = AutoConfig.from_pretrained(source.folder, local_files_only=True)
    config_checks.note_default_length(
        stated, getattr(hf_config, "max_position_embeddings", None), str(_config_file(source))
    )
    return hf_config


def _config_file(source: CheckpointSource) -> Path:
    """Where the config's values come from: config.json, or the GGUF file's metadata."""
    return source.gguf_file if source.gguf_file is not None else source.folder / "config.json"


def tensor_names(source: CheckpointSource) -> list[str]:
    """The checkpoint's tensor names, read from file headers only (no tensor data)."""
    if source.gguf_file is not None:
        from jaxinfer.models.gguf_metadata import read_gguf_metadata

        return list(read_gguf_metadata(source.gguf_file).tensor_names)
    index = source.folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    from safetensors import SafetensorError, safe_open

    names = []
    for file in _safetensors_files(source.folder):
        try:
            with safe_open(file, framework="numpy") as handle:
                names.extend(handle.keys())
        except SafetensorError as error:
            raise ValueError(f"corrupt safetensors file {file}: {error}") from error
    return names


def resolve_dtype(requested: str, hf_config, source: CheckpointSource) -> str:
    """`auto` means the checkpoint's own dtype; GGUF weights are dequantized to float32."""
    if requested != "auto":
        return requested
    if source.gguf_file is not None:
        return "float32"
    declared = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return _TORCH_DTYPE_NAMES.get(str(declared), "float32")


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"safetensors shards listed in {index.name} are missing: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {folder}")
    return files


def _iter_safetensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    for file in _safetensors_files(folder):
        try:
            # framework="flax" because numpy cannot hold bfloat16; np.asarray then gives ml_dtypes.
            with safe_open(file, framework="flax") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                    yield name, np.asarray(handle.get_tensor(name))
        except SafetensorError as error:
            raise ValueError(f"corrupt safetensors file {file}: {error}") from error


def _set_path(tree: dict, path: str, value) -> None:
    """Place `value` at "layers.3.q" in a tree of dicts whose "layers" entry is a list."""
    parts = path.split(".")
    node = tree
    for part, following in itertools.pairwise(parts):
        key = int(part) if isinstance(node, list) else part
        if isinstance(node, list):
            while len(node) <= key:
                node.append({})
            node = node[key]
        else:
            node = node.setdefault(key, [] if following.isdigit() else {})
    node[parts[-1]] = value


def build_params(
    specs: dict,
    tensors: Iterator[tuple[str, np.ndarray]],
    dtype: str,
    ignored: tuple[str, ...] = (),
    placement: WeightPlacement = ONE_DEVICE,
    check_finite: bool = True,
    quantization: str | None = None,
) -> dict:
    """Map named tensors through the declarations; fail naming anything unmapped, missing or misshapen.

    `ignored`: exact names the family knows its checkpoints carry and never reads (BERT's pooler).
    `placement`: one device, or each tensor's shard of a mesh (models/placement.py).
    `check_finite`: fail naming a tensor that holds NaN or inf in `dtype` (see `_check_finite`).
    `quantization`: "int8" stores the linear weights and embeddings as int8 QuantizedWeights,
    quantized here on the host from the `dtype` values (models/quantization.py); "gguf" keeps
    the GGUFBlocks a GGUF reader passes (models/gguf_weight.py) as they are.
    """
    by_hf_name = {spec.hf_name: (path, spec) for path, spec in specs.items()}
    params: dict = {}
    loaded: set[str] = set()
    target = jnp.dtype(dtype)
    for hf_name, array in tensors:
        if hf_name not in by_hf_name:
            if hf_name.endswith(_IGNORED_SUFFIXES) or hf_name in ignored:
                continue
            raise ValueError(
                f"checkpoint tensor {hf_name!r} {tuple(array.shape)} is not used by this model"
            )
        path, spec = by_hf_name[hf_name]
        if isinstance(array, GGUFBlocks):
            if quantization == "gguf" and is_quantized_path(path, spec):
                if check_finite:
                    array.check_finite(hf_name)
                _set_path(params, path, blocks_for_device(path, spec, array, dtype, placement))
                loaded.add(hf_name)
                continue
            array = array.dequantize()
        if spec.transpose:
            array = array.T
        array = placement.layout(spec, array)
        if tuple(array.shape) != spec.shape:
            raise ValueError(
                f"checkpoint tensor {hf_name!r} has shape {tuple(array.shape)} (after layout), "
                f"expected {spec.shape}"
            )
        with np.errstate(over="ignore" if check_finite else "warn"):  # the check says it better
            array = array.astype(target)
        if check_finite:
            _check_finite(hf_name, array, dtype)
        if quantization == "int8" and is_quantized_path(path, spec):
            _set_path(params, path, quantize_for_device(path, spec, array, placement))
        else:
            _set_path(params, path, placement.put(path, spec, array))
        loaded.add(hf_name)
    missing = sorted(set(by_hf_name) - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:5]}")
    params["layers"] = tuple(params.get("layers", ()))
    return params


def _check_finite(hf_name: str, array: np.ndarray, dtype: str) -> None:
    """One reduction per tensor, on the values the model will use (after the cast to `dtype`,
    which is where float16 overflows): a NaN in one weight otherwise surfaces only as garbage
    tokens, far from its cause."""
    finite = np.isfinite(array)
    if not finite.all():
        bad = array.size - int(np.count_nonzero(finite))
        raise ValueError(
            f"checkpoint tensor {hf_name!r} holds {bad} non-finite value(s) (NaN or inf) of "
            f"{array.size} as {dtype}: the file is damaged, or its values do not fit {dtype} "
            "(float16 ends at 65504). EngineConfig(check_weights_finite=False) skips this check"
        )


@dataclass(frozen=True)
class LoadedModel:
    source: CheckpointSource
    hf_config: object
    model_config: object  # the family's frozen config, e.g. DecoderConfig
    family: object  # the family module: declare_weights, forward
    params: dict
    dtype: str
    # Layers per pipeline stage as the weights were placed (runtime/pipeline.py); None: one stage.
    layer_partition: tuple[int, ...] | None = None

    @property
    def weight_bytes(self) -> int:
        return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(self.params))

    @property
    def is_encoder(self) -> bool:
        """An encoder (BERT) embeds with `Engine.encode()`; it has no KV cache and no logits."""
        return getattr(self.family, "IS_ENCODER", False)


def load_model(
    source: CheckpointSource,
    dtype: str = "auto",
    weight_cache_dir: str | None = None,
    mesh: Mesh | None = None,
    layer_partition: tuple[int, ...] | None = None,
    check_finite: bool = True,
    quantization: str | None = None,
    fuse_quantized_projections: bool = True,
) -> LoadedModel:
    """`weight_cache_dir`: restore converted weights from there, or save them (weight_cache.py).
    `mesh`: place every weight straight into its tensor-parallel shard (runtime/mesh.py), on its
    pipeline stage's devices (runtime/pipeline.py); `layer_partition`: layers per stage
    (EngineConfig.pipeline_layer_partition; None: vLLM's default split). `check_finite`: every
    converted weight is checked for NaN/inf (EngineConfig.check_weights_finite); weights restored
    from the weight cache were checked when they were converted. `quantization`: None, "int8"
    (EngineConfig.quantization; models/quantization.py) or "gguf" (models/gguf_weight.py), whose
    q/k/v and gate/up are then fused (models/fused_projections.py) unless
    `fuse_quantized_projections` is False (benchmarks/quantization.py compares the two)."""
    hf_config = load_hf_config(source)
    family = model_family(hf_config)
    # Before a single layer is declared: a config claiming 10**6 layers fails here, not after
    # minutes spent building them.
    config_checks.check_layer_count(
        hf_config.num_hidden_layers, tensor_names(source), str(_config_file(source))
    )
    is_encoder = getattr(family, "IS_ENCODER", False)
    model_config = (family.EncoderConfig if is_encoder else family.DecoderConfig).from_hf(hf_config)
    _check_quantization(quantization, is_encoder, source)
    dtype = resolve_dtype(dtype, hf_config, source)
    placement = ONE_DEVICE
    if mesh is not None:
        model_config, placement = _mesh_layout(family, model_config, mesh, layer_partition)
    specs = family.declare_weights(model_config)

    def convert() -> dict:
        return _convert_params(
            source,
            hf_config,
            family,
            model_config,
            specs,
            dtype,
            placement,
            check_finite,
            quantization,
        )

    if weight_cache_dir is None:
        params = convert()
    else:
        from jaxinfer.models import weight_cache  # orbax is imported only when caching

        params = weight_cache.load_or_convert(
            Path(weight_cache_dir).expanduser(), source, specs, dtype, family, convert, placement
        )
    if quantization is not None and fuse_quantized_projections:
        params = fuse_projections(params)
    stages = placement.stages
    partition = None if stages is None else tuple(len(r) for r in stages.ranges)
    return LoadedModel(source, hf_config, model_config, family, params, dtype, partition)


def _mesh_layout(
    family, model_config, mesh: Mesh, layer_partition: tuple[int, ...] | None = None
) -> tuple[object, WeightPlacement]:
    """The model as the mesh stores it: layers split into pipeline stages, kv heads repeated
    when fewer than the TP size. Raises before any weight is read when the mesh does not fit."""
    size = mesh.shape["model"]
    check_tensor_parallel(model_config, size)
    stages = StageLayout.build(mesh, model_config.num_layers, family.EMBED_PARAMS, layer_partition)
    if stages.num_stages > 1:
        logger.info("pipeline stages hold %s layers", ",".join(str(len(r)) for r in stages.ranges))
    repeat = kv_head_replication(model_config, size)
    placement = WeightPlacement(stages, repeat, model_config.num_kv_heads)
    if repeat > 1:
        model_config = dataclasses.replace(
            model_config, num_kv_heads=model_config.num_kv_heads * repeat
        )
    return model_config, placement


def _convert_params(
    source: CheckpointSource,
    hf_config,
    family,
    model_config,
    specs: dict,
    dtype: str,
    placement: WeightPlacement = ONE_DEVICE,
    check_finite: bool = True,
    quantization: str | None = None,
) -> dict:
    """Read every tensor of the checkpoint and lay it out for our model code (`build_params`)."""
    if source.gguf_file is not None:
        keep_blocks = quantization == "gguf"
        tensors = gguf_reader.read_gguf_tensors(source.gguf_file, hf_config, keep_blocks).items()
        if model_config.tie_word_embeddings:
            tensors = ((k, v) for k, v in tensors if k != "lm_head.weight")
    else:
        tensors = _iter_safetensors(source.folder)
        if hasattr(family, "rename_tensors"):  # uploads named unlike transformers' (family.py)
            tensors = family.rename_tensors(model_config, tensors)
    ignored = getattr(family, "IGNORED_TENSORS", ())
    return build_params(
        specs,
        iter(tensors),
        dtype,
        ignored=ignored,
        placement=placement,
        check_finite=check_finite,
        quantization=quantization,
    )


def _check_quantization(
    quantization: str | None, is_encoder: bool, source: CheckpointSource
) -> None:
    """EngineConfig checks the value and its combinations; the model's kind and whether it is a
    GGUF are known only here (before any tensor is read)."""
    if quantization is not None and is_encoder:
        raise ValueError(
            f"EngineConfig.quantization={quantization!r} applies to decoder models only"
        )
    if quantization == "gguf" and source.gguf_file is None:
        raise ValueError(
            "EngineConfig.quantization='gguf' keeps a GGUF file's quantized blocks, but "
            f"{source.folder} is not a GGUF checkpoint: use quantization='int8' or None"
        )
