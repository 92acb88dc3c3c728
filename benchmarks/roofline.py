"""The machine's roofline for decoder-only LLM inference: how fast could decoding possibly go here?

Two measured rates bound every step:

* memory read bandwidth (bytes/s): a decode step must stream every matmul weight once, plus the
  K/V of every sequence in the batch over its whole context. Measured as the best of N `sum`s over a
  1 GiB float32 array (far beyond any cache), both on one thread and split over all cores; the
  faster of the two is used.
* float32 matmul rate (FLOP/s): a step costs 2 FLOPs per weight per token, plus attention
  (4 * layers * heads * head_dim * context per token). Measured as the best of N jitted
  `jnp.dot` of two 2048x2048 float32 matrices, i.e. the rate XLA:CPU itself reaches on this machine.

On an accelerator (JAX's default device is a GPU) both rates are the device's own: read bandwidth
is the best of N jitted `jnp.sum`s over a 4 GiB array in device memory (far beyond the L2), and the
matmul rate the best of N jitted `jnp.dot`s of two 8192x8192 matrices in the engine's dtype
(bfloat16 for a bf16 model: that is what its tensor cores run), both timed with
`block_until_ready`. Host memory plays no part in a GPU decode step, so it is not measured there.

The bound for a decode step at batch b is then  b / max(bytes / bandwidth, flops / flop_rate)
tokens/s. Nothing else (scheduling, sampling, host overhead, kernel launch) is counted, so measured
throughput divided by this bound is the fraction of the machine's roofline an engine achieves.

    python benchmarks/roofline.py                  # both built-in models, context 384
    python benchmarks/roofline.py --context 1024 --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

BATCH_SIZES = (1, 16, 64)


# ---- model shapes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the roofline needs of a Llama-style decoder: its matrices and its KV cache."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    dtype_bytes: int = 4
    kv_dtype_bytes: int | None = None  # the KV cache's element size when not dtype_bytes (fp8: 1)

    @classmethod
    def from_decoder_config(
        cls, name: str, cfg, dtype_bytes: int = 4, kv_dtype_bytes: int | None = None
    ) -> ModelShape:
        """From jaxinfer's `DecoderConfig` (engine.model.model_config)."""
        return cls(
            name=name,
            hidden=cfg.hidden_size,
            intermediate=cfg.intermediate_size,
            layers=cfg.num_layers,
            heads=cfg.num_heads,
            kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            vocab=cfg.vocab_size,
            tied_embeddings=cfg.tie_word_embeddings,
            dtype_bytes=dtype_bytes,
            kv_dtype_bytes=kv_dtype_bytes,
        )

    @property
    def layer_matmul_params(self) -> int:
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.intermediate
        return q_o + k_v + mlp

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def matmul_params(self) -> int:
        """Weights every decode token multiplies by: all layers plus the LM head (tied or not)."""
        return self.layers * self.layer_matmul_params + self.lm_head_params

    @property
    def total_params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * self.layer_matmul_params + embeddings + norms

    @property
    def weight_bytes_per_step(self) -> int:
        """Bytes a step streams for the weights (embedding rows are a gather: ignored)."""
        return self.matmul_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        element = self.dtype_bytes if self.kv_dtype_bytes is None else self.kv_dtype_bytes
        return 2 * self.layers * self.kv_heads * self.head_dim * element

    def attention_flops(self, context: float) -> float:
        """QK^T and PV for one query token over `context` keys, all layers."""
        return 4.0 * self.layers * self.heads * self.head_dim * context

    def decode_step(self, batch: int, context: float) -> tuple[float, float]:
        """(bytes read, FLOPs) of one decode step of `batch` sequences, each `context` long."""
        bytes_read = self.weight_bytes_per_step + batch * context * self.kv_bytes_per_token
        flops = batch * (2.0 * self.matmul_params + self.attention_flops(context))
        return bytes_read, flops

    def prefill_flops(self, prompt_len: int) -> float:
        """A causal prefill; logits only for the last position."""
        body = 2.0 * (self.matmul_params - self.lm_head_params) * prompt_len
        attention = self.attention_flops(1.0) * prompt_len * (prompt_len + 1) / 2
        return body + attention + 2.0 * self.lm_head_params


# The two benchmark models, for running this file on its own (throughput.py reads the real configs).
BUILTIN_SHAPES = {
    "smollm2": ModelShape("SmolLM2-135M", 576, 1536, 30, 9, 3, 64, 49152, tied_embeddings=True),
    "llama50m": ModelShape("llama50m", 512, 1024, 8, 8, 2, 64, 32000, tied_embeddings=False),
}


# ---- machine rates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MachineRates:
    bandwidth_bytes_s: float  # best of single-thread and all-core reads; on a GPU its own reads
    bandwidth_1thread_bytes_s: float  # CPU only (0 on an accelerator)
    bandwidth_threads_bytes_s: float  # CPU only (0 on an accelerator)
    matmul_flops_s: float
    bandwidth_array_bytes: int
    matmul_size: int
    device: str = "cpu"  # "cpu", or the accelerator's device kind ("NVIDIA H200")
    matmul_dtype: str = "float32"


def _best_seconds(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def measure_bandwidth(array_bytes: int = 1 << 30, repeats: int = 5) -> tuple[float, float]:
    """-> (single-thread, all-core) read bandwidth in bytes/s: best of `repeats` sums."""
    data = np.ones(array_bytes // 4, dtype=np.float32)
    data.sum()  # touch every page before timing
    single = array_bytes / _best_seconds(data.sum, repeats)
    workers = os.cpu_count() or 1
    chunks = np.array_split(data, workers)
    with ThreadPoolExecutor(workers) as pool:  # numpy releases the GIL inside the reduction

        def threaded_sum() -> None:
            list(pool.map(np.sum, chunks))

        threaded = array_bytes / _best_seconds(threaded_sum, repeats)
    return single, threaded


def measure_matmul(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """FLOP/s of a jitted n x n @ n x n in `dtype` on JAX's default device: best of `repeats`."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()  # compile
    return 2.0 * n**3 / _best_seconds(lambda: dot(a, b).block_until_ready(), repeats)


def measure_device_bandwidth(array_bytes: int, repeats: int) -> float:
    """Read bandwidth of JAX's default device in bytes/s: best of `repeats` jitted sums over an
    array that lives in device memory."""
    import jax
    import jax.numpy as jnp

    data = jnp.ones((array_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(data).block_until_ready()  # compile
    return array_bytes / _best_seconds(lambda: total(data).block_until_ready(), repeats)


def measure_machine(quick: bool = False, dtype: str = "float32") -> MachineRates:
    """The rates of the device the engine runs on: the host on CPU, else the accelerator
    (`dtype`: the matmul's input type there, the engine's weight dtype)."""
    import jax

    device = jax.devices()[0]
    if device.platform != "cpu":
        # The full sizes even with --quick (each takes well under a second): on the H200 a sum
        # over 1 GiB read 2.6-2.8 TB/s against 3.7-3.8 over 4 GiB, and a 4096^3 product ran
        # 318-342 TFLOP/s against 660 at 8192^3 (2026-12-04): the small sizes time launch costs.
        array_bytes = 4 << 30
        bandwidth = measure_device_bandwidth(array_bytes, repeats=10)
        size = 8192
        flops = measure_matmul(size, repeats=10, dtype=dtype)
        return MachineRates(
            bandwidth, 0.0, 0.0, flops, array_bytes, size, str(device.device_kind), dtype
        )
    array_bytes = (256 << 20) if quick else (1 << 30)
    single, threaded = measure_bandwidth(array_bytes, repeats=3 if quick else 5)
    size = 1024 if quick else 2048
    flops = measure_matmul(size, repeats=5 if quick else 10)
    return MachineRates(max(single, threaded), single, threaded, flops, array_bytes, size)


# ---- bounds --------------------------------------------------------------------------------------


def decode_bound(shape: ModelShape, rates: MachineRates, batch: int, context: float) -> dict:
    """Upper bound on decode tokens/s at `batch`, and which side of the roofline limits it."""
    bytes_read, flops = shape.decode_step(batch, context)
    memory_s = bytes_read / rates.bandwidth_bytes_s
    compute_s = flops / rates.matmul_flops_s
    step_s = max(memory_s, compute_s)
    return {
        "batch": batch,
        "context": context,
        "bytes_per_step": bytes_read,
        "flops_per_step": flops,
        "memory_s": memory_s,
        "compute_s": compute_s,
        "bound": "memory" if memory_s >= compute_s else "compute",
        "tokens_per_s": batch / step_s,
    }


def workload_bound(
    shape: ModelShape,
    rates: MachineRates,
    prompt_lens: list[int],
    output_lens: list[int],
    max_num_seqs: int,
    max_num_batched_tokens: int,
) -> dict:
    """A lower bound on the time of a whole workload, hence an upper bound on its output tokens/s.

    Compute: every prefill and every decode token's FLOPs at the matmul rate. Memory: the fewest
    steps continuous batching allows (prefill chunks of max_num_batched_tokens; decode steps of
    max_num_seqs sequences, and never fewer than the longest output) each streaming the weights,
    plus every decode token's KV reads. Bound time = max(compute, memory): steps may overlap them.
    """
    compute_flops = sum(shape.prefill_flops(p) for p in prompt_lens)
    kv_bytes = 0.0
    for p, n in zip(prompt_lens, output_lens, strict=True):
        decode_tokens = n - 1  # the first output token comes from the prefill
        mean_context = p + 1 + (decode_tokens - 1) / 2 if decode_tokens > 0 else p
        compute_flops += decode_tokens * (
            2.0 * shape.matmul_params + shape.attention_flops(mean_context)
        )
        kv_bytes += decode_tokens * mean_context * shape.kv_bytes_per_token
    decode_steps = max(
        max(output_lens) - 1, math.ceil(sum(n - 1 for n in output_lens) / max_num_seqs)
    )
    prefill_steps = math.ceil(sum(prompt_lens) / max_num_batched_tokens)
    memory_bytes = (decode_steps + prefill_steps) * shape.weight_bytes_per_step + kv_bytes
    compute_s = compute_flops / rates.matmul_flops_s
    memory_s = memory_bytes / rates.bandwidth_bytes_s
    seconds = max(compute_s, memory_s)
    return {
        "compute_s": compute_s,
        "memory_s": memory_s,
        "bound": "memory" if memory_s >= compute_s else "compute",
        "seconds": seconds,
        "output_tokens_per_s": sum(output_lens) / seconds,
    }


def roofline(shape: ModelShape, rates: MachineRates, context: float) -> dict:
    """The dict throughput.py records: shape, rates, and the decode bound at each batch size."""
    return {
        "model": shape.name,
        "total_params": shape.total_params,
        "matmul_params": shape.matmul_params,
        "weight_bytes_per_step": shape.weight_bytes_per_step,
        "kv_bytes_per_token": shape.kv_bytes_per_token,
        "machine": asdict(rates),
        "decode": [decode_bound(shape, rates, b, context) for b in BATCH_SIZES],
    }


def format_rates(rates: MachineRates) -> str:
    if rates.device != "cpu":
        return (
            f"{rates.device}: memory read bandwidth {rates.bandwidth_bytes_s / 1e9:.1f} GB/s "
            f"(jnp.sum over {rates.bandwidth_array_bytes / 2**30:.0f} GiB); "
            f"{rates.matmul_dtype} matmul {rates.matmul_flops_s / 1e12:.1f} TFLOP/s "
            f"({rates.matmul_size}x{rates.matmul_size} jnp.dot)"
        )
    return (
        f"memory read bandwidth {rates.bandwidth_bytes_s / 1e9:.1f} GB/s "
        f"(1 thread {rates.bandwidth_1thread_bytes_s / 1e9:.1f}, "
        f"all cores {rates.bandwidth_threads_bytes_s / 1e9:.1f}); "
        f"f32 matmul {rates.matmul_flops_s / 1e9:.1f} GFLOP/s "
        f"({rates.matmul_size}x{rates.matmul_size} jnp.dot)"
    )


def format_table(result: dict) -> str:
    title = (
        f"{result['model']}: {result['total_params'] / 1e6:.1f}M params, "
        f"{result['weight_bytes_per_step'] / 2**20:.0f} MiB weights read per step, "
        f"{result['kv_bytes_per_token'] / 1024:.1f} KiB KV per token"
    )
    lines = [
        title,
        f"{'batch':>6} {'context':>8} {'MiB/step':>9} {'GFLOP/step':>11} {'bound':>8} {'tok/s':>9}",
    ]
    for row in result["decode"]:
        lines.append(
            f"{row['batch']:>6} {row['context']:>8.0f} {row['bytes_per_step'] / 2**20:>9.1f} "
            f"{row['flops_per_step'] / 1e9:>11.2f} {row['bound']:>8} {row['tokens_per_s']:>9.1f}"
        )
    return "\n".join(lines)


def numpy_dtype(name: str):
    """numpy has no bfloat16; ml_dtypes (a JAX dependency) does."""
    import ml_dtypes

    return ml_dtypes.bfloat16 if name == "bfloat16" else name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*BUILTIN_SHAPES, "both"], default="both")
    parser.add_argument("--context", type=float, default=384, help="tokens of context per sequence")
    parser.add_argument("--quick", action="store_true", help="smaller arrays, fewer repeats")
    parser.add_argument("--dtype", default="float32", help="matmul and weight dtype")
    args = parser.parse_args(argv)
    rates = measure_machine(args.quick, args.dtype)
    print(format_rates(rates))
    names = list(BUILTIN_SHAPES) if args.model == "both" else [args.model]
    for name in names:
        print()
        shape = dataclasses.replace(
            BUILTIN_SHAPES[name], dtype_bytes=np.dtype(numpy_dtype(args.dtype)).itemsize
        )
        print(format_table(roofline(shape, rates, args.context)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
