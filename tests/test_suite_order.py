"""How the README's test command spreads the suite over the CPUs (tests/conftest.py): the slowest
files first, the files that share the default model's engine on one worker, the rest a file per
xdist group; and CI runs exactly that command."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import SLOW_FILES_FIRST, SMOLLM2_GROUP, pytest_collection_modifyitems

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class FakeItem:
    """The two things the hook reads or writes on a pytest.Item."""

    nodeid: str
    markers: list = field(default_factory=list)

    def add_marker(self, marker) -> None:
        self.markers.append(marker)

    def group(self) -> str:
        (mark,) = [m for m in self.markers if m.name == "xdist_group"]
        return mark.args[0]


def test_every_named_file_exists():
    """A renamed file would silently drop out of the order (and out of the SmolLM2 group)."""
    missing = [name for name in SLOW_FILES_FIRST if not (ROOT / name).is_file()]
    assert missing == []
    assert set(SMOLLM2_GROUP) <= set(SLOW_FILES_FIRST)
    assert len(set(SLOW_FILES_FIRST)) == len(SLOW_FILES_FIRST)


def test_slow_files_go_first_in_order_and_smollm2_files_share_a_group():
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
    groups = [item.group() for item in items]
    assert groups[:3] == ["smollm2"] * 3
    assert groups[3:] == [late, "tests/engine/test_seam.py", "tests/engine/test_seam.py"]


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


@pytest.mark.parametrize("option", ["--dist", "--no-loadscope-reorder"])
def test_pyproject_keeps_groups_whole_and_in_order(option):
    """`--dist loadgroup` keeps a group on one worker; without `--no-loadscope-reorder` xdist
    would start the groups with the most tests first instead of the slowest."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    (addopts,) = [line for line in pyproject.splitlines() if line.startswith("addopts")]
    words = shlex.split(addopts.split("=", 1)[1].strip().strip('"'))
    assert option in words
    if option == "--dist":
        assert words[words.index("--dist") + 1] == "loadgroup"
