"""The README's guides run as written, with a tiny checkpoint in place of each config's model.

Every fenced block under `## Guides` runs, in order, per `###` section, in a fresh directory:
```python blocks through exec(), ```bash lines through the CLI's main() (`jaxinfer ...`) or a
byte comparison (`cmp A B`); any other shell command fails the test, so the README cannot show a
command nobody runs. A `configs/NAME.yaml` in a block is swapped for a copy that points at the
tiny checkpoint with the small shapes of configs/tiny-cpu-test.yaml (its sampling section kept).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from jaxinfer.cli import main

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ("From a script", "In a notebook", "Seeded evaluation")
CONFIG_PATH = re.compile(r"configs/[\w.-]+\.yaml")
SMALL_SHAPES = (
    "max_model_len",
    "num_kv_blocks",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_prefill_seqs",
    "seq_buckets",
    "token_buckets",
)


def guide_blocks() -> dict[str, list[tuple[str, str]]]:
    """`### heading` -> [(language, code), ...] for the fenced blocks under `## Guides`."""
    text = (ROOT / "README.md").read_text()
    guides = text.split("\n## Guides\n", 1)[1].split("\n## ", 1)[0]
    sections: dict[str, list[tuple[str, str]]] = {}
    for chunk in guides.split("\n### ")[1:]:
        heading, body = chunk.split("\n", 1)
        sections[heading.strip()] = re.findall(r"```(\w+)\n(.*?)```", body, flags=re.DOTALL)
    return sections


def tiny_copy(name: str, model: Path, folder: Path) -> Path:
    config = yaml.safe_load((ROOT / name).read_text())
    small = yaml.safe_load((ROOT / "configs" / "tiny-cpu-test.yaml").read_text())
    config.update({key: small[key] for key in SMALL_SHAPES}, model=str(model))
    config.pop("compilation_cache_dir", None)  # JAX's cache is process-wide: not from a test
    path = folder / Path(name).name
    path.write_text(yaml.safe_dump(config))
    return path


def run_shell(line: str) -> None:
    command, *args = shlex.split(line)
    if command == "jaxinfer":
        assert main([*args, "--no-progress"] if args[0] == "eval" else args) == 0, line
    elif command == "cmp":
        first, second = (Path(a).read_bytes() for a in args)
        assert first == second, f"{line}: the files differ"
    else:
        raise AssertionError(f"README shell command not run by this test: {line!r}")


def test_every_guide_has_an_example():
    sections = guide_blocks()
    for heading in GUIDES:
        assert any(lang == "python" for lang, _ in sections.get(heading, [])), heading


@pytest.mark.parametrize("heading", GUIDES)
def test_guide_example_runs(heading, tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    configs = tmp_path / "tiny-configs"
    configs.mkdir()
    for language, code in guide_blocks()[heading]:
        names = set(CONFIG_PATH.findall(code))
        assert names, f"{heading}: the example names no configs/*.yaml to point at a tiny model"
        for name in names:
            code = code.replace(name, str(tiny_copy(name, tiny_llama, configs)))
        if language == "python":
            namespace = {"__name__": "__readme__"}
            exec(compile(code, f"README.md ({heading})", "exec"), namespace)  # noqa: S102 (our README)
        elif language == "bash":
            for line in code.splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    run_shell(line)
        else:
            raise AssertionError(f"{heading}: a ```{language} block this test cannot run")
    printed = capsys.readouterr().out
    if heading == "From a script":
        assert printed.count("'") >= 4 and ("length" in printed or "stop" in printed)
    if heading == "In a notebook":
        import matplotlib.pyplot as plt

        (line,) = plt.gca().lines
        assert len(line.get_ydata()) >= 1 and max(line.get_ydata()) <= 0  # logprobs
        plt.close("all")
    if heading == "Seeded evaluation":
        results = (tmp_path / "results.jsonl").read_text().splitlines()
        assert len(results) == 1 + 4  # header, france, story, colour x2
        assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "results.jsonl").read_bytes()
