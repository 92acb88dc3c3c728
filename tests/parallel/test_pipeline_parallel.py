"""Pipeline parallelism on 8 fake CPU devices against the single-device engine.

Measured once in a subprocess (tests/parallel/pp_worker.py, see test_tensor_parallel for why):
Llamas with stages of unequal size (3 layers over 2 stages and 5 over 4 by vLLM's default split, 5
under TP 2 x PP 2 split 2,3 by `pipeline_layer_partition`) and 2-layer Gemma 2 (tied embeddings)
under PP 2, each with one micro-batch of sequences per stage in flight (the default).
"""

from __future__ import annotations

import pytest

from tests.parallel.fake_devices import run_worker

CASES = {  # name -> (tensor_parallel_size, pipeline_parallel_size, layers per stage)
    # Uneven stages: vLLM's default split (extra layers before the last stage), or an explicit one.
    "llama3-pp2": (1, 2, (2, 1)),
    "llama5-pp4": (1, 4, (1, 1, 2, 1)),
    "llama5-tp2-pp2": (2, 2, (2, 3)),
    "gemma2-pp2": (1, 2, (1, 1)),
}
THOROUGH = "llama3-pp2"  # also measured: warm-up, micro-batches in flight, stages taking turns


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    return run_worker("tests.parallel.pp_worker", tmp_path_factory.mktemp("pp") / "pp.json")


@pytest.mark.parametrize("case", CASES)
def test_logits_and_tokens_match_one_device(measured, case):
    """Prefill logits within 1e-4 of one device (pure PP runs the very same per-layer programs, so
    it is exact); greedy and seeded-sampling tokens identical on mixed-length prompts."""
    report = measured["cases"][case]
    assert report["max_logit_diff"] < 1e-4
    if CASES[case][0] == 1:
        assert report["max_logit_diff"] == 0.0
    assert report["greedy_equal"], report["greedy"]
    assert report["seeded_equal"]


@pytest.mark.parametrize("case", CASES)
def test_each_stage_holds_only_its_layers(measured, case):
    tp, pp, per_stage = CASES[case]
    report = measured["cases"][case]
    stages = report["stages"]
    assert len(stages) == pp
    seen_devices: set[int] = set()
    for s, stage in enumerate(stages):
        first = sum(per_stage[:s])
        assert stage["layers"] == [first, first + per_stage[s]]
        assert stage["kv_cache_layers"] == per_stage[s]
        devices = list(range(s * tp, (s + 1) * tp))  # stage s: the s-th group of T devices
        assert stage["weight_devices"] == devices
        assert stage["kv_cache_devices"] == devices
        assert not seen_devices & set(devices)
        seen_devices |= set(devices)
        for name in ("q", "kv_cache"):  # split T ways inside the stage, whole across it
            shard = stage[name]
            assert shard["devices"] == tp
            assert sum(shard["shard_bytes"]) == shard["global_bytes"]
    first, last = stages[0]["params"], stages[-1]["params"]
    assert "embed" in first
    assert "final_norm" in last
    for middle in stages[1:-1]:
        assert middle["params"] == []


def test_each_device_holds_its_share_of_its_stage_only(measured):
    """A device holds 1/T of its stage's weights (plus the small norms every shard keeps whole),
    so with uneven stages the devices of the larger stage hold more, and none holds the model."""
    for case, (tp, pp, _) in CASES.items():
        report = measured["cases"][case]
        held = {int(d): n for d, n in report["bytes_per_device"].items()}
        assert len(held) == tp * pp
        assert max(held.values()) < report["model_bytes"], case
        for stage in report["stages"]:
            share = stage["param_bytes"] / tp
            for device in stage["weight_devices"]:
                assert share <= held[device] <= 1.01 * share, (case, device)
    # Llama, 5 layers split 2,3 over 2 stages of 2 devices: the last stage's devices hold more.
    held = measured["cases"]["llama5-tp2-pp2"]["bytes_per_device"]
    assert held["0"] == held["1"] < held["2"] == held["3"]


def test_tied_embedding_is_on_the_first_and_last_stage(measured):
    stages = measured["cases"]["gemma2-pp2"]["stages"]
    assert "embed" in stages[0]["params"] and "embed" in stages[-1]["params"]
    assert "lm_head" not in stages[-1]["params"]


def test_micro_batches_compile_nothing_after_warmup_and_turns_agree(measured):
    """Micro-batches use the engine's own buckets, so warm-up covers them; one batch (stages
    taking turns) gives the same tokens as one micro-batch per stage in flight."""
    report = measured["cases"][THOROUGH]
    assert report["new_compilations"] == 0
    assert report["one_batch_equal"] and report["in_flight_greedy_equal"]


def test_one_step_per_micro_batch_is_in_flight(measured):
    """With P = 2 micro-batches the engine dispatches one's step before reading the other's back,
    so both stages have work; as one batch, each step is read back before the next starts."""
    report = measured["cases"][THOROUGH]
    assert report["steps_in_flight"] == 2
    assert report["one_batch_steps_in_flight"] == 1


def test_clear_errors(measured):
    found = measured["errors"]
    assert (
        "pipeline_parallel_size 8 exceeds the number of layers (5): every stage needs at least "
        "one layer" in found["pp8-of-5-layers"]
    )
    assert (
        "pipeline_layer_partition 2,2 adds up to 4 layers, but the model has 5"
        in found["partition-sum"]
    )
    assert "16 devices, but only 8" in found["pp16"]
    assert "pipeline_micro_batches" in found["micro0"]
