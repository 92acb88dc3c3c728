"""How the README's test command spreads the suite over the CPUs (tests/conftest.py): the slowest
files first, the files that share the default model's engine on one worker, the rest a file per
xdist group, compiled fast, as many workers as the CPUs we are given; and CI runs exactly that
command."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from tests.conftest import (
    FAST_COMPILE_XLA_FLAG,
    SLOW_FILES_FIRST,
    SMOLLM2_GROUP,
    pytest_collection_modifyitems,
    pytest_xdist_make_scheduler,
    usable_cpus,
)
from tests.parallel.fake_devices import xla_flags_with_devices

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class FakeItem:
    nodeid: str


def test_every_named_file_exists():
    """A renamed file would silently drop out of the order (and out of the SmolLM2 group)."""
    missing = [name for name in SLOW_FILES_FIRST if not (ROOT / name).is_file()]
    assert missing == []
    assert set(SMOLLM2_GROUP) <= set(SLOW_FILES_FIRST)
    assert len(set(SLOW_FILES_FIRST)) == len(SLOW_FILES_FIRST)


def test_slow_files_go_first_in_order():
    late, early = SLOW_FILES_FIRST[-1], SLOW_FILES_FIRST[0]
    items = [
        FakeItem("tests/engine/test_seam.py::test_a"),
        FakeItem(f"{late}::test_b"),
        FakeItem("tests/engine/test_seam.py::test_c"),
        FakeItem(f"{early}::test_d[1]"),
        FakeItem(f"{SMOLLM2_GROUP[1]}::test_e"),
        FakeItem(f"{early}::test_d[2]"),
    ]
    pytest_collection_modifyitems(None, items)  # type: ignore[arg-type]
    assert [item.nodeid for item in items] == [
        f"{early}::test_d[1]",  # the order within a file is kept
        f"{early}::test_d[2]",
        f"{SMOLLM2_GROUP[1]}::test_e",
        f"{late}::test_b",
        "tests/engine/test_seam.py::test_a",  # the rest keep pytest's order
        "tests/engine/test_seam.py::test_c",
    ]


def test_the_scheduler_keeps_a_file_on_one_worker_and_the_smollm2_files_together():
    two_workers = SimpleNamespace(getvalue={"tx": ["popen", "popen"]}.get)  # what -n 2 sets
    scheduler = pytest_xdist_make_scheduler(two_workers, None)
    assert scheduler.numnodes == 2
    scope = scheduler._split_scope
    assert scope("tests/engine/test_seam.py::test_a") == "tests/engine/test_seam.py"
    assert scope("tests/engine/test_seam.py::test_b[x-1]") == "tests/engine/test_seam.py"
    assert scope("tests/engine/test_seam.py::TestClass::test_c") == "tests/engine/test_seam.py"
    assert {scope(f"{name}::test_x") for name in SMOLLM2_GROUP} == {"smollm2"}
    each = SimpleNamespace(getvalue={"tx": ["popen", "popen"], "dist": "each"}.get)
    assert pytest_xdist_make_scheduler(each, None) is None  # a mode asked for by name


def test_workers_compile_fast_and_a_plain_run_as_users_do():
    fast = FAST_COMPILE_XLA_FLAG in os.environ.get("XLA_FLAGS", "").split()
    assert fast == bool(os.environ.get("PYTEST_XDIST_WORKER"))


def test_child_processes_keep_the_compile_level(monkeypatch):
    flags = "--xla_force_host_platform_device_count=3 --xla_backend_optimization_level=0"
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert xla_flags_with_devices(2).split() == [
        "--xla_backend_optimization_level=0",
        "--xla_force_host_platform_device_count=2",
    ]


def test_workers_count_the_cpus_we_are_given():
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert usable_cpus() <= len(os.sched_getaffinity(0))


def _pytest_command(line: str) -> list[str]:
    words = shlex.split(line)
    return words[words.index("pytest") - 2 :]  # from "python -m pytest"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    (readme_line,) = [line for line in readme.splitlines() if "python -m pytest" in line]
    (ci_line,) = [
        line for line in (ROOT / ".ci/run").read_text().splitlines() if "python -m pytest" in line
    ]
    command = _pytest_command(readme_line.split("&&")[-1])
    assert command == _pytest_command(ci_line)
    assert command[command.index("-n") + 1] == "logical"  # every CPU, bounded by --maxprocesses


def test_pyproject_keeps_the_groups_in_order():
    """Without `--no-loadscope-reorder` xdist would start the groups with the most tests first,
    not the slowest."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    (addopts,) = [line for line in pyproject.splitlines() if line.startswith("addopts")]
    assert "--no-loadscope-reorder" in shlex.split(addopts.split("=", 1)[1].strip().strip('"'))
