"""Decode tuning for the Pallas paged-attention kernel: its tile knobs searched on the device at
hand, one knob at a time, against the device's read bandwidth.

    python benchmarks/paged_attention_sweep.py                  # on a GPU
    python benchmarks/paged_attention_sweep.py --quick          # CPU smoke run (interpreted)

Why: `default_tiling` (pallas_kernels/paged_attention.py) was written before the kernel first ran
on a GPU; the H200's first run read 70-73% of the device's read bandwidth at long context, and
Triton's software pipelining (`num_stages`), the warps per program, the keys loaded per loop step
(`pages_per_step`) and the split-K count (`num_splits`) decide how many bytes are in flight.

How: for each (batch, context) cell, start from the defaults, then for each knob in turn try its
values with the others at the best so far and keep the fastest (a coordinate search: a few dozen
compilations per cell, not the full product). Each timing is the median of `--repeats` runs
after a warm-up (paged_attention.timed). The search stops at `--time-limit` seconds and writes
what it has (a GPU lease is short). Table on stdout, JSON to `--out`.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from paged_attention import format_table, random_paged_batch, run_header, timed
from roofline import measure_device_bandwidth

from pallas_kernels import paged_attention as kernel

# Values tried per knob, in search order. `num_splits` is tried as multiples of the default.
DECODE_KNOBS: dict[str, tuple] = {
    "pages_per_step": (2, 4, 8, 16),
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3, 4),
    "split_factor": (0.5, 1, 2, 4),
}
# Prefill (fresh prompts: every key is one of the step's new tokens): the query tile's tokens
# (rows = tokens x the padded GQA group) and the keys per loop step decide the dots' sizes.
PREFILL_KNOBS: dict[str, tuple] = {
    "tokens_per_tile": (8, 16, 32),
    "new_keys_per_step": (32, 64, 128),
    "num_warps": (4, 8),
    "num_stages": (1, 2, 3, 4),
}
# Points that move several knobs at once, tried from the best of the one-knob search: flash
# attention's usual Hopper prefill tile (128 query rows: 32 tokens x a GQA group of 4, 8 warps),
# which one knob at a time never reaches (128 rows with 4 warps, or 8 warps with 64 rows, are
# both slower than the defaults).
PREFILL_JOINT: tuple[dict, ...] = (
    {"tokens_per_tile": 32, "num_warps": 8, "num_stages": 2},
    {"tokens_per_tile": 32, "num_warps": 8, "num_stages": 3},
    {"tokens_per_tile": 32, "num_warps": 8, "num_stages": 3, "new_keys_per_step": 32},
)


def _cells(text: str) -> list[tuple[int, int]]:
    """'64x32768,256x8192' -> [(64, 32768), (256, 8192)]; '' -> [] (none of that case)"""
    return [tuple(int(n) for n in cell.split("x")) for cell in text.split(",") if cell]  # type: ignore[misc]


def knob_settings(knobs: dict, default_splits: int) -> dict:
    """The kernel's keyword arguments for a point of the search."""
    settings = {name: value for name, value in knobs.items() if name != "split_factor"}
    if "split_factor" not in knobs:
        return settings
    splits = max(1, min(64, round(default_splits * knobs["split_factor"])))
    return {**settings, "num_splits": splits}


def search_cell(
    args, batch: int, context: int, read_rate: float, deadline: float, *, prefill: bool = False
) -> list[dict]:
    """Rows for every point tried on one cell: decode (one new token per sequence, `context`
    cached) or prefill (`context` new tokens per sequence, nothing cached)."""
    q_len = context if prefill else 1
    inputs = random_paged_batch(jax.random.key(0), args, batch=batch, context=context, q_len=q_len)
    kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * jnp.dtype(args.dtype).itemsize
    flops = 4 * batch * context * context / 2 * args.heads * args.head_dim
    defaults = kernel.default_tiling(
        group=args.heads // args.kv_heads,
        block_size=args.block_size,
        decode_only=not prefill,
        table_positions=inputs[5].shape[1] * args.block_size,
        num_seqs=batch,
        kv_heads=args.kv_heads,
    )
    if prefill:
        best = {name: defaults[name] for name in PREFILL_KNOBS}
    else:
        best = {name: defaults[name] for name in DECODE_KNOBS if name != "split_factor"}
        best["split_factor"] = 1
    rows: list[dict] = []
    seen: dict[tuple, float] = {}

    def measure(knobs: dict) -> float | None:
        settings = knob_settings(knobs, defaults["num_splits"])
        key = tuple(sorted(settings.items()))
        if key in seen:
            return seen[key]
        if time.monotonic() > deadline:
            return None
        fn = jax.jit(
            functools.partial(
                kernel.paged_attention,
                scale=args.head_dim**-0.5,
                decode_only=not prefill,
                interpret=args.interpret,
                **settings,
            )
        )
        row = {"case": "prefill" if prefill else "decode", "batch": batch, "context": context}
        row.update(settings)
        try:
            seconds = timed(fn, *inputs, repeats=args.repeats)
        except Exception as error:  # noqa: BLE001 (a knob value the compiler refuses: report it)
            seen[key] = float("inf")
            rows.append({**row, "error": str(error)[:160]})
            return float("inf")
        seen[key] = seconds
        if prefill:
            rows.append({**row, "ms": seconds * 1e3, "TFLOP/s": flops / seconds / 1e12})
        else:
            rate = kv_bytes / seconds
            row.update(ms=seconds * 1e3, of_read_bw=rate / read_rate)
            rows.append({**row, "GB/s": rate / 1e9})
        return seconds

    best_seconds = measure(best)
    if best_seconds is not None:
        rows[-1]["default"] = True
    for name, values in (PREFILL_KNOBS if prefill else DECODE_KNOBS).items():
        for value in values:
            seconds = measure({**best, name: value})
            if seconds is None:
                break
            if best_seconds is None or seconds < best_seconds:
                best, best_seconds = {**best, name: value}, seconds
    for joint in PREFILL_JOINT if prefill else ():
        seconds = measure({**best, **joint})
        if seconds is not None and (best_seconds is None or seconds < best_seconds):
            best, best_seconds = {**best, **joint}, seconds
    for row in rows:
        row["best"] = row.get("ms") == (best_seconds or 0) * 1e3
    return rows  # the cell's cache (up to ~9 GB) is freed with this frame


COLUMNS = (
    "case",
    "batch",
    "context",
    "tokens_per_tile",
    "new_keys_per_step",
    "pages_per_step",
    "num_warps",
    "num_stages",
    "num_splits",
    "ms",
    "GB/s",
    "of_read_bw",
    "TFLOP/s",
    "default",
    "best",
    "error",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, interpreted (CPU)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--cells",
        type=_cells,
        default=_cells("64x32768,256x8192,8x8192,64x2048,1x32768"),
        help="decode (batch x context) cells, searched in this order",
    )
    parser.add_argument(
        "--prefill-cells",
        type=_cells,
        default=_cells("4x2048,1x8192,16x512"),
        help="prefill (batch x prompt length) cells, searched after the decode cells",
    )
    parser.add_argument("--time-limit", type=float, default=150.0, help="seconds for the search")
    parser.add_argument(
        "--out", default=str(Path(__file__).with_name("paged_attention_sweep.json"))
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    started = time.monotonic()
    args = parse_args(argv)
    args.dtype = jnp.dtype(args.dtype)
    args.heads, args.kv_heads, args.head_dim, args.block_size = 32, 8, 128, 16
    args.interpret = jax.default_backend() != "gpu"
    read_bytes = 4 << 30  # roofline.py's size: at 1 GiB a sum's launch cost shows (2.6 vs 3.8 TB/s)
    if args.quick:
        args.heads, args.kv_heads, args.head_dim = 4, 1, 64
        args.cells, args.prefill_cells = [(3, 200)], [(2, 40)]
        args.repeats, read_bytes = 1, 1 << 22
    read_rate = measure_device_bandwidth(read_bytes, max(args.repeats, 10))
    deadline = started + args.time_limit
    rows: list[dict] = []
    for batch, context in args.cells:
        if time.monotonic() > deadline:
            break
        rows += search_cell(args, batch, context, read_rate, deadline)
    for batch, context in args.prefill_cells:
        if time.monotonic() > deadline:
            break
        rows += search_cell(args, batch, context, read_rate, deadline, prefill=True)
    seconds = time.monotonic() - started
    result = {**run_header(args, read_rate, f"; {seconds:.0f} s"), "seconds": seconds, "rows": rows}
    print(format_table(rows, COLUMNS))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
