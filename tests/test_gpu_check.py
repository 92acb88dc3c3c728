"""benchmarks/gpu_check.sh, the parts that run without a GPU: its arguments, the plan it would run
(every benchmark's arguments accepted by that benchmark's own parser), the skip without a GPU, and
its run loop and summary with a stand-in python that claims a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = [
    "kernel_tests",
    "backend_agreement",
    "paged_attention",
    "throughput",
    "throughput_multistep",
]


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )


def plan(*args: str) -> dict[str, list[str]]:
    """Step name -> its command, from --dry-run."""
    result = run("--dry-run", *args)
    assert result.returncode == 0, result.stderr
    steps = {}
    for line in result.stdout.splitlines()[1:]:
        head, command = line.strip().split(": ", 1)
        steps[head.split(" ")[0]] = shlex.split(command)
    return steps


def benchmark_module(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_check_{name}", ROOT / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_help_and_usage_errors():
    shown = run("--help")
    assert shown.returncode == 0
    assert "OUT_DIR (default ./gpu_check_out)" in shown.stdout
    assert "Exit status: 0 every step passed, or no GPU" in shown.stdout
    bad = run("--bogus")
    assert bad.returncode == 2 and "unknown option '--bogus'" in bad.stderr
    two = run("a", "b")
    assert two.returncode == 2 and "one OUT_DIR only" in two.stderr
    missing = run("--model")
    assert missing.returncode == 2 and "--model needs a path" in missing.stderr


def test_plan_writes_under_one_folder_and_every_benchmark_accepts_its_arguments(tmp_path):
    out = tmp_path / "out dir"
    steps = plan(str(out))
    assert list(steps) == STEPS
    pytest_cmd = steps["kernel_tests"]
    assert pytest_cmd[1:4] == ["-m", "pytest", "-q"] and "tests/kernels" in pytest_cmd
    assert f"{out}/kernel_tests.xml" in pytest_cmd
    parsed = {}
    for step, script in [
        ("backend_agreement", "backend_agreement.py"),
        ("paged_attention", "paged_attention.py"),
        ("throughput", "throughput.py"),
        ("throughput_multistep", "throughput.py"),
    ]:
        command = steps[step]
        assert command[1] == f"benchmarks/{script}"
        parsed[step] = benchmark_module(script).parse_args(command[2:])
        assert Path(parsed[step].out).parent == out
    assert parsed["throughput"].dtype == "bfloat16"
    assert parsed["throughput"].model == "smollm2" and parsed["throughput"].skip_hf
    assert parsed["throughput"].markdown == f"{out}/throughput.md"
    assert parsed["throughput"].num_scheduler_steps == 1
    assert parsed["throughput_multistep"].num_scheduler_steps == 8
    assert parsed["throughput_multistep"].markdown == f"{out}/throughput_multistep.md"
    assert parsed["paged_attention"].batches == [1, 8, 64, 256]
    assert parsed["backend_agreement"].dtypes == ["float32", "bfloat16"]


def test_quick_and_model_options_reach_the_benchmarks():
    steps = plan("--quick", "--model", "/models/smol lm.gguf", "--no-time-limits")
    throughput = benchmark_module("throughput.py").parse_args(steps["throughput"][2:])
    assert throughput.quick and throughput.model_path == "/models/smol lm.gguf"
    multistep = benchmark_module("throughput.py").parse_args(steps["throughput_multistep"][2:])
    assert multistep.quick and multistep.model_path == "/models/smol lm.gguf"
    agreement = benchmark_module("backend_agreement.py").parse_args(steps["backend_agreement"][2:])
    assert agreement.model == "/models/smol lm.gguf" and agreement.prompts == 4
    assert "--prefill-lens" in steps["paged_attention"]
    assert "[no limit]" in run("--dry-run", "--no-time-limits").stdout


def test_steps_option_runs_a_subset_in_the_fixed_order():
    assert list(plan("--steps", "throughput,kernel_tests")) == ["kernel_tests", "throughput"]
    assert list(plan("--steps=paged_attention")) == ["paged_attention"]
    bad = run("--dry-run", "--steps", "kernel_tests,throughput_")
    assert bad.returncode == 2 and "unknown step 'throughput_'" in bad.stderr
    assert run("--steps").returncode == 2


def test_without_a_gpu_it_says_skip_and_writes_nothing(tmp_path):
    result = run(str(tmp_path / "out"), JAX_PLATFORMS="cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("SKIP: no GPU visible to JAX")
    assert "platform 'cpu'" in result.stdout
    assert not (tmp_path / "out").exists()


def test_a_python_without_jax_is_exit_3(tmp_path):
    result = run(str(tmp_path / "out"), PYTHON=str(tmp_path / "no-python"))
    assert result.returncode == 3 and "cannot run jax" in result.stderr


@pytest.fixture
def python_claiming_a_gpu(tmp_path) -> Path:
    """A stand-in `python3`: claims a GPU when probed, records each step's command instead of
    running it (paged_attention fails), and hands everything else to the real python."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        'if [ "$1" = -c ] && [[ "$2" == *"jax.devices()[0]"* ]]; then echo "gpu Fake GPU"; exit 0; fi\n'
        'case "$*" in\n'
        f'  "-m pytest "*|benchmarks/*) echo "$*" >>"{tmp_path}/ran.txt";\n'
        '    [[ "$*" == *paged_attention* ]] && { echo "kernel broke" >&2; exit 1; }; exit 0 ;;\n'
        "esac\n"
        f'exec "{sys.executable}" "$@"\n'
    )
    fake.chmod(0o755)
    return fake


def test_run_loop_records_every_step_and_fails_when_one_fails(tmp_path, python_claiming_a_gpu):
    out = tmp_path / "out"
    result = run(str(out), PYTHON=str(python_claiming_a_gpu))
    assert result.returncode == 1, result.stdout + result.stderr
    ran = (tmp_path / "ran.txt").read_text().splitlines()
    assert len(ran) == 5 and "--num-scheduler-steps 8" in ran[-1]
    summary = json.loads((out / "summary.json").read_text())["steps"]
    assert [s["step"] for s in summary] == STEPS
    assert [s["status"] for s in summary] == ["pass", "pass", "fail (exit 1)", "pass", "pass"]
    assert "kernel broke" in (out / "paged_attention.log").read_text()
    lines = (out / "summary.txt").read_text().splitlines()
    assert lines[2].split()[:4] == ["paged_attention", "fail", "(exit", "1)"]
    assert "device: Fake GPU" in (out / "environment.txt").read_text()


def _steps(tokens: list[int], logprob: float = -0.5, gap: float = 1.0) -> list[dict]:
    return [{"token": t, "logprob": logprob, "top2": [logprob, logprob - gap]} for t in tokens]


def test_agreement_verdict_allows_divergence_only_at_a_near_tie():
    agreement = benchmark_module("backend_agreement.py")
    bound = agreement.LOGPROB_BOUND
    reference = [_steps([5, 6, 7]), _steps([1, 2, 3], gap=bound / 2)]
    same = agreement.compare(reference, [_steps([5, 6, 7]), _steps([1, 2, 3])])
    assert same["identical"] == 2 and same["max_logprob_diff"] == 0.0
    assert agreement.verdict("float32", same) == "pass"
    # The second prompt diverges at its first step, where the reference's top-2 were a near-tie.
    tie = agreement.compare(reference, [_steps([5, 6, 7]), _steps([9, 2, 3])])
    assert tie["identical"] == 1 and tie["divergences"][0]["step"] == 0
    assert agreement.verdict("float32", tie) == "pass"
    # The first diverges where the reference was sure: a real difference.
    wrong = agreement.compare(reference, [_steps([5, 9, 7]), _steps([1, 2, 3])])
    assert agreement.verdict("float32", wrong).startswith("FAIL: tokens diverge")
    drift = agreement.compare(
        reference, [_steps([5, 6, 7], logprob=-0.5 + 2 * bound), reference[1]]
    )
    assert agreement.verdict("float32", drift).startswith("FAIL: logprob differs")
    assert agreement.verdict("bfloat16", wrong) == "reported"
