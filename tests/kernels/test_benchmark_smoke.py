"""benchmarks/paged_attention.py stays runnable: its CPU smoke run measures every case it reports."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

BENCHMARK = Path(__file__).parents[2] / "benchmarks" / "paged_attention.py"


def test_quick_run_writes_a_complete_table(tmp_path):
    spec = importlib.util.spec_from_file_location("paged_attention_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "result.json"
    result = module.main(["--quick", "--interpret", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    seen = {(row["case"], row["impl"]) for row in result["rows"]}
    assert {
        ("decode", "xla_reference"),
        ("decode", "pallas"),
        ("prefill", "pallas"),
        ("prefill", "dense_dot_product_attention"),
        ("kv_write", "xla_scatter"),
    } <= seen
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["ms"] > 0 and math.isfinite(row["ms"])
        if row["case"] == "decode":
            assert row["back_to_back_ms"] > 0 and math.isfinite(row["back_to_back_ms"])
    assert result["read_bandwidth_GB/s"] > 0


def test_sweep_quick_run_searches_every_knob(tmp_path):
    """benchmarks/paged_attention_sweep.py: every knob's values are tried on the decode cell and
    the prefill cell, one row of each is the defaults and one the fastest, and no point failed
    to compile or run."""
    sweep = BENCHMARK.with_name("paged_attention_sweep.py")
    spec = importlib.util.spec_from_file_location("paged_attention_sweep", sweep)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "sweep.json"
    result = module.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["rows"]
    for row in rows:
        assert "error" not in row, row
        assert row["ms"] > 0 and math.isfinite(row["ms"])
    for case, knobs in (("decode", module.DECODE_KNOBS), ("prefill", module.PREFILL_KNOBS)):
        case_rows = [row for row in rows if row["case"] == case]
        for knob, values in knobs.items():
            if knob != "split_factor":
                assert {row[knob] for row in case_rows} == set(values), (case, knob)
        assert sum(bool(row.get("default")) for row in case_rows) == 1, case
        best = [row for row in case_rows if row["best"]]
        if case == "prefill":  # the joint points (128-row tiles on 8 warps) ran too
            joint = {(p["tokens_per_tile"], p["num_warps"]) for p in module.PREFILL_JOINT}
            assert joint <= {(row["tokens_per_tile"], row["num_warps"]) for row in case_rows}
        assert len(best) == 1 and best[0]["ms"] == min(row["ms"] for row in case_rows), case
