"""benchmarks/vs_llamacpp.py, benchmarks/step_profile.py, benchmarks/step_trace.py and
benchmarks/quantization.py's product tables stay runnable: their quick runs fill every column they report. A tiny checkpoint stands in
for SmolLM2 on the jaxinfer side; llama.cpp (a benchmark-only dependency in its own venv, never in
the test requirements) runs SmolLM2's GGUF when that venv exists, and only its column is left out
when it does not."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_vs_llamacpp_quick_run_fills_every_column(tiny_llama, smollm2_gguf, tmp_path):
    module = _load("vs_llamacpp")
    has_llamacpp = Path(module.DEFAULT_LLAMACPP_PYTHON).is_file()
    out = tmp_path / "vs.json"
    result = module.main(
        ["--quick", "--model", str(tiny_llama), "--llamacpp-model", str(smollm2_gguf),
         "--out", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    engines = {row["engine"] for row in result["rows"]}
    expected = {"jaxinfer float32", "jaxinfer int8", "jaxinfer int8 x8"}
    expected |= {"llama.cpp"} if has_llamacpp else set()
    assert engines == expected
    if not has_llamacpp:
        assert "no llama.cpp interpreter" in result["llamacpp"]
    rows = {row["engine"]: row for row in result["rows"]}
    for row in rows.values():
        for key in ("decode_tok_s", "prefill_tok_s", "workload_tok_s", "bandwidth_bound_tok_s"):
            assert row[key] > 0 and math.isfinite(row[key]), (row["engine"], key)
    # int8 holds fewer weight bytes than float32 (values at 1 byte plus scales).
    assert rows["jaxinfer int8"]["weight_bytes_per_token"] < (
        rows["jaxinfer float32"]["weight_bytes_per_token"] / 2
    )
    if has_llamacpp:  # the GGUF's tensors: SmolLM2 Q4_1 with a Q8_0 embedding, ~97 MB
        assert 90e6 < rows["llama.cpp"]["weight_bytes_per_token"] < 100e6


def test_step_profile_quick_run_splits_the_step(tiny_llama, tmp_path):
    module = _load("step_profile")
    out = tmp_path / "profile.json"
    result = module.main(
        ["--quick", "--model", str(tiny_llama), "--batches", "1,2", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [row["batch"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["decode_steps"] > 0
        assert row["device_step_ms"] > 0
        assert set(row["pieces_ms"]) == set(module.PIECES)
        assert all(ms > 0 and math.isfinite(ms) for ms in row["pieces_ms"].values())
        assert not row["bucket"]["is_prefill"]


def test_step_trace_quick_run_names_the_int8_kernel_calls(tiny_llama, tmp_path, monkeypatch):
    """The trace is read back, the kernel's custom calls are named by target and counted: every
    decode step runs each int8 product once (the tiny llama: 2 layers x 4, q/k/v and gate/up
    fused at load, and its lm_head)."""
    # main() appends its trace flag to XLA_FLAGS (for JAX, not started yet in a real run); the
    # worker's later child processes must not inherit it.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    module = _load("step_trace")
    out = tmp_path / "trace.json"
    result = module.main(
        ["--quick", "--model", str(tiny_llama), "--quantization", "int8", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    calls = result["thunks_per_step"]["jaxinfer_int8_matmul"]
    assert calls == 2 * 4 + 1  # qkv, o, gate_up, down per layer (fused_projections); lm_head
    assert result["thunk_ms_per_step"]["jaxinfer_int8_matmul"] > 0
    assert result["python_ms_per_step"]["dispatch"] > 0
    assert module.thunk_kind("add_rsqrt_fusion.12", {}) == "add_rsqrt_fusion"
    assert module.custom_call_targets(
        '%ffi_call.3 = f32[1,8]{1,0} custom-call(%a), custom_call_target="jaxinfer_int8_matmul"'
    ) == {"ffi_call.3": "jaxinfer_int8_matmul"}


def test_step_trace_prefill_mode_traces_prefill_steps(tiny_llama, tmp_path, monkeypatch):
    """--prefill: each traced step is one prefill of B fresh prompts; its attention goes through
    the CPU kernel (one call per layer) and every int8 product runs once."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    module = _load("step_trace")
    out = tmp_path / "prefill.json"
    args = ["--quick", "--model", str(tiny_llama), "--quantization", "int8", "--out", str(out)]
    result = module.main([*args, "--prefill", "--batch", "2", "--prompt-len", "24"])
    assert result["prefill"] and result["prompt_len"] == 24 and result["traced_steps"] == 4
    assert result["thunks_per_step"]["jaxinfer_int8_matmul"] == 2 * 4 + 1
    assert result["thunks_per_step"]["jaxinfer_paged_attention_f32"] == 2  # one per layer
    assert result["traced_wall_ms_per_step"] > 0


def test_quantization_products_only_quick_run_times_every_block_type(tmp_path):
    """benchmarks/quantization.py's product tables alone (the engine sections need SmolLM2)."""
    module = _load("quantization")
    out = tmp_path / "products.json"
    assert module.main(["--quick", "--products-only", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["products"]) == 4 and len(result["block_products"]) == 2
    for row in result["block_products"].values():
        assert set(row["ms"]) == {"float32", *module.BLOCK_TYPES_TIMED}
        for value in (*row["ms"].values(), *row["weight_gb_s"].values()):
            assert value > 0 and math.isfinite(value)


def test_scoring_quick_run_scores_with_both_engines_and_they_agree(tiny_llama, tmp_path):
    module = _load("scoring")
    out = tmp_path / "scoring.json"
    result = module.main(["--quick", "--model", str(tiny_llama), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {row["engine"]: row for row in result["rows"]}
    batch = module.QUICK.hf_batch_size
    assert set(rows) == {"jaxinfer", "transformers per request", f"transformers batched ({batch})"}
    for row in rows.values():
        assert row["warm_s"] > 0 and math.isfinite(row["tokens_per_s"]), row["engine"]
        assert len(row["rounds_s"]) == module.QUICK.rounds
    assert rows["jaxinfer"]["first_compile_s"] > 0  # the first run compiled the step shapes
    requests = module.QUICK.contexts * module.CONTINUATIONS
    for per_round in result["agreement"].values():
        for check in per_round:
            assert check["requests"] == requests
            assert check["max_abs_logprob_diff"] <= module.AGREEMENT_TOL
            assert check["is_greedy_equal"] == requests


def test_throughput_llamacpp_column_runs_the_workload_in_sequence(smollm2_gguf, tmp_path):
    """throughput.py's llama.cpp column: vs_llamacpp's worker generates exactly each request's
    tokens; without the venv, or for a model that is not a GGUF, the column says why it is out."""
    module = _load("throughput")
    files = module.resolve_model("smollm2", tmp_path, path=str(smollm2_gguf))
    python = module.DEFAULT_LLAMACPP_PYTHON
    folder = module.ModelFiles("folder", str(tmp_path), str(tmp_path), None)
    assert "not a GGUF" in module.llamacpp_unavailable(folder, python, skip=False)
    assert "--skip-llamacpp" in module.llamacpp_unavailable(files, python, skip=True)
    missing = module.llamacpp_unavailable(files, str(tmp_path / "no-python"), skip=False)
    assert "no llama.cpp interpreter" in missing
    if module.llamacpp_unavailable(files, python, skip=False) is not None:
        return  # no venv here: the notes above are what the run reports
    spec = module.WorkloadSpec(3, (4, 12), (2, 5), 3, 16, 1)
    workload = module.make_workload(spec, seed=0, vocab_size=49152)
    result = module.run_llamacpp(files, workload, spec, python, ttft_repeats=1)
    assert [len(t) for t in result["tokens"]] == workload.output_lens
    assert result["output_tokens"] == sum(workload.output_lens)
    assert result["output_tokens_per_s"] > 0 and result["ttft_s"] > 0
    assert 90e6 < result["weight_bytes"] < 100e6  # SmolLM2's Q4_1 / Q8_0 tensors
