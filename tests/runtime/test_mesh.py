"""Mesh rules that need no extra devices: validation messages and the logical-axis table."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import pytest
from jax.sharding import PartitionSpec

from jaxinfer.runtime.mesh import (
    build_mesh,
    check_tensor_parallel,
    kv_head_replication,
    partition_spec,
)


def decoder(heads: int, kv_heads: int) -> SimpleNamespace:
    return SimpleNamespace(num_heads=heads, num_kv_heads=kv_heads)


def test_heads_must_divide():
    check_tensor_parallel(decoder(8, 2), 4)  # kv heads repeated: fine
    with pytest.raises(ValueError, match="must divide the number of attention heads"):
        check_tensor_parallel(decoder(9, 3), 2)
    with pytest.raises(ValueError, match="kv heads"):
        check_tensor_parallel(decoder(12, 3), 2)


def test_encoders_are_refused_clearly():
    with pytest.raises(ValueError, match="decoder models only"):
        check_tensor_parallel(SimpleNamespace(num_heads=12), 2)


def test_kv_head_replication():
    assert kv_head_replication(decoder(8, 8), 4) == 1
    assert kv_head_replication(decoder(8, 2), 8) == 4


def test_too_many_devices_asked_names_all_sizes():
    too_many = len(jax.devices()) + 1
    with pytest.raises(ValueError, match=r"data_parallel_size \(1\).*tensor_parallel_size"):
        build_mesh(too_many)


def test_megatron_rules_and_indivisible_axes_stay_replicated():
    assert partition_spec(("embed", "q_heads")) == PartitionSpec(None, "model")
    assert partition_spec(("mlp", "embed")) == PartitionSpec("model", None)
    three_way = SimpleNamespace(shape={"data": 1, "stage": 1, "model": 3})  # only .shape is read
    assert partition_spec(("vocab", "embed"), (9, 4), three_way) == PartitionSpec("model", None)
    assert partition_spec(("vocab", "embed"), (512, 4), three_way) == PartitionSpec(None, None)
    with pytest.raises(ValueError, match="no sharding rule"):
        partition_spec(("experts",))
