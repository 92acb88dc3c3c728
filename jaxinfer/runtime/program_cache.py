"""Compiled programs held by key, each compiled once even when several threads ask for it at once,
a warm-up that compiles them on a thread pool, and the switch that persists them on disk (JAX's
compilation cache).

Why threads: a warm-up compiles every bucket's programs (dozens: each bucket's forward pass, a
cache writer per token count, a sampler per sequence count, ...), and one XLA compilation keeps
about one core busy. The compiler releases the GIL, so compiling on several threads overlaps them.
Measured on the 2-core CPU container (SmolLM2-135M, the 24 forward programs of an engine with
max_num_seqs=8, max_num_batched_tokens=128, no compilation cache): 16.8 s one after another,
12.4 s on two threads (`benchmarks/warmup.py` has the whole warm-up). A GPU host has more cores
(16 on the H200 machine lent to this project) and overlaps more.

A program several buckets share (the sampler for 8 sequences, the cache writer for 128 tokens)
is compiled by the first thread that needs it while the others wait on its key's lock, so each
program is compiled, counted and timed once whatever the order. Thread-local JAX settings (a
`with jax.default_matmul_precision(...)` block) do not reach other threads, so inside one the
warm-up compiles on the caller's thread alone.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

logger = logging.getLogger(__name__)

Program = TypeVar("Program")

# Threads a warm-up compiles on, at most (and never more than the host's cores): each compilation
# holds its own working memory, so a large model's warm-up should not multiply it without bound.
# $JAXINFER_COMPILE_THREADS overrides it (1: one program at a time, as before 2026-12-04).
MAX_COMPILE_THREADS = 8
COMPILE_THREADS_ENV = "JAXINFER_COMPILE_THREADS"


def max_compile_threads() -> int:
    """$JAXINFER_COMPILE_THREADS if set (a positive integer), else MAX_COMPILE_THREADS."""
    configured = os.environ.get(COMPILE_THREADS_ENV, "").strip()
    if not configured:
        return MAX_COMPILE_THREADS
    if not configured.isdigit() or int(configured) < 1:
        raise ValueError(f"${COMPILE_THREADS_ENV} must be a positive integer, got {configured!r}")
    return int(configured)


class ProgramCache:
    """Counts and times compilations (`num_compilations`, `compile_seconds`: the sum over
    programs, more than the wall time when they overlap) and compiles each (table, key) once."""

    def __init__(self, announce: Callable[[str], None]) -> None:
        self.num_compilations = 0
        self.compile_seconds = 0.0
        self._announce = announce
        self._lock = threading.Lock()
        self._key_locks: dict[tuple[int, Hashable], threading.Lock] = {}

    def get(self, table: dict, key: Hashable, what: str, build: Callable[[], Program]) -> Program:
        """`table[key]`, compiled by `build()` first if missing (`what` names it for the log and
        the progress bar). Concurrent callers for the same key wait for one compilation."""
        program = table.get(key)
        if program is not None:
            return program  # every step after warm-up: no lock taken
        with self._lock:
            key_lock = self._key_locks.setdefault((id(table), key), threading.Lock())
        with key_lock:
            program = table.get(key)
            if program is None:
                self._announce(what)
                started = time.perf_counter()
                program = build()
                table[key] = program
                elapsed = time.perf_counter() - started
                with self._lock:
                    self.compile_seconds += elapsed
                    self.num_compilations += 1
                logger.debug("compiled %s in %.2fs", what, elapsed)
        return program


def compile_concurrently(
    jobs: Sequence[Callable[[], object]], max_threads: int | None = None
) -> None:
    """Run the compile `jobs` on up to `max_threads` threads (default `max_compile_threads()`;
    never more than the cores; one: in order, on this thread). On this thread alone while the
    caller holds thread-local JAX settings (inside `with jax.default_matmul_precision(...)`, say):
    other threads would not see them, and a warmed-up program must be the one this thread would
    compile for the same shape later.

    The first job to fail raises here; jobs not yet started are cancelled and the running ones
    finish first, so every table entry is a whole program (Ctrl-C likewise)."""
    if max_threads is None:
        max_threads = max_compile_threads()
    threads = min(len(jobs), os.cpu_count() or 1, max_threads)
    if threads > 1 and not threads_trace_like_this_one():
        threads = 1
    if threads <= 1:
        for job in jobs:
            job()
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="jaxinfer-compile")
    try:
        for future in [pool.submit(job) for job in jobs]:
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def threads_trace_like_this_one() -> bool:
    """Whether a new thread traces under this thread's JAX settings, by jit's own cache key for
    them (`trace_context`: private, so anything unexpected answers False, one thread)."""
    try:
        from jax._src.config import trace_context

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(trace_context).result() == trace_context()
    except Exception:  # noqa: BLE001 (a jax without it, or another failure: the safe answer)
        return False


def enable_compilation_cache(path: str) -> None:
    """Persist compiled executables across processes (JAX's own cache; CPU and GPU alike)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
