"""The layering DESIGN.md asks for, held by tests: `engine/` and the seam never import JAX, and
`runtime/` never imports `engine/` (the seam is the one module both sides share)."""

import ast
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = REPO_ROOT / "jaxinfer"


def _modules(folder: str) -> list[str]:
    return sorted(
        f"jaxinfer.{folder}.{path.stem}"
        for path in (PACKAGE / folder).glob("*.py")
        if path.stem != "__init__"
    )


def test_every_engine_module_and_the_seam_import_without_jax() -> None:
    modules = [
        *_modules("engine"),
        "jaxinfer.seam",
        "jaxinfer.seeds",
        "jaxinfer.inputs",
        "jaxinfer.interrupts",
    ]
    assert len(modules) >= 15, modules  # the glob found the package
    code = (
        f"import importlib, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
        "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('jax.'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_runtime_never_imports_engine() -> None:
    offenders = {
        path.name: sorted(n for n in _imported_modules(path) if n.startswith("jaxinfer.engine"))
        for path in (PACKAGE / "runtime").glob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_engine_never_imports_runtime_or_jax_even_lazily() -> None:
    """Function-level imports too: the device side is wired in by `jaxinfer/llm.py` instead."""

    def device_side(name: str) -> bool:
        return name in ("jax", "jaxlib") or name.startswith(("jax.", "jaxinfer.runtime"))

    offenders = {
        path.name: sorted(filter(device_side, _imported_modules(path)))
        for path in (PACKAGE / "engine").glob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}
