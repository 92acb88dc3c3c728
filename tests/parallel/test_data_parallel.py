"""Data parallelism on 8 fake CPU devices against one engine on one device.

The measurements run once, in a subprocess with `--xla_force_host_platform_device_count=8`:
tests/parallel/dp_worker.py. DP=2 (one device per replica) and DP=2 x TP=2 serve a batch of
mixed-length prompts twice (greedy, then sampling with seeded and unseeded requests).
"""

from __future__ import annotations

import pytest

from jaxinfer.engine.data_parallel import balance
from tests.parallel.fake_devices import run_worker

CASES = {"dp2": 1, "dp2-tp2": 2}  # case -> tensor_parallel_size
KINDS = ("greedy", "sampled")


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    results = run_worker("tests.parallel.dp_worker", tmp_path_factory.mktemp("dp") / "dp.json")
    return results


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_outputs_match_one_engine(measured, case, kind):
    """Same request ids, tokens and text; logprobs equal up to batching's float noise (a request
    is batched and chunked with other requests than on one engine)."""
    assert measured["cases"][case]["type"] == "DataParallelEngine"
    expected, got = measured["single"][kind], measured["cases"][case]["outputs"][kind]
    assert [o["request_id"] for o in got] == [o["request_id"] for o in expected]
    for want, have in zip(expected, got, strict=True):
        assert have["token_ids"] == want["token_ids"]
        assert have["text"] == want["text"]
        assert have["cumulative_logprob"] == pytest.approx(want["cumulative_logprob"], abs=1e-4)
        for step_want, step_have in zip(want["logprobs"], have["logprobs"], strict=True):
            assert step_have.keys() == step_want.keys()
            for token, logprob in step_want.items():
                assert step_have[token] == pytest.approx(logprob, abs=1e-5)


def test_replica_outputs_are_bitwise_one_engines_on_the_same_share(measured):
    """Given the requests a replica served, one engine gives exactly (bitwise) its outputs."""
    got = measured["cases"]["dp2"]["outputs"]["greedy"]
    share, single = measured["share"], measured["single_share"]
    assert 0 < len(share) < len(got)
    for i, want in zip(share, single, strict=True):
        assert {**got[i], "request_id": None} == {**want, "request_id": None}


@pytest.mark.parametrize("case", CASES)
def test_each_replica_reuses_its_own_prefix_cache(measured, case):
    """The sampled call repeats the greedy call's prompts, which `balance` sends to the same
    replicas: each serves their full blocks from its own cache (and the outputs above still
    equal one engine's)."""
    assert all(hits > 0 for hits in measured["cases"][case]["prefix_cache_hits"])


@pytest.mark.parametrize("case", CASES)
def test_each_replica_lives_on_its_own_device_group(measured, case):
    size = CASES[case]
    replicas = measured["cases"][case]["replicas"]
    assert len(replicas) == 2
    for r, replica in enumerate(replicas):
        group = list(range(r * size, (r + 1) * size))
        assert replica["weights"] == replica["kv_cache"] == replica["slot_state"] == group


def test_too_few_devices_is_a_clear_error(measured):
    errors = measured["errors"]
    assert "12 devices, but only 8 are available" in errors["dp3-tp4"]
    assert "data_parallel_size (9)" in errors["dp9-tp1"]


def test_balance_splits_by_tokens_and_keeps_input_order():
    assert balance([10, 100, 10, 10, 50, 40], 2) == [[1, 2], [0, 3, 4, 5]]
    assert balance([5, 5, 5, 5], 2) == [[0, 2], [1, 3]]
    assert balance([7], 3) == [[0], [], []]
