"""One workload through each engine: jaxinfer, transformers `generate`, llama.cpp.

Each runner returns a dict of measurements plus every request's tokens, so benchmarks/throughput.py
can check the engines agree; its docstring says how each engine is measured and why.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path

import numpy as np
import roofline  # a sibling module: throughput.py puts benchmarks/ on sys.path
from bench_models import ModelFiles
from workload import BLOCK_SIZE, Workload, WorkloadSpec, make_workload


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
    print(f"   loaded in {load_s:.1f} s; warming up", flush=True)
    workload = make_workload(spec, seed, engine.vocab_size)
    num_compiled, warmup_s = _timed(engine.warmup)
    print(f"   warm-up compiled {num_compiled} programs in {warmup_s:.1f} s", flush=True)
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
            kv_dtype_bytes=engine.llm_engine.runner.kv_cache_dtype.itemsize,
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
