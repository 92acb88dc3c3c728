"""The CPU row-statistics kernel (jaxinfer/kernels/cpu/row_stats.cc) against numpy float64, and
the sampler's use of it.

argmax, max, shift and finite are exact quantities: the kernel must give numpy's values (the first
maximum of the masked row, a NaN counting as the maximum; finiteness of the raw row).

log_sum tolerance, derived rather than measured: each term exp(x_i - shift) comes from Cephes'
expf (a degree-5 polynomial after a two-part ln 2 reduction, no fused multiply-adds) within 4 u
relative error (u = 2^-24, float32 rounding; the polynomial's own error is ~1 u, the reduction
and the scaling add at most 3 roundings); each lane's compensated (Kahan) sum adds at most 2 u
relative error plus terms of order n u^2, the 16-lane tree 4 u; log rounds once more (u of the
result) and turns a relative error e of the sum into an absolute error e. So
|log_sum - exact| <= 12 u + u |exact| (+ n u^2, 3e-11 at n = 9,496), 7e-7 + 6e-8 |exact|.
Dropping any term of a row whose terms are at least 1e-3 of its sum, or a wrong shift, exceeds
it by orders of magnitude (the mutation test below drops one).

Invariance: a row's results must be bitwise the same whatever the row count, its position and the
threads (the kernel's order depends on V alone), and the AVX2 and portable builds must give the
AVX-512 build's bits.
"""

from __future__ import annotations

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.kernels import row_stats as kernel
from jaxinfer.kernels.native_build import build_shared_library
from jaxinfer.runtime import slot_state as slots
from jaxinfer.runtime.sampling import apply_token_bitmask, logit_stats
from jaxinfer.runtime.sampling_tensors import SamplingTensors
from jaxinfer.runtime.step import sample_rows
from jaxinfer.seam import SamplingScalars

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu",
    reason="the row-statistics kernel is registered for XLA:CPU only (the jnp path the other "
    "backends take is tests/runtime/test_sampling.py's and this file's fallback test's)",
)

U = 2.0**-24
FIELDS = ("argmax", "max", "shift", "log_sum", "finite")


def log_sum_bound(exact: np.ndarray) -> np.ndarray:
    return 12 * U + U * np.abs(exact)


def random_bitmask(rng: np.random.Generator, rows: int, vocab: int, keep: float) -> np.ndarray:
    """[rows, ceil(V / 32)] int32, each token allowed with probability `keep` (1: all ones)."""
    allowed = rng.random((rows, -(-vocab // 32) * 32)) < keep
    allowed[:, vocab:] = rng.random((rows, allowed.shape[1] - vocab)) < 0.5  # padding bits: any
    words = (allowed.reshape(rows, -1, 32) * (1 << np.arange(32, dtype=np.uint64))).sum(-1)
    return words.astype(np.uint64).astype(np.uint32).view(np.int32)


def numpy_stats(x: np.ndarray, bitmask: np.ndarray) -> dict[str, np.ndarray]:
    """What the kernel must give, in float64 where it rounds."""
    vocab = x.shape[1]
    bits = (bitmask.view(np.uint32)[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1
    allowed = bits.reshape(x.shape[0], -1)[:, :vocab].astype(bool)
    masked = np.where(allowed, x, -np.inf)
    top = masked.max(-1)  # NaN where any
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        log_sum = np.log(np.exp(masked.astype(np.float64) - shift[:, None]).sum(-1))
    return {
        "argmax": np.argmax(masked, -1),
        "max": top,
        "shift": shift,
        "log_sum": log_sum,
        "finite": np.isfinite(x).all(-1),
    }


def kernel_stats(x: np.ndarray, bitmask: np.ndarray | None, **kw) -> dict[str, np.ndarray]:
    stats = jax.jit(functools.partial(kernel.row_stats, **kw))(x, bitmask)
    return {name: np.asarray(getattr(stats, name)).reshape(len(x)) for name in FIELDS}


def assert_matches_numpy(x: np.ndarray, bitmask: np.ndarray) -> None:
    got, want = kernel_stats(x, bitmask), numpy_stats(x, bitmask)
    for name in ("argmax", "max", "shift", "finite"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    exact = want["log_sum"]
    finite = np.isfinite(exact)
    error = np.abs(got["log_sum"][finite] - exact[finite])
    assert (error <= log_sum_bound(exact[finite])).all(), (error.max(), exact[finite])
    np.testing.assert_array_equal(got["log_sum"][~finite], exact[~finite].astype(np.float32))


@pytest.mark.parametrize(
    ("rows", "vocab", "scale", "keep"),
    [(1, 49152, 4.0, 1.0), (3, 17, 1.0, 1.0), (5, 1000, 30.0, 0.3), (2, 151936, 8.0, 0.9),
     (4, 1, 1.0, 1.0), (6, 33, 2.0, 0.5)],
)  # fmt: skip
def test_stats_against_float64(rows, vocab, scale, keep):
    rng = np.random.default_rng(vocab + rows)
    x = (rng.standard_normal((rows, vocab)) * scale).astype(np.float32)
    bitmask = random_bitmask(rng, rows, vocab, keep)
    bitmask[0] = -1  # one unconstrained row whatever `keep`
    if vocab > 1:
        bitmask[0, 0] |= 1  # the first token allowed somewhere
    assert_matches_numpy(x, bitmask)


def test_special_rows():
    """Ties, infinities, NaN, masked NaN, all -inf and all-masked rows: numpy's argmax and
    finiteness, and the batch-invariant log-softmax's normalizer (shift 0 for a non-finite max)."""
    inf, nan = np.inf, np.nan
    x = np.array(
        [
            [2.0, 5.0, 5.0, 1.0, 0.0],  # a tie: the first
            [1.0, nan, 3.0, nan, 0.0],  # the first NaN
            [1.0, inf, inf, 2.0, 0.0],  # the first +inf: log_sum +inf
            [-inf, -inf, -inf, -inf, -inf],  # argmax 0, log_sum -inf
            [-inf, 3.0, -inf, 3.0, 1.0],  # masked entries in the model's own logits
            [nan, 1.0, 2.0, 0.5, 0.25],  # a NaN the mask removes: not the argmax, not finite
            [1.0, 2.0, 3.0, 4.0, 5.0],  # every token masked: -inf
        ],
        np.float32,
    )
    bitmask = np.full((len(x), 1), -1, np.int32)
    bitmask[5, 0] = ~1  # token 0 banned
    bitmask[6, 0] = 0
    assert_matches_numpy(x, bitmask)
    got = kernel_stats(x, bitmask)
    assert got["argmax"].tolist() == [1, 1, 1, 0, 1, 2, 0]
    assert got["finite"].tolist() == [True, False, False, False, False, False, True]


def test_a_dropped_term_fails_the_bound():
    """The bound is tight enough to see one term of the sum missing (a mutation of the result)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 3000)) * 2).astype(np.float32)
    bitmask = np.full((4, 94), -1, np.int32)
    want = numpy_stats(x, bitmask)["log_sum"]
    dropped = np.log(np.exp(want) - np.exp(x[:, 100].astype(np.float64) - x.max(-1)))
    assert (np.abs(dropped - want) > log_sum_bound(want)).all()


def test_a_row_gives_the_same_bits_in_any_batch_and_on_any_thread_count():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((7, 5000)) * 3).astype(np.float32)
    bitmask = random_bitmask(rng, 7, 5000, 0.7)
    together = kernel_stats(x, bitmask)
    single_thread = kernel_stats(x, bitmask, max_threads=1)
    for row in range(7):
        alone = kernel_stats(x[row : row + 1], bitmask[row : row + 1])
        for name in FIELDS:
            assert alone[name][0] == together[name][row] == single_thread[name][row], name


# ---- the top logprobs --------------------------------------------------------------------------


def jnp_top_logprobs(x, tokens, shift, log_sum, k):
    """The jnp formulas of sampling.top_logprobs_of_logits for a given normalizer."""
    token_logprob = (jnp.take_along_axis(x, tokens[:, None], axis=-1) - shift) - log_sum
    rank = jnp.sum((x - shift) - log_sum >= token_logprob, axis=-1, dtype=jnp.int32)
    values, ids = jax.lax.top_k(x, k)
    return token_logprob[:, 0], rank, ids, (values - shift) - log_sum


@pytest.mark.parametrize(
    ("rows", "vocab", "k", "ties"),
    [(5, 1000, 20, False), (7, 300, 5, True), (3, 49152, 1, False), (4, 40, 40, True),
     (2, 100, 0, False), (3, 600, 20, True)],
)  # fmt: skip
def test_top_logprobs_are_the_jnp_formulas_bit_for_bit(rows, vocab, k, ties):
    """Given the same normalizer: the token logprob, the rank (ties counted, as vLLM) and the top
    logprobs are the same float32 operations, so the same bits; the top ids are lax.top_k's, ties
    by the lower index and -0 below +0 (rounded logits make many ties and signed zeros)."""
    rng = np.random.default_rng(rows * vocab + k)
    x = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    if ties:
        x = np.round(x).astype(np.float32)
    tokens = rng.integers(0, vocab, rows).astype(np.int32)
    stats = jax.jit(kernel.row_stats)(x)
    got = jax.jit(kernel.top_logprobs, static_argnums=4)(x, tokens, stats.shift, stats.log_sum, k)
    want = jax.jit(jnp_top_logprobs, static_argnums=4)(x, tokens, stats.shift, stats.log_sum, k)
    for name, a, b in zip(("token_logprob", "rank", "top_ids", "top_logprobs"), got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_top_logprobs_skip_nan_and_fill_short_rows():
    """A NaN never enters the top k (lax.top_k would rank it first; such a row's logits are
    reported non-finite); a row with fewer than k other entries pads with NaN logprobs."""
    x = np.array([[1.0, np.nan, 3.0, 2.0], [np.nan, np.nan, np.nan, 5.0]], np.float32)
    stats = jax.jit(kernel.row_stats)(x)
    _, _, ids, values = jax.jit(kernel.top_logprobs, static_argnums=4)(
        x, np.array([0, 3], np.int32), stats.shift, stats.log_sum, 3
    )
    assert np.asarray(ids)[0].tolist() == [2, 3, 0]
    assert np.asarray(ids)[1, 0] == 3 and np.isnan(np.asarray(values)[1, 1:]).all()


def test_a_later_plus_zero_displaces_a_minus_zero():
    """lax.top_k puts +0 above -0: a block whose maximum only equals the k-th value as a float
    must still be looked at (its +0 beats the list's -0)."""
    x = np.full((1, 600), -1.0, np.float32)
    x[0, 5], x[0, 400] = -0.0, 0.0
    stats = jax.jit(kernel.row_stats)(x)
    _, _, ids, _ = jax.jit(kernel.top_logprobs, static_argnums=4)(
        x, np.zeros(1, np.int32), stats.shift, stats.log_sum, 1
    )
    assert np.asarray(ids)[0].tolist() == [400] == np.asarray(jax.lax.top_k(x, 1)[1])[0].tolist()


OTHER_ISAS = [
    ("avx2", ("-mno-avx512f",)),
    ("portable", ("-mno-avx2", "-mno-fma", "-mno-avx512f")),
]


@pytest.mark.parametrize(("isa", "flags"), OTHER_ISAS)
def test_other_instruction_sets_give_the_same_bits(isa, flags):
    path = build_shared_library(kernel.SOURCE, (jax.ffi.include_dir(),), extra_flags=flags)
    assert path is not None
    library = ctypes.CDLL(str(path))
    library.JaxinferRowStatsIsa.restype = ctypes.c_char_p
    assert library.JaxinferRowStatsIsa().decode() == isa
    target = f"jaxinfer_row_stats_test_{isa}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(library.JaxinferRowStats), platform="cpu")
    top_target = f"jaxinfer_top_logprobs_test_{isa}"
    top_handler = jax.ffi.pycapsule(library.JaxinferTopLogprobs)
    jax.ffi.register_ffi_target(top_target, top_handler, platform="cpu")
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((5, 4099)) * 6).astype(np.float32)
    x[3, 17] = np.inf
    bitmask = random_bitmask(rng, 5, 4099, 0.8)
    rows = x.shape[0]
    shapes = (jax.ShapeDtypeStruct((rows,), jnp.int32),) + 3 * (
        jax.ShapeDtypeStruct((rows,), jnp.float32),
    ) + (jax.ShapeDtypeStruct((rows,), jnp.int32),)  # fmt: skip
    call = jax.ffi.ffi_call(target, shapes)
    other = jax.jit(lambda a, b: call(a, b, max_threads=np.int64(0)))(x, bitmask)
    ours = kernel_stats(x, bitmask)
    for name, value in zip(FIELDS, other, strict=True):
        np.testing.assert_array_equal(np.asarray(value).astype(ours[name].dtype), ours[name])
    tokens = rng.integers(0, x.shape[1], rows).astype(np.int32)
    shift, log_sum = ours["shift"][:, None], ours["log_sum"][:, None]
    top_shapes = (
        jax.ShapeDtypeStruct((rows,), jnp.float32),
        jax.ShapeDtypeStruct((rows,), jnp.int32),
        jax.ShapeDtypeStruct((rows, 7), jnp.int32),
        jax.ShapeDtypeStruct((rows, 7), jnp.float32),
    )
    top_call = jax.ffi.ffi_call(top_target, top_shapes)
    other_top = jax.jit(lambda *a: top_call(*a, max_threads=np.int64(0)))(
        x, tokens, shift[:, 0], log_sum[:, 0]
    )
    our_top = jax.jit(kernel.top_logprobs, static_argnums=4)(x, tokens, shift, log_sum, 7)
    for a, b in zip(other_top, our_top, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- the sampler ---------------------------------------------------------------------------------


def _sampler_args(rng: np.random.Generator, rows: int, vocab: int, want_logprobs: bool):
    neutral = SamplingTensors.neutral(rows, vocab)
    scalars = {name: getattr(neutral, name) for name in SamplingScalars.specs()}
    scalars["temperature"] = np.where(np.arange(rows) % 3 == 2, 0.8, 0.0).astype(np.float32)
    scalars["seeds"] = np.arange(rows, dtype=np.uint32)
    bitmask = random_bitmask(rng, rows, vocab, 0.6)
    bitmask[::2] = -1  # structured output on the odd rows only
    state = slots.allocate(rows, vocab)
    slot_rows = slots.gather_rows(
        state, jnp.arange(rows, dtype=jnp.int32), jnp.full((rows, 1), vocab, jnp.int32)
    )
    inputs = {
        "want_logprobs": np.full(rows, want_logprobs),
        "token_bitmask": bitmask,
        "sampling": SamplingScalars(**scalars),
    }
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    return logits, slot_rows, inputs


def _compile_sampler(logits, slot_rows, inputs, monkeypatch, kernels: bool):
    monkeypatch.setenv("JAXINFER_CPU_KERNELS", "1" if kernels else "0")
    function = jax.jit(functools.partial(sample_rows, max_top_k=8, num_logprobs=3))
    return function.lower(logits, slot_rows, inputs).compile()


def test_the_sampler_takes_the_kernel_and_keeps_its_tokens(monkeypatch):
    """`sample_rows` on the CPU lowers its argmax and normalizer to one kernel call; its tokens
    and top-logprob ids are the jnp path's, its logprobs within the derived bound of them (the two
    normalizers differ in rounding only), the finite flag the raw logits'. A row's logprob is the
    same number whether or not some row of the batch asked for top logprobs (the two branches of
    `want_logprobs`, one compiled program)."""
    import jaxinfer.runtime.seam_pytrees  # noqa: F401  (SamplingScalars as a pytree)

    rng = np.random.default_rng(5)
    logits, slot_rows, inputs = _sampler_args(rng, 6, 300, want_logprobs=False)
    logits[4, 9] = np.inf  # a non-finite row is reported, whatever the mask
    with_kernel = _compile_sampler(logits, slot_rows, inputs, monkeypatch, kernels=True)
    assert with_kernel.as_text().count('custom_call_target="jaxinfer_row_stats"') >= 1
    without = _compile_sampler(logits, slot_rows, inputs, monkeypatch, kernels=False)
    assert "jaxinfer_row_stats" not in without.as_text()
    finite = np.isfinite(logits).all(-1)
    masked = np.asarray(apply_token_bitmask(jnp.asarray(logits), inputs["token_bitmask"]))
    want = numpy_stats(logits, inputs["token_bitmask"])
    results = {}
    for want_logprobs in (False, True):
        asked = {**inputs, "want_logprobs": np.full(6, want_logprobs)}
        ours = {k: np.asarray(v) for k, v in with_kernel(logits, slot_rows, asked).items()}
        theirs = {k: np.asarray(v) for k, v in without(logits, slot_rows, asked).items()}
        results[want_logprobs] = ours
        np.testing.assert_array_equal(ours["tokens"], theirs["tokens"])
        np.testing.assert_array_equal(ours["logits_finite"], finite)
        np.testing.assert_array_equal(theirs["logits_finite"], finite)
        chosen = masked[np.arange(6), ours["tokens"]].astype(np.float64)
        exact_logprob = chosen - want["shift"] - want["log_sum"]
        # the normalizer's bound, and the subtraction's rounding
        bound = log_sum_bound(want["log_sum"]) + U * np.abs(exact_logprob)
        error = np.abs(ours["token_logprob"] - exact_logprob)
        assert (error[finite] <= 2 * bound[finite]).all()
    asked = results[True]
    np.testing.assert_array_equal(asked["token_logprob"], results[False]["token_logprob"])
    np.testing.assert_array_equal(asked["top_ids"][finite], theirs["top_ids"][finite])
    np.testing.assert_array_equal(asked["token_rank"][finite], theirs["token_rank"][finite])
    # the reported token's logprob is the same number as its entry among the top logprobs
    first = (asked["top_ids"][:, 0] == asked["tokens"]) & finite
    np.testing.assert_array_equal(asked["top_logprobs"][first, 0], asked["token_logprob"][first])


def test_logit_stats_falls_back_to_jnp(monkeypatch):
    """With the kernels off, `logit_stats` gives the same argmax / finite (exact) and the
    normalizer close to float64 (XLA's own sum, uncompensated: within 700 terms' worth of
    rounding, which the kernel's bound times 4 covers at this V)."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((3, 700)) * 5).astype(np.float32)
    bitmask = random_bitmask(rng, 3, 700, 0.5)
    monkeypatch.setenv("JAXINFER_CPU_KERNELS", "0")
    plain = jax.jit(logit_stats)(x, bitmask)
    want = numpy_stats(x, bitmask)
    np.testing.assert_array_equal(np.asarray(plain.argmax), want["argmax"])
    np.testing.assert_array_equal(np.asarray(plain.finite), want["finite"])
    error = np.abs(np.asarray(plain.log_sum)[:, 0] - want["log_sum"])
    assert (error <= 4 * log_sum_bound(want["log_sum"])).all()
