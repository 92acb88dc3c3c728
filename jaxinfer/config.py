"""Engine configuration: what the user asks for, validated once, frozen afterwards.

Values discovered at start-up (the model's max length, the number of KV blocks) are filled in by
`dataclasses.replace` in the engine, never by mutating a config in place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")
# vLLM's kv_cache_dtype values: "auto" keeps the model's dtype; the fp8 ones store K and V as 8-bit
# floats (scale 1.0, vLLM's default without calibrated scales); runtime/kv_cache.py maps them.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
# What each backend means: runtime/attention_backend.py.
ATTENTION_BACKENDS = ("auto", "pallas", "pallas_interpret", "reference")


def _check(condition: bool, field_name: str, allowed: str, value: object) -> None:
    if not condition:
        raise ValueError(f"EngineConfig.{field_name} must be {allowed}, got {value!r}")


# The environment variable that names the persistent compilation cache folder ("" or "off": none).
COMPILATION_CACHE_ENV = "JAXINFER_COMPILATION_CACHE_DIR"
_CACHE_OFF = ("", "off")


def _host_cpu_tag() -> str:
    """The machine type and a short hash of the CPU's feature flags, e.g. ``x86_64-1a2b3c4d``.

    XLA:CPU compiles for the host's instruction set and refuses an executable built for another,
    so machines sharing a home folder get one cache subfolder per CPU instead of overwriting each
    other's entries under the same key.
    """
    features = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.split(":", 1)[0].strip() in ("flags", "Features"):
                    features = line
                    break
    except OSError:
        pass
    digest = hashlib.sha256(features.encode()).hexdigest()[:8]
    return f"{platform.machine() or 'unknown'}-{digest}"


def default_compilation_cache_dir() -> str | None:
    """Where compiled programs persist when ``EngineConfig.compilation_cache_dir`` is not given.

    ``$JAXINFER_COMPILATION_CACHE_DIR`` if set ("" or "off": no cache), else the user's cache
    folder, ``$XDG_CACHE_HOME/jaxinfer/xla/<cpu>`` (``~/.cache`` without XDG_CACHE_HOME). On by
    default because compiling is most of a cold start: a second identical run then loads every
    program instead of compiling it (JAX keys entries by the program with its source locations
    stripped, the jaxlib version, the backend, XLA flags and the devices, so nothing of a
    checkpoint's path or the working folder enters a key).
    """
    configured = os.environ.get(COMPILATION_CACHE_ENV)
    if configured is not None:
        return None if configured.strip().lower() in _CACHE_OFF else configured
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base).expanduser() / "jaxinfer" / "xla" / _host_cpu_tag())


def parse_layer_partition(value: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Layers per pipeline stage, from vLLM's `VLLM_PP_LAYER_PARTITION` form ("8,8,7,7") or a
    sequence of ints. Every entry must be a whole number >= 1: a stage without layers has nothing
    to run. (Whether they add up to the model's layers is checked when the model is read:
    `runtime.pipeline.layer_partition`.)"""
    if isinstance(value, str):
        try:
            counts = tuple(int(part) for part in value.split(","))
        except ValueError:
            raise ValueError(
                "EngineConfig.pipeline_layer_partition must be comma-separated layer counts "
                f"like '8,8,7,7', got {value!r}"
            ) from None
    elif isinstance(value, tuple | list):
        counts = tuple(value)
    else:
        counts = ()
    if not counts or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        raise ValueError(
            "EngineConfig.pipeline_layer_partition must be layer counts per stage ('8,8,7,7' "
            f"or a tuple of ints), got {value!r}"
        )
    if any(c < 1 for c in counts):
        raise ValueError(
            f"EngineConfig.pipeline_layer_partition {','.join(map(str, counts))}: every stage "
            "needs at least one layer"
        )
    return counts


def powers_of_two_up_to(limit: int, start: int = 1) -> tuple[int, ...]:
    """Bucket sizes start, 2*start, ... and finally `limit` itself (so the largest bucket is exact)."""
    sizes = []
    size = start
    while size < limit:
        sizes.append(size)
        size *= 2
    sizes.append(limit)
    return tuple(sizes)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Everything that shapes an engine. Field names follow vLLM's `LLM(...)` arguments."""

    model: str
    tokenizer: str | None = None
    gguf_file: str | None = None
    dtype: str = "auto"
    seed: int = 0

    # Model length and KV cache.
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    # "fp8" / "fp8_e4m3" / "fp8_e5m2": K and V stored in 8 bits (4x the blocks of a float32 cache
    # in the same memory, 2x bfloat16's), every key and value rounded to it, the step's own too.
    kv_cache_dtype: str = "auto"
    num_kv_blocks: int | None = None  # explicit override (tests); otherwise sized from the budget
    kv_cache_memory_bytes: int | None = None  # explicit budget; otherwise from the device
    gpu_memory_utilization: float = 0.9  # fraction of accelerator memory for weights + cache
    # On CPU, the cache takes this fraction of physical RAM (not of the free RAM of the moment),
    # rounded down coarsely: the same shapes, hence the same compiled programs, every run.
    cpu_kv_cache_fraction: float = 0.1

    # Scheduler.
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    # New prompts a step may take (its prefill rows). 8: lm-eval's short scoring prompts fill a
    # 512-token step (with 4, 8-11% of it was padding; benchmarks/RESULTS.md "Prompt scoring").
    # The jnp reference's prefill attention over cached context costs tokens x seqs x context;
    # the CPU kernel and the Pallas kernel score each token against its own sequence only.
    max_prefill_seqs: int = 8
    # Reuse the K/V of full blocks whose token prefix was computed before (vLLM's automatic
    # prefix caching, on by default as in vLLM V1): engine/block_manager.py.
    enable_prefix_caching: bool = True
    # Unified steps (vLLM V1): running decodes and prefill chunks share each step's token budget.
    # False: a prefill step whenever a prefill can run, else a decode step (for comparison).
    unified_steps: bool = True
    # Batch-invariant mode (vLLM's VLLM_BATCH_INVARIANT=1): a request's tokens and logprobs are
    # bitwise the same whatever else is in the batch, its row, the bucket, the chunked-prefill cuts,
    # preemption and max_num_seqs; slower (benchmarks/RESULTS.md). How: jaxinfer/models/invariant.py
    # and pallas_kernels/batch_invariant.py (the jnp attention; the Pallas kernel is not invariant).
    batch_invariant: bool = False

    # Shape buckets (None: powers of two up to the limits above; one block-table width).
    seq_buckets: tuple[int, ...] | None = None
    token_buckets: tuple[int, ...] | None = None
    block_buckets: tuple[int, ...] | None = None

    # Parallelism (runtime/mesh.py): a (data, stage, model) mesh over jax.devices().
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    # Under pipeline parallelism the running sequences form this many independent micro-batches,
    # each with its own scheduler and up to max_num_seqs sequences, one step of each in flight at
    # once, so that stages work at the same time (vLLM's virtual engines). None: one per stage;
    # 1: a single batch, stages take turns.
    pipeline_micro_batches: int | None = None
    # Layers per pipeline stage, first stage first: "8,8,7,7" (vLLM's VLLM_PP_LAYER_PARTITION) or
    # (8, 8, 7, 7), normalized to a tuple; one entry per stage, each >= 1, summing to the model's
    # layers. None: vLLM's default split (runtime/pipeline.py, layer_partition), which no longer
    # needs pipeline_parallel_size to divide the layer count.
    pipeline_layer_partition: str | tuple[int, ...] | None = None
    # Several processes (runtime/distributed.py): jax.distributed's coordinator "host:port", the
    # process count and this process's id; None reads JAX_COORDINATOR_ADDRESS /
    # JAX_NUM_PROCESSES / JAX_PROCESS_ID, and no coordinator anywhere means one process.
    distributed_coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    attention_backend: str = "auto"
    # JAX's persistent compilation cache: a second engine with the same shapes skips XLA compiles.
    # Default: the user's cache folder (default_compilation_cache_dir); None, "" or "off": none.
    compilation_cache_dir: str | None = dataclasses.field(
        default_factory=default_compilation_cache_dir
    )
    # Converted weights saved with orbax on first load, restored later (models/weight_cache.py).
    weight_cache_dir: str | None = None
    # On CPU, keep freed host memory mapped (glibc mallopt): see runtime/host_allocator.py.
    cpu_keep_freed_memory: bool = True
    # Largest logprobs / prompt_logprobs a request may ask for (vLLM's). -1: no bound, and
    # logprobs=-1 returns the whole vocabulary, so every step then carries [rows, vocab] results.
    max_logprobs: int = 20
    # vLLM's async scheduling: while a decode step runs on the device, the host schedules and
    # dispatches the next one, feeding it the running step's tokens on the device (runs ahead
    # only in steady decoding on one device; False: the plain loop, for debugging).
    async_scheduling: bool = True
    # vLLM's multi-step scheduling: up to this many decode steps in one compiled call, each
    # step's tokens fed to the next on the device (runtime/multi_step.py), so the host's
    # per-step work and launches are paid once per call. Runs in steady decoding (nobody waiting
    # who could be seated, no structured outputs or multi-token bad words), on one device or a
    # tensor-parallel mesh, not across pipeline stages; 1: one step per call.
    num_scheduler_steps: int = 1
    # A model named by Hugging Face hub id (models/hub.py): the repo revision (branch, tag or
    # commit; None: main) of the model, and of a separate `tokenizer` repo (None: the model's),
    # and vLLM's `download_dir`, the hub cache to use (None: huggingface_hub's, $HF_HUB_CACHE).
    revision: str | None = None
    tokenizer_revision: str | None = None
    download_dir: str | None = None
    # Check every weight for NaN and inf at load (one reduction per tensor), failing with the
    # tensor's name; False skips it (a fast load of a checkpoint already known to be sound).
    check_weights_finite: bool = True
    # Weight-only quantization (vLLM's argument): None keeps the checkpoint's floats (a GGUF is
    # dequantized); "int8" stores every linear weight and the embedding as int8 with one scale per
    # output channel, quantized at load (models/quantization.py); "gguf" keeps a GGUF's Q8_0 /
    # Q4_0 / Q4_1 matrices in their blocks (models/gguf_weight.py). One device, no weight cache yet.
    quantization: str | None = None

    def __post_init__(self) -> None:
        cache = self.compilation_cache_dir
        _check(
            cache is None or isinstance(cache, str),
            "compilation_cache_dir",
            'None, "off" or a folder path',
            cache,
        )
        if cache is not None:
            # Normalized once here, so that every reader sees None for "no cache" and a real
            # path otherwise (construction, not a later mutation: the config stays frozen).
            off = cache.strip().lower() in _CACHE_OFF
            normalized = None if off else str(Path(cache).expanduser())
            object.__setattr__(self, "compilation_cache_dir", normalized)
        _check(
            isinstance(self.model, str) and bool(self.model),
            "model",
            "a non-empty path",
            self.model,
        )
        _check(self.dtype in DTYPES, "dtype", f"one of {DTYPES}", self.dtype)
        _check(
            self.kv_cache_dtype in KV_CACHE_DTYPES,
            "kv_cache_dtype",
            f"one of {KV_CACHE_DTYPES}",
            self.kv_cache_dtype,
        )
        _check(
            self.attention_backend in ATTENTION_BACKENDS,
            "attention_backend",
            f"one of {ATTENTION_BACKENDS}",
            self.attention_backend,
        )
        _check(
            not (self.batch_invariant and self.attention_backend.startswith("pallas")),
            "attention_backend",
            "'auto' or 'reference' with batch_invariant=True (the invariant attention is its own "
            "jnp formulation; the Pallas kernel's is not invariant)",
            self.attention_backend,
        )
        _check(
            self.block_size in (8, 16, 32, 64, 128),
            "block_size",
            "one of 8, 16, 32, 64, 128",
            self.block_size,
        )
        steps = self.num_scheduler_steps
        _check(
            isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= 64,
            "num_scheduler_steps",
            "an int from 1 to 64",
            steps,
        )
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            size = getattr(self, name)
            _check(isinstance(size, int) and size >= 1, name, "an int >= 1", size)
        micro = self.pipeline_micro_batches
        _check(
            micro is None or (isinstance(micro, int) and micro >= 1),
            "pipeline_micro_batches",
            "None or an int >= 1",
            micro,
        )
        if self.pipeline_layer_partition is not None:
            partition = parse_layer_partition(self.pipeline_layer_partition)
            _check(
                len(partition) == self.pipeline_parallel_size,
                "pipeline_layer_partition",
                f"one layer count per stage ({self.pipeline_parallel_size}, the "
                "pipeline_parallel_size)",
                self.pipeline_layer_partition,
            )
            # Normalized once here (construction, not a later mutation): readers see a tuple.
            object.__setattr__(self, "pipeline_layer_partition", partition)
        _check(self.max_num_seqs >= 1, "max_num_seqs", ">= 1", self.max_num_seqs)
        _check(
            self.max_num_batched_tokens >= 1,
            "max_num_batched_tokens",
            ">= 1",
            self.max_num_batched_tokens,
        )
        _check(self.max_prefill_seqs >= 1, "max_prefill_seqs", ">= 1", self.max_prefill_seqs)
        _check(
            0.0 < self.gpu_memory_utilization <= 1.0,
            "gpu_memory_utilization",
            "in (0, 1]",
            self.gpu_memory_utilization,
        )
        _check(
            0.0 < self.cpu_kv_cache_fraction <= 0.9,
            "cpu_kv_cache_fraction",
            "in (0, 0.9]",
            self.cpu_kv_cache_fraction,
        )
        if self.max_model_len is not None:
            _check(
                self.max_model_len >= 2,
                "max_model_len",
                ">= 2 (a prompt of at least one token plus one generated token)",
                self.max_model_len,
            )
        _check(
            self.quantization in (None, "int8", "gguf"),
            "quantization",
            "None, 'int8' or 'gguf'",
            self.quantization,
        )
        if self.quantization is not None:
            _check(
                self.weight_cache_dir is None,
                "weight_cache_dir",
                f"None with quantization={self.quantization!r} (the weight cache holds floats)",
                self.weight_cache_dir,
            )
            for name in ("tensor_parallel_size", "pipeline_parallel_size"):
                _check(
                    getattr(self, name) == 1,
                    name,
                    f"1 with quantization={self.quantization!r} (untested on a mesh)",
                    getattr(self, name),
                )
        if self.weight_cache_dir is not None:
            _check(
                isinstance(self.weight_cache_dir, str) and bool(self.weight_cache_dir),
                "weight_cache_dir",
                "None or a non-empty folder path",
                self.weight_cache_dir,
            )
        if self.num_kv_blocks is not None:
            _check(
                self.num_kv_blocks >= 2,
                "num_kv_blocks",
                ">= 2 (block 0 is reserved)",
                self.num_kv_blocks,
            )
        if self.kv_cache_memory_bytes is not None:
            _check(
                self.kv_cache_memory_bytes > 0,
                "kv_cache_memory_bytes",
                "> 0",
                self.kv_cache_memory_bytes,
            )
        _check(
            self.max_logprobs >= -1,
            "max_logprobs",
            ">= 0, or -1 (no bound: logprobs=-1 returns the whole vocabulary)",
            self.max_logprobs,
        )
        for name in ("seq_buckets", "token_buckets", "block_buckets"):
            buckets = getattr(self, name)
            if buckets is not None:
                _check(
                    len(buckets) > 0 and all(isinstance(b, int) and b >= 1 for b in buckets),
                    name,
                    "a non-empty tuple of positive ints",
                    buckets,
                )
        for name in ("revision", "tokenizer_revision", "download_dir"):
            value = getattr(self, name)
            _check(
                value is None or (isinstance(value, str) and bool(value)),
                name,
                "None or a non-empty string",
                value,
            )

    @property
    def max_blocks_per_seq(self) -> int:
        if self.max_model_len is None:
            raise ValueError("max_model_len is resolved when the engine loads the model")
        return math.ceil(self.max_model_len / self.block_size)

    def resolved_seq_buckets(self) -> tuple[int, ...]:
        buckets = self.seq_buckets or powers_of_two_up_to(self.max_num_seqs)
        return tuple(
            sorted(b for b in set(buckets) if b <= self.max_num_seqs) or [self.max_num_seqs]
        )

    def resolved_token_buckets(self) -> tuple[int, ...]:
        limit = self.max_num_batched_tokens
        buckets = self.token_buckets or powers_of_two_up_to(limit, start=min(16, limit))
        return tuple(sorted(b for b in set(buckets) if b <= limit) or [limit])

    def resolved_block_buckets(self) -> tuple[int, ...]:
        """Block-table widths. Default: one, the full `max_model_len`.

        Attention loops over cached context only as far as the step's longest sequence, so a wider
        table costs nothing but its int32 entries, and every extra width would multiply the
        compiled programs (it used to: 7 widths, 135 programs and ~9 minutes of warm-up for
        SmolLM2 on the 2-core CPU).
        """
        limit = self.max_blocks_per_seq
        kept = sorted(b for b in set(self.block_buckets or ()) if b < limit)
        return tuple(kept + [limit])  # the largest bucket always covers max_model_len

    @property
    def resolved_micro_batches(self) -> int:
        if self.pipeline_micro_batches is None:
            return self.pipeline_parallel_size
        return self.pipeline_micro_batches

    def replace(self, **changes) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> EngineConfig:
        """An engine config from a YAML file (see `jaxinfer.config_file`); `overrides` win.

        Unknown keys and bad values raise ValueError naming the key and the file; the file's
        `sampling:` section is read by `jaxinfer.config_file.load_config_file`, not here.
        """
        from jaxinfer.config_file import engine_config_from_yaml  # it imports this module

        return engine_config_from_yaml(path, **overrides)
