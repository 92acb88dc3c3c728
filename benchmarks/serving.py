"""Online serving in the style of `vllm bench serve`: Poisson arrivals against `jaxinfer serve`.

    python benchmarks/serving.py                      # SmolLM2, rates 0.5, 1, 2 and inf
    python benchmarks/serving.py --quick              # fewer requests, for checking the script

What it measures and why this way:

* One seeded workload: prompts of random token ids (lengths uniform in `--input-len` +- 25%),
  outputs of `--output-len` +- 25% tokens, greedy with ignore_eos, so every request produces
  exactly its length whatever the weights say and every run does the same work.
* The server runs in its own process (`python -m jaxinfer.cli serve`, warmed up before the
  clock starts), on a config with one decode and one prefill shape. For each request rate the
  requests are sent at Poisson arrival times (rate inf: all at once) as streamed completions
  through httpx, as `vllm bench serve` does; the client timestamps every SSE chunk. TTFT is
  send -> first token; TPOT per request is (e2e - TTFT) / (tokens - 1); ITL is every gap between
  chunks, split evenly over the tokens a chunk carries. Output tok/s is all output tokens over the
  time from the first send to the last token.
* The same workload offline, in this process on the same config after the server has exited:
  `LLM.generate` (all prompts in one call, FINAL_ONLY: one detokenization per request), and
  `AsyncEngine` streaming DELTA outputs with every request submitted at once (what the server
  does, without HTTP). Against the server at rate inf (also all at once, so the same batches),
  the wall-time differences per output token split the server's overhead into the streaming
  engine's part (a delta per step: detokenize, asyncio queues) and HTTP + SSE + JSON.

Results: a JSON file (keyed by run) and a section of benchmarks/RESULTS.md, replaced when the
same run is repeated. The machine is shared: the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import write_json, write_markdown  # a sibling module

FIRST_TOKEN_ID = 16  # clear of the special tokens at the start of SmolLM2's vocabulary
MODEL_NAME = "smollm2"


@dataclass(frozen=True)
class Setup:
    num_prompts: int
    input_len: int
    output_len: int
    rates: tuple[float, ...]
    seed: int
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 128
    max_model_len: int = 512

    def config(self, model: str) -> dict:
        """One decode and one prefill shape: the server compiles little before it listens."""
        blocks = self.max_num_seqs * self.max_model_len // 16 + 1
        return {
            "model": model,
            "dtype": "float32",
            "seed": 0,
            "max_model_len": self.max_model_len,
            "block_size": 16,
            "num_kv_blocks": blocks,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_prefill_seqs": 4,
            "seq_buckets": [self.max_num_seqs],
            "token_buckets": [self.max_num_batched_tokens],
        }


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    output_len: int


@dataclass
class Record:
    """One request as the client saw it (perf_counter seconds)."""

    sent: float
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent

    @property
    def e2e(self) -> float:
        return self.chunk_times[-1] - self.sent

    def itls(self) -> list[float]:
        gaps = []
        for k in range(1, len(self.chunk_times)):
            gap = self.chunk_times[k] - self.chunk_times[k - 1]
            gaps += [gap / self.chunk_tokens[k]] * self.chunk_tokens[k]
        return gaps


def make_workload(setup: Setup, vocab_size: int) -> list[Request]:
    rng = np.random.default_rng(setup.seed)

    def length(mean: int) -> int:
        return int(rng.integers(int(mean * 0.75), int(mean * 1.25) + 1))

    return [
        Request(
            prompt=rng.integers(FIRST_TOKEN_ID, vocab_size, length(setup.input_len)).tolist(),
            output_len=length(setup.output_len),
        )
        for _ in range(setup.num_prompts)
    ]


def arrival_offsets(count: int, rate: float, seed: int) -> list[float]:
    """Poisson process: exponential gaps of mean 1/rate (rate inf: everything at t=0)."""
    if rate == float("inf"):
        return [0.0] * count
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, count)
    return np.concatenate([[0.0], np.cumsum(gaps[1:])]).tolist()


# ---- the server --------------------------------------------------------------------------------


def start_server(config_path: Path, log_path: Path) -> tuple[subprocess.Popen, str, float]:
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "jaxinfer.cli", "serve", "--config", str(config_path),
        "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
        "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url, time.perf_counter() - started
        except httpx.TransportError:
            time.sleep(0.5)


async def _one(client, request: Request, delay: float, start: float) -> Record:
    await asyncio.sleep(max(0.0, start + delay - time.perf_counter()))
    body = {
        "model": MODEL_NAME,
        "prompt": request.prompt,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    record = Record(sent=time.perf_counter())
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            tokens = sum(len(c["token_ids"]) for c in json.loads(line[6:])["choices"])
            if tokens:
                record.chunk_times.append(now)
                record.chunk_tokens.append(tokens)
    if record.tokens != request.output_len:
        raise RuntimeError(f"asked for {request.output_len} tokens, got {record.tokens}")
    return record


async def run_rate(url: str, workload: list[Request], rate: float, seed: int) -> dict:
    import httpx

    offsets = arrival_offsets(len(workload), rate, seed)
    limits = httpx.Limits(max_connections=len(workload) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        start = time.perf_counter()
        records = await asyncio.gather(
            *(_one(client, r, d, start) for r, d in zip(workload, offsets, strict=True))
        )
    return summarize(records, start, rate)


def summarize(records: list[Record], start: float, rate: float | None) -> dict:
    end = max(r.chunk_times[-1] for r in records)
    tokens = sum(r.tokens for r in records)
    tpots = [(r.e2e - r.ttft) / (r.tokens - 1) for r in records if r.tokens > 1]
    itls = [gap for r in records for gap in r.itls()]

    def pct(values: list[float]) -> dict:
        ms = np.array(values) * 1000
        return {
            "mean": float(ms.mean()),
            "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)),
        }

    return {
        "rate": rate,
        "requests": len(records),
        "duration_s": end - start,
        "output_tokens": tokens,
        "output_tok_s": tokens / (end - start),
        "request_s": len(records) / (end - start),
        "ttft_ms": pct([r.ttft for r in records]),
        "tpot_ms": pct(tpots),
        "itl_ms": pct(itls),
        "e2e_ms": pct([r.e2e for r in records]),
    }


# ---- offline ------------------------------------------------------------------------------------


def run_offline(config_path: Path, workload: list[Request]) -> dict:
    """LLM.generate and an in-process AsyncEngine on the server's config, after warm-up."""
    from jaxinfer import LLM, SamplingParams
    from jaxinfer.config_file import engine_config_from_yaml
    from jaxinfer.engine.async_engine import AsyncEngine
    from jaxinfer.sampling_params import RequestOutputKind

    def params(request: Request, kind=RequestOutputKind.FINAL_ONLY) -> SamplingParams:
        return SamplingParams(
            temperature=0.0, max_tokens=request.output_len, ignore_eos=True, output_kind=kind
        )

    with LLM(engine_config_from_yaml(config_path)) as llm:
        llm.warmup()
        first = workload[: llm.config.max_num_seqs]  # untimed first runs, as for the server
        llm.generate([r.prompt for r in first], [params(r) for r in first], False)
        start = time.perf_counter()
        outputs = llm.generate([r.prompt for r in workload], [params(r) for r in workload], False)
        generate_s = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        engine = AsyncEngine(llm)

        async def stream(index: int, request: Request, start: float) -> Record:
            record = Record(sent=start)
            delta = params(request, RequestOutputKind.DELTA)
            async for output in engine.generate(request.prompt, delta, f"offline-{index}"):
                record.chunk_times.append(time.perf_counter())
                record.chunk_tokens.append(len(output.outputs[0].token_ids))
            return record

        async def all_at_once() -> tuple[list[Record], float]:
            start = time.perf_counter()
            records = await asyncio.gather(*(stream(i, r, start) for i, r in enumerate(workload)))
            return records, start

        records, start = asyncio.run(all_at_once())
        engine.shutdown()
    streamed = summarize(records, start, None)
    return {
        "generate": {
            "wall_s": generate_s,
            "output_tokens": tokens,
            "output_tok_s": tokens / generate_s,
        },
        "async_engine": streamed,
    }


# ---- report -------------------------------------------------------------------------------------


def machine() -> dict:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "device": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def _rate_name(rate: float | None) -> str:
    return "inf" if rate == float("inf") else f"{rate:g}"


def rows(run: dict) -> list[list[str]]:
    def line(name: str, r: dict) -> list[str]:
        return [
            name, f"{r['output_tok_s']:.1f}", f"{r['request_s']:.2f}",
            f"{r['ttft_ms']['p50']:.0f} / {r['ttft_ms']['p99']:.0f}",
            f"{r['tpot_ms']['p50']:.1f} / {r['tpot_ms']['p99']:.1f}",
            f"{r['itl_ms']['p50']:.1f} / {r['itl_ms']['p99']:.1f}",
            f"{r['duration_s']:.1f}",
        ]  # fmt: skip

    table = [line(f"server, {_rate_name(r['rate'])} req/s", r) for r in run["server"]]
    table.append(line("AsyncEngine in-process, all at once", run["offline"]["async_engine"]))
    gen = run["offline"]["generate"]
    table.append(["LLM.generate, all at once", f"{gen['output_tok_s']:.1f}", "-", "-", "-", "-",
                  f"{gen['wall_s']:.1f}"])  # fmt: skip
    return table


HEADER = ["run", "output tok/s", "req/s", "TTFT ms p50 / p99", "TPOT ms p50 / p99",
          "ITL ms p50 / p99", "wall s"]  # fmt: skip


def text_table(table: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *table]) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [HEADER, *table]
    )


def overhead(run: dict) -> dict:
    """ms per output token, at rate inf (the same all-at-once batches in all three)."""
    inf = next((r for r in run["server"] if r["rate"] == float("inf")), None)
    gen, streamed = run["offline"]["generate"], run["offline"]["async_engine"]
    tokens = gen["output_tokens"]
    result = {
        "streaming_engine_ms_per_token": 1000 * (streamed["duration_s"] - gen["wall_s"]) / tokens
    }
    if inf is not None:
        result["http_sse_ms_per_token"] = (
            1000 * (inf["duration_s"] - streamed["duration_s"]) / tokens
        )
        result["server_total_ms_per_token"] = 1000 * (inf["duration_s"] - gen["wall_s"]) / tokens
    return result


def markdown(key: str, run: dict) -> str:
    s, m, o = run["setup"], run["machine"], run["overhead"]
    table = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    table += ["| " + " | ".join(row) + " |" for row in rows(run)]
    header = (
        f"{m['date']} · {m['cpu']}, {m['cores']} cores, no GPU ({m['device']}) · jax {m['jax']}, "
        f"Python {m['python']} · load average {run['load_before']:.1f} before, "
        f"{run['load_after']:.1f} after (**the machine is shared**: expect +-20%). "
        "JSON: `benchmarks/serving.json`."
    )
    workload = (
        f"Workload: SmolLM2-135M-Instruct (GGUF Q4_1 -> float32), {s['num_prompts']} requests per "
        f"rate, random-token prompts of {s['input_len']} +-25% tokens, {s['output_len']} +-25% "
        f"output tokens, greedy, ignore_eos, streamed completions; max_num_seqs "
        f"{s['max_num_seqs']}, max_num_batched_tokens {s['max_num_batched_tokens']}, one decode "
        f"and one prefill shape. The server took {run['server_start_s']:.0f} s to answer /health "
        "(load, warm-up from the compilation cache)."
    )
    nan = float("nan")
    differences = (
        "Wall-time differences per output token at rate inf (all requests at once, so the same "
        "batches as the offline runs): server - LLM.generate "
        f"{o.get('server_total_ms_per_token', nan):.2f} ms, of which AsyncEngine - LLM.generate "
        f"{o['streaming_engine_ms_per_token']:.2f} ms (a DELTA output per step: detokenizing, "
        f"asyncio queues) and server - AsyncEngine {o.get('http_sse_ms_per_token', nan):.2f} ms "
        "(HTTP, SSE, JSON, the client)."
    )
    parts = [
        f"<!-- run: {key} -->",
        "## Online serving: `jaxinfer serve` under Poisson arrivals (`python benchmarks/serving.py`)",
        "",
        header,
        "",
        workload,
        "",
        *table,
        "",
        differences,
        "",
        NOTES,
        f"<!-- end run: {key} -->",
        "",
    ]
    return "\n".join(parts)


NOTES = (
    "TTFT: send -> first streamed token, client side. TPOT: (e2e - TTFT) / (tokens - 1) per "
    "request. ITL: every gap between chunks, per token. Output tok/s: all output tokens / (last "
    "token - first send). The client (httpx, asyncio) runs on the same 2 cores as the server."
)


# ---- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=None, help="per rate (default 24; quick 8)")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--rates", default=None, help="comma-separated req/s, 'inf' for all at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(here / "serving.json"))
    p.add_argument("--markdown", default=str(here / "RESULTS.md"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import yaml

    from jaxinfer.default_model import default_model_path

    args = parse_args(argv)
    rates = args.rates or ("1,inf" if args.quick else "0.5,1,2,inf")
    setup = Setup(
        num_prompts=args.num_prompts or (8 if args.quick else 24),
        input_len=args.input_len,
        output_len=args.output_len,
        rates=tuple(float(r) for r in rates.split(",")),
        seed=args.seed,
    )
    workload = make_workload(setup, vocab_size=49152)
    folder = Path(tempfile.mkdtemp(prefix="jaxinfer-serving-"))
    config_path = folder / "serving.yaml"
    config_path.write_text(yaml.safe_dump(setup.config(str(default_model_path()))))
    run: dict = {"setup": asdict(setup), "machine": machine(), "load_before": os.getloadavg()[0]}
    process, url, run["server_start_s"] = start_server(config_path, folder / "server.log")
    try:
        # Untimed: each compiled program's first run costs seconds more than later ones (the
        # first requests after start-up pay it), which is not what the rates compare.
        asyncio.run(run_rate(url, workload[: setup.max_num_seqs], float("inf"), args.seed))
        run["server"] = []
        for rate in setup.rates:
            result = asyncio.run(run_rate(url, workload, rate, args.seed))
            run["server"].append(result)
            print(f"rate {_rate_name(rate)}: {result['output_tok_s']:.1f} tok/s", flush=True)
    finally:
        process.send_signal(signal.SIGTERM)
        run["server_exit_code"] = process.wait(120)
    run["offline"] = run_offline(config_path, workload)
    run["overhead"] = overhead(run)
    run["load_after"] = os.getloadavg()[0]
    print(text_table(rows(run)))
    print(json.dumps(run["overhead"], indent=1))
    key = "serving-quick" if args.quick else "serving"
    write_json(Path(args.out), key, run)
    if not args.quick:
        write_markdown(Path(args.markdown), key, markdown(key, run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
