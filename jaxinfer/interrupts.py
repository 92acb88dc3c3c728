"""Hold Ctrl-C back while a donated buffer is being swapped for its replacement.

The runner calls executables that donate their input (the KV cache, the sampling slot state) and
stores the result back: `stage.kv_cache = writer(stage.kv_cache, ...)`. Python raises a
KeyboardInterrupt at the first bytecode after a signal arrives, and a Ctrl-C that arrives while the
call runs is raised as soon as it returns, before the store: the attribute is left holding the
donated (deleted) buffers and every later step fails with "Buffer has been deleted or donated".

`deferred_interrupts()` swaps in a SIGINT handler that only takes note for the length of such a
section, then puts the previous handler back and runs it with what arrived, so the
KeyboardInterrupt is raised just after the store. Signal handlers can only be set from the main
thread; elsewhere (where a KeyboardInterrupt is never raised anyway) it does nothing.

The engine core's state changes (`step`, `add_prepared`, `abort_request`) run whole under
`@uninterruptible` for the same reason on the host side: an interrupt between two of a step's
bookkeeping updates (a block allocated but not recorded, a request queued in the scheduler but not
in the core) would leave the engine inconsistent. A Ctrl-C then waits for the step in progress.
"""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_depth = 0  # nesting on the main thread: only the outermost section swaps handlers


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """SIGINT received inside the block is delivered right after it (at most once)."""
    global _depth
    if _depth or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler not installed from Python: it cannot be put back
        yield
        return
    received: list[tuple[int, object]] = []

    def take_note(signum: int, frame: object) -> None:
        received.append((signum, frame))

    signal.signal(signal.SIGINT, take_note)
    _depth = 1
    try:
        yield
    finally:
        _depth = 0
        signal.signal(signal.SIGINT, previous)
        if received:
            _deliver(previous, *received[0])


def _deliver(handler: object, signum: int, frame: object) -> None:
    """What the previous handler would have done with the signal."""
    if callable(handler):  # signal.default_int_handler raises KeyboardInterrupt here
        handler(signum, frame)
    elif handler == signal.SIG_DFL:  # the default action: ask the kernel for it now
        signal.raise_signal(signum)
    # SIG_IGN: nothing to do


def uninterruptible(method: Callable) -> Callable:
    """Run `method` whole under `deferred_interrupts()` (see the module docstring)."""

    @functools.wraps(method)
    def guarded(*args, **kwargs):
        with deferred_interrupts():
            return method(*args, **kwargs)

    return guarded
