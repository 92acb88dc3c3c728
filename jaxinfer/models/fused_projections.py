"""One product where a layer had several: q/k/v -> `qkv`, gate/up -> `gate_up`, for quantized
weights, joined once after loading.

Why: a quantized product is one call of a CPU kernel behind `jax.ffi`, and at batch 1 what each
call costs beside its bytes (the call, waking the second thread, the small tail of a panel) is
of the order of reading K or V itself: SmolLM2's k and v are 110 KB each. Joining them leaves 4
calls per layer instead of 7. Measured on the 2-core EPYC (benchmarks/RESULTS.md, "Fused
projections"): all of a SmolLM2 decode step's products at batch 1, int8 6.87 -> 6.37 ms, GGUF
blocks 11.30 -> 8.53 ms.

The join changes no value: every output channel of a quantized weight has its own scale (int8)
or its own blocks (GGUF), and the kernels sum each channel's products in a fixed order that does
not depend on the other channels, so `x @ qkv` is `[x @ q | x @ k | x @ v]` bit for bit.
`layers.project_qkv` and `layers.gated_mlp` already split fused outputs (GPT-2's and Phi-3's
checkpoints store them fused), so the forward pass needs nothing new.

Only quantized weights are joined: they are never sharded (the engine refuses a quantization with
a mesh), while a float model's q/k/v are split over a tensor-parallel mesh by heads, which a
joined matrix could not be. int8 parts are unpacked and packed into panels again, so a part
that does not fill its last panel of 64 leaves no gap; GGUF parts are joined only when they share
a block type (a file may store v in Q6_K beside a Q4_K q).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxinfer.kernels.int8_matmul import pack_panels, unpack_panels
from jaxinfer.models.gguf_weight import GGUFBlockWeight
from jaxinfer.models.quantization import QuantizedWeight

FUSIONS = (("qkv", ("q", "k", "v")), ("gate_up", ("gate", "up")))


def fuse_projections(params: dict) -> dict:
    """`params` with each layer's q/k/v and gate/up joined where the weights allow (see the
    module docstring); a layer whose parts cannot be joined keeps them apart."""
    return {**params, "layers": tuple(_fuse_layer(layer) for layer in params.get("layers", ()))}


def _fuse_layer(layer: dict) -> dict:
    layer = dict(layer)
    for fused_name, parts in FUSIONS:
        if fused_name in layer or not all(part in layer for part in parts):
            continue
        weight = _fuse_weights([layer[part] for part in parts])
        biases = [layer.get(f"{part}_bias") for part in parts]
        has_bias = [bias is not None for bias in biases]
        if weight is None or (any(has_bias) and not all(has_bias)):
            continue
        for part in parts:
            del layer[part]
            layer.pop(f"{part}_bias", None)
        layer[fused_name] = weight
        if all(has_bias):
            layer[f"{fused_name}_bias"] = _joined(biases)
    return layer


def _fuse_weights(weights: list) -> QuantizedWeight | GGUFBlockWeight | None:
    """The weights' output channels one after another, or None when they cannot be joined."""
    first = weights[0]  # GGUF parts below: blocks are rows already, fused as they are
    if not isinstance(first, QuantizedWeight | GGUFBlockWeight):
        return None
    if not all(type(w) is type(first) and w.transposed for w in weights):
        return None
    if any(w.dtype_name != first.dtype_name for w in weights):
        return None
    if isinstance(first, QuantizedWeight):
        # Back to rows and into panels again: a part whose rows do not fill its last panel
        # (a padded one) then leaves no gap in the fused output.
        rows = np.concatenate([unpack_panels(_host(w.values), w.scale.shape[0]) for w in weights])
        return dataclasses.replace(
            first,
            values=_device(pack_panels(rows), first.values),
            scale=_joined([w.scale for w in weights]),
        )
    if any(w.qtype != first.qtype or w.scales.shape[1] != first.scales.shape[1] for w in weights):
        return None

    def rows(name: str):
        arrays = [getattr(w, name) for w in weights]
        return None if arrays[0] is None else _joined(arrays)

    return dataclasses.replace(
        first,
        quants=rows("quants"),
        scales=rows("scales"),
        mins=rows("mins"),
        sub_scales=rows("sub_scales"),
    )


def _host(array: jax.Array) -> np.ndarray:
    return np.asarray(jax.device_get(array))


def _device(array: np.ndarray, like: jax.Array) -> jax.Array:
    return jax.device_put(array, like.sharding)


def _joined(arrays: list[jax.Array]) -> jax.Array:
    """The arrays one after another along their first axis, on the first one's device. Joined on
    the host (numpy): done with jnp, every new shape would compile a small program at load."""
    return _device(np.concatenate([_host(a) for a in arrays]), arrays[0])
