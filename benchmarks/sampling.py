"""Time per call of the sampler (jaxinfer.runtime.sampling.sample) at batch 64, per feature mix.

    python benchmarks/sampling.py                       # V = 32000 and 151936, K = 256
    python benchmarks/sampling.py --vocab 32000 --repeats 3

Cases (every row of the batch alike; logits ~ N(0, 2^2), a history of 64 output tokens per row):
- greedy: temperature 0, nothing else: the raw-argmax fast path.
- greedy+processing: penalties, logit_bias, a banned token, min_tokens: argmax of processed logits.
- top_k=50 (candidate path): all features with top_k 50, top_p 0.9, min_p 0.01.
- top_p=0.9 (bisection path): all features, top_k off, so the nucleus is wider than K candidates.
- temperature only: temperature 0.8, nothing else: a draw over the whole vocabulary.
- sort reference: argsort + cumsum top-p + categorical, what a sort-based sampler costs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.runtime.host_allocator import keep_freed_memory_mapped
from jaxinfer.runtime.sampling import sample
from jaxinfer.runtime.sampling_tensors import SamplingTensors


def _tensors(num_rows: int, vocab: int, **features: float) -> SamplingTensors:
    t = SamplingTensors.neutral(num_rows, vocab)
    rng = np.random.default_rng(0)
    t.seeds[:] = np.arange(num_rows)
    t.positions[:] = 64
    t.num_output_tokens[:] = 64
    for name, value in features.items():
        getattr(t, name)[:] = value
    if features.get("repetition_penalty", 1.0) != 1.0:
        history = rng.integers(0, vocab, (num_rows, 64))
        for r in range(num_rows):
            t.output_counts[r] = np.bincount(history[r], minlength=vocab)
            t.prompt_mask[r, rng.integers(0, vocab, 128)] = True
        t.logit_bias[:, :10] = 5.0
        t.allowed_mask[:, 10] = False
        t.stop_mask[:, 0] = True
        t.min_tokens[:] = 100
    return jax.device_put(t)


def _sort_reference(logits: jax.Array, top_p: float, key: jax.Array) -> jax.Array:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    above = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(above < top_p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times) * 1e3  # best of N: the machine may be shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-top-k", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).with_name("sampling.json")))
    args = parser.parse_args()
    if jax.default_backend() == "cpu":
        keep_freed_memory_mapped()  # as the engine does on CPU

    processing = {"repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": 0.5}
    cases = {
        "greedy": {},
        "greedy+processing": processing,
        "top_k=50 (candidate path)": dict(
            processing, temperature=0.8, top_k=50, top_p=0.9, min_p=0.01
        ),
        "top_p=0.9 (bisection path)": dict(processing, temperature=0.8, top_p=0.9, min_p=0.01),
        "temperature only": {"temperature": 0.8},
    }
    run = jax.jit(lambda logits, t: sample(logits, t, args.max_top_k)[0])
    reference = jax.jit(_sort_reference, static_argnums=1)
    device = jax.devices()[0].device_kind
    print(f"{device}, S={args.rows}, K={args.max_top_k}, ms per call (best of {args.repeats})")
    results = []
    for vocab in args.vocab:
        logits = 2.0 * jax.random.normal(jax.random.key(0), (args.rows, vocab))
        for name, features in cases.items():
            t = _tensors(args.rows, vocab, **features)
            ms = _time(run, logits, t, repeats=args.repeats)
            results.append({"vocab": vocab, "case": name, "ms": round(ms, 2)})
            print(f"V={vocab:>7}  {name:<28} {ms:8.1f}")
        ms = _time(reference, logits, 0.9, jax.random.key(0), repeats=args.repeats)
        results.append({"vocab": vocab, "case": "sort reference", "ms": round(ms, 2)})
        print(f"V={vocab:>7}  {'sort reference':<28} {ms:8.1f}")
    meta = {
        "device": device,
        "rows": args.rows,
        "max_top_k": args.max_top_k,
        "jax": jax.__version__,
    }
    Path(args.out).write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
