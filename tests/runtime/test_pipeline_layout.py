"""Which stage owns which layers and weights (runtime/pipeline.py), without extra devices."""

from __future__ import annotations

import pytest

from jaxinfer import Engine, EngineConfig
from jaxinfer.runtime.pipeline import StageLayout, layer_ranges


def test_layers_split_into_equal_contiguous_ranges():
    assert layer_ranges(8, 4) == (range(2), range(2, 4), range(4, 6), range(6, 8))
    assert layer_ranges(8, 1) == (range(8),)
    with pytest.raises(ValueError, match=r"pipeline_parallel_size 3 must divide .* \(8\)"):
        layer_ranges(8, 3)


def test_weights_go_to_the_stage_that_reads_them():
    layout = StageLayout((None, None, None), layer_ranges(6, 3), ("embed", "positions"))
    assert [layout.stage_of(f"layers.{i}.q") for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert layout.stage_of("layers.5.q_bias") == 2
    assert layout.stage_of("embed") == 0
    assert layout.stage_of("positions") == 0
    assert layout.stage_of("final_norm") == 2
    assert layout.stage_of("final_norm_bias") == 2
    assert layout.stage_of("lm_head") == 2


def test_stage_params_split_the_tree_without_copies():
    layout = StageLayout((None, None), layer_ranges(4, 2), ("embed",))
    layers = tuple({"q": f"q{i}"} for i in range(4))
    params = {"embed": "E", "final_norm": "N", "lm_head": "H", "layers": layers}
    first, last = layout.stage_params(params, tied_embedding=False)
    assert first == {"layers": layers[:2], "embed": "E"}
    assert last == {"layers": layers[2:], "final_norm": "N", "lm_head": "H"}


def test_pipeline_across_processes_is_refused_before_loading(monkeypatch, tiny_llama):
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="across several processes is not supported"):
        Engine(EngineConfig(model=str(tiny_llama), pipeline_parallel_size=2))
