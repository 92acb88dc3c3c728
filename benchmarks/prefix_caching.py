"""Prefix caching and unified steps, measured on SmolLM2-135M (or any model) through EngineCore.

    python benchmarks/prefix_caching.py                  # the three workloads below, SmolLM2
    python benchmarks/prefix_caching.py --quick          # fewer, shorter requests: checks the script

Workloads (fixed seeds; prompt ids drawn from the vocabulary, greedy, `ignore_eos`):

* shared prefix: `--num-requests` (64) requests = one 1,024-token few-shot prefix + a 16-64-token
  question, 32 output tokens each, all arriving at t=0 (an offline evaluation), caching on vs off.
  Reported: prompt tokens the engine computed, hit rate, time to first token p50/p99 (from t=0),
  total wall time. Computed prompt tokens should fall by about the shared fraction.
* multiple choice: 16 contexts (60-200 tokens) x 4 continuations (5-20 tokens), `prompt_logprobs=1`,
  `max_tokens=1`, as evaluation harnesses score. vLLM computes every position of a request that
  asks for prompt logprobs (it skips reading the prefix cache for them), and so does jaxinfer: this
  row shows the cost is the same with caching on, not a gain.
* long prompts arriving: 8 requests decode 96 tokens each; after their 4th token, 4 requests with
  768-token prompts arrive. Inter-token latency p50/p99 of the 8 decoders, unified steps (decodes
  and prefill chunks share each step) vs separate prefill and decode steps.

Each row runs on its own engine (same shapes, so the compilation cache is shared) after a warm-up
run of the very same workload (then `reset_prefix_cache()`), so no compile falls in a timed run. Results: a table, `--out` JSON, and the
numbers in benchmarks/RESULTS.md by hand with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

FIRST_ID = 16


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def make_engine(model: str, **overrides):
    from jaxinfer import LLM, EngineConfig

    config = dict(
        model=model,
        dtype="float32",
        max_model_len=1280,
        max_num_seqs=16,
        max_num_batched_tokens=512,
        num_kv_blocks=1024,  # 16k tokens: the whole shared-prefix workload fits without reuse
    )
    config.update(overrides)
    return LLM(EngineConfig(**config))


def drive(core, arrivals: list[tuple[int, dict, object]]) -> dict:
    """Step `core` until idle. `arrivals`: (add after this many steps, prompt, params); every
    request's token times are recorded. -> per request: arrival, first-token and token times."""
    pending = sorted(enumerate(arrivals), key=lambda a: a[1][0])
    times: dict[str, list[float]] = {}
    arrived: dict[str, float] = {}
    counts: dict[str, int] = {}
    step = 0
    started = time.perf_counter()
    while pending or core.has_unfinished_requests():
        while pending and pending[0][1][0] <= step:
            index, (_, prompt, params) = pending.pop(0)
            core.add_request(str(index), prompt, params)
            arrived[str(index)] = time.perf_counter()
            times[str(index)] = []
        for output in core.step():
            now = time.perf_counter()
            n = len(output.outputs[0].token_ids)
            times[output.request_id] += [now] * (n - counts.get(output.request_id, 0))
            counts[output.request_id] = n
        step += 1
    return {"wall": time.perf_counter() - started, "arrived": arrived, "times": times}


def ids(rng, n: int, vocab: int) -> list[int]:
    return rng.integers(FIRST_ID, vocab, size=n).tolist()


def shared_prefix(model: str, args) -> list[dict]:
    from jaxinfer import SamplingParams

    rows = []
    for caching in (True, False):
        llm = make_engine(model, enable_prefix_caching=caching)
        vocab = llm.vocab_size
        rng = np.random.default_rng(0)
        prefix = ids(rng, args.prefix_len, vocab)
        prompts = [
            {"prompt_token_ids": prefix + ids(rng, int(rng.integers(16, 65)), vocab)}
            for _ in range(args.num_requests)
        ]
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        core = llm.llm_engine
        drive(core, [(0, p, params) for p in prompts])  # warm-up: compiles what the run needs
        core.reset_prefix_cache()
        before = (
            core.stats.prompt_tokens,
            core.stats.prefix_cache_queries,
            core.stats.prefix_cache_hits,
        )
        run = drive(core, [(0, p, params) for p in prompts])
        ttft = [run["times"][r][0] - run["arrived"][r] for r in run["times"]]
        queries = core.stats.prefix_cache_queries - before[1]
        rows.append(
            {
                "workload": "shared prefix",
                "setting": f"enable_prefix_caching={caching}",
                "requests": args.num_requests,
                "prompt tokens (all)": sum(len(p["prompt_token_ids"]) for p in prompts),
                "prompt tokens computed": core.stats.prompt_tokens - before[0],
                "hit rate": (core.stats.prefix_cache_hits - before[2]) / queries
                if queries
                else 0.0,
                "TTFT p50 s": percentile(ttft, 50),
                "TTFT p99 s": percentile(ttft, 99),
                "wall s": run["wall"],
            }
        )
        llm.shutdown()
    return rows


def multiple_choice(model: str, args) -> list[dict]:
    from jaxinfer import SamplingParams

    rows = []
    for caching in (True, False):
        llm = make_engine(model, enable_prefix_caching=caching)
        vocab = llm.vocab_size
        rng = np.random.default_rng(1)
        prompts = []
        for _ in range(args.num_contexts):
            context = ids(rng, int(rng.integers(60, 201)), vocab)
            prompts += [
                {"prompt_token_ids": context + ids(rng, int(rng.integers(5, 21)), vocab)}
                for _ in range(4)
            ]
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
        core = llm.llm_engine
        drive(core, [(0, p, params) for p in prompts])  # warm-up
        core.reset_prefix_cache()
        before = core.stats.prompt_tokens
        run = drive(core, [(0, p, params) for p in prompts])
        rows.append(
            {
                "workload": "multiple choice",
                "setting": f"enable_prefix_caching={caching}",
                "requests": len(prompts),
                "prompt tokens (all)": sum(len(p["prompt_token_ids"]) for p in prompts),
                "prompt tokens computed": core.stats.prompt_tokens - before,
                "wall s": run["wall"],
            }
        )
        llm.shutdown()
    return rows


def long_prompts_arriving(model: str, args) -> list[dict]:
    from jaxinfer import SamplingParams

    rows = []
    for unified in (True, False):
        llm = make_engine(model, unified_steps=unified, enable_prefix_caching=False)
        vocab = llm.vocab_size
        rng = np.random.default_rng(2)
        decoders = [{"prompt_token_ids": ids(rng, 16, vocab)} for _ in range(8)]
        longs = [{"prompt_token_ids": ids(rng, args.long_len, vocab)} for _ in range(4)]
        decode = SamplingParams(temperature=0, max_tokens=args.decode_len, ignore_eos=True)
        prefill = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        arrivals = [(0, p, decode) for p in decoders] + [(5, p, prefill) for p in longs]
        core = llm.llm_engine
        drive(core, arrivals)  # warm-up
        run = drive(core, arrivals)
        gaps = [
            later - earlier
            for r in map(str, range(len(decoders)))
            for earlier, later in zip(run["times"][r], run["times"][r][1:])
            if later > earlier  # tokens of one step (never more than one per decoder)
        ]
        rows.append(
            {
                "workload": "long prompts arriving",
                "setting": f"unified_steps={unified}",
                "requests": len(arrivals),
                "ITL p50 ms": 1000 * percentile(gaps, 50),
                "ITL p99 ms": 1000 * percentile(gaps, 99),
                "ITL max ms": 1000 * max(gaps),
                "wall s": run["wall"],
            }
        )
        llm.shutdown()
    return rows


def no_sharing(args) -> list[dict]:
    """benchmarks/throughput.py's llama50m workload (64 requests, nothing shared): the new
    defaults (unified steps, prefix caching) against the old behaviour, same tokens required."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import throughput

    from jaxinfer import SamplingParams

    spec = throughput.WorkloadSpec(
        64, (16, 512), (16, 256), max_num_seqs=64, max_num_batched_tokens=512, hf_batch_size=16
    )
    files = throughput.resolve_model("llama50m", Path(args.cache_dir).expanduser())
    rows, tokens = [], {}
    for unified, caching in ((True, True), (False, False)):
        llm = make_engine(
            files.path,
            max_model_len=spec.max_model_len,
            max_num_seqs=spec.max_num_seqs,
            num_kv_blocks=None,
            unified_steps=unified,
            enable_prefix_caching=caching,
        )
        workload = throughput.make_workload(spec, 0, llm.vocab_size)
        arrivals = [
            (
                0,
                {"prompt_token_ids": p},
                SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
            )
            for p, n in zip(workload.prompts, workload.output_lens)
        ]
        core = llm.llm_engine
        drive(core, arrivals)  # warm-up
        core.reset_prefix_cache()
        steps = core.stats.num_steps
        run = drive(core, arrivals)
        generated = sum(len(t) for t in run["times"].values())
        tokens[unified] = [len(run["times"][str(i)]) for i in range(len(arrivals))]
        rows.append(
            {
                "workload": "no sharing (llama50m)",
                "setting": f"unified_steps={unified}, enable_prefix_caching={caching}",
                "requests": len(arrivals),
                "output tok/s": generated / run["wall"],
                "steps": core.stats.num_steps - steps,
                "wall s": run["wall"],
            }
        )
        llm.shutdown()
    assert tokens[True] == tokens[False], "the two settings generated different token counts"
    return rows


WORKLOADS = ("shared-prefix", "multiple-choice", "long-prompts", "no-sharing")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the installed SmolLM2 GGUF")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--num-contexts", type=int, default=16)
    parser.add_argument("--long-len", type=int, default=768)
    parser.add_argument("--decode-len", type=int, default=96)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"any of {WORKLOADS}")
    parser.add_argument("--cache-dir", default="~/.cache/jaxinfer/benchmarks")
    parser.add_argument("--out", default="benchmarks/prefix_caching.json")
    args = parser.parse_args()
    if args.quick:
        args.num_requests, args.prefix_len, args.output_len = 8, 128, 8
        args.num_contexts, args.long_len, args.decode_len = 2, 128, 24
    if args.model is None:
        from jaxinfer.cli import default_model_path

        args.model = str(default_model_path())
    chosen = args.workloads.split(",")
    unknown = set(chosen) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {WORKLOADS}")
    rows = []
    if "shared-prefix" in chosen:
        rows += shared_prefix(args.model, args)
    if "multiple-choice" in chosen:
        rows += multiple_choice(args.model, args)
    if "long-prompts" in chosen:
        rows += long_prompts_arriving(args.model, args)
    if "no-sharing" in chosen:
        rows += no_sharing(args)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print(" | ".join(columns))
    for row in rows:
        cells = [row.get(c, "") for c in columns]
        print(" | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    record = {
        "machine": machine,
        "args": vars(args),
        "rows": rows,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load": os.getloadavg(),
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
