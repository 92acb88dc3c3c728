"""The contract between a model family module and the rest of the engine.

A family module (llama.py, gemma.py, opt.py, ...) exports:

    ARCHITECTURES     the Hugging Face `architectures` names it implements (see registry.py)
    DecoderConfig     a frozen `DecoderShape` subclass with `from_hf(hf_config)`
    declare_weights   cfg -> {param path: WeightSpec}; loading, shape checks and sharding derive from it
    EMBED_PARAMS      the top-level parameters `embed` reads (a pipeline's first stage holds them)
    embed             (params, cfg, token_ids [T], positions [T]) -> x [T, E]
    decoder_layer     (layer params, cfg, layer index, x, layer cache, positions, attention)
                      -> (x [T, E], the layer's new (k, v) [T, K, D])
    logits            (params, cfg, hidden [..., E]) -> float32 logits [..., V]
    rename_tensors    optional: (cfg, (name, array) pairs) -> pairs, for exports that name tensors
                      differently from what `transformers` saves today (older GPT-2 and OPT uploads)
    layer_kind        optional: (cfg, layer index) -> a hashable value; layers of one kind run the
                      same code (`run_layers` traces it once per kind). Without it, every layer
                      runs the same code whatever its index (Gemma2's windows and GPT-2's scales
                      differ by layer: those families say so)

Three pieces rather than one forward pass so that a pipeline stage can run any contiguous range of
layers (`run_layers`): the first stage embeds, the last computes logits, the rest pass hidden
states along. Every other top-level parameter belongs to `logits` (the last stage).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import jax


@dataclass(frozen=True)
class WeightSpec:
    """One parameter: where it comes from in a Hugging Face checkpoint and the shape it has here.

    Linear weights are stored [in, out] here (x @ W) while Hugging Face stores [out, in]: `transpose`.
    """

    hf_name: str
    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]
    transpose: bool = False


@dataclass(frozen=True, kw_only=True)
class DecoderShape:
    """What the runtime reads from every family's config: the KV cache is sized and laid out from
    `num_layers`, `num_kv_heads` and `head_dim`; the attention defaults to `head_dim**-0.5` and
    `sliding_window` (a window every layer uses; per-layer windows are the family's business);
    the engine bounds lengths by `max_position_embeddings` and sampling by `vocab_size`.

    Hashable, so a compiled step can close over it.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    sliding_window: int | None = None


def linear_specs(
    hf_prefix: str,
    shape: tuple[int, int],
    logical_axes: tuple[str | None, str | None],
    *,
    name: str,
    bias: bool,
    transpose: bool = True,
) -> dict[str, WeightSpec]:
    """A linear layer's weight (`name`) and, when the checkpoint has one, its bias (`name_bias`)."""
    specs = {name: WeightSpec(f"{hf_prefix}.weight", shape, logical_axes, transpose)}
    if bias:
        specs[f"{name}_bias"] = WeightSpec(f"{hf_prefix}.bias", shape[1:], logical_axes[1:])
    return specs


def norm_specs(
    hf_prefix: str, size: int, *, name: str, weight: bool = True, bias: bool = False
) -> dict[str, WeightSpec]:
    """A norm's scale (`name`) and shift (`name_bias`), each only when the checkpoint has it."""
    specs = {}
    if weight:
        specs[name] = WeightSpec(f"{hf_prefix}.weight", (size,), ("embed",))
    if bias:
        specs[f"{name}_bias"] = WeightSpec(f"{hf_prefix}.bias", (size,), ("embed",))
    return specs


def run_layers(
    family: ModuleType,
    layers: tuple[dict, ...],  # the parameters of layers first_layer, first_layer + 1, ...
    cfg,
    kv_cache: tuple,  # the same layers' (k, v) caches
    x: jax.Array,  # [T, E]: embeddings, or the previous layer range's output
    positions: jax.Array,  # [T]
    attention: Callable,
    first_layer: int = 0,
    trace_once: bool = True,
) -> tuple[jax.Array, tuple]:
    """-> (the last layer's output [T, E], per layer the new (k, v) [T, K, D]).

    Each layer goes through one `jax.jit` wrapper, so JAX traces and lowers a layer's code once
    per kind of layer (`layer_kind`) and calls it again for the others, instead of tracing the
    same Python 30 times: a second run, whose programs come from the persistent compilation
    cache, spent much of its time tracing (benchmarks/RESULTS.md, "Cold start"). XLA inlines the
    calls; SmolLM2's tokens and logprobs came out bitwise the same as with the layers traced one
    by one (float32 and int8, checked when this was written). The layer's index given to
    `decoder_layer` is the first index of its kind (static; all layers of a kind run alike).

    `trace_once=False` traces every layer in turn: for an `attention` with a side effect in
    Python (the multi-step loop's records each layer's written cache), which a layer traced once
    and called again would run only for the first layer of its kind.
    """
    layer_kind = getattr(family, "layer_kind", None)

    def one_layer(layer, x, layer_cache, positions, *, index: int):
        return family.decoder_layer(layer, cfg, index, x, layer_cache, positions, attention)

    call_layer = jax.jit(one_layer, static_argnames="index") if trace_once else one_layer
    first_of_kind: dict = {}
    new_kv = []
    for offset, (layer, layer_cache) in enumerate(zip(layers, kv_cache, strict=True)):
        index = first_layer + offset
        kind = None if layer_kind is None else layer_kind(cfg, index)
        if trace_once:
            index = first_of_kind.setdefault(kind, index)
        x, kv = call_layer(layer, x, layer_cache, positions, index=index)
        new_kv.append(kv)
    return x, tuple(new_kv)
