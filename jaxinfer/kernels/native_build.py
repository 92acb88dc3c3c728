"""Compile a C++ source shipped with the package into a shared library, once per machine.

Why at first use and not at install: the kernels are built with `-march=native` (the int8 product
is only faster than XLA's path when it uses the host's vector instructions), so a wheel built
elsewhere could not carry them; and a compiler is on every machine this project runs on. The
library lands in the user's cache folder (`$JAXINFER_KERNEL_CACHE_DIR`, else
`$XDG_CACHE_HOME/jaxinfer/kernels/<cpu>`, next to the compilation cache), named by a hash of
everything that changes the binary: the source and the headers beside it, the flags, the
compiler's version, the jaxlib version (the FFI headers) and the CPU's feature flags. It is
written under a temporary name and renamed, so two processes building at once never load a
half-written file.

A missing compiler or a failed build is not an error: `build_shared_library` logs one warning
and returns None, and the caller keeps its XLA path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from jaxinfer.config import _host_cpu_tag

logger = logging.getLogger("jaxinfer")

KERNEL_CACHE_ENV = "JAXINFER_KERNEL_CACHE_DIR"
# -ffp-contract=off: only the fused multiply-adds the source asks for (the kernels' summation
# order, and so their batch invariance, is stated in the source, not chosen by the compiler).
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off")
BUILD_TIMEOUT_S = 300


def kernel_cache_dir() -> Path:
    configured = os.environ.get(KERNEL_CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "jaxinfer" / "kernels" / _host_cpu_tag()


def find_compiler() -> str | None:
    """`$CXX` if set, else the first C++ compiler on PATH."""
    configured = os.environ.get("CXX")
    if configured:
        return shutil.which(configured)
    for name in ("g++", "c++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _compiler_version(compiler: str) -> str:
    result = subprocess.run(
        [compiler, "--version"], check=False, capture_output=True, text=True, timeout=60
    )
    return result.stdout.strip()


def _local_headers(source: Path) -> list[str]:
    """Name and text of every `*.h` in the source's folder, sorted by name: what a quoted
    `#include` there can read. Hashed with the source, so that editing a shared header (the CPU
    kernels share cpu/lanes.h) names a new library instead of loading the stale one. Headers the
    source does not include count too: a needless rebuild costs seconds, a stale library wrong
    results."""
    return [f"{header.name}\n{header.read_text()}" for header in sorted(source.parent.glob("*.h"))]


def build_shared_library(
    source: Path, include_dirs: tuple[str, ...] = (), extra_flags: tuple[str, ...] = ()
) -> Path | None:
    """-> the path of `source` compiled into a shared library (cached), or None with a warning.

    `extra_flags` come after FLAGS (tests build the source's other instruction-set paths with
    `-mno-avx512f` and the like)."""
    import jaxlib

    compiler = find_compiler()
    if compiler is None:
        logger.warning(
            "jaxinfer: no C++ compiler found (set CXX or install g++); %s is not built and the "
            "XLA path is used instead",
            source.name,
        )
        return None
    command = [compiler, *FLAGS, *extra_flags, *(f"-I{d}" for d in include_dirs)]
    try:
        identity = "\n".join(
            [
                source.read_text(),
                *_local_headers(source),
                " ".join(command),
                _compiler_version(compiler),
                jaxlib.__version__,
                _host_cpu_tag(),
            ]
        )
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("jaxinfer: cannot build %s (%s); using the XLA path", source.name, error)
        return None
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    folder = kernel_cache_dir()
    target = folder / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=folder)
        os.close(handle)
        try:
            result = subprocess.run(
                [*command, str(source), "-o", temporary],
                check=False,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
            )
            if result.returncode != 0:
                logger.warning(
                    "jaxinfer: building %s failed, using the XLA path instead:\n%s",
                    source.name,
                    result.stderr.strip()[-4000:],
                )
                return None
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("jaxinfer: cannot build %s (%s); using the XLA path", source.name, error)
        return None
    logger.info("jaxinfer: built %s -> %s", source.name, target)
    return target


CPU_KERNELS_ENV = "JAXINFER_CPU_KERNELS"  # "0": XLA's paths only


def cpu_kernels_wanted() -> bool:
    """Whether a product traced now may go through a CPU kernel: the computation is for CPU (the
    default backend: the engine places its weights there) and `JAXINFER_CPU_KERNELS=0` does not
    switch the kernels off. The caller also needs its library loaded."""
    import jax

    if os.environ.get(CPU_KERNELS_ENV, "1").strip() == "0":
        return False
    return jax.default_backend() == "cpu"


class FfiKernelLibrary:
    """One C++ source's FFI handlers: built, loaded and registered for "cpu" once per process.

    `targets` maps each FFI target name to its handler symbol; `isa_symbol` names the function
    that says which instruction-set implementation the build holds. Each kernel module
    (int8_matmul, gguf_matmul, paged_attention_cpu) is one of these plus its `ffi_call` wrapper."""

    def __init__(self, source: Path, targets: dict[str, str], isa_symbol: str) -> None:
        self.source = source
        self.targets = dict(targets)
        self.isa_symbol = isa_symbol
        self._lock = threading.Lock()
        self._library: ctypes.CDLL | None = None
        self._attempted = False

    def load(self) -> ctypes.CDLL | None:
        """The loaded library, or None (one warning) when it cannot be built or loaded."""
        import jax

        with self._lock:
            if not self._attempted:
                self._attempted = True
                path = build_shared_library(self.source, include_dirs=(jax.ffi.include_dir(),))
                if path is not None:
                    try:
                        library = ctypes.CDLL(str(path))
                        for target, symbol in self.targets.items():
                            handler = jax.ffi.pycapsule(getattr(library, symbol))
                            jax.ffi.register_ffi_target(target, handler, platform="cpu")
                        getattr(library, self.isa_symbol).restype = ctypes.c_char_p
                    except (OSError, AttributeError) as error:  # unloadable file, missing symbol
                        logger.warning(
                            "jaxinfer: cannot load %s (%s); using the XLA path", path, error
                        )
                    else:
                        self._library = library
            return self._library

    def enabled(self) -> bool:
        """Whether a call traced now goes through this library: XLA:CPU, the CPU kernels not
        switched off (`JAXINFER_CPU_KERNELS=0`), and the library built and loaded."""
        return cpu_kernels_wanted() and self.load() is not None

    def call_threads(self, max_threads: int | None, threads_env: str) -> int:
        """For a call traced now: the thread limit to pass it (`max_threads`, else
        `$threads_env`, else 0: all of XLA's intra-op pool), after making sure the library is
        loaded (RuntimeError if it cannot be: callers ask `enabled()` first)."""
        if self.load() is None:
            raise RuntimeError(
                f"the kernels of {self.source.name} are not available (see the warning logged)"
            )
        if max_threads is None:
            max_threads = int(os.environ.get(threads_env, "0") or 0)
        return max_threads

    def isa(self) -> str | None:
        """Which of the source's implementations the build holds: avx512, avx2 or portable."""
        library = self.load()
        return None if library is None else getattr(library, self.isa_symbol)().decode()
