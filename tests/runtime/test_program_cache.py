"""runtime/program_cache.py without JAX: each program compiled once whatever the threads, counted
once, a failed compile leaving nothing behind; the warm-up's job runner overlaps jobs, raises the
first failure and starts nothing after it."""

from __future__ import annotations

import threading
import time

import pytest

from jaxinfer.runtime import program_cache
from jaxinfer.runtime.program_cache import ProgramCache, compile_concurrently


def test_one_compile_per_key_when_threads_ask_together():
    announced, builds = [], []
    cache = ProgramCache(announced.append)
    table: dict = {}
    start = threading.Barrier(8)

    def build(key):
        builds.append(key)
        time.sleep(0.05)  # long enough that the other threads arrive while it compiles
        return f"program {key}"

    def ask(key):
        start.wait()
        return cache.get(table, key, f"program {key}", lambda: build(key))

    results: list = [None] * 8
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, ask(i % 2))) for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(builds) == [0, 1]
    assert results == ["program 0", "program 1"] * 4
    assert cache.num_compilations == 2 and sorted(announced) == ["program 0", "program 1"]
    assert cache.compile_seconds >= 0.1  # summed over the two (overlapping) compiles
    assert cache.get(table, 0, "again", lambda: pytest.fail("compiled twice")) == "program 0"


def test_the_same_key_in_two_tables_is_two_programs():
    cache = ProgramCache(lambda what: None)
    samplers, writers = {}, {}
    assert cache.get(samplers, 8, "sampler", lambda: "s") == "s"
    assert cache.get(writers, 8, "writer", lambda: "w") == "w"
    assert (samplers, writers, cache.num_compilations) == ({8: "s"}, {8: "w"}, 2)


def test_a_failed_compile_stores_nothing_and_the_next_call_retries():
    cache = ProgramCache(lambda what: None)
    table: dict = {}

    def broken():
        raise RuntimeError("XLA said no")

    with pytest.raises(RuntimeError, match="XLA said no"):
        cache.get(table, "bucket", "bucket", broken)
    assert table == {} and cache.num_compilations == 0
    assert cache.get(table, "bucket", "bucket", lambda: "ok") == "ok"
    assert cache.num_compilations == 1


def test_jobs_overlap_on_threads(monkeypatch):
    monkeypatch.setattr(program_cache.os, "cpu_count", lambda: 4)
    running, peak, lock = [0], [0], threading.Lock()

    def job():
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1

    compile_concurrently([job] * 8, max_threads=3)
    assert peak[0] == 3  # min(jobs, cores, max_threads)


def test_one_core_runs_the_jobs_in_order_on_this_thread(monkeypatch):
    monkeypatch.setattr(program_cache.os, "cpu_count", lambda: 1)
    seen = []
    jobs = [lambda i=i: seen.append((i, threading.current_thread())) for i in range(4)]
    compile_concurrently(jobs)
    assert seen == [(i, threading.main_thread()) for i in range(4)]


def test_a_failing_job_raises_and_the_queued_ones_never_start(monkeypatch):
    monkeypatch.setattr(program_cache.os, "cpu_count", lambda: 2)
    started, release = [], threading.Event()
    threading.Timer(0.5, release.set).start()  # lets the running jobs end after the failure

    def held(i):  # a compile still running when the failure arrives
        started.append(i)
        release.wait(5)

    def failing():
        started.append("failing")
        raise ValueError("bad bucket")

    jobs = [failing] + [lambda i=i: held(i) for i in range(6)]
    began = time.perf_counter()
    with pytest.raises(ValueError, match="bad bucket"):
        compile_concurrently(jobs, max_threads=2)
    # Two threads: the failing job and job 0 start; the failing job's thread may take job 1
    # before the failure reaches the caller; the rest were cancelled, never started.
    assert started[0] in ("failing", 0) and len(started) <= 3, started
    assert set(started) <= {"failing", 0, 1}
    # ... and the call returned only after the running ones finished (no half-built program).
    assert time.perf_counter() - began >= 0.4 and release.is_set()


def test_the_environment_sets_the_thread_limit(monkeypatch):
    monkeypatch.setattr(program_cache.os, "cpu_count", lambda: 16)
    monkeypatch.delenv("JAXINFER_COMPILE_THREADS", raising=False)
    assert program_cache.max_compile_threads() == program_cache.MAX_COMPILE_THREADS
    monkeypatch.setenv("JAXINFER_COMPILE_THREADS", "1")
    seen = []
    compile_concurrently([lambda: seen.append(threading.current_thread())] * 3)
    assert seen == [threading.main_thread()] * 3  # one thread: in order, on the caller's
    for bad in ("0", "two", "-3"):
        monkeypatch.setenv("JAXINFER_COMPILE_THREADS", bad)
        with pytest.raises(ValueError, match="JAXINFER_COMPILE_THREADS must be a positive"):
            compile_concurrently([lambda: None] * 2)


def test_inside_a_thread_local_jax_setting_the_warm_up_stays_on_this_thread(monkeypatch):
    """Threads do not inherit `with jax.default_matmul_precision(...)`: compiling there would give
    programs other than the ones this thread compiles for the same shapes later."""
    import jax

    monkeypatch.setattr(program_cache.os, "cpu_count", lambda: 4)
    monkeypatch.delenv("JAXINFER_COMPILE_THREADS", raising=False)

    def threads_used() -> set:
        seen = set()
        compile_concurrently([lambda: seen.add(threading.current_thread())] * 4)
        return seen

    assert program_cache.threads_trace_like_this_one()
    assert threading.main_thread() not in threads_used()
    with jax.default_matmul_precision("highest"):
        assert not program_cache.threads_trace_like_this_one()
        assert threads_used() == {threading.main_thread()}
    assert program_cache.threads_trace_like_this_one()  # the block left: threads again
