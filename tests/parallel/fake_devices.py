"""Run a measuring worker module on 8 fake CPU devices, in a subprocess, and read its JSON.

The device count is fixed when JAX starts (`--xla_force_host_platform_device_count`) and the rest
of the suite runs on one device, so parallel tests measure in a child process (a worker module
that only measures and writes JSON) and assert in the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
NUM_DEVICES = 8


def xla_flags_with_devices(count: int) -> str:
    """XLA_FLAGS for a child process on `count` fake CPU devices, keeping this process's other
    flags (tests/conftest.py may have set the compile level)."""
    kept = [
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={count}"])


def run_worker(module: str, out: Path) -> dict:
    env = dict(os.environ, XLA_FLAGS=xla_flags_with_devices(NUM_DEVICES))
    subprocess.run(
        [sys.executable, "-m", module, str(out)], cwd=ROOT, env=env, check=True, timeout=900
    )
    results = json.loads(out.read_text())
    assert results["devices"] == NUM_DEVICES
    return results
