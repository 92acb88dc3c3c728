"""The CPU paged-attention kernel on decode rows (jaxinfer/kernels/cpu/paged_attention.cc); its
prefill chunks are tests/kernels/test_cpu_paged_attention_prefill.py's.

Against a float64 numpy implementation of the same attention: random caches, block tables drawn
from a shuffled pool, ragged contexts (1, either side of a block boundary, the table's full
width), padding rows, with and without a sliding window and a soft cap, GQA groups 1 and > 1,
head dims that are and are not a multiple of the kernel's 16 lanes. Every cache slot that is not
a real earlier position of its row is NaN (block 0, the spare blocks, the tail of each last block,
the new token's own slot) and so are the padding rows' q / k_new / v_new: a stray read shows.

Tolerance, derived from the reference: the jnp reference (`decode_only=True`) runs the same
float32 computation in another order, so its own error against float64 is the yardstick. Per
case, the kernel's largest error must be at most FACTOR = 4 times the reference's (measured
ratios 0.53-1.25 over these cases, errors 1e-7 to 5e-7, and 0.47-1.43, errors 3e-7 to 7e-7, over
the prefill file's; with a window of 1 both are exact), so a wrong position, weight or rescale
fails (dropping the last cached position: error 0.93) while rounding cannot. For a bfloat16 or
8-bit float cache the float64 answer uses the values the cache holds (their casts to float32 are
exact).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import Engine, EngineConfig, SamplingParams
from jaxinfer.kernels import paged_attention_cpu as kernel
from jaxinfer.kernels.native_build import build_shared_library
from jaxinfer.runtime.attention_backend import attention_fn
from pallas_kernels import reference
from tests.parallel.fake_devices import xla_flags_with_devices

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the kernel is registered for XLA:CPU only"
)
FACTOR = 4.0


@pytest.fixture(scope="module", autouse=True)
def built_kernel():
    if not kernel.cpu_kernel_enabled():
        pytest.fail("the CPU paged-attention kernel did not build (g++ is on every machine we use)")


@dataclass(frozen=True, kw_only=True)
class RaggedCase:
    seqs: tuple[tuple[int, int], ...]  # (cached positions, new tokens) of each sequence
    padding_tokens: int = 3
    padding_seqs: int = 1  # table rows with no tokens (a bucket's spare sequence slots)
    kv_heads: int = 2
    group: int = 3
    head_dim: int = 64
    block_size: int = 16
    width: int = 6
    spare_blocks: int = 3


def make_ragged_batch(case: RaggedCase, seed: int = 0) -> dict[str, np.ndarray]:
    """Sequence s feeds seqs[s][1] tokens after seqs[s][0] cached positions, then padding tokens
    and table rows with no tokens; NaN wherever nothing is owed."""
    rng = np.random.default_rng(seed)
    kv, group, dim, size = case.kv_heads, case.group, case.head_dim, case.block_size
    rows = len(case.seqs) + case.padding_seqs
    needed = [math.ceil((c + n) / size) for c, n in case.seqs]
    assert max(needed) <= case.width
    num_blocks = 1 + sum(needed) + case.spare_blocks
    pool = rng.permutation(np.arange(1, num_blocks))
    tables = np.zeros((rows, case.width), np.int32)
    k_cache = np.full((kv, num_blocks, size, dim), np.nan, np.float32)
    v_cache = np.full_like(k_cache, np.nan)
    used = 0
    for s, ((cached, _), count) in enumerate(zip(case.seqs, needed, strict=True)):
        tables[s, :count] = pool[used : used + count]
        used += count
        for position in range(cached):  # the new tokens' own slots stay NaN
            block, offset = tables[s, position // size], position % size
            k_cache[:, block, offset] = rng.standard_normal((kv, dim))
            v_cache[:, block, offset] = rng.standard_normal((kv, dim))
    real = sum(n for _, n in case.seqs)
    tokens = real + case.padding_tokens
    q = rng.standard_normal((tokens, kv * group, dim)).astype(np.float32)
    k_new = rng.standard_normal((tokens, kv, dim)).astype(np.float32)
    v_new = rng.standard_normal((tokens, kv, dim)).astype(np.float32)
    for array in (q, k_new, v_new):
        array[real:] = np.nan
    starts = np.cumsum([0] + [n for _, n in case.seqs] + [0] * case.padding_seqs)
    return {
        "q": q,
        "k_new": k_new,
        "v_new": v_new,
        "k_cache": k_cache,
        "v_cache": v_cache,
        "block_tables": tables,
        "context_lens": np.array([c + n for c, n in case.seqs] + [0] * case.padding_seqs, np.int32),
        "query_start_loc": starts.astype(np.int32),
    }


def numpy_attention(batch, *, scale, window=None, cap=None) -> np.ndarray:
    """Each real token's heads over its sequence's cached positions and the step's tokens up to
    itself (inside the window), float64."""
    q, k_cache, v_cache = (batch[n].astype(np.float64) for n in ("q", "k_cache", "v_cache"))
    k_new, v_new = batch["k_new"].astype(np.float64), batch["v_new"].astype(np.float64)
    heads = q.shape[1]
    group, size = heads // k_cache.shape[0], k_cache.shape[2]
    starts = batch["query_start_loc"]
    out = np.zeros(q.shape)
    for s in range(len(starts) - 1):
        q_len = int(starts[s + 1] - starts[s])
        cached = int(batch["context_lens"][s]) - q_len
        for i in range(q_len):
            t, position = int(starts[s]) + i, cached + i
            visible = [p for p in range(position + 1) if window is None or p > position - window]
            for h in range(heads):
                kh = h // group
                keys, values = [], []
                for p in visible:
                    if p < cached:
                        block, offset = batch["block_tables"][s, p // size], p % size
                        keys.append(k_cache[kh, block, offset])
                        values.append(v_cache[kh, block, offset])
                    else:
                        keys.append(k_new[int(starts[s]) + p - cached, kh])
                        values.append(v_new[int(starts[s]) + p - cached, kh])
                scores = np.stack(keys) @ (q[t, h] * scale)
                if cap is not None:
                    scores = cap * np.tanh(scores / cap)
                weights = np.exp(scores - scores.max())
                out[t, h] = weights @ np.stack(values) / weights.sum()
    return out


def decode_case(contexts: tuple[int, ...], padding_rows: int = 2, **layout) -> RaggedCase:
    """Decode rows: each real row one new token after context - 1 cached positions, then
    `padding_rows` padding rows (table rows and tokens). `contexts`: tokens after the step."""
    return RaggedCase(
        seqs=tuple((context - 1, 1) for context in contexts),
        padding_tokens=padding_rows,
        padding_seqs=padding_rows,
        **{"width": 4, **layout},
    )


def _args(batch, cache_dtype=jnp.float32):
    names = ("q", "k_new", "v_new", "k_cache", "v_cache")
    floats = [jnp.asarray(batch[n], cache_dtype if "cache" in n else jnp.float32) for n in names]
    ints = [jnp.asarray(batch[n]) for n in ("block_tables", "context_lens", "query_start_loc")]
    return (*floats, *ints)


def _run(function, batch, cache_dtype=jnp.float32, **static) -> np.ndarray:
    return np.asarray(jax.jit(lambda *a: function(*a, **static))(*_args(batch, cache_dtype)))


def _reference(*args, **static):
    return reference.paged_attention(*args, decode_only=True, **static)


CONTEXTS = (1, 16, 17, 33, 64, 5, 48)  # P = 16: one token, either side of a boundary, full table
CASES = {
    "gqa3-d64": decode_case(CONTEXTS),
    "mha-d64": decode_case(CONTEXTS, group=1),
    "gqa4-d24-p8": decode_case(  # a head dim with a lane tail, 8-token blocks, 1 kv head
        (1, 8, 9, 40, 3), kv_heads=1, group=4, head_dim=24, block_size=8, width=5
    ),
}


def check_against_float64(batch, reference_fn, exact_fn, *, group, scale, window, cap) -> None:
    """The kernel's result on `batch`: finite, zeros for padding tokens, its largest error against
    `exact_fn` (float64) at most FACTOR times `reference_fn`'s, and with a window of 1 (only the
    token itself visible) exactly its value row."""
    static = {"scale": scale, "sliding_window": window, "soft_cap": cap}
    got = _run(kernel.paged_attention, batch, **static)
    ours = _run(reference_fn, batch, **static)
    exact = exact_fn(batch, scale=scale, window=window, cap=cap)
    real = int(batch["query_start_loc"][-1])
    assert np.isfinite(got).all()
    assert (got[real:] == 0).all(), "padding tokens output zeros"
    error, yardstick = np.abs(got - exact).max(), np.abs(ours - exact).max()
    assert error <= FACTOR * yardstick, (error, yardstick)
    if window == 1:
        np.testing.assert_array_equal(got[:real], np.repeat(batch["v_new"][:real], group, 1))


@pytest.mark.parametrize("window", [None, 1, 7, 20])
@pytest.mark.parametrize("cap", [None, 5.0])
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_error_within_a_factor_of_the_references(name, window, cap):
    case = CASES[name]
    batch = make_ragged_batch(case, seed=len(name) + (window or 0))
    check_against_float64(
        batch, _reference, numpy_attention, group=case.group, scale=case.head_dim**-0.5,
        window=window, cap=cap,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("cache_dtype", "q_dtype"),
    [
        (jnp.bfloat16, jnp.float32),
        (jnp.bfloat16, jnp.bfloat16),
        (jnp.float8_e4m3fn, jnp.float32),  # kv_cache_dtype "fp8"
        (jnp.float8_e5m2, jnp.float32),
        (jnp.float8_e4m3fn, jnp.bfloat16),
    ],
)
def test_narrow_cache(cache_dtype, q_dtype):
    """bfloat16 and 8-bit float caches: the kernel widens what the cache holds exactly."""
    case = CASES["gqa3-d64"]
    batch = make_ragged_batch(case, seed=9)
    for name in ("k_cache", "v_cache"):  # the values the cache holds, exactly in float32
        batch[name] = np.asarray(jnp.asarray(batch[name], cache_dtype).astype(jnp.float32))
    if q_dtype == jnp.bfloat16:
        for name in ("q", "k_new", "v_new"):
            batch[name] = np.asarray(jnp.asarray(batch[name], jnp.bfloat16).astype(jnp.float32))
    static = {"scale": case.head_dim**-0.5, "sliding_window": None, "soft_cap": None}

    def with_q_dtype(function):
        def call(q, k_new, v_new, *rest, **kw):
            return function(
                q.astype(q_dtype), k_new.astype(q_dtype), v_new.astype(q_dtype), *rest, **kw
            )

        return call

    got = _run(with_q_dtype(kernel.paged_attention), batch, cache_dtype, **static)
    ours = _run(with_q_dtype(_reference), batch, cache_dtype, **static)
    assert got.dtype == ours.dtype == jnp.dtype(q_dtype)
    exact = numpy_attention(batch, scale=static["scale"])
    got, ours = got.astype(np.float32), ours.astype(np.float32)
    assert (got[int(batch["query_start_loc"][-1]) :] == 0).all()
    error, yardstick = np.abs(got - exact).max(), np.abs(ours - exact).max()
    assert error <= FACTOR * yardstick, (error, yardstick)


@pytest.mark.parametrize("fp8", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_every_fp8_byte_widens_exactly(fp8):
    """All 256 bytes of an 8-bit float cache (subnormals, the largest values, infinities, NaN) as
    one cached value row that takes all the weight: the output is each byte's value (ml_dtypes')
    exactly. The new token's score is 10,100 below, so its weight is exp(-87) (the kernel's clamp)
    times a zero value row."""
    dim = 256
    v_cache = np.zeros((1, 2, 16, dim), np.uint8)
    v_cache[0, 1, 0] = np.arange(256, dtype=np.uint8)
    k_cache = np.zeros((1, 2, 16, dim), np.float32)
    k_cache[0, 1, 0, 0] = 1.0
    q = np.zeros((1, 1, dim), np.float32)
    q[0, 0, 0] = 100.0
    k_new = np.zeros((1, 1, dim), np.float32)
    k_new[0, 0, 0] = -100.0
    out = kernel.paged_attention(
        jnp.asarray(q),
        jnp.asarray(k_new),
        jnp.zeros((1, 1, dim), jnp.float32),
        jax.lax.bitcast_convert_type(jnp.asarray(k_cache, fp8), jnp.uint8),
        jnp.asarray(v_cache),
        jnp.array([[1]], jnp.int32),
        jnp.array([2], jnp.int32),
        jnp.array([0, 1], jnp.int32),
        scale=1.0,
        cache_dtype=fp8,
    )
    expected = np.arange(256, dtype=np.uint8).view(jnp.dtype(fp8)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(out)[0, 0], expected)


def test_a_rows_result_does_not_depend_on_the_other_rows_or_threads():
    """Each (row, kv head) is one work item with a fixed order: alone, in a batch, on one thread
    or two, its bits are the same."""
    case = decode_case((40, 3, 64, 17, 1, 29, 50, 12, 33, 60), padding_rows=0)
    batch = make_ragged_batch(case, seed=4)
    static = {"scale": 0.125, "sliding_window": None, "soft_cap": None}
    together = _run(kernel.paged_attention, batch, **static)
    for threads in (1, 2):
        again = _run(kernel.paged_attention, batch, max_threads=threads, **static)
        np.testing.assert_array_equal(again, together)
    for row in (0, 7):
        alone = {name: value[row : row + 1] for name, value in batch.items()}
        alone |= {"k_cache": batch["k_cache"], "v_cache": batch["v_cache"]}
        alone["query_start_loc"] = np.array([0, 1], np.int32)
        np.testing.assert_array_equal(
            _run(kernel.paged_attention, alone, **static)[0], together[row]
        )


OTHER_ISAS = [
    ("avx2", ("-mno-avx512f",)),
    ("portable", ("-mno-avx2", "-mno-fma", "-mno-avx512f")),
]


def assert_other_isa_gives_the_same_bits(isa, flags, batch, window, cap) -> None:
    """The kernel built for `isa` (float32, bfloat16 and float8 caches) gives this build's bits."""
    path = build_shared_library(kernel.SOURCE, (jax.ffi.include_dir(),), extra_flags=flags)
    assert path is not None
    library = ctypes.CDLL(str(path))
    library.JaxinferPagedAttentionIsa.restype = ctypes.c_char_p
    assert library.JaxinferPagedAttentionIsa().decode() == isa
    static = {"scale": 0.2, "sliding_window": window, "soft_cap": cap}
    attrs = {
        "scale": np.float32(0.2),
        "sliding_window": np.int64(window),
        "soft_cap": np.float32(cap),
        "max_threads": np.int64(0),
    }
    for symbol, dtype in (
        ("F32", jnp.float32),
        ("BF16", jnp.bfloat16),
        ("F8E4M3", jnp.float8_e4m3fn),
        ("F8E5M2", jnp.float8_e5m2),
    ):
        target = f"jaxinfer_paged_attention_test_{isa}_{symbol}_{len(batch['q'])}"
        handler = jax.ffi.pycapsule(getattr(library, f"JaxinferPagedAttention{symbol}"))
        jax.ffi.register_ffi_target(target, handler, platform="cpu")
        call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(batch["q"].shape, jnp.float32))
        args = _args(batch, dtype)
        if jnp.dtype(dtype).itemsize == 1:  # the fp8 handlers take the cache's bytes
            args = [
                a if a.dtype != dtype else jax.lax.bitcast_convert_type(a, jnp.uint8) for a in args
            ]
        got = np.asarray(jax.jit(lambda *a, call=call: call(*a, **attrs))(*args))
        np.testing.assert_array_equal(got, _run(kernel.paged_attention, batch, dtype, **static))


@pytest.mark.parametrize(("isa", "flags"), OTHER_ISAS)
def test_other_instruction_sets_give_the_same_bits(isa, flags):
    """The AVX2 and plain C++ paths run the same sequence of operations as this machine's."""
    batch = make_ragged_batch(CASES["gqa4-d24-p8"], seed=2)
    assert_other_isa_gives_the_same_bits(isa, flags, batch, window=30, cap=4.0)


def test_the_reference_backend_sends_decode_rows_to_the_kernel_on_cpu(monkeypatch):
    """Decode calls with a float32 or bfloat16 cache lower to the custom call (prefill calls too:
    the prefill test file; 8-bit float caches too); a float16 cache, a failed build and JAXINFER_CPU_KERNELS=0 take the
    reference; the dispatcher's result is the kernel's."""
    batch = make_ragged_batch(CASES["mha-d64"], seed=5)
    local = attention_fn("reference")

    def lowered(decode_only: bool, cache_dtype=jnp.float32) -> str:
        function = jax.jit(lambda *a: local(*a, scale=0.125, decode_only=decode_only))
        return function.lower(*_args(batch, cache_dtype)).compile().as_text()

    assert "jaxinfer_paged_attention_f32" in lowered(decode_only=True)
    assert "jaxinfer_paged_attention_bf16" in lowered(decode_only=True, cache_dtype=jnp.bfloat16)
    for fp8, target in ((jnp.float8_e4m3fn, "f8e4m3"), (jnp.float8_e5m2, "f8e5m2")):
        assert f"jaxinfer_paged_attention_{target}" in lowered(decode_only=False, cache_dtype=fp8)
    assert "jaxinfer_paged_attention" not in lowered(decode_only=True, cache_dtype=jnp.float16)
    np.testing.assert_array_equal(
        _run(local, batch, scale=0.125, decode_only=True),
        _run(kernel.paged_attention, batch, scale=0.125),
    )
    monkeypatch.setattr(kernel._LIBRARY, "load", lambda: None)  # as after a failed build
    assert "jaxinfer_paged_attention" not in lowered(decode_only=True)
    monkeypatch.undo()
    monkeypatch.setenv("JAXINFER_CPU_KERNELS", "0")
    assert "jaxinfer_paged_attention" not in lowered(decode_only=True)


SHARDED = """
import json
import jax
import numpy as np
from jaxinfer.kernels import paged_attention_cpu as kernel
from jaxinfer.runtime.attention_backend import attention_fn
from jaxinfer.runtime.mesh import build_mesh
from tests.kernels.test_cpu_paged_attention import CASES, _args, make_ragged_batch

args = _args(make_ragged_batch(CASES["gqa3-d64"], seed=6))  # 2 kv heads: one per device
local = attention_fn("reference", build_mesh(tensor_parallel_size=2))
sharded = jax.jit(lambda *a: local(*a, scale=0.125, decode_only=True))
whole = jax.jit(lambda *a: kernel.paged_attention(*a, scale=0.125))
print(json.dumps({
    "devices": len(jax.devices()),
    "custom_call": "jaxinfer_paged_attention_f32" in sharded.lower(*args).compile().as_text(),
    "equal": bool((np.asarray(sharded(*args)) == np.asarray(whole(*args))).all()),
}))
"""


def test_under_shard_map_each_device_runs_the_kernel_on_its_own_heads():
    """Tensor parallel 2 on 2 fake CPU devices (a subprocess: the device count is fixed when JAX
    starts): the sharded call holds the custom call and gives the unsharded kernel's bits (a kv
    head's result depends on that head alone)."""
    root = Path(__file__).parents[2]
    env = dict(os.environ, XLA_FLAGS=xla_flags_with_devices(2))
    result = subprocess.run(
        [sys.executable, "-c", SHARDED],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"devices": 2, "custom_call": True, "equal": True}


ENGINE = {
    "dtype": "float32",
    "max_model_len": 128,
    "block_size": 8,
    "num_kv_blocks": 48,
    "max_num_seqs": 4,
    "max_num_batched_tokens": 64,
    "seq_buckets": (4,),
    "token_buckets": (64,),
}


def _greedy_and_programs(path, prompts) -> tuple[list, list[tuple[bool, bool, str]]]:
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    with Engine(EngineConfig(model=str(path), attention_backend="reference", **ENGINE)) as engine:
        tokens = [o.outputs[0].token_ids for o in engine.generate(prompts, params)]
        programs = [
            (bucket.is_prefill, bucket.num_decode_seqs > 0, executable.as_text())
            for stage in engine.llm_engine.runner.stages
            for bucket, executable in stage.executables.items()
        ]
    return tokens, programs


def test_engine_greedy_tokens_match_with_the_kernel_off(tiny_llama, monkeypatch):
    """Tiny Llama (GQA 4:2, head dim 16), prompts of 1 to 40 tokens, 20 greedy tokens that cross
    8-token blocks: the same tokens with the kernel and without; every program holds the custom
    call (decode rows and prefill chunks), none with the kernel switched off."""
    rng = np.random.default_rng(20)
    prompts = [rng.integers(5, 500, size=n).tolist() for n in (1, 7, 8, 23, 40)]
    with_kernel, programs = _greedy_and_programs(tiny_llama, prompts)
    monkeypatch.setenv("JAXINFER_CPU_KERNELS", "0")
    without, programs_off = _greedy_and_programs(tiny_llama, prompts)
    assert with_kernel == without
    assert all(len(tokens) == 20 for tokens in with_kernel)
    assert any(prefill for prefill, _, _ in programs)
    assert any(not prefill for prefill, _, _ in programs)
    assert all("jaxinfer_paged_attention_f32" in text for *_, text in programs)
    assert not any("jaxinfer_paged_attention" in text for *_, text in programs_off)


def test_the_benchmark_quick_run_fills_its_table(tmp_path):
    """benchmarks/cpu_attention.py stays runnable and compares the same two computations."""
    path = Path(__file__).parents[2] / "benchmarks" / "cpu_attention.py"
    spec = importlib.util.spec_from_file_location("cpu_attention_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(
        ["--quick", "--kv-cache-dtype", "fp8", "--out", str(tmp_path / "out.json")]
    )
    assert json.loads((tmp_path / "out.json").read_text()) == report
    assert [(r["rows"], r["contexts"]) for r in report["results"]] == [
        (1, "equal"),
        (1, "ragged"),
        (16, "equal"),
        (16, "ragged"),
    ]
    assert [(r["step"], r["tokens"]) for r in report["prefill"]] == [("4 x 128 fresh", 512)]
    for row in report["results"] + report["prefill"]:
        assert row["reference_ms"] > 0 and row["kernel_ms"] > 0
        assert row["max_abs_diff"] < 1e-5
    assert all(row["kernel_fp8_ms"] > 0 for row in report["results"])  # the fp8 column
