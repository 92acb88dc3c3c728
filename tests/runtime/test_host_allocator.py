"""The host-allocator tweak really changes where glibc puts a large block (checked in a subprocess,
since mallopt settings are process-wide and cannot be undone)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt is a glibc feature; elsewhere keep_freed_memory_mapped() is a no-op",
)

PROBE = """
import ctypes, sys
from jaxinfer.runtime.host_allocator import keep_freed_memory_mapped

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
if sys.argv[1] == "tuned":
    assert keep_freed_memory_mapped()
block = libc.malloc(64 << 20)
print(libc.mallinfo2().hblkhd)  # bytes in mmapped chunks
"""


def _mmapped_bytes(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


def test_large_blocks_come_from_the_heap_once_tuned():
    assert _mmapped_bytes("default") >= 64 << 20  # glibc's default: a fresh mmap per big block
    assert _mmapped_bytes("tuned") < 64 << 20  # tuned: from the heap, so kept after free
