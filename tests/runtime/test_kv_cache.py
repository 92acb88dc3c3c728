"""KV cache sizing on CPU (jaxinfer.runtime.kv_cache): host-side, memory readings monkeypatched."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from jaxinfer.config import EngineConfig
from jaxinfer.runtime import kv_cache

GiB = 1 << 30
# SmolLM2-135M's cache geometry: 30 layers x 3 kv heads x 64 dims; float32 16-token blocks are
# 2 * 16 * 3 * 64 * 4 * 30 = 737,280 bytes.
SMOLLM2 = SimpleNamespace(num_layers=30, num_kv_heads=3, head_dim=64)
PER_BLOCK = 737_280


def _config(**changes) -> EngineConfig:
    fields = {"model": "unused", "max_model_len": 8192, "max_num_seqs": 32, **changes}
    return EngineConfig(**fields)


def _blocks(monkeypatch, total: int, available: int, **changes) -> int:
    # The CPU path whatever machine runs the test (a GPU one included).
    monkeypatch.setattr(kv_cache.jax, "devices", lambda: [SimpleNamespace(platform="cpu")])
    monkeypatch.setattr(kv_cache, "_host_memory_bytes", lambda: total)
    monkeypatch.setattr(kv_cache, "_available_host_bytes", lambda: available)
    return kv_cache.num_blocks_for(_config(**changes), SMOLLM2, "float32", weight_bytes=0)


def test_bytes_per_block():
    assert kv_cache.bytes_per_block(SMOLLM2, 16, "float32") == PER_BLOCK


def test_cpu_blocks_do_not_depend_on_free_memory(monkeypatch):
    """The same command sizes the same cache however much memory happens to be free, so its
    compiled programs (whose shapes include num_blocks) are found in the persistent cache."""
    counts = {_blocks(monkeypatch, 24 * GiB, free) for free in (23 * GiB, 17 * GiB, 9 * GiB)}
    # 10% of 24 GiB rounded down coarsely: 2 GiB.
    assert counts == {2 * GiB // PER_BLOCK}


def test_cpu_budget_is_a_coarse_fraction_of_physical_memory(monkeypatch):
    """10% of physical memory with all but 3 leading bits cleared: machines of about the same
    size agree, and under 20% of the budget is lost."""
    for total, budget in (
        (24 * GiB, 2 * GiB),  # 2.4 GiB -> 2 GiB (4 x 2^29)
        (23 * GiB + 900 * 2**20, 2 * GiB),  # a little less memory reported: the same
        (30 * GiB, 3 * GiB),  # 6 x 2^29
        (41 * GiB, 4 * GiB),
        (64 * GiB, 6 * GiB),  # 6.4 GiB -> 6 GiB
    ):
        assert _blocks(monkeypatch, total, total) == budget // PER_BLOCK, total
    assert _blocks(monkeypatch, 24 * GiB, 24 * GiB, cpu_kv_cache_fraction=0.3) == (
        7 * GiB // PER_BLOCK  # 7.2 GiB -> 7 GiB
    )


def test_cpu_budget_shrinks_only_when_memory_is_short(monkeypatch, caplog):
    with caplog.at_level("WARNING", logger="jaxinfer"):
        # 2 GiB would take over half of the 3 GiB free: halved to 1 GiB, and said so.
        assert _blocks(monkeypatch, 24 * GiB, 3 * GiB) == 1 * GiB // PER_BLOCK
    assert "will not be reused" in caplog.text


def test_cpu_blocks_capped_by_what_sequences_can_use(monkeypatch):
    # 4 sequences x 128 blocks (2048 tokens) + the padding block.
    assert _blocks(monkeypatch, 24 * GiB, 24 * GiB, max_num_seqs=4, max_model_len=2048) == 513


def test_explicit_sizes_win(monkeypatch):
    assert _blocks(monkeypatch, 24 * GiB, 1 * GiB, num_kv_blocks=7) == 7
    # An explicit byte budget is used as given: not rounded, not checked against free memory.
    explicit = 300 * PER_BLOCK + 5
    assert _blocks(monkeypatch, 24 * GiB, 1 * GiB, kv_cache_memory_bytes=explicit) == 300


def test_pipeline_stages_size_the_cache_by_the_largest_stage(monkeypatch):
    """The budget is one device's; each device holds its stage's layers, so 30 layers over 4
    stages (vLLM's split 7,8,8,7) fit as many blocks as 8 layers do, and an explicit partition
    is followed. Even stages: exactly the whole model's blocks times the stage count."""
    budget = 1000 * PER_BLOCK
    per_layer = PER_BLOCK // 30

    def blocks(**changes):
        return _blocks(monkeypatch, 24 * GiB, 24 * GiB, kv_cache_memory_bytes=budget, **changes)

    assert blocks() == 1000
    assert blocks(pipeline_parallel_size=2) == 2000  # 15 layers a stage
    assert blocks(pipeline_parallel_size=4) == budget // (8 * per_layer)
    assert blocks(pipeline_parallel_size=4, pipeline_layer_partition="6,6,6,12") == budget // (
        12 * per_layer
    )
    assert blocks(pipeline_parallel_size=2, tensor_parallel_size=3) == 6000  # kv heads / 3


def test_budget_too_small_raises(monkeypatch):
    with pytest.raises(ValueError, match="at least 2"):
        _blocks(monkeypatch, 24 * GiB, 24 * GiB, kv_cache_memory_bytes=PER_BLOCK)


def test_host_memory_reads_a_cgroup_limit(monkeypatch, tmp_path):
    """A container's memory limit caps the physical memory the budget is a fraction of."""
    limit = tmp_path / "memory.max"
    limit.write_text(f"{4 * GiB}\n")
    real_open = open

    def fake_open(path, *args, **kwargs):
        if str(path) == "/sys/fs/cgroup/memory.max":
            return real_open(limit, *args, **kwargs)
        if str(path) == "/sys/fs/cgroup/memory/memory.limit_in_bytes":
            raise OSError("no cgroup v1 here")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    assert kv_cache._host_memory_bytes() == min(4 * GiB, kv_cache._machine_memory_bytes())
    limit.write_text("max\n")  # cgroup v2: no limit
    assert kv_cache._host_memory_bytes() == kv_cache._machine_memory_bytes()
