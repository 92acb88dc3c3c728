"""What a throughput run writes: the machine it ran on, the table on stdout, the JSON file keyed by
run, and the run's section of benchmarks/RESULTS.md (other benchmarks reuse `machine_info` and the
two writers)."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import roofline  # a sibling module: throughput.py puts benchmarks/ on sys.path


def _version(module: str) -> str:
    """A package's version, or "not installed" (a GPU machine may run jaxinfer without torch)."""
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def machine_info() -> dict:
    import jax

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax_device": str(jax.devices()[0].device_kind),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "transformers": _version("transformers"),
        "torch": _version("torch"),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def table_rows(result: dict) -> list[list[str]]:
    """One row per engine: tok/s, req/s, TTFT, compile, wall, % of the workload roofline."""
    bound = result["roofline"]["workload"]["output_tokens_per_s"]
    rows = []
    sides = (
        ("jaxinfer", "jaxinfer"),
        ("jaxinfer_plain_loop", "jaxinfer, plain loop"),
        ("transformers", "transformers generate"),
        ("llamacpp", "llama.cpp, sequential requests"),
    )
    for side, label in sides:
        r = result.get(side)
        if r is None:
            continue
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        rows.append(
            [
                result["model"],
                label,
                f"{r['output_tokens_per_s']:.1f}",
                f"{r['requests_per_s']:.2f}",
                f"{r['ttft_s'] * 1e3:.0f}",
                compile_s,
                f"{r['wall_s']:.1f}",
                f"{100 * r['output_tokens_per_s'] / bound:.0f}%",
            ]
        )
    rows.append(
        [
            result["model"],
            "roofline bound",
            f"{bound:.1f}",
            "-",
            "-",
            "-",
            f"{result['roofline']['workload']['seconds']:.1f}",
            "100%",
        ]
    )
    return rows


NOTES = (
    "Notes: output tok/s = generated tokens / wall time of the whole workload (jaxinfer after "
    "warm-up; compile s is the separate warm-up compiling every bucket). TTFT is a separate "
    "single request at the median prompt length with max_tokens=1 on an idle engine (jaxinfer "
    'has no streaming API), median of 3. "of roofline" compares with the workload bound of '
    "benchmarks/roofline.py (weights + KV bytes over measured bandwidth, FLOPs over measured "
    "matmul rate). llama.cpp runs the requests one after another (llama-cpp-python has no "
    "batched generation); its TTFT is a single request's first token, timed in its worker."
)
HEADER = [
    "model",
    "engine",
    "output tok/s",
    "req/s",
    "TTFT ms",
    "compile s",
    "wall s",
    "of roofline",
]


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    fmt = lambda r: "  ".join(
        c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
    )
    return "\n".join([fmt(HEADER), *(fmt(r) for r in rows)])


def markdown_section(key: str, run: dict) -> str:
    m, spec = run["machine"], run["workload_spec"]
    rows = [row for result in run["results"] for row in table_rows(result)]
    lines = [
        f"<!-- run: {key} -->",
        f"## {key}",
        "",
        (
            f"{m['date']} · {m['cpu']}, {m['cores']} cores ({m['jax_device']}) · jax {m['jax']}, "
            f"transformers {m['transformers']}, torch {m['torch']}, Python {m['python']}"
        ),
        "",
        (
            f"Workload: {spec['num_requests']} requests, seed {run['seed']}, prompt lengths "
            f"{spec['prompt_range'][0]}-{spec['prompt_range'][1]}, output lengths "
            f"{spec['output_range'][0]}-{spec['output_range'][1]} (log-uniform), greedy, "
            f"ignore_eos. jaxinfer: {run.get('dtype', 'float32')}, "
            f"quantization {run.get('quantization')}, "
            f"{run.get('num_scheduler_steps', 1)} decode step(s) per call, "
            f"KV cache {run.get('kv_cache_dtype', 'auto')}, "
            f"{run['results'][0]['jaxinfer'].get('attention_backend', 'reference')} attention, "
            f"max_num_seqs {spec['max_num_seqs']}, "
            f"max_num_batched_tokens {spec['max_num_batched_tokens']}. transformers: float32, "
            f"static batches of {spec['hf_batch_size']} sorted by prompt length."
        ),
        "",
        markdown_table(rows),
        "",
        f"Machine: {roofline.format_rates(roofline.MachineRates(**run['rates']))}.",
        "",
    ]
    for result in run["results"]:
        wb = result["roofline"]["workload"]
        decode = ", ".join(
            f"b={d['batch']}: {d['tokens_per_s']:.0f}" for d in result["roofline"]["decode"]
        )
        line = (
            f"- {result['model']}: {result['workload']['output_tokens']} output tokens, "
            f"{result['workload']['prompt_tokens']} prompt tokens; workload roofline is "
            f"{wb['bound']}-bound ({wb['compute_s']:.1f}s compute, {wb['memory_s']:.1f}s memory); "
            f"decode bound tok/s at mean context ({decode})."
        )
        if "transformers" in result:
            hf, ag = result["transformers"], result["agreement"]
            line += (
                f" transformers generated {hf['generated_tokens_incl_waste']} tokens for "
                f"{hf['output_tokens']} useful. Greedy agreement: first token "
                f"{100 * ag['first_token_match_fraction']:.0f}%, exact "
                f"{100 * ag['exact_match_fraction']:.0f}%."
            )
        if "llamacpp" in result:
            llama, ag = result["llamacpp"], result["llamacpp_agreement"]
            line += (
                f" llama.cpp (llama-cpp-python {llama['version']}, {llama['threads']} threads): "
                f"the GGUF's own blocks ({llama['weight_bytes'] / 1e6:.1f} MB of tensors, so its "
                "'of roofline' is against a bound computed for float32 weights), requests one "
                f"after another; greedy agreement with jaxinfer: first token "
                f"{100 * ag['first_token_match_fraction']:.0f}%, exact "
                f"{100 * ag['exact_match_fraction']:.0f}%."
            )
        elif "llamacpp_note" in result:
            line += f" llama.cpp: {result['llamacpp_note']}."
        lines.append(line)
    lines += [
        "",
        NOTES,
        f"<!-- end run: {key} -->",
        "",
    ]
    return "\n".join(lines)


def write_markdown(path: Path, key: str, section: str) -> None:
    """Replace this run's section if present, else append it."""
    text = path.read_text() if path.is_file() else "# jaxinfer throughput results\n\n"
    start, end = f"<!-- run: {key} -->", f"<!-- end run: {key} -->"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_json(path: Path, key: str, run: dict) -> None:
    runs = json.loads(path.read_text()) if path.is_file() else {}
    runs[key] = run
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs, indent=2, default=str) + "\n")
