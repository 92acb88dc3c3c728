"""Which stage owns which layers and weights (runtime/pipeline.py), without extra devices."""

from __future__ import annotations

import pytest

from jaxinfer import Engine, EngineConfig
from jaxinfer.config_file import load_config_file
from jaxinfer.runtime.pipeline import StageLayout, layer_partition, layer_ranges


def test_layers_split_into_equal_contiguous_ranges():
    assert layer_ranges(8, 4) == (range(2), range(2, 4), range(4, 6), range(6, 8))
    assert layer_ranges(8, 1) == (range(8),)


# vLLM's own expectations for get_pp_indices (tests/distributed/test_pipeline_partition.py,
# test_uneven_auto_partition), as (start, end) per stage.
VLLM_UNEVEN = {
    (2, 2): [(0, 1), (1, 2)],
    (3, 2): [(0, 2), (2, 3)],
    (3, 3): [(0, 1), (1, 2), (2, 3)],
    (4, 3): [(0, 1), (1, 3), (3, 4)],
    (5, 3): [(0, 2), (2, 4), (4, 5)],
}


@pytest.mark.parametrize(("num_layers", "stages"), VLLM_UNEVEN)
def test_uneven_layers_split_as_vllm_does(num_layers, stages):
    ranges = layer_ranges(num_layers, stages)
    assert [(r.start, r.stop) for r in ranges] == VLLM_UNEVEN[num_layers, stages]


def test_remainder_goes_to_the_stages_before_the_last():
    """vLLM's rule: one extra layer each from the second-to-last stage backwards, so the last
    stage (norm, lm_head, sampler) never gets one and the first only when it must."""
    assert layer_partition(30, 4) == (7, 8, 8, 7)
    assert layer_partition(28, 3) == (9, 10, 9)
    assert layer_partition(5, 4) == (1, 1, 2, 1)
    assert layer_partition(7, 4) == (2, 2, 2, 1)
    assert layer_partition(61, 4) == (15, 15, 16, 15)


def test_explicit_partition_overrides_the_default():
    # vLLM's test_custom_layer_partition cases, as per-stage counts.
    assert layer_ranges(20, 4, "4,6,6,4") == (range(4), range(4, 10), range(10, 16), range(16, 20))
    assert layer_partition(22, 4, (5, 6, 5, 6)) == (5, 6, 5, 6)
    assert layer_partition(4, 2, "1,3") == (1, 3)


@pytest.mark.parametrize(
    ("num_layers", "stages", "override", "message"),
    [
        (20, 4, "5,5,5", r"pipeline_layer_partition 5,5,5 names 3 stages, but .* is 4"),
        (21, 4, "5,5,5,5", r"5,5,5,5 adds up to 20 layers, but the model has 21"),
        (20, 4, "5,5,5,a", r"comma-separated layer counts like '8,8,7,7', got '5,5,5,a'"),
        (20, 4, "5,5,5,5,", r"comma-separated layer counts"),
        (4, 2, "4,0", r"4,0: every stage needs at least one layer"),
        (4, 2, (5, -1), r"5,-1: every stage needs at least one layer"),
        (4, 2, (2.0, 2), r"layer counts per stage"),
        (3, 4, None, r"pipeline_parallel_size 4 exceeds the number of layers \(3\)"),
    ],
)
def test_bad_partitions_are_refused_with_the_reason(num_layers, stages, override, message):
    with pytest.raises(ValueError, match=message):
        layer_partition(num_layers, stages, override)


def test_engine_config_checks_and_normalizes_the_partition(tmp_path):
    config = EngineConfig(model="m", pipeline_parallel_size=4, pipeline_layer_partition="8,8,7,7")
    assert config.pipeline_layer_partition == (8, 8, 7, 7)
    assert EngineConfig(
        model="m", pipeline_parallel_size=2, pipeline_layer_partition=[2, 1]
    ).pipeline_layer_partition == (2, 1)
    with pytest.raises(ValueError, match=r"pipeline_layer_partition must be one layer count per"):
        EngineConfig(model="m", pipeline_parallel_size=2, pipeline_layer_partition="1,1,1")
    with pytest.raises(ValueError, match=r"pipeline_layer_partition 3,0: every stage needs"):
        EngineConfig(model="m", pipeline_parallel_size=2, pipeline_layer_partition="3,0")
    path = tmp_path / "pp.yaml"
    path.write_text(
        f"model: {tmp_path}\npipeline_parallel_size: 2\npipeline_layer_partition: [2, 1]\n"
    )
    assert load_config_file(path).engine.pipeline_layer_partition == (2, 1)
    path.write_text(f"model: {tmp_path}\npipeline_parallel_size: 2\npipeline_layer_partition: 1\n")
    with pytest.raises(ValueError, match=r"pp.yaml: pipeline_layer_partition must be"):
        load_config_file(path)


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
