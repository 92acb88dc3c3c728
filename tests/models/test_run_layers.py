"""family.run_layers traces a layer's code once per kind of layer (`layer_kind`), not once per
layer, and still runs every layer with its own weights and cache, in order.

Why it matters: a second run takes its programs from the persistent compilation cache but JAX
still traces them first; tracing SmolLM2's 30 layers one by one was most of that time
(benchmarks/RESULTS.md, "Cold start").
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.models.family import run_layers

NUM_LAYERS = 5


def _family(kinds=None):
    traced = []

    def decoder_layer(layer, cfg, index, x, layer_cache, positions, attention):
        traced.append(index)
        scale = 1.0 if kinds is None else float(kinds[index])  # what the layer's kind changes
        x = attention(x * layer["w"] * scale + layer_cache[0].sum())
        return x, (x + index, positions)

    family = SimpleNamespace(decoder_layer=decoder_layer)
    if kinds is not None:
        family.layer_kind = lambda cfg, index: kinds[index]
    return family, traced


def _run(family, first_layer=0):
    layers = tuple({"w": jnp.float32(i + 2)} for i in range(NUM_LAYERS))
    caches = tuple((jnp.full((2,), i, jnp.float32), jnp.zeros(2)) for i in range(NUM_LAYERS))
    bias = jnp.float32(0.5)  # a tracer of the outer program, closed over by `attention`

    @jax.jit
    def step(x, positions, bias):
        return run_layers(
            family, layers, None, caches, x, positions, lambda h: h + bias, first_layer
        )

    return step(jnp.ones(3), jnp.arange(3), bias)


def _expected(kinds=None, first_layer=0):
    x = np.ones(3, np.float32)
    new_kv = []
    for i in range(NUM_LAYERS):
        index = first_layer + i
        kind_index = index if kinds is None else kinds.index(kinds[index])
        scale = 1.0 if kinds is None else float(kinds[index])
        x = x * (i + 2) * scale + 2 * i + 0.5
        new_kv.append(x + (first_layer if kinds is None else kind_index))
    return x, new_kv


def test_alike_layers_are_traced_once_and_each_runs_its_own_weights():
    family, traced = _family()
    x, new_kv = _run(family)
    assert traced == [0]
    want_x, want_kv = _expected()
    np.testing.assert_allclose(np.asarray(x), want_x, rtol=1e-6)
    for (k, positions), want in zip(new_kv, want_kv, strict=True):
        np.testing.assert_allclose(np.asarray(k), want, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(positions), np.arange(3))


def test_each_kind_of_layer_is_traced_once_with_the_first_index_of_its_kind():
    kinds = [1, 3, 1, 3, 3]  # e.g. Gemma2's sliding / global layers
    family, traced = _family(kinds)
    x, new_kv = _run(family)
    assert traced == [0, 1]
    want_x, want_kv = _expected(kinds)
    np.testing.assert_allclose(np.asarray(x), want_x, rtol=1e-6)
    for (k, _), want in zip(new_kv, want_kv, strict=True):
        np.testing.assert_allclose(np.asarray(k), want, rtol=1e-6)


def test_a_pipeline_stage_passes_the_global_index():
    family, traced = _family()
    _run(family, first_layer=7)
    assert traced == [7]
