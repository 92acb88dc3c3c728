"""jaxinfer against llama.cpp on the same GGUF, side by side in one run (issue 20).

    python benchmarks/vs_llamacpp.py                      # SmolLM2-135M Q4_1, the full run
    python benchmarks/vs_llamacpp.py --quick              # checks the script (seconds to a minute)
    python benchmarks/vs_llamacpp.py --llamacpp-python /path/to/venv/bin/python

llama.cpp comes from `llama-cpp-python` built from source in a separate virtual environment (a
benchmark-only dependency, never in the package's or the tests' requirements):

    python -m venv /tmp/llamavenv
    CMAKE_BUILD_PARALLEL_LEVEL=2 /tmp/llamavenv/bin/pip install --no-binary llama-cpp-python \
        llama-cpp-python

It runs in a subprocess under that interpreter (this file, `--worker`), so the project's
environment stays untouched; the two processes take turns, never run at once. Without the
interpreter the llama.cpp column is left out and the run says so.

What is measured, each engine on the same token ids (random ids from the vocabulary, seeded, so
the work does not depend on what the model says; greedy; no stop at EOS):

(a) batch-1 decode: one 32-token prompt, 128 generated tokens, streamed; the first token (prefill
    plus one sample) is timed apart, decode tok/s = 127 / (time from the first token to the last).
    jaxinfer through `LLM.stream`, llama.cpp through `Llama.generate` (both yield token by token).
(b) prompt processing: one 512-token prompt, tok/s = 512 / time. jaxinfer: `generate` with
    max_tokens=1 (one step: the whole prompt in one 512-token chunk, plus one sampled token);
    llama.cpp: `Llama.eval` of the prompt (n_batch 512: one batch, logits of the last position).
(c) a batched workload: 64 requests, prompt lengths 32-256 and output lengths 64-128, drawn
    log-uniformly (benchmarks/throughput.py's `make_workload`); output tok/s = generated tokens /
    wall time. jaxinfer: one `generate` call (continuous batching, max_num_seqs 64). llama.cpp:
    llama-cpp-python's high-level API has no batched generation, so the requests run one after
    another (each a `generate` from a reset context): what a user of that API gets.

Engines: jaxinfer with the default dtype (the GGUF dequantized to float32 at load), jaxinfer with
`quantization="int8"` (weight-only int8 with per-channel scales, through the public API), jaxinfer
with `quantization="gguf"` (the file's Q4_1 / Q8_0 blocks kept on the device; only when --model is
a GGUF), the int8 engine again with multi-step decode (`num_scheduler_steps`, default 8 decode
steps per compiled call: "int8 x8"), and llama.cpp reading the file's own blocks (Q4_1, token embedding Q8_0). Each measurement runs in
rounds that interleave the engines (A, B, C, A, B, C ...), so drift in the machine's load hits all
of them alike; the table reports medians over rounds. Every round draws fresh prompts (seed +
round), the same ones for every engine, so no prefix cache serves a repeated prompt.

jaxinfer compiles a shape the first time a step needs it (no every-bucket `warmup()`: that takes
many minutes on the 2-core machine); the engine's compile seconds are taken out of every timed
span and reported (`jaxinfer_compile_s_excluded`), and an untimed first call of (a) and (b) per
engine absorbs one-off costs on both sides. With the persistent compilation cache
(JAXINFER_COMPILATION_CACHE_DIR) a second run compiles almost nothing.

Bytes of weights read per decoded token (batch 1: every matmul weight once per step) and the
bandwidth bound tok/s = read bandwidth / those bytes (bandwidth measured here, roofline.py's
numpy sums). jaxinfer: the weights it holds on the device (`model.weight_bytes`: float32, or int8
values + float32 scales); llama.cpp: the bytes of the GGUF's tensors. Embedding rows are a gather,
but SmolLM2's embedding is also its (tied) lm_head, read whole every step, so it is counted.

Threads: both engines get 2 threads. llama.cpp: n_threads = n_threads_batch = 2. jaxinfer: XLA:CPU
uses every core of the machine, which on the 2-core container is 2 (the run records os.cpu_count()).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_LLAMACPP_PYTHON = "/tmp/llamavenv/bin/python"
FIRST_TOKEN_ID = 16  # clear of the special tokens at the start of the vocabulary
THREADS = 2


@dataclass(frozen=True)
class Plan:
    """How much of each measurement a run does."""

    rounds: int  # interleaved rounds of (a) and (b)
    workload_rounds: int  # interleaved rounds of (c): the long one
    decode_prompt_len: int
    decode_tokens: int
    prefill_len: int
    num_requests: int
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]

    @property
    def max_model_len(self) -> int:
        longest = max(self.prefill_len + 1, self.decode_prompt_len + self.decode_tokens)
        longest = max(longest, self.prompt_range[1] + self.output_range[1])
        return -(-longest // 16) * 16


FULL = Plan(3, 1, 32, 128, 512, 64, (32, 256), (64, 128))
QUICK = Plan(1, 1, 8, 4, 16, 2, (4, 8), (2, 4))  # checks the plumbing, measures nothing


# ---- llama.cpp, in its own interpreter -----------------------------------------------------------


def _worker_main() -> int:
    """Answer JSON requests, one a line, from stdin; runs under the llama.cpp venv's Python.

    Only the standard library and llama_cpp here: the project is not importable in that venv.
    """
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever llama.cpp prints goes to stderr, not into the replies
    from llama_cpp import Llama

    llm = None
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "load":
            llm = Llama(
                model_path=request["model"],
                n_ctx=request["n_ctx"],
                n_batch=request["n_batch"],
                n_threads=request["threads"],
                n_threads_batch=request["threads"],
                verbose=False,
            )
            import llama_cpp

            answer = {"version": llama_cpp.__version__, "n_vocab": llm.n_vocab()}
        elif op == "stream":
            answer = _llama_stream(llm, request["prompt"], request["new_tokens"])
        elif op == "prefill":
            llm.reset()
            started = time.perf_counter()
            llm.eval(request["prompt"])
            answer = {"seconds": time.perf_counter() - started}
        elif op == "workload":
            started = time.perf_counter()
            tokens = [
                _llama_stream(llm, prompt, n)["tokens"]
                for prompt, n in zip(request["prompts"], request["output_lens"])
            ]
            answer = {"seconds": time.perf_counter() - started, "tokens": tokens}
        elif op == "quit":
            return 0
        else:
            answer = {"error": f"unknown op {op!r}"}
        reply.write(json.dumps(answer) + "\n")
    return 0


def _llama_stream(llm, prompt: list[int], new_tokens: int) -> dict:
    """Greedy `generate` from a reset context: first token timed apart from the rest."""
    llm.reset()
    generator = llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)
    started = time.perf_counter()
    tokens = [next(generator)]
    first = time.perf_counter()
    while len(tokens) < new_tokens:
        tokens.append(next(generator))
    done = time.perf_counter()
    generator.close()
    return {"first_token_s": first - started, "rest_s": done - first, "tokens": tokens}


class LlamaCpp:
    """The worker process, spoken to one JSON line at a time."""

    name = "llama.cpp"

    def __init__(self, python: str, model: str, plan: Plan) -> None:
        self.process = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = self._ask(
            op="load", model=model, n_ctx=plan.max_model_len, n_batch=512, threads=THREADS
        )
        self.vocab_size = self.info["n_vocab"]

    def _ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker exited ({self.process.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def stream(self, prompt: list[int], new_tokens: int) -> dict:
        return self._ask(op="stream", prompt=prompt, new_tokens=new_tokens)

    def prefill_seconds(self, prompt: list[int]) -> float:
        return self._ask(op="prefill", prompt=prompt)["seconds"]

    def workload(self, prompts: list[list[int]], output_lens: list[int]) -> dict:
        return self._ask(op="workload", prompts=prompts, output_lens=output_lens)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.process.stdin.close()
            self.process.wait(timeout=30)


# ---- jaxinfer ------------------------------------------------------------------------------------


class Jaxinfer:
    def __init__(
        self,
        name: str,
        model: str,
        plan: Plan,
        quantization: str | None,
        num_scheduler_steps: int = 1,
    ) -> None:
        from jaxinfer import LLM, EngineConfig

        self.name = name
        started = time.perf_counter()
        self.llm = LLM(
            EngineConfig(
                model=model,
                quantization=quantization,
                max_model_len=plan.max_model_len,
                max_num_seqs=plan.num_requests,
                max_num_batched_tokens=max(512, plan.prefill_len),
                num_scheduler_steps=num_scheduler_steps,
            )
        )
        self.load_s = time.perf_counter() - started
        self.compile_s = 0.0  # compile seconds taken out of the timed runs
        self.weight_bytes = self.llm.llm_engine.model.weight_bytes
        self.vocab_size = self.llm.vocab_size

    @staticmethod
    def _greedy(n: int):
        from jaxinfer import SamplingParams

        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    def _timer(self) -> float:
        """Wall time less the engine's compile time so far: a shape compiled for the first time
        inside a timed run (compiled here, not by an every-bucket `warmup()`, which takes many
        minutes on this machine) is not counted as inference. The persistent compilation cache
        makes those compiles short after the first run anyway."""
        compiled = self.llm.llm_engine.runner.compile_seconds
        self.compile_s = compiled
        return time.perf_counter() - compiled

    def stream(self, prompt: list[int], new_tokens: int) -> dict:
        outputs = self.llm.stream({"prompt_token_ids": prompt}, self._greedy(new_tokens))
        started = self._timer()
        tokens = list(next(outputs).outputs[0].token_ids)
        first = self._timer()
        for output in outputs:
            tokens += output.outputs[0].token_ids
        done = self._timer()
        return {"first_token_s": first - started, "rest_s": done - first, "tokens": tokens}

    def prefill_seconds(self, prompt: list[int]) -> float:
        started = self._timer()
        self.llm.generate({"prompt_token_ids": prompt}, self._greedy(1), use_tqdm=False)
        return self._timer() - started

    def workload(self, prompts: list[list[int]], output_lens: list[int]) -> dict:
        requests = [{"prompt_token_ids": p} for p in prompts]
        params = [self._greedy(n) for n in output_lens]
        started = self._timer()
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        seconds = self._timer() - started
        return {"seconds": seconds, "tokens": [list(o.outputs[0].token_ids) for o in outputs]}

    def close(self) -> None:
        self.llm.shutdown()


# ---- the measurements ----------------------------------------------------------------------------


def _ids(rng: np.random.Generator, vocab: int, n: int) -> list[int]:
    return rng.integers(FIRST_TOKEN_ID, vocab, size=n).tolist()


def measure(engines: list, plan: Plan, vocab: int, seed: int) -> dict[str, dict]:
    """Interleaved rounds; -> per engine the raw per-round numbers."""
    from throughput import WorkloadSpec, make_workload

    raw = {
        e.name: {"decode": [], "first_token_s": [], "prefill": [], "workload": []} for e in engines
    }
    warm = np.random.default_rng(seed + 1000)  # untimed: first calls' one-off costs, both engines
    for engine in engines:
        engine.stream(_ids(warm, vocab, plan.decode_prompt_len), plan.decode_tokens)
        engine.prefill_seconds(_ids(warm, vocab, plan.prefill_len))
    for round_ in range(plan.rounds):
        rng = np.random.default_rng(seed + round_)
        decode_prompt = _ids(rng, vocab, plan.decode_prompt_len)
        prefill_prompt = _ids(rng, vocab, plan.prefill_len)
        for engine in engines:
            result = engine.stream(decode_prompt, plan.decode_tokens)
            if len(result["tokens"]) != plan.decode_tokens:
                raise RuntimeError(f"{engine.name} generated {len(result['tokens'])} tokens")
            raw[engine.name]["decode"].append((plan.decode_tokens - 1) / result["rest_s"])
            raw[engine.name]["first_token_s"].append(result["first_token_s"])
            raw[engine.name]["prefill"].append(
                plan.prefill_len / engine.prefill_seconds(prefill_prompt)
            )
        print(f"   round {round_ + 1}/{plan.rounds} of decode and prefill done", flush=True)
    spec = WorkloadSpec(
        plan.num_requests, plan.prompt_range, plan.output_range, plan.num_requests, 512, 1
    )
    for round_ in range(plan.workload_rounds):
        workload = make_workload(spec, seed + round_, vocab)
        for engine in engines:
            result = engine.workload(workload.prompts, workload.output_lens)
            generated = sum(len(t) for t in result["tokens"])
            if generated != sum(workload.output_lens):
                raise RuntimeError(f"{engine.name} generated {generated} workload tokens")
            raw[engine.name]["workload"].append(generated / result["seconds"])
            print(
                f"   workload round {round_ + 1}: {engine.name} "
                f"{generated / result['seconds']:.1f} tok/s",
                flush=True,
            )
    raw["_workload"] = {
        "prompt_tokens": sum(workload.prompt_lens),
        "output_tokens": sum(workload.output_lens),
    }
    return raw


def gguf_tensor_bytes(path: str) -> int:
    """Bytes of every tensor stored in the GGUF: what llama.cpp reads per decoded token (its
    matmuls read the file's blocks; the tied embedding is the lm_head)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def summarize(raw: dict, bytes_per_token: dict[str, int], bandwidth: float) -> list[dict]:
    rows = []
    for name, per in raw.items():
        if name.startswith("_"):
            continue
        bound = bandwidth / bytes_per_token[name]
        decode = statistics.median(per["decode"])
        rows.append(
            {
                "engine": name,
                "decode_tok_s": decode,
                "first_token_ms": 1e3 * statistics.median(per["first_token_s"]),
                "prefill_tok_s": statistics.median(per["prefill"]),
                "workload_tok_s": statistics.median(per["workload"]),
                "weight_bytes_per_token": bytes_per_token[name],
                "bandwidth_bound_tok_s": bound,
                "decode_fraction_of_bound": decode / bound,
                "rounds": per,
            }
        )
    return rows


HEADER = [
    "engine",
    "decode tok/s (b=1)",
    "first token ms",
    "prompt tok/s",
    "batched workload tok/s",
    "weight MB / token",
    "bound tok/s",
    "decode / bound",
]


def table_rows(rows: list[dict]) -> list[list[str]]:
    return [
        [
            r["engine"],
            f"{r['decode_tok_s']:.1f}",
            f"{r['first_token_ms']:.0f}",
            f"{r['prefill_tok_s']:.0f}",
            f"{r['workload_tok_s']:.1f}",
            f"{r['weight_bytes_per_token'] / 1e6:.1f}",
            f"{r['bandwidth_bound_tok_s']:.0f}",
            f"{100 * r['decode_fraction_of_bound']:.0f}%",
        ]
        for r in rows
    ]


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|---|" + "---:|" * (len(HEADER) - 1)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _loadavg() -> str:
    """The 1, 5 and 15 minute load averages: the machine is shared, the numbers say how much."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2-135M Q4_1)")
    p.add_argument("--llamacpp-python", default=DEFAULT_LLAMACPP_PYTHON)
    p.add_argument(
        "--llamacpp-model",
        default=None,
        help="the GGUF llama.cpp runs (default: --model; the smoke test pairs a tiny jaxinfer "
        "checkpoint with SmolLM2's GGUF here, prompts drawn from the smaller vocabulary)",
    )
    p.add_argument("--skip-llamacpp", action="store_true")
    p.add_argument("--skip-int8", action="store_true")
    p.add_argument("--skip-gguf", action="store_true")
    p.add_argument(
        "--num-scheduler-steps",
        type=int,
        default=8,
        help="also run int8 with this many decode steps per call (multi-step decode); 1: not",
    )
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--workload-rounds", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(HERE / "vs_llamacpp.json"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import roofline
    import throughput

    plan = QUICK if args.quick else FULL
    overrides = {"rounds": args.rounds, "workload_rounds": args.workload_rounds}
    plan = Plan(**{**plan.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    if args.model is None:
        from jaxinfer.default_model import default_model_path

        args.model = str(default_model_path())
    llamacpp_model = args.llamacpp_model or args.model
    load_before = _loadavg()
    single, threaded = roofline.measure_bandwidth(
        (256 << 20) if args.quick else (1 << 30), repeats=3 if args.quick else 5
    )
    bandwidth = max(single, threaded)
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; load average {load_before}", flush=True)

    engines: list = []
    llamacpp_note = None
    is_gguf = llamacpp_model.endswith(".gguf")
    if args.skip_llamacpp:
        llamacpp_note = "skipped (--skip-llamacpp)"
    elif not is_gguf:
        llamacpp_note = f"skipped: {llamacpp_model} is not a GGUF file"
    elif not Path(args.llamacpp_python).is_file():
        llamacpp_note = (
            f"skipped: no llama.cpp interpreter at {args.llamacpp_python} (build llama-cpp-python "
            "into a venv as this file's docstring says, or pass --llamacpp-python)"
        )
    print(f"llama.cpp: {llamacpp_note or args.llamacpp_python}", flush=True)
    try:
        print("loading jaxinfer (float32) ...", flush=True)
        engines.append(Jaxinfer("jaxinfer float32", args.model, plan, None))
        if not args.skip_int8:
            print("loading jaxinfer (int8) ...", flush=True)
            engines.append(Jaxinfer("jaxinfer int8", args.model, plan, "int8"))
            steps = args.num_scheduler_steps
            if steps > 1:
                print(f"loading jaxinfer (int8, {steps} steps per call) ...", flush=True)
                name = f"jaxinfer int8 x{steps}"
                engines.append(Jaxinfer(name, args.model, plan, "int8", steps))
        if args.model.endswith(".gguf") and not args.skip_gguf:
            print("loading jaxinfer (gguf blocks) ...", flush=True)
            engines.append(Jaxinfer("jaxinfer gguf", args.model, plan, "gguf"))
        if llamacpp_note is None:
            print("loading llama.cpp ...", flush=True)
            engines.append(LlamaCpp(args.llamacpp_python, llamacpp_model, plan))
        bytes_per_token = {
            e.name: (
                gguf_tensor_bytes(llamacpp_model) if isinstance(e, LlamaCpp) else e.weight_bytes
            )
            for e in engines
        }
        vocab = min(e.vocab_size for e in engines)
        raw = measure(engines, plan, vocab, args.seed)
    finally:
        for engine in engines:
            engine.close()
    workload = raw.pop("_workload")
    rows = summarize(raw, bytes_per_token, bandwidth)
    load_after = _loadavg()
    print()
    print(markdown_table(table_rows(rows)))
    print(
        f"\nread bandwidth {bandwidth / 1e9:.1f} GB/s; load average before {load_before}, "
        f"after {load_after}"
    )
    if llamacpp_note:
        print(f"llama.cpp: {llamacpp_note}")
    llama = next((e for e in engines if isinstance(e, LlamaCpp)), None)
    result = {
        "machine": throughput.machine_info(),
        "model": args.model,
        "llamacpp_model": llamacpp_model if llama else None,
        "plan": plan.__dict__,
        "seed": args.seed,
        "threads": THREADS,
        "bandwidth_bytes_s": bandwidth,
        "bandwidth_1thread_bytes_s": single,
        "bandwidth_threads_bytes_s": threaded,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "llamacpp": llama.info if llama else llamacpp_note,
        "workload": workload,
        "jaxinfer_load_s": {e.name: e.load_s for e in engines if isinstance(e, Jaxinfer)},
        "jaxinfer_compile_s_excluded": {
            e.name: e.compile_s for e in engines if isinstance(e, Jaxinfer)
        },
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        raise SystemExit(_worker_main())
    main()
