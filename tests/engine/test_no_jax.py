"""The host side must import without JAX: it is tested in milliseconds and runs on any machine."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_engine_host_modules_do_not_import_jax() -> None:
    code = (
        "import jaxinfer.engine.scheduler, jaxinfer.engine.block_manager, "
        "jaxinfer.engine.sequence; import sys; "
        "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('jax'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
