"""Where a decode (or prefill) step's device time goes, op by op, from an XLA:CPU trace (issue 20).

    python benchmarks/step_trace.py --quantization int8             # SmolLM2, batch 1
    python benchmarks/step_trace.py --batch 16 --steps 32
    python benchmarks/step_trace.py --quantization int8 --num-scheduler-steps 8   # multi-step
    python benchmarks/step_trace.py --quantization int8 --prefill --batch 4 --prompt-len 128
    python benchmarks/step_trace.py --quick --model /path/to/tiny/checkpoint

Why next to step_profile.py: that one times pieces compiled apart; this one watches the engine's
own programs run, through `jax.profiler.trace` with XLA:CPU's per-thunk trace events switched on
(`--xla_cpu_enable_xprof_traceme`, set in XLA_FLAGS before JAX starts; programs compiled with it
get their own compilation-cache entries; custom calls are named without it). The trace is read
back with `jax.profiler.ProfileData` (no xprof / tensorboard needed).

Method: B requests of a 16-token prompt through vLLM's engine API (`add_request`, `step`), a first
round untraced (compiles); in the second, after the prefill step, N engine steps (decode steps
only) are traced. The engine runs the plain loop (`async_scheduling=False`), so the traced window
holds exactly N step programs; async scheduling would overlap the host's work with them, not
change them. Every thunk event (inside an executor's span) of XLA's threads is summed by kind
and divided by N:
  * `jaxinfer_*` custom calls (the CPU kernels: int8 / GGUF products, paged attention), named by
    their target, read from the compiled decode step's HLO (`ffi_call.N -> custom_call_target`;
    another program's `ffi_call.N`, the sampler's, would take the step's name: none has one);
  * XLA's own thunks by kind (fusions, copies, ...), the instruction names less their numbers.
With `--prefill`, each traced step is the prefill of B fresh prompts of `--prompt-len` random
tokens (one step: B * prompt-len must fit `max_num_batched_tokens`, which is set to it), the
requests aborted after it; the custom calls are named from that prefill bucket's program.
Also the Python thread's time per step inside the runner's dispatch and collect. Thunks of
other programs (sampler, cache writer) count by kind too. Thunk times overlap when XLA runs
thunks concurrently, and the trace adds a little to each, so read shares, not exact sums.
Results: a table and JSON (`--out`).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PROMPT_LEN = 16
TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
_CALL = re.compile(r"%(ffi_call(?:\.\d+)?) = .*custom_call_target=\"([^\"]+)\"")
_NUMBER = re.compile(r"(\.\d+)+(\.clone)?$")


def custom_call_targets(hlo_text: str) -> dict[str, str]:
    """`ffi_call.N` -> its custom-call target, from a compiled program's HLO text."""
    return dict(_CALL.findall(hlo_text))


def thunk_kind(name: str, targets: dict[str, str]) -> str:
    """What a thunk event is: a jaxinfer kernel by target, else XLA's instruction name without
    its number (`add_rsqrt_fusion.12` -> `add_rsqrt_fusion`)."""
    if name in targets:
        return targets[name]
    return _NUMBER.sub("", name)


def _executor_spans(events: list) -> list[tuple[int, int]]:
    """The merged time spans of a thread's `ThunkExecutor::Execute` events: where it ran thunks
    (compiles and the executor's own bookkeeping fall outside)."""
    spans = sorted(
        (e.start_ns, e.start_ns + e.duration_ns)
        for e in events
        if e.name == "ThunkExecutor::Execute"
    )
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def summarize(profile, targets: dict[str, str], steps: int) -> dict:
    """Per-step ms of every thunk kind on XLA's threads (events inside an executor's span), and of
    the runner's dispatch / collect on the Python thread."""
    kinds: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    python: collections.Counter = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            events = list(line.events)
            if "python" in line.name:
                for event in events:
                    for wanted in ("dispatch", "collect"):
                        if event.name.startswith("$runner.py") and event.name.endswith(wanted):
                            python[wanted] += event.duration_ns
                continue
            spans = _executor_spans(events)
            starts = [start for start, _ in spans]
            for event in events:
                if event.name.startswith(("ThunkExecutor", "ThreadpoolListener", "end: ")):
                    continue  # the executor's own spans, pool bookkeeping, completion markers
                at = bisect.bisect_right(starts, event.start_ns) - 1
                if at < 0 or event.start_ns + event.duration_ns > spans[at][1]:
                    continue  # not a thunk: a compile, a transfer
                kind = thunk_kind(event.name, targets)
                kinds[kind] += event.duration_ns
                counts[kind] += 1
    return {
        "thunk_ms_per_step": {k: ns / steps / 1e6 for k, ns in kinds.most_common()},
        "thunks_per_step": {k: counts[k] / steps for k, _ in kinds.most_common()},
        "python_ms_per_step": {k: ns / steps / 1e6 for k, ns in python.items()},
    }


def trace_decode(llm, batch: int, steps: int, seed: int) -> dict:
    """`batch` requests through vLLM's engine API (`add_request`, `step`): a first round runs
    untraced (compiles); in the second the prefill step runs before the trace starts, then
    `steps` engine steps (decode steps only) are traced, then the rest is drained."""
    import jax
    from jax.profiler import ProfileData

    from jaxinfer import SamplingParams

    engine = llm.llm_engine
    rng = np.random.default_rng(seed)
    room = steps + 4 + engine.config.num_scheduler_steps  # a multi-step call may run past `steps`
    params = SamplingParams(temperature=0.0, max_tokens=room, ignore_eos=True)

    def start_requests(round_: int) -> None:
        for index in range(batch):
            prompt = {"prompt_token_ids": rng.integers(16, llm.vocab_size, PROMPT_LEN).tolist()}
            engine.add_request(f"trace-{round_}-{index}", prompt, params)
        engine.step()  # the prefill

    def drain() -> None:
        while engine.has_unfinished_requests():
            engine.step()

    start_requests(0)
    drain()  # compiles what the run needs
    runner = engine.runner
    programs = list(runner._multi_step.values())  # multi-step decode: its one program runs
    if not programs:
        decode = [b for b in runner.stages[-1].executables if not b.is_prefill]
        programs = [runner.stages[-1].executables[bucket] for bucket in decode]
    targets: dict[str, str] = {}
    for compiled in programs:
        targets.update(custom_call_targets(compiled.as_text()))
    start_requests(1)
    with tempfile.TemporaryDirectory() as folder:
        first = engine.stats.num_steps
        with jax.profiler.trace(folder):
            started = time.perf_counter()
            while engine.stats.num_steps - first < steps:  # a multi-step call counts its steps
                engine.step()
            wall = time.perf_counter() - started
        traced = engine.stats.num_steps - first
        drain()
        (path,) = Path(folder).rglob("*.xplane.pb")
        summary = summarize(ProfileData.from_file(str(path)), targets, traced)
    return {"batch": batch, "traced_steps": traced, "traced_wall_ms_per_step": 1e3 * wall / traced,
            **summary}  # fmt: skip


def trace_prefill(
    llm, batch: int, prompt_len: int, steps: int, seed: int, prompt_logprobs: int | None = None
) -> dict:
    """`steps` traced engine steps, each the prefill of `batch` fresh random prompts of
    `prompt_len` tokens (then aborted); two untraced rounds first (compiles). `prompt_logprobs`:
    the requests ask for them (lm-eval's scoring), so the step also runs the prompt scorer."""
    import jax
    from jax.profiler import ProfileData

    from jaxinfer import SamplingParams

    engine = llm.llm_engine
    rng = np.random.default_rng(seed)
    params = SamplingParams(
        temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=prompt_logprobs
    )

    def prefill_step(tag: str) -> float:
        ids = [f"prefill-{tag}-{index}" for index in range(batch)]
        for request_id in ids:
            prompt = {"prompt_token_ids": rng.integers(16, llm.vocab_size, prompt_len).tolist()}
            engine.add_request(request_id, prompt, params)
        started = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - started
        for request_id in ids:
            engine.abort_request(request_id)
        return seconds

    for round_ in range(2):
        prefill_step(f"warm{round_}")
    runner = engine.runner
    tokens = batch * prompt_len
    buckets = [b for b in runner.stages[-1].executables if b.is_prefill and b.num_tokens >= tokens]
    bucket = min(buckets, key=lambda b: b.num_tokens)  # the bucket the prefill steps ran in
    targets = custom_call_targets(runner.stages[-1].executables[bucket].as_text())
    # The prompt scorer's own custom calls, if any, would take the step's names: it has none.
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            walls = [prefill_step(f"traced{index}") for index in range(steps)]
        (path,) = Path(folder).rglob("*.xplane.pb")
        summary = summarize(ProfileData.from_file(str(path)), targets, steps)
    return {"batch": batch, "prompt_len": prompt_len, "traced_steps": steps,
            "traced_wall_ms_per_step": 1e3 * float(np.median(walls)), **summary}  # fmt: skip


def table(result: dict, top: int) -> str:
    rows = list(result["thunk_ms_per_step"].items())
    lines = ["| thunk kind | ms / step | per step | share |", "|---|---:|---:|---:|"]
    total = sum(ms for _, ms in rows)
    for kind, ms in rows[:top]:
        count = result["thunks_per_step"][kind]
        lines.append(f"| {kind} | {ms:.3f} | {count:.1f} | {100 * ms / total:.1f}% |")
    rest = sum(ms for _, ms in rows[top:])
    lines.append(f"| (the other {max(len(rows) - top, 0)} kinds) | {rest:.3f} | | |")
    lines.append(f"| **all thunks** | **{total:.3f}** | | |")
    python = ", ".join(f"{k} {v:.2f} ms" for k, v in result["python_ms_per_step"].items())
    lines.append(f"\nPython thread per step: {python}; wall per traced step "
                 f"{result['traced_wall_ms_per_step']:.2f} ms")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2-135M Q4_1 GGUF")
    p.add_argument("--quantization", default=None, choices=[None, "int8", "gguf"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--num-scheduler-steps", type=int, default=1, help="multi-step decode")
    p.add_argument("--prefill", action="store_true", help="trace prefill steps instead")
    p.add_argument("--prompt-len", type=int, default=128, help="with --prefill")
    p.add_argument(
        "--prompt-logprobs", type=int, default=None, help="with --prefill: scoring requests"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(HERE / "step_trace.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 4
    if args.prefill:
        args.steps = min(args.steps, 8)
    if "jax" in sys.modules and TRACE_FLAG not in os.environ.get("XLA_FLAGS", ""):
        print("note: JAX was imported before the trace flag was set: thunks may be unnamed")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TRACE_FLAG}".strip()
    sys.path.insert(0, str(HERE))
    import throughput

    from jaxinfer import LLM, EngineConfig

    if args.model is None:
        from jaxinfer.default_model import default_model_path

        args.model = str(default_model_path())
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    prefill_settings = {}
    if args.prefill:  # one step takes the whole batch's prompts
        tokens = args.batch * args.prompt_len
        prefill_settings = {"max_num_batched_tokens": tokens, "max_prefill_seqs": args.batch}
    llm = LLM(
        EngineConfig(
            model=args.model,
            quantization=args.quantization,
            async_scheduling=False,  # one step program per engine step inside the traced window
            max_model_len=max(
                -(-(PROMPT_LEN + args.steps + 4 + args.num_scheduler_steps) // 16) * 16 + 16,
                -(-(args.prompt_len + 2) // 16) * 16 + 16 if args.prefill else 0,
            ),
            max_num_seqs=args.batch,
            num_scheduler_steps=args.num_scheduler_steps,
            **prefill_settings,
        )
    )
    try:
        if args.prefill:
            traced = trace_prefill(
                llm, args.batch, args.prompt_len, args.steps, args.seed, args.prompt_logprobs
            )
        else:
            traced = trace_decode(llm, args.batch, args.steps, args.seed)
    finally:
        llm.shutdown()
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(table(traced, args.top))
    print(f"load average before {load_before}, after {load_after}")
    result = {
        "machine": throughput.machine_info(),
        "model": args.model,
        "quantization": args.quantization,
        "num_scheduler_steps": args.num_scheduler_steps,
        "prefill": args.prefill,
        "prompt_logprobs": args.prompt_logprobs,
        "method": "jax.profiler trace with --xla_cpu_enable_xprof_traceme; per-step thunk sums",
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        **traced,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
