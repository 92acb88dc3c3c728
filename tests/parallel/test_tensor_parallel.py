"""Tensor parallelism on 8 fake CPU devices against the single-device engine.

The measurements run once, in a subprocess with `--xla_force_host_platform_device_count=8` (the
device count is fixed when JAX starts; the rest of the suite uses one device): tests/parallel/
tp_worker.py. Tiny Llama checkpoints with 8 query heads and 8 or 2 kv heads, TP 2, 4 and 8: with
2 kv heads, TP 4 and 8 store each kv head 2 or 4 times so every device holds the heads its query
heads read.
"""

from __future__ import annotations

import pytest

from tests.parallel.fake_devices import run_worker

CASES = [f"{kv}-tp{t}" for kv in ("kv8", "kv2") for t in (2, 4, 8)]


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    results = run_worker("tests.parallel.tp_worker", tmp_path_factory.mktemp("tp") / "tp.json")
    return results["cases"]


@pytest.mark.parametrize("case", CASES)
def test_logits_and_greedy_tokens_match_one_device(measured, case):
    report = measured[case]
    assert report["max_logit_diff"] < 1e-4
    assert report["tokens_equal"], report["tokens"]


@pytest.mark.parametrize("case", ["kv8-tp2", "kv2-tp2"])
def test_multi_step_decode_gives_the_same_tokens(measured, case):
    """num_scheduler_steps=4 over a TP 2 mesh: several decode steps per call, one device's
    greedy tokens."""
    assert measured[case]["multi_step_calls"] > 0
    assert measured[case]["multi_step_tokens_equal"]


@pytest.mark.parametrize("case", CASES)
def test_every_device_holds_only_its_shard(measured, case):
    size = int(case.split("tp")[1])
    report = measured[case]
    named = {**report["weights"], "embed": report["embed"], "lm_head": report["lm_head"]}
    for name, weight in named.items():
        assert weight["devices"] == size, name
        assert sum(weight["shard_bytes"]) == weight["global_bytes"], name  # no device has it all
        assert all(b == weight["global_bytes"] // size for b in weight["shard_bytes"]), name
    cache = report["kv_cache"]
    kv_heads = cache["global_shape"][0]
    assert kv_heads == report["kv_heads_stored"] == max(size, int(case[2]))
    assert all(shape[0] == kv_heads // size for shape in cache["shard_shapes"])
    assert sum(cache["shard_bytes"]) == cache["global_bytes"]


def test_column_and_row_parallel_layout(measured):
    """q (column-parallel) is split on its output axis, o (row-parallel) on its input axis."""
    weights = measured["kv8-tp2"]["weights"]
    q, o = weights["q"], weights["o"]
    assert q["shard_shapes"][0] == [q["global_shape"][0], q["global_shape"][1] // 2]
    assert o["shard_shapes"][0] == [o["global_shape"][0] // 2, o["global_shape"][1]]


def test_tp2_step_has_two_all_reduces_per_layer_and_gathers_no_weight(measured):
    """Megatron layout: per layer one all-reduce after attention's o projection and one after the
    MLP's down projection; outside the layers one for the vocab-parallel embedding lookup. The
    only all-gathers are of logits (vocab-parallel, gathered once for sampling), never of a
    whole weight."""
    report = measured["kv8-tp2"]
    found = report["collectives"]
    assert found["all_reduce"] == 2 * found["layers"] + 1
    weights = [*report["weights"].values(), report["embed"], report["lm_head"]]
    whole = {f"f32[{','.join(map(str, w['global_shape']))}]" for w in weights}
    assert found["all_gather_shapes"], "expected the logits all-gather"
    assert not whole & set(found["all_gather_shapes"]), found["all_gather_shapes"]
    vocab = report["lm_head"]["global_shape"][1]
    assert all(shape.endswith(f",{vocab}]") for shape in found["all_gather_shapes"])
